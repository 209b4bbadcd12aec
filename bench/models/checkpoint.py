"""Loading published checkpoints: safe unpickling, the `{'model': sd}` wrapper, strict load with a key diff.

`load_checkpoint(model, path, ...)` is the one way weights get into a model, for real checkpoints and for the
golden fixtures alike. It returns a small report (sha256, ignored/tolerated keys) that goes into the record.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass, field

import torch
from torch import nn

from bench import BenchError


@dataclass
class LoadReport:
    path: str
    sha256: str
    ignored_keys: list[str] = field(default_factory=list)      # present in the file, dropped on purpose
    absent_optional: list[str] = field(default_factory=list)   # tolerated missing keys (kept at module defaults)

    def note(self) -> str:
        parts = []
        if self.ignored_keys:
            parts.append(f"ignored {len(self.ignored_keys)} unused published keys")
        if self.absent_optional:
            parts.append("checkpoint lacks " + ", ".join(self.absent_optional) + " (module defaults kept)")
        return "; ".join(parts)


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True; unwrap {'model': sd} / {'state_dict': sd}; strip a `module.` prefix."""
    if not os.path.isfile(path):
        raise BenchError(f"checkpoint not found: {path} (put the published file there, or set weights_dir=...)")
    if os.path.getsize(path) == 0:
        raise BenchError(f"checkpoint {path} is empty (0 bytes): download it again")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except pickle.UnpicklingError as e:
        if allow_unsafe_pickle:
            raise BenchError(f"checkpoint {path} is not a readable checkpoint: {_first_line(e)}") from e
        raise BenchError(f"checkpoint {path} was refused by torch.load(weights_only=True) ({_first_line(e)}); "
                         "if you trust the file, rerun with allow_unsafe_pickle=true") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise BenchError(f"checkpoint {path} is truncated or not a torch checkpoint ({_first_line(e)}): "
                         "download it again") from e
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BenchError(f"checkpoint {path} holds no state_dict (found {type(obj).__name__}): "
                         "point weights_dir at the published .pth")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def key_diff(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape mismatches as 'key: file [..] vs model [..]')."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: file {list(state_dict[k].shape)} vs model {list(v.shape)}"
              for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    return missing, unexpected, shapes


def format_diff(missing: list[str], unexpected: list[str], shapes: list[str], limit: int = 5) -> str:
    def part(name: str, items: list[str]) -> str:
        shown = ", ".join(items[:limit]) + (f", ... (+{len(items) - limit})" if len(items) > limit else "")
        return f"{len(items)} {name} [{shown}]" if items else ""

    return "; ".join(p for p in (part("missing", missing), part("unexpected", unexpected),
                                 part("shape mismatches", shapes)) if p)


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state_dict",
                           ignore_prefixes: tuple[str, ...] = (), optional_keys: tuple[str, ...] = ()) -> LoadReport:
    """Strict load. Keys under `ignore_prefixes` are dropped (reported); `optional_keys` may be absent."""
    ignored = sorted(k for k in state_dict if k.startswith(tuple(ignore_prefixes))) if ignore_prefixes else []
    state_dict = {k: v for k, v in state_dict.items() if k not in set(ignored)}
    missing, unexpected, shapes = key_diff(model, state_dict)
    absent_optional = [k for k in missing if k in optional_keys]
    if absent_optional and len(absent_optional) != len(optional_keys):
        absent_optional = []  # only the exact set of optional keys may be absent
    missing = [k for k in missing if k not in absent_optional]
    if missing or unexpected or shapes:
        raise BenchError(f"checkpoint {source} does not match {type(model).__name__}: "
                         f"{format_diff(missing, unexpected, shapes)}")
    own = model.state_dict()
    for k in absent_optional:
        state_dict[k] = own[k]
    model.load_state_dict(state_dict, strict=True)
    return LoadReport(path=source, sha256="", ignored_keys=ignored, absent_optional=absent_optional)


def load_checkpoint(model: nn.Module, path: str, ignore_prefixes: tuple[str, ...] = (),
                    optional_keys: tuple[str, ...] = (), allow_unsafe_pickle: bool = False) -> LoadReport:
    state_dict = read_state_dict(path, allow_unsafe_pickle)
    report = load_state_dict_strict(model, state_dict, path, ignore_prefixes, optional_keys)
    report.sha256 = sha256_of(path)
    return report
