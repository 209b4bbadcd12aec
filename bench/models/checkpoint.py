"""Loading published checkpoints: safe unpickling, the `{'model': sd}` wrapper, strict load with a key diff.

`load_checkpoint(model, path, ...)` is the one way weights get into a model, for real checkpoints and for the
golden fixtures alike. It returns a small report (sha256, ignored/tolerated keys) that goes into the record.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import pickletools
import re
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
    sha256_mismatch: str = ""                                   # the published sha256 when this file's differs

    def note(self) -> str:
        parts = []
        if self.sha256_mismatch:
            parts.append(f"sha256 {self.sha256[:12]}… is not the published {self.sha256_mismatch[:12]}…")
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


class PickleRefused(BenchError):
    """A real torch checkpoint whose pickle names a global the safe loader (weights_only=True) refuses."""

    def __init__(self, message: str, global_name: str):
        super().__init__(message)
        self.global_name = global_name


# legacy (pre-zip) torch.save files begin with this pickled number, then protocol version, sys info, the object
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _expected(size: int, expected_size: int | None, expected_sha256: str | None) -> str:
    """' (this file has N bytes, the published one N; sha256 …)' for a re-download hint; '' when nothing is known."""
    parts = [f"this file has {size:,} bytes" + (f", the published one {expected_size:,}" if expected_size else "")]
    if expected_sha256:
        parts.append(f"published sha256 {expected_sha256}")
    return f" ({'; '.join(parts)})" if expected_size or expected_sha256 else ""


def _starts_like_text(head: bytes) -> str:
    shown = head[:24].decode("latin-1")
    if not shown.strip() or not all(c.isprintable() or c.isspace() for c in shown):
        return "unrecognised bytes"
    return f"it starts with {' '.join(shown.split())!r}: an error or login page?"


def _container_problem(path: str) -> str:
    """Why `path` is not a torch checkpoint container ('' when it is a torch zip or a legacy torch pickle)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "truncated or corrupt: the zip archive has no readable central directory (a download cut short?)"
        if not any(n.endswith("/data.pkl") for n in names):
            return f"not a torch checkpoint: a zip archive without data.pkl (it holds {names[:3]})"
        return ""
    if head.startswith(b"\x80"):
        try:
            first = next(a for op, a, _ in pickletools.genops(io.BytesIO(head)) if op.name in ("LONG1", "LONG4"))
        except (ValueError, StopIteration):
            first = None
        if first == _LEGACY_MAGIC:
            return ""
        return "not a torch checkpoint: a Python pickle without torch.save's header"
    return f"not a torch checkpoint ({_starts_like_text(head)})"


def read_state_dict(path: str, allow_unsafe_pickle: bool = False, expected_size: int | None = None,
                    expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True; unwrap {'model': sd} / {'state_dict': sd}; strip a `module.` prefix.

    A file that is no torch checkpoint, or a truncated/corrupt one, is a BenchError asking for a re-download (with
    the published size and sha256 when given); a real checkpoint whose pickle needs a global the safe loader
    refuses is a `PickleRefused` naming that global, and only then mentions `allow_unsafe_pickle=true`."""
    if not os.path.isfile(path):
        raise BenchError(f"checkpoint not found: {path} (put the published file there, or set weights_dir=...)")
    size = os.path.getsize(path)
    again = f"download it again{_expected(size, expected_size, expected_sha256)}"
    if size == 0:
        raise BenchError(f"checkpoint {path} is empty (0 bytes): {again}")
    problem = _container_problem(path)
    if problem:
        raise BenchError(f"checkpoint {path} is {problem}; {again}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except pickle.UnpicklingError as e:
        name = _REFUSED_GLOBAL.search(str(e))
        if name and not allow_unsafe_pickle:
            raise PickleRefused(f"checkpoint {path} needs the Python global {name.group(1)}, which the safe loader "
                                "(torch.load weights_only=True) refuses since unpickling it can run code; if you "
                                "trust the file's source, rerun with allow_unsafe_pickle=true",
                                name.group(1)) from None
        raise BenchError(f"checkpoint {path} is corrupt: its pickle does not parse; {again}") from None
    except (ModuleNotFoundError, AttributeError) as e:   # allow_unsafe_pickle=true: the global's code is absent
        raise BenchError(f"checkpoint {path} needs {getattr(e, 'name', None) or _first_sentence(e)} to unpickle "
                         "(allow_unsafe_pickle=true imports what the file names): install it, or use a plain "
                         "state_dict file") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError) as e:
        raise BenchError(f"checkpoint {path} is truncated or corrupt ({_first_sentence(e)}); {again}") from None
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BenchError(f"checkpoint {path} holds no state_dict (found {type(obj).__name__}): "
                         "point weights_dir at the published .pth")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _first_sentence(e: BaseException) -> str:
    """The first sentence of an exception's first line (whole, never cut mid-sentence), else its type."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    head = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", lines[0])   # torch's C++ source location
    return re.split(r"(?<=[.!?])\s", head, maxsplit=1)[0].rstrip(".") or type(e).__name__


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
                    optional_keys: tuple[str, ...] = (), allow_unsafe_pickle: bool = False,
                    expected_size: int | None = None, expected_sha256: str | None = None) -> LoadReport:
    """Read `path` and load it strictly. `expected_size` / `expected_sha256` (the model config's `checkpoint.size`
    / `.sha256`, None when unpublished) go into the re-download hint, and a loadable file whose sha256 differs is
    noted in the report (torch does not checksum tensor data: a flipped byte loads)."""
    state_dict = read_state_dict(path, allow_unsafe_pickle, expected_size, expected_sha256)
    report = load_state_dict_strict(model, state_dict, path, ignore_prefixes, optional_keys)
    report.sha256 = sha256_of(path)
    if expected_sha256 and report.sha256 != expected_sha256.lower():
        report.sha256_mismatch = expected_sha256.lower()
    return report
