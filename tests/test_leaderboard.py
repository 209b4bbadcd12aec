"""The leaderboard page (bench/board/), from hand-made records only (no model is built): golden markdown (missing
cells, errors, a pipeline check, three devices, a resolution sweep, several precisions, crop models, the timing-only
cells of a CPU speed sweep), the figures it links, filters, the published-vs-measured flags, the compute floor,
published figures and order carried by the records, and the CSVs it is generated from.

Refresh the golden files after an intended change of the page:
`UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_leaderboard.py` (then read the diff). The records come from
tests/fixtures/leaderboard/make_records.py; published figures from the frozen tests/fixtures/leaderboard/conf.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bench import BenchError
from bench import leaderboard as lb
from bench.board import accuracy, efficiency, published, tables
from bench.board.plots import pareto_front

FIXTURES = Path(__file__).parent / "fixtures" / "leaderboard"
CONF = str(FIXTURES / "conf")
EXPECTED = FIXTURES / "expected"
PAGES = {"leaderboard.md": None, "leaderboard-h100.md": {"device": "h100"}}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results(tmp: Path) -> Path:
    results = tmp / "results"
    (results / "runs").mkdir(parents=True)
    for f in sorted((FIXTURES / "runs").glob("*.json")):
        shutil.copy(f, results / "runs" / f.name)
    return results


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The fixture records built into both pages once (main page first, then the H100-only page)."""
    results = _results(tmp_path_factory.mktemp("lb"))
    for name, filters in PAGES.items():
        lb.build_leaderboard(str(results), name, filters, conf_dir=CONF)
    return results


def _links(md: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+\.png)\)", md)


# ---------------------------------------------------------------------------------------------------- golden
@pytest.mark.parametrize("name", list(PAGES))
def test_markdown_matches_golden(built, name):
    text = (built / name).read_text()
    golden = EXPECTED / name
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"no golden file {golden}; run with UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"{name} differs from {golden} (UPDATE_GOLDEN=1 refreshes it after review)"


def test_markdown_is_deterministic(built, tmp_path):
    results = _results(tmp_path)
    lb.build_leaderboard(str(results), conf_dir=CONF)
    assert (results / "leaderboard.md").read_text() == (built / "leaderboard.md").read_text()


def test_sections_and_content(built):
    md = (built / "leaderboard.md").read_text()
    for heading in ("## Accuracy", "### Published vs measured, cell by cell", "## Efficiency", "### Size and compute",
                    "### Speed and memory on NVIDIA H100 80GB HBM3", "### Speed and memory on AMD EPYC 7B13",
                    "### Speed and memory on Intel Xeon Platinum 8481C", "## Speed against the compute floor",
                    "### Crop models: cost per dataset", "## Plots", "## Per-class drill-down", "### Resolution sweep",
                    "## Cells without a result", "## Provenance and protocol", "#### Short side 448, fp32"):
        assert heading in md
    assert "16.7 (v0.6 12.6) / 12.6ᴾ (+4.1) ⚠ formula" in md            # PC-459: both formulas, known reason
    assert "47.1 / 47.7ᴾ (-0.6) ⚠ unexplained" in md                     # a gap nobody explains
    assert "⚠ partial" in md and "evaluated 200 of 2000 images" in md    # max_images run
    assert "– (missing) / 10.1ᴾ" in md and "– (error) / 53.8ᴾ" in md
    assert "cell process died with exit code -9" in md and "| `weights/SCAN.pth` " in md
    assert "GMACs = GFLOPs / 2" in md and "580.159.04" in md and "00716eb1c2d3" in md
    assert "H100 SXM5 datasheet, dense fp32" in md and "182.6 GFLOP/s (measured matmul peak, from the record)" in md


def test_pipeline_check_never_shows_an_miou(built):
    md = (built / "leaderboard.md").read_text()
    rec = next(json.loads(p.read_text()) for p in (FIXTURES / "runs").glob("*.json")
               if json.loads(p.read_text())["dataset"] == "synthetic")
    assert rec["pipeline_check"] and rec["status"] == "ok"
    row = next(line for line in md.splitlines() if line.startswith("| SCAN ViT-L/14 ") and "pipeline check" in line)
    assert f"{rec['mIoU']:.1f}" not in row
    assert "SCAN ViT-L/14 · Synthetic" not in md                         # no per-class drill-down either
    assert f"{rec['mIoU']:.2f}" not in md


def test_missing_cells_feed_efficiency_but_never_accuracy(built):
    md = (built / "leaderboard.md").read_text()
    size = md.split("### Size and compute")[1].split("###")[0]
    assert "| SCAN ViT-L/14 " in size and "| 100 (bound: one per query) |" in size
    published = md.split("### Published vs measured")[1].split("###")[0]
    assert "SCAN" not in published


