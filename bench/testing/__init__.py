"""Test support that ships with the package: the golden fixtures' fill rules (`bench.testing.fills`)."""
