"""One record per cell: its key, atomic write (the project's one: `atomic_write`), skip-if-done, and provenance.

A record is a flat JSON dict (plus a `per_class` list) written to `results/runs/<key>.json` with a temp file and
`os.replace`, so a killed process never leaves a half-written record, and concurrent writers never corrupt one.
The key is a stable hash of the part of the resolved config that determines the result (bench.config).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import functools
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from typing import Any, BinaryIO, Callable, Iterator

import torch

from bench import BenchError

STATUS_OK, STATUS_MISSING, STATUS_ERROR = "ok", "missing", "error"


def key_inputs(config: dict) -> dict:
    """The part of a resolved config that the key hashes (stored in the record): `bench.config.result_part`."""
    from bench.config import result_part

    return result_part(config)


def _str_keys(value):
    """Mapping keys as strings, recursively: `{7: "bed ", 11: "sidewalk"}` from a YAML file and the same mapping
    after a JSON round trip (the isolated cell's child) must hash alike; sorting int keys and str keys differs."""
    if isinstance(value, dict):
        return {str(k): _str_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_str_keys(v) for v in value]
    return value


def cell_key(config: dict) -> str:
    """Stable hash of the result-determining part of a resolved config (clarifications §17)."""
    blob = json.dumps(_str_keys(key_inputs(config)), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def runs_dir(results_dir: str) -> str:
    return os.path.join(results_dir, "runs")


def record_path(results_dir: str, key: str) -> str:
    return os.path.join(runs_dir(results_dir), f"{key}.json")


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def write_error(path: str, e: OSError, setting: str = "results_dir") -> BenchError:
    """The one-line BenchError for an OSError while writing `path`: the path, the errno text and the fix."""
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    what = f"{e.strerror or type(e).__name__}" + (f" ({code})" if code else "")
    fix = (f"free space on that disk, or set {setting}=<a folder on another disk>" if e.errno in _NO_SPACE
           else f"set {setting}=<a writable folder>")
    return BenchError(f"cannot write {path}: {what}; {fix}")


@functools.lru_cache(maxsize=1)
def _file_mode() -> int:
    """0o666 minus the process umask: what `open()` would create (mkstemp's own 0600 hides results on shared
    clusters). Read from /proc where it can be, as `os.umask` can only be read by setting it."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, content: bytes | str | Callable[[BinaryIO], None], setting: str = "results_dir") -> None:
    """Write `path` whole or not at all: a temp file `.tmp-<pid>-<random>.<name>` beside it (mode from the umask;
    the pid tells a cleaner whether its writer is alive), fsync, `os.replace`. `content` is bytes, text (UTF-8)
    or a function writing to the binary file object (`lambda f: torch.save(obj, f)`). Any OSError (a full disk,
    a read-only or forbidden folder) removes the temp file and raises one BenchError line (`write_error`, naming
    `setting` as the way out), with nothing chained."""
    folder = os.path.dirname(path) or "."
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=f".{os.path.basename(path)[:100]}",
                                   dir=folder)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode())
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e, setting) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def atomic_write_json(path: str, obj: Any, setting: str = "results_dir") -> None:
    """`obj` as indented JSON (NaN allowed), through `atomic_write`."""
    atomic_write(path, json.dumps(obj, indent=1, default=_json_default, allow_nan=True), setting)


def lock_path(results_dir: str, key: str) -> str:
    return os.path.join(results_dir, "locks", f"{key}.lock")   # beside runs/, which holds records only


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def cell_lock(results_dir: str, key: str) -> Iterator[str]:
    """Hold `<results_dir>/locks/<key>.lock` (an exclusive, non-blocking `flock`) while cell `key` is computed; yields its path.

    Held elsewhere (another sweep, or a cell process whose sweep was killed): one-line BenchError naming the
    holder's pid. The kernel drops a lock with its process, so a kill -9 never leaves the cell locked; the file
    is removed only by its holder, while it still holds it (a lock taken on a file that was removed meanwhile is
    retaken on the new one)."""
    path = lock_path(results_dir, key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _file_mode())
        except OSError as e:
            raise write_error(path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise BenchError(f"cell {key} is being computed by another process (pid {holder}); wait for it to "
                             f"finish, or stop that process (lock {path})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)                              # its holder removed it between our open and our lock: again
    try:
        with contextlib.suppress(OSError):      # the pid is for the message only (a full disk may refuse it)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        try:
            os.unlink(path)                       # ours: we still hold it
        except OSError:
            pass
        os.close(fd)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def read_record(path: str) -> dict | None:
    """A record, or None if it is absent or unreadable (never raises on a damaged file)."""
    try:
        with open(path) as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None


def load_records(results_dir: str) -> list[dict]:
    folder = runs_dir(results_dir)
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith("."))
    return [r for r in (read_record(os.path.join(folder, n)) for n in names) if r is not None and "key" in r]


def is_done(results_dir: str, key: str) -> bool:
    rec = read_record(record_path(results_dir, key))
    return bool(rec) and rec.get("status") == STATUS_OK


def git_sha() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        sha = out.stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def provenance(device: torch.device) -> dict:
    driver = ""
    if device.type == "cuda":
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = "unknown"
    return {
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "device_type": device.type,
        "device_name": device_name(device),
        "driver": driver,
        "hostname": platform.node(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def atomic_write_text(path: str, text: str, setting: str = "results_dir") -> None:
    """A text file (tables, pages) through `atomic_write`: never seen half-written."""
    atomic_write(path, text, setting)