# ---------------------------------------------------------------------------------------------------- figures
def test_every_linked_png_is_written_and_nonempty(built):
    linked = set()
    for name in PAGES:
        links = _links((built / name).read_text())
        assert links, f"{name} links no figure"
        for link in links:
            data = (built / link).read_bytes()
            assert len(data) > 1000 and data.startswith(PNG_MAGIC), link
        assert all(link.startswith(Path(name).stem + ".") for link in links)
        linked |= set(links)
    assert {p.name for p in built.glob("*.png")} == linked               # nothing unlinked lies in results/
    main = _links((built / "leaderboard.md").read_text())
    assert {"leaderboard.gmacs-vs-resolution.png", "leaderboard.miou-vs-resolution.png",
            "leaderboard.latency-vs-gflops.png", "leaderboard.params-vs-gmacs.png",
            "leaderboard.pareto-protocol-nvidia-h100-80gb-hbm3.png",
            "leaderboard.pareto-r448-nvidia-h100-80gb-hbm3.png"} <= set(main)


def test_stale_pngs_are_removed_and_absent_plots_said(tmp_path):
    results = _results(tmp_path)
    lb.build_leaderboard(str(results), conf_dir=CONF)
    assert len(list(results.glob("leaderboard.pareto-*.png"))) >= 2
    (results / "leaderboard.other.png").write_bytes(b"x")                 # linked by nobody
    (results / ".tmp-999999999-leaderboard.pareto-x.png").write_bytes(b"x")  # a killed build's temp file
    for p in (results / "runs").glob("*.json"):                          # keep only cells without an mIoU
        if json.loads(p.read_text())["status"] == "ok":
            p.unlink()
    lb.build_leaderboard(str(results), conf_dir=CONF)
    md = (results / "leaderboard.md").read_text()
    assert "_No plot: no cell has both a measured mIoU and a latency yet._" in md
    assert "_No plot: no measured mIoU yet._" in md
    left = ["leaderboard.gmacs-vs-resolution.png", "leaderboard.params-vs-gmacs.png",
            "leaderboard.latency-vs-gflops.png"]                          # need no accuracy: missing cells count
    assert sorted(p.name for p in results.glob("*.png")) == sorted(left)
    assert not list(results.glob(".tmp-*"))
    assert _links(md) == left


def test_pareto_front():
    pts = [(10, 20.0), (12, 19.0), (20, 25.0), (21, 25.0), (30, 24.0), (40, 30.0)]
    assert pareto_front(pts) == [(10, 20.0), (20, 25.0), (40, 30.0)]


# ---------------------------------------------------------------------------------------------------- CSVs, filters
def test_tables_are_the_source(built):
    runs = pd.read_csv(built / "runs.csv")
    per_class = pd.read_csv(built / "per_class.csv")
    assert len(runs) == len(list((FIXTURES / "runs").glob("*.json")))
    assert list(runs.columns[:len(tables.RUN_COLUMNS)]) == tables.RUN_COLUMNS
    for col in ("mIoU", "gflops_model", "latency_ms_model_median", "resolution"):
        assert runs[col].dtype.kind in "fi", col
    assert set(per_class["key"]) <= set(runs[runs["status"] == "ok"]["key"])
    assert {"class_name", "IoU", "ACC", "pipeline_check"} <= set(per_class.columns)
    check = set(runs[runs["pipeline_check"].astype(str) == "True"]["key"])
    assert check and set(per_class[per_class["pipeline_check"]]["key"]) == check & set(per_class["key"])
    assert "published" not in runs.columns and {"model_order", "dataset_order", "evaluated"} <= set(runs.columns)


def test_cli_filters_write_a_second_page(built, tmp_path, capsys):
    results = _results(tmp_path)
    rc = lb.main([f"results_dir={results}", "model=san_b,simseg", "precision=fp32", "resolution=512,640",
                  "out=leaderboard-sub.md", "tolerance=1.0", f"conf_dir={CONF}"])
    assert rc == 0 and "leaderboard-sub.md" in capsys.readouterr().out
    md = (results / "leaderboard-sub.md").read_text()
    assert "**Filtered: model = san_b,simseg; resolution = 512,640; precision = fp32.**" in md
    assert "| SAN ViT-L/14" not in md and "| SCAN ViT" not in md
    assert "| SimSeg ViT-B/16 " in md and "bf16" not in md.split("## Per-class")[0]
    assert "⚠ unexplained" not in md                                     # |−0.63| is within tolerance 1.0
    assert not (results / "leaderboard.md").exists()                    # only the asked page (and the CSVs)
    assert (results / "runs.csv").exists()


def test_cli_rejects_unknown_options(tmp_path, capsys):
    assert lb.main([f"results_dir={tmp_path}", "modle=san_b"]) == 2
    assert "unknown option(s) modle" in capsys.readouterr().err
    with pytest.raises(BenchError, match="unknown leaderboard filter"):
        lb.build_leaderboard(str(tmp_path), filters={"gpu": "h100"}, conf_dir=CONF)


