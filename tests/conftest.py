"""Shared helpers of the golden tests (SAN, SimSeg, SCAN, CLIP): where the fixtures are, the tolerance measure,
packed masks, and loading a fixture's filled weights through the same `load_checkpoint` a real checkpoint takes.

The golden contract (clarifications §4): an array matches when max|ref - ours| <= tol * max|ref|. Test modules
import these helpers (`from conftest import rel_err, ...`); the fill rules themselves live in `bench.testing.fills`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pytest
import torch

from bench.profile import configure_allocator

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"

# The test process keeps freed memory in glibc's heap (what `profile.allocator=heap` does for a cell): the golden
# forwards allocate the same large temporaries again and again, and fresh pages fault and are zeroed each time
# (CAT-Seg's forward: 44 s with the default allocator, 25 s without the faults, on the 2-core VM). Results are
# the same; only the speed of the suite changes.
configure_allocator("heap")


def as_numpy(x) -> np.ndarray:
    """float64 numpy view of an array or tensor (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, np.float64)


def rel_err(ref, got) -> float:
    """max|ref - got| / max|ref| (shapes must agree)."""
    ref, got = as_numpy(ref), as_numpy(got)
    assert ref.shape == got.shape, (ref.shape, got.shape)
    return float(np.abs(ref - got).max() / np.abs(ref).max())


def assert_rel(ref, got, tol: float, what: str = "") -> None:
    """Assert max|ref - got| <= tol * max|ref|, naming the array and the error when it fails."""
    err = rel_err(ref, got)
    assert err <= tol, f"{what}: max|ref-ours|/max|ref| = {err:.2e} over {tol:.0e}"


def arrays_over(ref: Mapping, got: Mapping, names: Iterable[str], tol: float) -> dict[str, str]:
    """{name: error} of the arrays among `names` whose error exceeds tol (empty when all match)."""
    errors = {k: rel_err(ref[k], got[k]) for k in names}
    return {k: f"{e:.2e}" for k, e in errors.items() if not e <= tol}


def unpack_masks(npz: Mapping, name: str, width: int | None = None) -> np.ndarray:
    """A fixture's bit-packed boolean masks (np.packbits along the last axis) -> bool, cut to `width` columns."""
    bits = np.unpackbits(npz[name], axis=-1)
    return (bits if width is None else bits[..., :width]).astype(bool)


def load_filled(model: torch.nn.Module, family: str, manifest: Path, scaled: bool, path: Path | None,
                wrap: bool = True, extra: Mapping[str, torch.Tensor] | None = None,
                ignore_prefixes: tuple[str, ...] = ()):
    """Fill a fixture's state dict (bench.testing.fills), write it to `path` ({'model': sd} when `wrap`, plus any
    `extra` keys), load it through `load_checkpoint` and delete the file. Returns the load report. With
    `path=None` the filled dict goes straight to `load_state_dict_strict` (the same strict load, no file: a golden
    module reads its first fill through a file and the second from memory; a full-size save + read + sha256 costs
    CI about 5 s per large model, and every wrapper layout has its own test in test_checkpoint.py)."""
    from bench.models.checkpoint import load_checkpoint, load_state_dict_strict
    from bench.testing.fills import golden_state_dict

    state_dict = golden_state_dict(family, manifest, scaled=scaled)
    state_dict.update(extra or {})
    if path is None:
        return load_state_dict_strict(model, state_dict, f"{family} fill", ignore_prefixes)
    torch.save({"model": state_dict, "iteration": 0} if wrap else state_dict, path)
    del state_dict
    try:
        return load_checkpoint(model, str(path), ignore_prefixes=ignore_prefixes)
    finally:
        path.unlink()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """san_tiny.pth: the tiny SAN's (tests/fixtures/conf/model/san_tiny.yaml) seeded random weights in the
    published layout ({'model': state_dict}), for sweep and fault tests that read a checkpoint."""
    from omegaconf import OmegaConf

    from bench.models import create_model

    cfg = OmegaConf.load(FIXTURES / "conf" / "model" / "san_tiny.yaml")
    torch.manual_seed(0)
    model = create_model(cfg.builder, **OmegaConf.to_container(cfg.builder_kwargs))
    folder = tmp_path_factory.mktemp("tiny_weights")
    torch.save({"model": model.state_dict(), "iteration": 1}, folder / "san_tiny.pth")
    return folder
