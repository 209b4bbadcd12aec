"""The cell runner end to end at a small resolution on the synthetic layout: records, skip/force, missing inputs,
failing cells, non-finite outputs, the leaderboard, and the CLI. The first test runs the full-size SAN ViT-B/16 (the
real model and checkpoint size); the others run the tiny SAN (tests/fixtures/conf/model/san_tiny.yaml: the san_b
code path at small widths), which takes a few seconds per cell instead of about 15."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import bench.config  # noqa: F401  (registers the typed schema)

from bench.cell import run_cell
from bench.leaderboard import build_leaderboard
from bench.records import load_records

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
# a 256-px matmul peak probe (the default 2048 costs about 4 s of every test cell; the figures stay measured)
FAST = ["resolution=64", "profile.warmup=0", "profile.iters=1", "profile.peak_size=256",
        "profile.vocabulary=synthetic8.txt", "progress=false", "dataset=synthetic"]


TINY = [f"hydra.searchpath=[file://{ROOT / 'tests' / 'fixtures' / 'conf'}]", "model=san_tiny"]


def make_cfg(tmp: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"results_dir={tmp / 'results'}", f"data_root={tmp / 'data'}",
                                            f"weights_dir={tmp / 'weights'}", *FAST, *overrides])


@pytest.fixture(scope="module")
def san_checkpoint(tmp_path_factory):
    """SAN-B weights in the published layout ({'model': state_dict}), random but fixed; written once."""
    from bench.models import create_model

    import bench.models.san  # noqa: F401  (registers the builders)

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = create_model("san_vit_b_16")
    torch.save({"model": model.state_dict(), "iteration": 1}, folder / "san_vit_b_16.pth")
    return folder


def test_cell_ok_then_skipped_then_forced(tmp_path, san_checkpoint):
    cfg = make_cfg(tmp_path, f"weights_dir={san_checkpoint}")
    rec = run_cell(cfg)
    assert rec["status"] == "ok", rec.get("reason")
    assert rec["pipeline_check"] is True  # synthetic data: never a result
    assert 0.0 <= rec["mIoU"] <= 100.0 and rec["images_evaluated"] == 4
    assert rec["params_state_total"] == 157_846_408
    assert rec["gflops_model"] > 0 and rec["latency_ms_model_median"] > 0
    assert len(rec["checkpoint_sha256"]) == 64 and len(rec["per_class"]) == 8
    path = tmp_path / "results" / "runs" / f"{rec['key']}.json"
    mtime = path.stat().st_mtime_ns
    again = run_cell(cfg)
    assert again["key"] == rec["key"] and path.stat().st_mtime_ns == mtime  # skipped
    forced = run_cell(make_cfg(tmp_path, f"weights_dir={san_checkpoint}", "force=true"))
    assert forced["key"] == rec["key"] and path.stat().st_mtime_ns != mtime
    assert len(load_records(str(tmp_path / "results"))) == 1


def test_missing_inputs_are_recorded_with_the_expected_paths(tmp_path):
    rec = run_cell(make_cfg(tmp_path, *TINY, "dataset=ade150"))
    assert rec["status"] == "missing"
    assert f"no checkpoint at {tmp_path / 'weights' / 'san_tiny.pth'}" in rec["reason"]
    assert "no dataset at " in rec["reason"] and "ADEChallengeData2016" in rec["reason"]
    assert rec["gflops_model"] > 0  # efficiency is measured without weights


@pytest.mark.parametrize("damage", ["truncated", "other_model", "nan"])
def test_bad_checkpoints_fail_the_cell_with_one_line(tmp_path, tiny_weights, damage):
    weights = tmp_path / "weights"
    weights.mkdir()
    src, dst = tiny_weights / "san_tiny.pth", weights / "san_tiny.pth"
    if damage == "truncated":
        data = src.read_bytes()
        dst.write_bytes(data[: len(data) // 3])
    elif damage == "other_model":
        torch.save({"model": {"backbone.res2.0.conv1.weight": torch.zeros(64, 64, 1, 1)}}, dst)
    else:
        sd = torch.load(src, weights_only=True)["model"]
        sd = {k: (torch.full_like(v, float("nan")) if k.startswith("side_adapter_network") else v) for k, v in sd.items()}
        torch.save({"model": sd}, dst)
    rec = run_cell(make_cfg(tmp_path, *TINY))
    assert rec["status"] == "error" and "\n" not in rec["reason"]
    expected = {"truncated": "is truncated or corrupt", "other_model": "does not match",
                "nan": "non-finite outputs"}[damage]
    assert expected in rec["reason"]


def test_leaderboard_from_cells(tmp_path, tiny_weights):
    run_cell(make_cfg(tmp_path, *TINY, f"weights_dir={tiny_weights}"))
    run_cell(make_cfg(tmp_path, *TINY, "dataset=ade150"))
    build_leaderboard(str(tmp_path / "results"))
    md = (tmp_path / "results" / "leaderboard.md").read_text()
    assert "pipeline check" in md and "**No checkpoint**" in md and "SAN tiny (test)" in md
    import pandas as pd

    runs = pd.read_csv(tmp_path / "results" / "runs.csv")
    assert len(runs) == 2 and runs["gflops_model"].dtype.kind == "f"
    per_class = pd.read_csv(tmp_path / "results" / "per_class.csv")
    assert len(per_class) == 8 and set(per_class.columns) >= {"class_name", "IoU", "ACC"}
    assert {"BoundaryIoU", "min(IoU, B-Iou)"} <= set(per_class.columns) & set(runs.columns)   # detectron2's B-IoU
    assert runs["boundary_iou"].dropna().str.contains("erosion, dilation_ratio 0.02").all()


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)


def test_cli_unknown_model_lists_the_valid_ones(tmp_path):
    out = _cli("model=san_xl", f"results_dir={tmp_path}")
    assert out.returncode != 0
    assert "san_b" in out.stderr and "scan_l" in out.stderr


@pytest.mark.slow
def test_sweep_with_a_failing_cell_finishes_then_exits_nonzero(tmp_path, tiny_weights):
    """A two-model sweep of isolated cells (each in its own process): SAN-L's checkpoint is not a checkpoint, the
    tiny SAN's is fine (the san_b code path at small widths, tests/fixtures/conf: the full-size SAN-B cell cost
    this test 30 s). The good cell is recorded, the bad one is an error, the leaderboard is written, exit 1."""
    weights = tmp_path / "weights"
    weights.mkdir()
    os.symlink(tiny_weights / "san_tiny.pth", weights / "san_tiny.pth")
    (weights / "san_vit_large_14.pth").write_bytes(b"not a checkpoint")
    out = _cli("-m", f"hydra.searchpath=[file://{ROOT / 'tests' / 'fixtures' / 'conf'}]", "model=san_l,san_tiny",
               *FAST, "profile.enabled=false", f"results_dir={tmp_path / 'results'}", f"data_root={tmp_path / 'd'}",
               f"weights_dir={weights}",
               f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert out.returncode == 1, out.stdout + out.stderr
    recs = {r["model"]: r for r in load_records(str(tmp_path / "results"))}
    assert recs["san_l"]["status"] == "error" and recs["san_tiny"]["status"] == "ok"
    assert "san_vit_large_14.pth" in recs["san_l"]["reason"]
    assert (tmp_path / "results" / "leaderboard.md").exists()
    status = [json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("cell_status.json")]
    assert sorted(s["status"] for s in status) == ["error", "ok"]


def test_repeated_cells_are_separate_measurements(tmp_path):
    """repeat=0,1: two records (distinct keys), each timed in its own run (no shared profile cache); the
    leaderboard gets one Repeatability row over both."""
    recs = [run_cell(make_cfg(tmp_path, *TINY, "synthesize_weights=true", "max_images=1", f"repeat={i}",
                              "profile.iters=3")) for i in (0, 1)]
    assert [r["status"] for r in recs] == ["ok", "ok"] and recs[0]["key"] != recs[1]["key"]
    assert [r["repeat"] for r in recs] == [0, 1]
    for r in recs:
        timings = json.loads((tmp_path / "results" / "runs" / f"{r['key']}.timings.json").read_text())
        assert len(timings["model"]) == 3
    assert len(list((tmp_path / "results" / "cache").glob("profile-*.json"))) == 2
    build_leaderboard(str(tmp_path / "results"))
    section = (tmp_path / "results" / "leaderboard.md").read_text().split("### Repeatability")[1].split("\n#")[0]
    assert sum(ln.startswith("| SAN tiny (test)") for ln in section.splitlines()) == 1


def test_bf16_cell_reports_agreement_with_fp32(tmp_path):
    rec = run_cell(make_cfg(tmp_path, *TINY, "precision=bf16", "synthesize_weights=true", "profile.enabled=false",
                            "compare_fp32_images=2"))
    assert rec["status"] == "ok", rec.get("reason")
    assert rec["fp32_compared_images"] == 2
    assert 50.0 <= rec["fp32_label_agreement_pct"] <= 100.0 and rec["fp32_max_abs_score_diff"] > 0
    assert rec["pipeline_check"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the GPU path (CUDA events, pinned "
                    "DataLoader, confusion matrix on the device) is the CPU code with device=cuda")
def test_gpu_cell_matches_cpu_cell(tmp_path):
    cpu = run_cell(make_cfg(tmp_path / "cpu", "synthesize_weights=true", "device=cpu"))
    gpu = run_cell(make_cfg(tmp_path / "gpu", "synthesize_weights=true", "device=cuda", "num_workers=2",
                            "profile.throughput_batch=2"))
    assert gpu["status"] == "ok" and gpu["timer"] == "cuda_events" and gpu["device_type"] == "cuda"
    assert abs(gpu["mIoU"] - cpu["mIoU"]) < 0.5 and gpu["throughput_img_s"] > 0


def _copy_weights(src_folder, tmp_path, name="weights_live"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "san_tiny.pth").write_bytes((src_folder / "san_tiny.pth").read_bytes())
    return folder


def test_failed_forced_rerun_keeps_the_ok_record(tmp_path, tiny_weights):
    """force=true with a broken checkpoint: the ok record stays (the failure noted in it), the run says it failed."""
    weights = _copy_weights(tiny_weights, tmp_path)
    rec = run_cell(make_cfg(tmp_path, *TINY, f"weights_dir={weights}", "profile.enabled=false"))
    assert rec["status"] == "ok"
    data = (weights / "san_tiny.pth").read_bytes()
    (weights / "san_tiny.pth").write_bytes(data[: len(data) // 3])
    again = run_cell(make_cfg(tmp_path, *TINY, f"weights_dir={weights}", "profile.enabled=false", "force=true"))
    assert again["rerun_failed_now"] is True and again["status"] == "ok"
    kept = load_records(str(tmp_path / "results"))
    assert len(kept) == 1 and kept[0]["mIoU"] == rec["mIoU"] and kept[0]["rerun_failed"].startswith("error: ")
    assert "rerun_failed_now" not in kept[0]


def test_stale_cells_are_recomputed_with_the_reason(tmp_path, tiny_weights, capsys):
    """A replaced checkpoint or a dataset with other files is not skipped as done: the cell is recomputed and
    the line says why; unchanged inputs are skipped."""
    weights = _copy_weights(tiny_weights, tmp_path)
    args = (*TINY, f"weights_dir={weights}", "profile.enabled=false")
    first = run_cell(make_cfg(tmp_path, *args))
    assert first["inputs"]["checkpoint"]["sha256"] == first["checkpoint_sha256"]
    assert first["inputs"]["dataset"]["n_images"] == 4
    run_cell(make_cfg(tmp_path, *args))
    assert "[skip]" in capsys.readouterr().out
    sd = torch.load(weights / "san_tiny.pth", weights_only=True)["model"]
    torch.save({"model": {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}},
               weights / "san_tiny.pth")
    second = run_cell(make_cfg(tmp_path, *args))
    out = capsys.readouterr().out
    assert "[recompute]" in out and "checkpoint" in out and "changed (sha256" in out
    assert second["checkpoint_sha256"] != first["checkpoint_sha256"]
    images = sorted((tmp_path / "data").rglob("*.jpg"))
    images[-1].unlink()
    next(p for p in (tmp_path / "data").rglob("*.png") if p.stem == images[-1].stem).unlink()
    third = run_cell(make_cfg(tmp_path, *args))
    assert "dataset now has 3 images, record has 4" in capsys.readouterr().out
    assert third["images_evaluated"] == 3


@pytest.mark.parametrize("bad,expected", [("precision=fp8", "expected one of [fp32, tf32, amp_bf16, bf16, fp16]"),
                                          ("resolution=abc", "could not be converted to Integer"),
                                          ("max_images=0", "must be at least 1"),
                                          ("compile=yes", "expected one of [eager, default"),
                                          ("-m precision=fp32,fp9", "precision=fp9")])
def test_bad_values_exit_2_in_one_line_without_a_record(tmp_path, bad, expected):
    out = _cli(*bad.split(), f"results_dir={tmp_path}", f"data_root={tmp_path / 'data'}")
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert not list(tmp_path.rglob("*.json"))


def test_single_missing_cell_exits_3(tmp_path):
    out = _cli(*TINY, "dataset=ade150", "profile.enabled=false", f"results_dir={tmp_path / 'r'}",
               f"weights_dir={tmp_path / 'w'}", f"data_root={tmp_path / 'd'}", "hydra.run.dir=" + str(tmp_path / "o"))
    assert out.returncode == 3, out.stderr[-500:]
    assert "[missing]" in out.stdout
