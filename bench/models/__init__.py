"""Model families (one file each) and the registry that maps builder names to them."""
from bench.models.registry import create_model, list_models, register_model  # noqa: F401
