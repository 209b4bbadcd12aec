"""The external-model example (examples/dense_clip): its own package and config folder, nothing under bench/ or
conf/, run through a real Hydra multirun sweep (cells in child processes) to a record, runs.csv and leaderboard
row; and `check_model` on its builder."""
from __future__ import annotations

import json
import os
import subprocess
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.records import load_records
from bench.testing import check_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dense_clip"
TINY = dict(width=64, layers=2, heads=4, text_width=64, text_layers=2, text_heads=4, embed_dim=32)


def sweep(tmp: Path, pythonpath: list[Path], *overrides: str) -> subprocess.CompletedProcess:
    """The README's command, from a folder outside the repository."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bench", "-m", "model=dense_clip", f"hydra.searchpath=[file://{EXAMPLE / 'conf'}]",
           "dataset=synthetic", "synthesize_weights=true", f"results_dir={tmp / 'results'}",
           f"data_root={tmp / 'data'}", f"hydra.sweep.dir={tmp / 'sweep'}", "resolution=64", "profile.warmup=0",
           "profile.iters=1", "profile.peak_size=256", "profile.vocabulary=synthetic8.txt", "progress=false", *overrides]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env, timeout=600)


def test_the_example_lives_outside_bench_and_conf():
    assert not (ROOT / "conf" / "model" / "dense_clip.yaml").exists()
    for folder in ("bench", "conf"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".yaml"):
                assert "dense_clip" not in path.read_text(), path


def test_the_example_builder_passes_check_model(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from bench.models import create_model

    torch.manual_seed(0)
    model = create_model("dense_clip_baseline.model:build", **TINY)
    assert type(model).__name__ == "DenseCLIP" and model.protocol.size_divisibility == 16
    measured = check_model(model, short_side=120)
    assert measured["permutation"] <= 1e-5 and measured["batch"] <= 1e-5


def test_installed_the_example_registers_its_builder_by_name(tmp_path, monkeypatch):
    """`pip install examples/dense_clip` (here into a folder put on sys.path) registers it as `dense_clip` through its
    entry point (group ovseg_bench.models): listed, then built by name."""
    pytest.importorskip("setuptools", reason="building the example's wheel offline needs setuptools in the venv")
    from bench.models import create_model, list_models, registry

    shutil.copytree(EXAMPLE, tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "--target", str(tmp_path / "site"), str(tmp_path / "src")]
    out = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(registry, "_entry_points", None)
    for name in [m for m in sys.modules if m.startswith("dense_clip_baseline")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        assert "dense_clip" in list_models()
        model = create_model("dense_clip", **TINY)
        assert type(model).__name__ == "DenseCLIP"
        assert sys.modules["dense_clip_baseline"].__file__.startswith(str(tmp_path / "site"))
    finally:  # forget the installed copy (monkeypatch then restores any earlier import)
        for name in [m for m in sys.modules if m.startswith("dense_clip_baseline")]:
            del sys.modules[name]


def tiny_kwargs_overrides() -> list[str]:
    """The YAML's builder_kwargs set on the command line: the example at TINY widths (same builder and code path)."""
    return [f"+model.builder_kwargs.{k}={v}" for k, v in TINY.items()]


def test_the_example_at_full_size_is_clip_vit_b_16(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from bench.models import create_model

    model = create_model("dense_clip_baseline.model:build")
    assert sum(p.numel() for p in model.parameters()) == 149_620_737   # CLIP ViT-B/16: both towers, logit scale


def test_the_example_runs_through_a_sweep_to_a_leaderboard_row(tmp_path, monkeypatch):
    out = sweep(tmp_path, [ROOT, EXAMPLE], *tiny_kwargs_overrides())   # isolate=true: the child inherits PYTHONPATH
    assert out.returncode == 0, out.stdout + out.stderr
    recs = load_records(str(tmp_path / "results"))
    assert len(recs) == 1
    rec = recs[0]
    assert rec["status"] == "ok", rec.get("reason")
    assert rec["model"] == "dense_clip" and rec["config"]["model"]["builder"] == "dense_clip_baseline.model:build"
    assert rec["pipeline_check"] and rec["images_evaluated"] == 4 and rec["gflops_model"] > 0
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from bench.models import create_model

    tiny = create_model("dense_clip_baseline.model:build", **TINY)
    assert rec["params_total"] == sum(p.numel() for p in tiny.parameters())       # the YAML's kwargs reached build()
    runs = pd.read_csv(tmp_path / "results" / "runs.csv")
    row = runs[runs["model"] == "dense_clip"]
    assert len(row) == 1 and row["status"].iloc[0] == "ok"
    board = (tmp_path / "results" / "leaderboard.md").read_text()
    assert "Dense CLIP ViT-B/16" in board
    status = [json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("cell_status.json")]
    assert [s["status"] for s in status] == ["ok"]


def test_without_the_package_on_the_path_the_cell_says_how_to_fix_it(tmp_path):
    out = sweep(tmp_path, [ROOT], "profile.enabled=false")
    assert out.returncode == 1, out.stdout + out.stderr
    rec, = load_records(str(tmp_path / "results"))
    assert rec["status"] == "error"
    assert "model builder 'dense_clip_baseline.model:build': cannot import module" in rec["reason"]
    assert "PYTHONPATH" in rec["reason"]
