"""Model registry: builder name -> function returning an `OVSegModel` (like timm's `register_model`).

A config's `builder` is one of three things, looked up in this order:
- a name registered in this package (`@register_model("san_vit_b_16")`);
- a name registered by an installed package under the entry-point group `ovseg_bench.models`
  (`[project.entry-points."ovseg_bench.models"] my_model = "mypkg.models:build"`), discovered on the first lookup
  of a name this package does not register, imported only when that builder is used;
- a dotted path `package.module:function` to any importable callable (the module must be on `PYTHONPATH`).
A builder from outside the package must return an `OVSegModel`; every failure is one BenchError naming it.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import logging
from typing import Any, Callable

from bench import BenchError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ovseg_bench.models"

_BUILDERS: dict[str, Callable] = {}
_entry_points: dict[str, importlib.metadata.EntryPoint] | None = None   # name -> entry point, once discovered


def register_model(name: str) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        if name in _BUILDERS:
            raise ValueError(f"model builder {name!r} registered twice")
        _BUILDERS[name] = fn
        return fn

    return wrap


def register_config(name: str, model_cls: type, cfg: Any, doc: str) -> Callable:
    """Register `name` as the builder `(protocol=None, **overrides) -> model_cls(cfg, protocol)`: the model config is
    data (a dataclass instance), `overrides` replace its fields (e.g. a tiny variant of the same code), and the model
    comes back frozen (no gradients) in eval mode. Returns the builder (`doc` is its docstring)."""

    def build(protocol: Any = None, **overrides):
        model = model_cls(dataclasses.replace(cfg, **overrides) if overrides else cfg, protocol)
        return model.requires_grad_(False).eval()

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{doc} `overrides` replace {type(cfg).__name__} fields."
    return register_model(name)(build)


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """The installed packages' builders (group `ovseg_bench.models`), discovered once; names this package
    registers itself win (a warning says which entry point is shadowed)."""
    global _entry_points
    if _entry_points is None:
        found = {}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in _BUILDERS:
                log.warning("entry point %s = %s is shadowed by the built-in model builder of that name",
                            ep.name, ep.value)
            else:
                found[ep.name] = ep
        _entry_points = found
    return _entry_points


def list_models() -> list[str]:
    """Registered builder names: this package's and installed packages' (dotted paths are not listed)."""
    return sorted(set(_BUILDERS) | set(entry_points()))


def resolve_builder(path: str, what: str | None = None) -> Callable:
    """`package.module:attr` (attr may be dotted) -> the callable; `what` names it in errors (default: the path)."""
    what = what or f"model builder {path!r}"
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise BenchError(f"{what}: a dotted builder path is 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name) and module_name[len(e.name):][:1] in ("", "."):
            raise BenchError(f"{what}: cannot import module {module_name!r} (no module named {e.name!r}); put "
                             "the folder above its package on PYTHONPATH or pip install the package") from e
        raise BenchError(f"{what}: importing module {module_name!r} failed: {e}; install what it needs") from e
    except Exception as e:  # anything the user's module raises while it is imported
        detail = str(e).splitlines()[0] if str(e) else ""
        raise BenchError(f"{what}: importing module {module_name!r} failed ({type(e).__name__}: {detail})") from e
    try:
        fn = functools.reduce(getattr, attr.split("."), module)
    except AttributeError as e:
        raise BenchError(f"{what}: module {module_name!r} has no attribute {attr!r}") from e
    if not callable(fn):
        raise BenchError(f"{what}: {attr!r} in {module_name!r} is not callable (type {type(fn).__name__})")
    return fn


def get_builder(name: str) -> Callable:
    if name in _BUILDERS:
        return _BUILDERS[name]
    if name in entry_points():
        ep = entry_points()[name]
        target = f"{ep.module}:{ep.attr}" if ep.attr else ep.module
        return resolve_builder(target, f"model builder {name!r} (entry point {ENTRY_POINT_GROUP}: {ep.value})")
    if ":" in name:
        return resolve_builder(name)
    raise BenchError(f"unknown model builder {name!r}; registered: {', '.join(list_models())}; "
                     "or give a dotted path 'package.module:function'")


def create_model(name: str, **kwargs):
    """Build the model `name` (registered name, entry point or dotted path) with the config's builder_kwargs.
    A builder from outside the package must return an `OVSegModel` (the package's own are tested for it)."""
    from bench.models.base import OVSegModel

    model = get_builder(name)(**kwargs)
    if name not in _BUILDERS and not isinstance(model, OVSegModel):
        raise BenchError(f"model builder {name!r} returned a {type(model).__name__}, not an OVSegModel "
                         "(subclass bench.models.base.OVSegModel)")
    return model
