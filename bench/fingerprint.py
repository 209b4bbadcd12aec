"""Fingerprints of a cell's inputs (the checkpoint file, the dataset's file list) and the one-line reason a cell
is recomputed when they changed (issue 18 item 2).

* `checkpoint_fingerprint(path)`: {file, size, mtime_ns, sha256}. The sha256 is computed once per (file, size,
  mtime_ns) and kept in a small JSON cache (`.checkpoint_sha256.json` beside the checkpoint, or under a given
  cache folder), so a 1.8 GB file is hashed once, not per cell. A cache that cannot be written is only logged.
* `dataset_fingerprint(files)`: {root, n_images, list_sha256}, the hash over the sorted relative names and sizes,
  so the same dataset under another root has the same fingerprint.
* `describe_change(old, new)`: '' when the inputs are the same, else e.g. "checkpoint weights/san_vit_b_16.pth
  changed (sha256 ab12cd34… -> 9f8e7d6c…)" or "dataset now has 2000 images, record has 2".

Pure functions on files; which fingerprints a record stores and when a cell is skipped is the cell runner's call.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping, Sequence

from bench import BenchError
from bench.records import atomic_write

log = logging.getLogger(__name__)

CACHE_FILE = ".checkpoint_sha256.json"


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _cache_path(path: str, cache_dir: str | None) -> str:
    return os.path.join(cache_dir if cache_dir else os.path.dirname(os.path.abspath(path)), CACHE_FILE)


def _read_cache(cache: str) -> dict[str, dict]:
    try:
        with open(cache) as f:
            entries = json.load(f).get("entries", {})
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}                                # absent or damaged: start again, never trust a half file


def _write_cache(cache: str, key: str, entry: dict) -> None:
    entries = _read_cache(cache)                 # re-read: another process may have added its own file
    entries[key] = entry
    try:
        atomic_write(cache, json.dumps({"entries": entries}, indent=1, sort_keys=True))
    except BenchError as e:                      # a read-only weights folder: hash again next time, go on
        log.warning("sha256 cache not saved (%s)", e)


def checkpoint_fingerprint(path: str, cache_dir: str | None = None) -> dict[str, Any]:
    """{file (as given), size, mtime_ns, sha256} of a checkpoint; the sha256 from the cache when size and
    mtime_ns are those it was computed for."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise BenchError(f"cannot read checkpoint {path}: {e.strerror}; put the file there or set weights_dir=...") \
            from None
    cache, key = _cache_path(path, cache_dir), os.path.realpath(path)
    hit = _read_cache(cache).get(key, {})
    if hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns and hit.get("sha256"):
        return {"file": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hit["sha256"]}
    digest = sha256_file(path)
    after = os.stat(path)
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise BenchError(f"checkpoint {path} changed while it was hashed (a download or copy still running?); "
                         "rerun when it is complete")
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    _write_cache(cache, key, entry)
    return {"file": path, **entry}


def dataset_fingerprint(files: Sequence[str], root: str | None = None, n_images: int | None = None) -> dict[str, Any]:
    """{root, n_images, list_sha256}: sha256 over the sorted names relative to `root` (default: the files'
    common folder), each with its size in bytes. Pass the label files too to cover them, with `n_images` the number
    of images (default len(files))."""
    paths = [os.path.abspath(p) for p in files]
    if root is None:
        root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    h = hashlib.sha256()
    for rel, size in sorted((os.path.relpath(p, root).replace(os.sep, "/"), os.path.getsize(p)) for p in paths):
        h.update(f"{rel}\t{size}\n".encode())
    return {"root": root, "n_images": len(paths) if n_images is None else n_images, "list_sha256": h.hexdigest()}


def _short(sha: str | None) -> str:
    return f"{sha[:8]}…" if sha else "none"


def _checkpoint_change(old: Mapping | None, new: Mapping | None) -> str:
    if not old:
        return ""                                # the record predates fingerprints (or weights were synthesized)
    if not new:
        return f"checkpoint {old.get('file')} is no longer used (record had sha256 {_short(old.get('sha256'))})"
    if old.get("sha256") == new.get("sha256"):
        return ""                                # touched or copied, same bytes
    return f"checkpoint {new.get('file')} changed (sha256 {_short(old.get('sha256'))} -> {_short(new.get('sha256'))})"


def _dataset_change(old: Mapping | None, new: Mapping | None) -> str:
    if not old or not new:
        return ""
    if old.get("n_images") != new.get("n_images"):
        return f"dataset now has {new.get('n_images')} images, record has {old.get('n_images')}"
    if old.get("list_sha256") != new.get("list_sha256"):
        return (f"dataset {new.get('root')} file list changed ({new.get('n_images')} images, list sha256 "
                f"{_short(old.get('list_sha256'))} -> {_short(new.get('list_sha256'))})")
    return ""


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """One line saying why a cell's inputs differ, '' when they do not. `old` / `new`: {"checkpoint":
    checkpoint_fingerprint(...) or None, "dataset": dataset_fingerprint(...)}. A part `old` lacks is no change (a
    record written before fingerprints stays done, clarifications §22); only the sha256 of a checkpoint counts."""
    parts = [_checkpoint_change(old.get("checkpoint"), new.get("checkpoint")),
             _dataset_change(old.get("dataset"), new.get("dataset"))]
    return "; ".join(p for p in parts if p)
