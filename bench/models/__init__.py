"""Model families (one file each) and the registry that maps builder names to them.

Importing this package registers every family's builders (explicitly, below), like timm's model modules. Models
from outside the package come in through `create_model` too: an entry point of the group `ovseg_bench.models`
or a dotted path `package.module:function` (see `bench.models.registry`).
"""
from bench.models.registry import create_model, list_models, register_model  # noqa: F401
from bench.models import catseg, san, scan, simseg  # noqa: F401,E402
