"""bench.official (the official code timed beside ours, interleaved) and profile.background_load (a busy machine).

The timing server of the official SAN runs only inside the reference environment (detectron2 + the official tree,
`bench/official/reference_env/setup_reference_env.sh`): its test runs when OVSEG_REFERENCE_ENV points at one and is
skipped with that reason otherwise (CI). Everything on our side of the protocol (starting the server, the ready
line, one call per timed iteration, the figures, a server that dies, the skip reasons, the cell's record) runs
here against tests/fixtures/official/matmul_server.py, a server with the same command line and protocol that
times a matmul.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import BenchError
from bench import official
from bench.profile import background_load, timed

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "tests" / "fixtures" / "official" / "matmul_server.py"
SAN_SPEC = {"script": "detectron2_san.py", "config": "configs/san_clip_vit_res4_coco.yaml",
            "source": "MendelXu/SAN@e19262d, detectron2@02b5c4e"}


def fake_env(tmp: Path) -> Path:
    """A folder with the reference environment's layout whose Python is this one (for the matmul server)."""
    env = tmp / "ref"
    (env / "venv" / "bin").mkdir(parents=True)
    python = env / "venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (env / "detectron2").mkdir()
    (env / "official").mkdir()
    return env


def test_skip_reasons_name_what_is_missing(tmp_path):
    env = fake_env(tmp_path)
    assert official.skip_reason(SAN_SPEC, env, "fp32") is None
    assert "no `official` block" in official.skip_reason({}, env, "fp32")
    assert "fp32 and bf16 autocast only" in official.skip_reason(SAN_SPEC, env, "fp16")
    assert "setup_reference_env.sh" in official.skip_reason(SAN_SPEC, None, "fp32")
    (env / "detectron2").rmdir()
    assert f"{env} has no detectron2" in official.skip_reason(SAN_SPEC, env, "bf16")


def test_timer_interleaves_one_official_call_per_timed_iteration(tmp_path):
    spec = {"script": str(SERVER), "config": "x", "source": "test"}
    image = np.zeros((32, 48, 3), np.uint8)
    with official.OfficialTimer(spec, fake_env(tmp_path), "bf16", 1, image, ["a", "b, c"]) as timer:
        assert timer.built == "matmul server, autocast_bf16, 32x48, K=2"
        timer.warm_up(2)
        assert timer.times == []
        ours, _ = timed(lambda: torch.randn(64, 64) @ torch.randn(64, 64), torch.device("cpu"), 1, 5,
                        beside=timer.call)
        figures = timer.figures(ours)
    assert len(timer.times) == len(ours) == 5 and all(t > 0 for t in timer.times)
    assert figures["official_iters"] == 5 and figures["official_precision"] == "autocast_bf16"
    assert figures["ours_over_official"] == pytest.approx(np.median(ours) / np.median(timer.times))


def test_a_server_that_dies_is_one_line_naming_it(tmp_path):
    spec = {"script": str(SERVER), "config": "fail", "source": "test"}
    with pytest.raises(BenchError, match=r"matmul_server.py in .*stopped: building the model failed") as e:
        with official.OfficialTimer(spec, fake_env(tmp_path), "fp32", 1, np.zeros((8, 8, 3), np.uint8), ["a"]):
            pass
    assert "\n" not in str(e.value)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])     # utime + stime


def test_background_load_runs_busy_processes_and_stops_them():
    with background_load(2) as pids:
        assert len(pids) == 2
        before = [_cpu_ticks(p) for p in pids]
        time.sleep(1.0)
        after = [_cpu_ticks(p) for p in pids]
    assert all(b - a >= 20 for a, b in zip(before, after)), (before, after)   # >= 0.2 s of CPU each in 1 s
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    with background_load(0) as none:
        assert none == []


def test_background_load_ends_with_a_killed_parent(tmp_path):
    """A cell killed with -9 cannot stop its busy processes: they notice the parent is gone and exit."""
    code = textwrap.dedent("""
        import sys, time
        from bench.profile import background_load
        with background_load(2) as pids:
            print(" ".join(map(str, pids)), flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    end = time.monotonic() + 10
    while time.monotonic() < end and any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in pids):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in pids)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_cell_records_official_figures_or_why_not(tmp_path, tiny_weights):
    """A speed cell of the tiny SAN with profile.official=true: with a reference environment (the matmul server)
    the record has official_ms and ours_over_official and the timings file the official calls; without one, or
    with a server whose build fails, it is still ok and says why (official_skipped)."""
    from hydra import compose, initialize_config_dir

    import bench.config  # noqa: F401
    from bench.cell import run_cell

    def cfg(*extra):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("config", overrides=[
                f"hydra.searchpath=[file://{ROOT / 'tests' / 'fixtures' / 'conf'}]", "model=san_tiny",
                "dataset=synthetic", "evaluate=false", "resolution=64", "profile.warmup=0", "profile.iters=3",
                "profile.peak_size=256", "profile.vocabulary=synthetic8.txt", "progress=false",
                f"results_dir={tmp_path / 'results'}", f"data_root={tmp_path / 'data'}",
                f"weights_dir={tiny_weights}", "profile.official=true", *extra])

    rec = run_cell(cfg(f"+model.official={{script: {SERVER}, config: x, source: test}}",
                       f"profile.official_env={fake_env(tmp_path)}", "profile.background_load=1"))
    assert rec["status"] == "ok", rec.get("reason")
    assert rec["official_iters"] == 3 and rec["official_ms"] > 0 and rec["background_load_procs"] == 1
    assert rec["ours_over_official"] == pytest.approx(rec["latency_ms_end_to_end_median"] / rec["official_ms"])
    timings = json.loads((tmp_path / "results" / "runs" / f"{rec['key']}.timings.json").read_text())
    assert len(timings["official_end_to_end"]) == 3
    skipped = run_cell(cfg("profile.official_env=null", "profile.iters=1"))
    assert skipped["status"] == "ok" and "official_ms" not in skipped
    assert "no `official` block" in skipped["official_skipped"]
    broken = run_cell(cfg(f"+model.official={{script: {SERVER}, config: fail, source: test}}", "profile.iters=2",
                          f"profile.official_env={tmp_path / 'ref'}"))   # a server whose build fails
    assert broken["status"] == "ok" and "official_ms" not in broken
    assert "stopped: building the model failed" in broken["official_skipped"]


@pytest.mark.skipif(not official.reference_env(None) or official.skip_reason(SAN_SPEC, official.reference_env(None),
                                                                               "fp32") is not None,
                    reason="needs the reference environment (OVSEG_REFERENCE_ENV=<folder made by "
                           "setup_reference_env.sh with MendelXu/SAN e19262d and detectron2 02b5c4e>)")
def test_official_san_server_times_the_official_model():
    image = np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    with official.OfficialTimer(SAN_SPEC, official.reference_env(None), "fp32", 2, image, ["cat", "sky"]) as timer:
        assert "configs/san_clip_vit_res4_coco.yaml, fp32" in timer.built and "golden_scaled fill" in timer.built
        timer.warm_up(1)
        timer.call()
    assert len(timer.times) == 1 and timer.times[0] > 0