def test_empty_results_dir(tmp_path):
    path = lb.build_leaderboard(str(tmp_path / "results"), conf_dir=CONF)
    md = Path(path).read_text()
    assert "No records yet" in md and not _links(md) and not list((tmp_path / "results").glob("*.png"))


def test_real_model_configs_have_published_sources_and_order():
    models = published.published_figures()
    assert {"san_b", "san_l", "simseg", "scan_l", "scan_b"} <= set(models)
    for info in models.values():
        assert info.protocol and all(s.text for s in info.sources)
    assert sorted(models, key=lambda m: models[m].order) == ["san_b", "san_l", "simseg", "scan_l", "scan_b", "catseg_b",
                                                             "catseg_l"]
    orders = published.dataset_orders()
    assert sorted(orders, key=orders.get) == ["ade847", "pc459", "ade150", "pc59", "voc20", "voc20b", "voc20b_proxies",
                                                   "synthetic"]


# ---------------------------------------------------------------------------------------------------- units
def _row(**kw) -> pd.Series:
    base = {"dataset": "pc459", "mIoU": 16.71, "mIoU_current": 16.71, "mIoU_v06": 12.59, "miou_formula": "current",
            "images_evaluated": 5104, "dataset_images_official": 5104, "note": ""}
    return pd.Series({**base, **kw})


@pytest.mark.parametrize("kw, source_formula, ref, codes", [
    ({}, None, 12.6, ["formula"]),                                   # paper used the v0.6 formula
    ({}, "current", 16.71, []),                                      # log, like for like
    ({}, "current", 12.6, ["unexplained"]),                          # known formula, still off
    ({"images_evaluated": 100}, "current", 16.71, ["partial"]),
    ({"mIoU_v06": 16.71}, None, 16.0, ["unexplained"]),
    ({"note": "settings not published (PAS-20's used)"}, None, 16.7, ["settings"]),
])
def test_compare_flags(kw, source_formula, ref, codes):
    src = published.Source("P", "paper table", "t", {"pc459": ref}, source_formula)
    c = accuracy.compare(_row(**kw), src, 0.3)
    assert c.codes == codes and len(c.reasons) == len(codes)


@pytest.mark.parametrize("name, dtype, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "cuda", "bf16", 989.4e3),
    ("NVIDIA H100 PCIe", "cuda", "fp32", 51.2e3),
    ("NVIDIA H200", "cuda", "amp_bf16", 989.4e3),
    ("NVIDIA A100-SXM4-80GB", "cuda", "tf32", 156e3),
    ("Tesla V100-SXM2-16GB", "cuda", "fp16", 125e3),
    ("Tesla V100-SXM2-16GB", "cuda", "bf16", None),
    ("NVIDIA GeForce RTX 4090", "cuda", "fp16", 165.2e3),
    ("NVIDIA L40S", "cuda", "fp32", None),                         # \bL4\b must not match L40S
    ("AMD EPYC 7B13", "cpu", "fp32", None),
])
def test_datasheet_peaks(name, dtype, precision, expected):
    row = pd.Series({"device_name": name, "device_type": dtype, "precision": precision})
    assert published.peak_gflops(row)[0] == expected


def test_measured_peak_wins_and_floor_flags_impossible_latency():
    row = pd.Series({"device_name": "AMD EPYC", "device_type": "cpu", "precision": "fp32", "peak_gflops": 100.0})
    assert published.peak_gflops(row) == (100.0, "measured matmul peak, from the record")
    rec = {"key": "k", "status": "missing", "model": "san_b", "dataset": "ade150", "resolution": 640,
           "precision": "fp32", "device_name": "AMD EPYC", "device_type": "cpu", "peak_gflops": 100.0,
           "gflops_model": 350.0, "latency_ms_model_median": 2000.0, "timestamp": "t"}
    cat = published.catalog([rec], CONF)
    page = tables.Page(tables.prepare(pd.DataFrame([rec]), cat.models), pd.DataFrame(), cat, 0.3, {}, "x")
    rows = efficiency.speed_rows(page, "AMD EPYC", {})
    assert rows[0]["floor ms"] == "3 500" and rows[0]["median ms"] == "2 000.0 ⚠" and rows[0]["img/s"] == "0.500"
    timed = dict(rec, gflops_timed_model=150.0)                            # a fast path: the floor counts what ran
    page = tables.Page(tables.prepare(pd.DataFrame([timed]), cat.models), pd.DataFrame(), cat, 0.3, {}, "x")
    rows = efficiency.speed_rows(page, "AMD EPYC", {})
    assert rows[0]["floor ms"] == "1 500" and rows[0]["median ms"] == "2 000.0"
    size = efficiency.compute_rows(page, {})
    assert size[0]["GFLOPs (= 2 × GMACs)"] == "350" and size[0]["GFLOPs, timed path"] == "150"


