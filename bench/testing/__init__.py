"""Test helpers that ship with the package: `check_model` (the `OVSegModel` surface, for any model)."""
from bench.testing.check import ModelCheckError, check_model  # noqa: F401
