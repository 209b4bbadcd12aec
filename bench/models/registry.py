"""Model registry: builder name -> function returning an `OVSegModel` (like timm's `register_model`)."""
from __future__ import annotations

from typing import Callable

from bench import BenchError

_BUILDERS: dict[str, Callable] = {}


def register_model(name: str) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        if name in _BUILDERS:
            raise ValueError(f"model builder {name!r} registered twice")
        _BUILDERS[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def create_model(name: str, **kwargs):
    if name not in _BUILDERS:
        raise BenchError(f"unknown model builder {name!r}; registered: {', '.join(list_models())}")
    return _BUILDERS[name](**kwargs)
