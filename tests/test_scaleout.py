"""Scale-out on existing engines: joblib and submitit launchers, torchrun sharding (gloo, 2 processes).
Every parallel run must give the same records as the serial run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.records import load_records

ROOT = Path(__file__).resolve().parents[1]
TINY = [f"hydra.searchpath=[file://{ROOT / 'tests' / 'fixtures' / 'conf'}]", "model=san_tiny", "dataset=synthetic",
        "synthesize_weights=true", "profile.warmup=0", "profile.iters=1", "profile.peak_size=256",
        "profile.vocabulary=synthetic8.txt", "progress=false"]
RESULT_FIELDS = ("key", "status", "mIoU", "mIoU_v06", "fwIoU", "mACC", "pACC", "images_evaluated", "gflops_model")


def bench(*args: str, tmp: Path, launcher: list[str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = (launcher or [sys.executable, "-m", "bench"]) + list(args) + TINY + [f"data_root={tmp / 'data'}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)


def results(folder: Path) -> dict[str, tuple]:
    return {r["key"]: tuple(r.get(f) for f in RESULT_FIELDS) for r in load_records(str(folder))}


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("serial")
    out = bench("-m", "resolution=64,96", "isolate=false", f"results_dir={tmp / 'results'}",
                f"hydra.sweep.dir={tmp / 'sweep'}", tmp=tmp)
    assert out.returncode == 0, out.stdout + out.stderr
    res = results(tmp / "results")
    assert len(res) == 2 and all(r[1] == "ok" for r in res.values())
    return res


def _same_accuracy(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:  # gflops are deterministic too; latency is not compared
        assert a[key] == b[key], key


@pytest.mark.slow
def test_joblib_launcher_gives_the_serial_records(tmp_path, serial):
    out = bench("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "resolution=64,96",
                f"results_dir={tmp_path / 'results'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    _same_accuracy(results(tmp_path / "results"), serial)
    assert (tmp_path / "results" / "leaderboard.md").exists()


@pytest.mark.slow
def test_submitit_local_launcher_gives_the_serial_records(tmp_path, serial):
    out = bench("-m", "hydra/launcher=submitit_local", "resolution=64,96", f"results_dir={tmp_path / 'results'}",
                f"hydra.sweep.dir={tmp_path / 'sweep'}", tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    _same_accuracy(results(tmp_path / "results"), serial)


@pytest.mark.slow
def test_torchrun_sharded_cell_equals_unsharded(tmp_path, serial):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                "-m", "bench"]
    out = bench("resolution=64", "isolate=false", f"results_dir={tmp_path / 'results'}",
                f"hydra.run.dir={tmp_path / 'run'}", tmp=tmp_path, launcher=torchrun)
    assert out.returncode == 0, out.stdout + out.stderr
    sharded = results(tmp_path / "results")
    assert len(sharded) == 1  # one record, written by rank 0
    key, row = next(iter(sharded.items()))
    assert serial[key][:-1] == row[:-1]  # identical metrics and image count
    rec = load_records(str(tmp_path / "results"))[0]
    assert rec["images_evaluated"] == 4
