"""The `key=value` arguments of the small commands (bench.fetch, bench.data.synth, bench.data.prepare,
bench.data.check), parsed one way (clarifications §19: every command takes Hydra-style overrides).

    opts, rest = parse_overrides(argv, {"root": str, "n_images": int, "force": bool, "datasets": list}, usage)

Each key the command owns is converted by its kind (str; bool: true/false/1/0/yes/no/on/off; int; list: `[a,b]` or
`a,b`; `key=` with no value leaves the key unset, at its default), a leading `+` allowed. Anything else fails with one line naming the valid
keys, unless `passthrough(arg)` accepts it: those arguments are returned untouched, in order (fetch hands them to
Hydra's compose, check applies `dataset.*` onto the dataset config). A main prints the error with `error` and
exits 2.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Mapping

from bench import BenchError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _to_bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise BenchError(f"{key}={value}: expected true or false")


def _to_int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise BenchError(f"{key}={value}: expected an integer") from None


def _to_list(key: str, value: str) -> list[str]:
    items = value.strip().removeprefix("[").removesuffix("]").split(",")
    return [s.strip().strip("'\"") for s in items if s.strip()]


_KINDS: dict[type, Callable[[str, str], Any]] = {bool: _to_bool, int: _to_int, list: _to_list,
                                                  str: lambda key, value: value}


def parse_overrides(argv: list[str], keys: Mapping[str, type], usage: str,
                    passthrough: Callable[[str], bool] | None = None) -> tuple[dict[str, Any], list[str]]:
    """(this command's keys -> converted values, the passed-through arguments); BenchError on a bad argument."""
    opts: dict[str, Any] = {}
    rest: list[str] = []
    unknown: list[str] = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        bare = key.lstrip("+")
        if bare in keys:
            if not eq:
                raise BenchError(f"{arg}: expected {bare}=VALUE ({usage})")
            if value:
                opts[bare] = _KINDS[keys[bare]](bare, value)
            else:
                opts.pop(bare, None)
        elif passthrough is not None and passthrough(arg):
            rest.append(arg)
        elif not eq or arg.startswith("-"):
            raise BenchError(f"unexpected argument {arg!r}: use key=value ({usage})")
        else:
            unknown.append(bare)
    if unknown:
        raise BenchError(f"unknown argument(s) {sorted(unknown)}; allowed: {sorted(keys)}")
    return opts, rest


def error(e: BaseException | str, code: int = 2) -> int:
    """Print `error: <one line>` to stderr; returns the exit code."""
    print(f"error: {e}", file=sys.stderr)
    return code