def _record(**kw) -> dict:
    rec = {"key": "0123456789abcdef", "status": "ok", "reason": "", "model": "san_b", "model_display": "SAN ViT-B/16",
           "dataset": "ade150", "dataset_display": "A-150", "resolution": 640, "resolution_is_protocol": True,
           "precision": "fp32", "batch_size": 1, "miou_formula": "current", "pipeline_check": False,
           "device_type": "cuda", "device_name": "NVIDIA H100 PCIe", "driver": "550.54.15", "git_sha": "1234e5678901",
           "torch_version": "2.14.1+cu130", "cuda_version": "12.10", "timestamp": "2026-11-20T10:00:00+00:00",
           "mIoU": 27.6, "mIoU_current": 27.6, "mIoU_v06": 27.6, "images_evaluated": 2000,
           "dataset_images_official": 2000, "per_class": [{"class_id": 0, "class_name": "wall", "IoU": 70.0,
                                                           "ACC": 80.0}]}
    return {**rec, **kw}


def test_text_columns_survive_the_csv_and_pipeline_checks_never_win(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    real = _record(key="123e4567")                                         # a key pandas would read as 1.23e+71
    check = _record(key="fedcba9876543210", pipeline_check=True, mIoU=77.777, timestamp="2026-11-21T10:00:00+00:00")
    for rec in (real, check):
        (runs / f"{rec['key']}.json").write_text(json.dumps(rec))
    lb.build_leaderboard(str(tmp_path), conf_dir=CONF)
    md = (tmp_path / "leaderboard.md").read_text()
    assert "12.10" in md and "1234e5678901" in md and "550.54.15" in md
    assert "| SAN ViT-B/16 |   640 | 27.6 / 27.5ᴾ (+0.1) |" in md
    assert "77.8" not in md and "77.78" not in md                          # the newer pipeline check loses
    assert "H100 PCIe datasheet, dense fp32" not in md                      # no latency: no speed table
    assert set(pd.read_csv(tmp_path / "per_class.csv", dtype={"key": str})["key"]) == {"123e4567",
                                                                                       "fedcba9876543210"}


def test_drill_down_uses_predicted_pixel_counts_when_recorded(tmp_path):
    (tmp_path / "runs").mkdir()
    rows = [{"class_id": i, "class_name": n, "IoU": iou, "ACC": iou, "pred_pixels": pp}
            for i, (n, iou, pp) in enumerate([("wall", 70.0, 900), ("floor", 0.0, 0), ("tree", 0.0, 12),
                                              ("sky", float("nan"), 0)])]
    (tmp_path / "runs" / "a.json").write_text(json.dumps(_record(key="a", per_class=rows)))
    lb.build_leaderboard(str(tmp_path), conf_dir=CONF)
    md = (tmp_path / "leaderboard.md").read_text()
    assert "3 of 4 classes in the GT, 1 never predicted" in md
    assert "Never predicted (1): floor." in md and "Absent from the val GT (IoU undefined): 1 class." in md


@pytest.mark.parametrize("args, expect", [
    (["resolution=448"], "resolution = 448"),
    (["model=[san_b,simseg]", "device=cuda"], "model = san_b,simseg; device = cuda"),
])
def test_cli_filter_values_scalar_or_list(tmp_path, args, expect):
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    (results / "runs" / "a.json").write_text(json.dumps(_record(key="a")))
    (results / "runs" / "b.json").write_text(json.dumps(_record(key="b", resolution=448, resolution_is_protocol=False)))
    assert lb.main([f"results_dir={results}", f"conf_dir={CONF}", *args]) == 0
    md = (results / "leaderboard.md").read_text()
    assert f"**Filtered: {expect}.**" in md
    assert "#### Short side 448" in md
    assert ("### mIoU at each model's own protocol resolution" in md) == ("resolution=448" not in args)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_rows(section: str, first: str) -> list[list[str]]:
    return [_cells(ln) for ln in section.splitlines() if ln.startswith(f"| {first}")]


def test_each_speed_row_is_judged_against_its_own_peak(tmp_path):
    """Two cells of one CPU and precision that measured different peaks: the header names no single peak, each row
    shows the one its floor used; a contended cell (CV > 10 %) is flagged."""
    (tmp_path / "runs").mkdir()
    cpu = {"device_type": "cpu", "device_name": "AMD EPYC 7B13", "driver": "", "latency_iters": 3,
           "latency_warmup": 1, "status": "missing", "gflops_model": 300.0, "latency_ms_model_median": 4000.0}
    (tmp_path / "runs" / "a.json").write_text(json.dumps(_record(key="a", peak_gflops=150.0, **cpu)))
    (tmp_path / "runs" / "b.json").write_text(json.dumps(_record(key="b", resolution=448, peak_gflops=61.5,
                                                                 latency_model_cv=0.42, **cpu)))
    lb.build_leaderboard(str(tmp_path), conf_dir=CONF)
    md = (tmp_path / "leaderboard.md").read_text()
    speed = md.split("### Speed and memory on AMD EPYC 7B13")[1].split("\n### ")[0]
    assert "fp32: each row's own (column `peak`; 2 different measured peaks)" in speed
    assert "150.0 GFLOP/s (measured" not in speed and "61.5 GFLOP/s (measured" not in speed
    rows = {r[1]: r for r in _table_rows(speed, "SAN ViT-B/16")}
    assert rows["640"][5:7] == ["150.0 GFLOP/s", "2 000"] and rows["448"][5:7] == ["61.5 GFLOP/s", "4 878"]
    assert rows["448"][9] == "42.0 ⚠ contended" and rows["640"][9] == "–"
    assert f"CV > {efficiency.CONTENDED_CV:.0%}" in md


def test_one_peak_per_precision_stays_in_the_header(built):
    md = (built / "leaderboard.md").read_text()
    amd = md.split("### Speed and memory on AMD EPYC 7B13")[1].split("\n### ")[0]
    assert "fp32: 182.6 GFLOP/s (measured matmul peak, from the record)" in amd and "| peak " not in amd


def _floor_part(md: str) -> str:
    return md.split("## Speed against the compute floor")[1].split("\n## ")[0]


def test_speed_against_the_compute_floor(built):
    """The timing-only cells of the CPU speed sweep: one row per cell and scope with its own peak, published and
    timed FLOPs as two labelled columns, targets judged on the interleaved ratio, contended timings flagged."""
    md = (built / "leaderboard.md").read_text()
    part = _floor_part(md)
    assert "[Speed against the compute floor](#speed-against-the-compute-floor)" in md
    assert "### Intel Xeon Platinum 8481C" in part and "AMD EPYC" not in part and "H100" not in part
    header = next(ln for ln in part.splitlines() if ln.startswith("| model") and "scope" in ln)
    cols = _cells(header)
    assert cols[6:12] == ["crops", "GFLOPs", "GFLOPs, timed path", "peak", "floor ms", "median ms"]
    rows = {(r[0], r[2], r[5]): dict(zip(cols, r)) for r in _table_rows(part, "S") if len(r) == len(cols)}
    assert len(rows) == 8                                                  # 4 cells x 2 scopes
    san = rows[("SAN ViT-B/16", "fp32", "model")]
    assert (san["GFLOPs"], san["GFLOPs, timed path"], san["peak"]) == ("352", "339", "330.0 GFLOP/s fp32")
    assert san["floor ms"] == "1 027" and san["× floor"] == "1.35" and san["× floor (interleaved)"] == "1.22"
    assert san["target"] == "≤ 1.30 ✓" and san["timing"] == "ok"          # met on the interleaved ratio
    assert rows[("SAN ViT-B/16", "bf16", "model")]["target"] == "≤ 1.60 ✗ missed"
    assert rows[("SAN ViT-B/16", "bf16", "model")]["peak"] == "1.63 TFLOP/s bf16"
    assert rows[("SAN ViT-L/14", "fp32", "end_to_end")]["timing"] == "⚠ contended"     # CV 12.8 %
    scan = rows[("SCAN ViT-B/16", "amp_bf16", "end_to_end")]
    assert scan["timing"] == "⚠ contended" and scan["× floor (interleaved)"] == "–"     # peak drift 31 %
    assert scan["crops"] == "100" and scan["GFLOPs"] == scan["GFLOPs, timed path"] == "4 426"
    per_cell = {r[0] + " " + r[2]: r for r in _table_rows(part, "S") if len(r) != len(cols)}
    assert per_cell["SAN ViT-B/16 bf16"][7:9] == ["99.87 (37)", "99.61"]
    assert per_cell["SAN ViT-B/16 bf16"][13] == "≥ 99.50% ✓"
    assert per_cell["SCAN ViT-B/16 amp_bf16"][6] == "31.0 ⚠" and per_cell["SCAN ViT-B/16 amp_bf16"][7] == "99.21 (1)"
    gap = next(json.loads(p.read_text())["gap_table"] for p in (FIXTURES / "runs").glob("*.json")
               if json.loads(p.read_text()).get("compile") == "max-autotune")
    assert f"[{gap}](runs/{gap})" in part
    assert f"CV > {efficiency.CONTENDED_CV:.0%}" in part and f"more than {efficiency.CONTENDED_PEAK_DRIFT:.0%}" in part


def test_timing_only_cells_are_neither_results_nor_missing(built):
    md = (built / "leaderboard.md").read_text()
    for part in (md.split("## Efficiency")[0], md.split("## Cells without a result")[1].split("## Provenance")[0],
                 md.split("## Plots")[1].split("## Per-class")[0].split("### GMACs")[0]):
        assert "Intel Xeon" not in part and "max-autotune" not in part
    assert "4 timing only (evaluation off)" in md
    assert "### Speed and memory on Intel Xeon Platinum 8481C" in md        # their speed still counts


def test_no_floor_section_without_interleaved_timings(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text(json.dumps(_record(key="a", latency_ms_model_median=20.0,
                                                                 gflops_model=350.0)))
    lb.build_leaderboard(str(tmp_path), conf_dir=CONF)
    md = (tmp_path / "leaderboard.md").read_text()
    assert "compute floor](#" not in md and "## Speed against the compute floor" not in md


def test_repeatability_spread_across_repeated_runs(tmp_path):
    """Records of the same cell with repeat=0..4 give one row: the CV of their medians (sample std / mean), the
    range, and the mean within-run CV; a cell measured once gives no row."""
    (tmp_path / "runs").mkdir()
    medians = [100.0, 102.0, 98.0, 101.0, 99.0]
    cpu = {"device_type": "cpu", "device_name": "AMD EPYC", "driver": "", "threads": 2, "latency_iters": 10,
           "latency_warmup": 3, "gflops_model": 127.0}
    for i, m in enumerate(medians):
        rec = _record(key=f"r{i}", repeat=i, latency_ms_model_median=m, latency_model_cv=0.01 * (i + 1),
                      latency_ms_end_to_end_median=2 * m, **cpu)
        (tmp_path / "runs" / f"r{i}.json").write_text(json.dumps(rec))
    once = _record(key="once", repeat=0, model="san_l", model_display="SAN ViT-L/14", latency_ms_model_median=500.0,
                   **cpu)
    (tmp_path / "runs" / "once.json").write_text(json.dumps(once))
    lb.build_leaderboard(str(tmp_path), conf_dir=CONF)
    md = (tmp_path / "leaderboard.md").read_text()
    section = md.split("### Repeatability")[1].split("\n###")[0]
    cv = pd.Series(medians).std(ddof=1) / pd.Series(medians).mean() * 100
    row = [ln for ln in section.splitlines() if ln.startswith("| SAN ViT-B/16")]
    assert len(row) == 1 and "SAN ViT-L/14" not in section
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[6] == "5" and cells[8] == "100.0" and cells[9] == "98.0–102.0"
    assert cells[10] == f"{cv:.2f}" and cells[11] == "3.00" and cells[12] == f"{cv:.2f}"


def test_harness_overhead_is_evaluation_over_model_only(tmp_path):
    (tmp_path / "runs").mkdir()
    cpu = {"device_type": "cpu", "device_name": "AMD EPYC", "driver": "", "threads": 2, "latency_iters": 3,
           "latency_warmup": 1, "gflops_model": 127.0, "latency_ms_model_median": 800.0}
    rec = _record(key="o", dataset="synthetic", dataset_display="Synthetic", pipeline_check=True, batch_size=8,
                  throughput_batch=8, throughput_img_s=2.0, eval_img_s=1.9, images_evaluated=512, **cpu)
    (tmp_path / "runs" / "o.json").write_text(json.dumps(rec))
    lb.build_leaderboard(str(tmp_path), conf_dir=CONF)
    md = (tmp_path / "leaderboard.md").read_text()
    section = md.split("### Harness overhead")[1].split("\n###")[0]
    row = [ln for ln in section.splitlines() if ln.startswith("| SAN ViT-B/16")]
    assert len(row) == 1
    assert [c.strip() for c in row[0].strip("|").split("|")][5:] == ["8", "512", "1.90", "2.00", "95.0%"]
    assert "### Repeatability" not in md


# ---------------------------------------------------------------------------------------------------- records in
def test_published_figures_and_order_come_from_the_records(tmp_path):
    """A model whose config lives outside conf/ gets its published figures and place from its records; a record
    without those fields (written before they existed) falls back to the model's YAML in conf_dir."""
    (tmp_path / "runs").mkdir()
    own = _record(key="own", model="dense_clip", model_display="Dense CLIP (ours)", mIoU=12.0, mIoU_current=12.0,
                  mIoU_v06=12.0, model_order=5, dataset_order=30,
                  published={"source": "our tech report, Table 2", "miou": {"ade150": 12.3}})
    older = _record(key="older", model="dense_clip", model_display="Dense CLIP (old name)", mIoU=11.0,
                    timestamp="2026-11-01T10:00:00+00:00", model_order=99,
                    published={"source": "superseded", "miou": {"ade150": 99.0}})
    san = _record(key="san")                                              # no published, no model_order
    for rec in (own, older, san):
        (tmp_path / "runs" / f"{rec['key']}.json").write_text(json.dumps(rec))
    lb.build_leaderboard(str(tmp_path), conf_dir=CONF)
    md = (tmp_path / "leaderboard.md").read_text()
    matrix = md.split("### mIoU at each model's own protocol resolution, fp32")[1].split("\n\n")[1]
    rows = [ln for ln in matrix.splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
    assert rows[0].startswith("| Dense CLIP (ours) ") and "12.0 / 12.3ᴾ (-0.3)" in rows[0]     # order 5 < 10
    assert rows[1].startswith("| SAN ViT-B/16 ") and "**27.6** / 27.5ᴾ (+0.1)" in rows[1]     # from conf_dir
    assert "Dense CLIP (ours) ᴾ (paper table): our tech report, Table 2" in md
    assert "superseded" not in md and "99.0" not in md and "old name" not in md


def test_a_corrupt_record_is_warned_about_by_name(tmp_path, caplog):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "good.json").write_text(json.dumps(_record(key="good")))
    (tmp_path / "runs" / "cut.json").write_text(json.dumps(_record(key="cut"))[:200])   # truncated by hand
    (tmp_path / "runs" / "list.json").write_text("[1, 2]")
    (tmp_path / "runs" / ".tmp-123.json").write_text("{")                  # a write in flight: not a record yet
    (tmp_path / "runs" / "good.timings.json").write_text("{}")             # a record's sidecar: not a record
    with caplog.at_level("WARNING", logger="bench.board.tables"):
        lb.build_leaderboard(str(tmp_path), conf_dir=CONF)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all("\n" not in w for w in warned)
    assert any(str(tmp_path / "runs" / "cut.json") in w and "not valid JSON" in w for w in warned)
    assert any(str(tmp_path / "runs" / "list.json") in w and "not a cell record" in w for w in warned)
    assert "1 record:" in (tmp_path / "leaderboard.md").read_text()


def test_cells_without_a_result_on_a_fresh_clone_fit_one_screen(tmp_path):
    """The default page of a fresh clone: 5 models x 6 datasets, no checkpoint and no data anywhere (30 cells)."""
    (tmp_path / "runs").mkdir()
    models = {"san_b": "san_vit_b_16.pth", "san_l": "san_vit_large_14.pth", "simseg": "simseg.pth",
              "scan_l": "SCAN.pth", "scan_b": "SCAN-vitB.pth"}
    datasets = ["ade847", "pc459", "ade150", "pc59", "voc20", "voc20b"]
    for m, ckpt in models.items():
        for d in datasets:
            rec = _record(key=f"{m}-{d}", model=m, model_display=m, dataset=d, dataset_display=d, status="missing",
                          reason=f"no checkpoint at weights/{ckpt}; no dataset at datasets/{d}/labels")
            (tmp_path / "runs" / f"{m}-{d}.json").write_text(json.dumps(rec))
    lb.build_leaderboard(str(tmp_path), conf_dir=CONF)
    section = (tmp_path / "leaderboard.md").read_text().split("## Cells without a result")[1].split("\n## ")[0]
    assert len(section.strip().splitlines()) <= 30
    assert "30 cells without a result" in section and "| status " not in section      # no per-cell rows
    for m, ckpt in models.items():
        assert re.search(rf"\| `weights/{re.escape(ckpt)}` +\| +6 \| `make weights MODEL={m}` +\|", section), m
    for d in datasets:
        assert re.search(rf"\| `datasets/{d}/labels` +\| +5 \| `python -m bench.data.prepare dataset={d} ", section)


def _run_cli(results: Path, **popen) -> "subprocess.CompletedProcess":
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "bench.leaderboard", f"results_dir={results}", f"conf_dir={CONF}"],
                          capture_output=True, text=True, env=env, timeout=300, **popen)


