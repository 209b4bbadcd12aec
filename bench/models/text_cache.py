"""On-disk cache of class text features, keyed by the text tower's weights and the exact prompts.

A-847 and PC-459 vocabularies are 847 / 459 classes x 14 templates: thousands of text-tower forwards that give
the same features for the same (weights, prompts). `encode_with_templates` (bench.models.clip) consults this cache
when the entry point has set a folder with `set_cache_dir` (the cell runner does: `results/cache/text/`).
The key is sha256 over every text-tower tensor's bytes plus the prompts, so a different checkpoint, dtype or
vocabulary never hits a stale entry.
"""
from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from bench.records import atomic_write

_cache_dir: str | None = None


def set_cache_dir(path: str | None) -> None:
    global _cache_dir
    _cache_dir = path


def cache_dir() -> str | None:
    return _cache_dir


def _fingerprint(module: nn.Module, prompts: list[str]) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update("\n".join(prompts).encode())
    return h.hexdigest()[:32]


def cached(module: nn.Module, prompts: list[str], compute) -> torch.Tensor:
    """compute() unless a cached tensor exists for (module weights, prompts); the result is stored atomically."""
    if _cache_dir is None:
        return compute()
    path = os.path.join(_cache_dir, f"text-{_fingerprint(module, prompts)}.pt")
    if os.path.isfile(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache entry is recomputed, never trusted
            pass
    feats = compute()
    out = feats.detach().cpu()
    atomic_write(path, lambda f: torch.save(out, f))   # a full or read-only disk: one line, no temp file left
    return feats
