"""One record per cell: its key, atomic write, skip-if-done, and provenance.

A record is a flat JSON dict (plus a `per_class` list) written to `results/runs/<key>.json` with a temp file and
`os.replace`, so a killed process never leaves a half-written record, and concurrent writers never corrupt one.
The key is a stable hash of the part of the resolved config that determines the result (bench.config).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from typing import Any

import torch

from bench import BenchError

STATUS_OK, STATUS_MISSING, STATUS_ERROR = "ok", "missing", "error"


def key_inputs(config: dict) -> dict:
    """The part of a resolved config that the key hashes (stored in the record): `bench.config.result_part`."""
    from bench.config import result_part

    return result_part(config)


def cell_key(config: dict) -> str:
    """Stable hash of the result-determining part of a resolved config (clarifications §17)."""
    blob = json.dumps(key_inputs(config), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def runs_dir(results_dir: str) -> str:
    return os.path.join(results_dir, "runs")


def record_path(results_dir: str, key: str) -> str:
    return os.path.join(runs_dir(results_dir), f"{key}.json")


def atomic_write_json(path: str, obj: Any) -> None:
    """Write JSON to `path` through a temp file in the same folder + fsync + rename."""
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    except OSError as e:
        raise BenchError(f"cannot write results under {folder}: {e.strerror}; set results_dir=<a writable folder>") \
            from e
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_json_default, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file through a temp file + rename (tables are never seen half-written)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
