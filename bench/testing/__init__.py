"""Test support that ships with the package: `check_model` (the `OVSegModel` surface, for any model) and the
golden fixtures' fill rules (`bench.testing.fills`, also the weights of `profile.weights=golden`)."""
from bench.testing.check import ModelCheckError, check_model  # noqa: F401