def _no_room():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))   # every write fails: a full disk


@pytest.mark.parametrize("how", ["read-only", "full disk"])
def test_an_unwritable_results_dir_is_one_line_and_nonzero(tmp_path, how):
    results = _results(tmp_path)
    before = sorted(p.name for p in results.rglob("*"))
    if how == "read-only":
        results.chmod(0o555)
        if os.access(results, os.W_OK):                                    # root ignores the mode
            results.chmod(0o755)
            pytest.skip("running as root: a read-only folder is still writable")
        out = _run_cli(results)
        results.chmod(0o755)
    else:
        out = _run_cli(results, preexec_fn=_no_room)
    err = out.stderr.strip().splitlines()
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {results}/runs.csv: ") and "results_dir=" in err[0]
    assert sorted(p.name for p in results.rglob("*")) == before            # no temp file, nothing half-written


def test_cost_against_vocabulary_size_table_and_plot(tmp_path):
    """Cells of one model at several K (make bench-vocab) give the table (one row per K, text cost apart) and the
    GFLOPs-vs-K plot; a model measured at one K only is left out."""
    import json

    from bench.leaderboard import build_leaderboard

    base = json.loads((FIXTURES / "runs" / "945baee3c78593e1.json").read_text())
    runs = tmp_path / "runs"
    runs.mkdir()
    for i, (k, gflops) in enumerate([(20, 101.0), (150, 127.0), (847, 250.0)]):
        rec = dict(base, key=f"vocab{i:011d}", status="ok", evaluated=False, profile_vocabulary_size=k,
                   gflops_model=gflops, gflops_text=0.5 * k, text_encode_s_uncached=0.01 * k, per_class=[])
        (runs / f"{rec['key']}.json").write_text(json.dumps(rec))
    build_leaderboard(str(tmp_path))
    md = (tmp_path / "leaderboard.md").read_text()
    section = md.split("## Cost against vocabulary size", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| SAN")]
    assert [row.split("|")[5].strip() for row in rows] == ["20", "150", "847"]
    assert "423.5" in section and "8.47" in section      # text GFLOPs and seconds of the 847-class vocabulary
    assert (tmp_path / "leaderboard.gflops-vs-vocabulary.png").stat().st_size > 10_000


def test_gflops_at_each_dataset_vocabulary_come_from_the_records(tmp_path):
    (tmp_path / "runs").mkdir()
    cells = [("catseg_b", "CAT-Seg ViT-B/16", "ade847", "A-847", 847, 4256.9),
             ("catseg_b", "CAT-Seg ViT-B/16", "ade150", "A-150", 150, 2997.7),
             ("san_b", "SAN ViT-B/16", "ade150", "A-150", 150, 121.4)]
    for i, (m, display, d, label, k, gf) in enumerate(cells):
        rec = _record(key=f"k{i}", model=m, model_display=display, dataset=d, dataset_display=label, status="missing",
                      mIoU=None, gflops_model=2997.7 if m == "catseg_b" else gf, dataset_vocabulary_size=k,
                      gflops_model_dataset_k=gf, params_total=1, dataset_order=10 if d == "ade847" else 30)
        (tmp_path / "runs" / f"k{i}.json").write_text(json.dumps(rec))
    lb.build_leaderboard(str(tmp_path), conf_dir=CONF)
    md = (tmp_path / "leaderboard.md").read_text()
    section = md.split("### GFLOPs at each dataset's vocabulary")[1].split("\n### ")[0]
    header = next(line for line in section.splitlines() if line.startswith("| model"))
    assert "A-847 (K=847)" in header and "A-150 (K=150)" in header
    assert header.index("A-847") < header.index("A-150")                       # dataset order from the records
    catseg = next(line for line in section.splitlines() if line.startswith("| CAT-Seg"))
    assert "4 257" in catseg and "2 998" in catseg
    san = next(line for line in section.splitlines() if line.startswith("| SAN"))
    assert [c.strip() for c in san.strip("|").split("|")][-2:] == ["–", "121"]


def test_make_bench_records_alone_draw_the_gflops_against_k_lines(tmp_path):
    """Records of a plain `make bench` (one profile vocabulary) carry shape-only GFLOPs at every dataset K: the
    cost-vs-vocabulary table and plot come from them; a measured `bench-vocab` row at the same K wins."""
    (tmp_path / "runs").mkdir()
    at_k = {"20": 1455.5, "59": 1918.1, "150": 2997.7, "847": 4256.9}
    recs = [_record(key="cat", model="catseg_b", model_display="CAT-Seg ViT-B/16", status="missing", mIoU=None,
                    gflops_model=2997.7, profile_vocabulary_size=150, gflops_model_at_k=at_k, params_total=1,
                    latency_ms_model_median=50607.0),
            _record(key="cat20", model="catseg_b", model_display="CAT-Seg ViT-B/16", status="missing", mIoU=None,
                    gflops_model=1455.0, profile_vocabulary_size=20, params_total=1, latency_ms_model_median=30000.0,
                    timestamp="2026-11-19T10:00:00+00:00")]
    for rec in recs:
        (tmp_path / "runs" / f"{rec['key']}.json").write_text(json.dumps(rec))
    lb.build_leaderboard(str(tmp_path), conf_dir=CONF)
    md = (tmp_path / "leaderboard.md").read_text()
    section = md.split("## Cost against vocabulary size")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| CAT-Seg")]
    assert [int(r.split("|")[5]) for r in rows] == [20, 59, 150, 847]
    assert "1 455.0" in rows[0] and "30 000.0" in rows[0]                     # the measured K=20 row wins
    assert "4 256.9" in rows[3] and rows[3].split("|")[7].strip() == "–"      # shapes only: no latency
    assert "gflops-vs-vocabulary" in md and "gflops_model_at_k_847" in (tmp_path / "runs.csv").read_text()
