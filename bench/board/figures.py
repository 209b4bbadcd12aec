"""The "Plots" part of the page: which figures it draws from the prepared runs table, their captions, and the
file names they are written under (`<page stem>.<figure>.png` beside the page; bench.board.plots draws them).
mIoU figures leave out cells evaluated on part of a split; the efficiency figures (GMACs vs resolution, latency vs
GFLOPs with the compute floor, parameters vs GMACs) need no accuracy data, so missing and timing-only cells count.
"""
from __future__ import annotations

import os

import pandas as pd

from bench.board import plots
from bench.board.efficiency import compute_rows, crop_counts, speed_rows
from bench.board.fmt import num, ordered, slug
from bench.board.published import PRECISION_ORDER
from bench.board.tables import Page, partial, pick
from bench.board.vocab import vocab_plot


def plots_section(page: Page, results_dir: str) -> tuple[list[str], list[str]]:
    """The figures (written now) and their markdown; returns (markdown lines, file names written)."""
    out = ["## Plots", ""]
    written: list[str] = []
    all_models = ordered(page.runs["model"], page.catalog.model_order)
    colors = plots.model_colors(all_models, page.catalog.model_order)
    labels = {m: page.models[m].display if m in page.models else m for m in all_models}

    def emit(heading: str, title: str, name: str, draw, caption: str = "") -> None:
        fname = f"{page.stem}.{name}.png"
        draw(os.path.join(results_dir, fname))
        written.append(fname)
        out.extend([heading, "", *([caption, ""] if caption else []), f"![{title}]({fname})", ""])

    _accuracy_plots(page, out, emit, colors, labels)
    crops = crop_counts(page.runs)
    _compute_plots(page, out, emit, colors, labels, crops)
    _speed_plot(page, out, emit, colors, labels, crops)
    vocab_plot(page, emit, colors, labels)
    return out, written


def _accuracy_plots(page: Page, out: list[str], emit, colors: dict, labels: dict) -> None:
    res_ok = page.runs[page.runs["ok_result"] & page.runs["mIoU"].map(num).notna()] if len(page.runs) else page.runs
    if len(res_ok):  # a partial evaluation (max_images) is no point of comparison
        res_ok = res_ok[[not partial(r) for _, r in res_ok.iterrows()]]

    # Pareto fronts: per resolution group and device, one panel per dataset
    pts = res_ok[res_ok["latency_ms_model_median"].map(num).notna()] if len(res_ok) else res_ok
    out += ["### mIoU vs latency", "",
            "_No plot: no cell has both a measured mIoU and a latency yet._" if pts.empty else
            "One figure per device and resolution, one panel per dataset. Each point is one (model, precision) "
            "cell: model-scope median latency at batch 1 (log scale when it spans a decade) against the headline "
            "mIoU. The dashed line is the Pareto front (no other point is both faster and more accurate). Crop "
            "models at each dataset's measured mean crop count; cells evaluated on part of a split are left out.", ""]
    groups = []
    for device in sorted(set(pts["device"])) if len(pts) else []:
        dpts = pts[pts["device"] == device]
        if dpts["at_protocol"].any():
            groups.append((device, "protocol", dpts[dpts["at_protocol"]], "at each model's protocol resolution"))
        for res in sorted(set(dpts[~dpts["at_protocol"]]["resolution"])):
            groups.append((device, f"r{res:g}", dpts[dpts["resolution"] == res], f"at short side {res:g}"))
    for device, gname, g, where in groups:
        g = pick(g, ["model", "dataset", "precision"])
        data = pd.DataFrame({"model": g["model"], "label": g["model"].map(labels), "dataset": g["dataset"],
                             "dataset_label": g["dataset_label"], "precision": g["precision"],
                             "latency_ms": g["latency_ms_model_median"].map(num), "miou": g["mIoU"].map(num)})
        title = f"mIoU vs latency {where}, {device}"
        emit(f"#### {where[0].upper()}{where[1:]}, {device}", title, f"pareto-{gname}-{slug(device)}",
             lambda p, data=data, title=title: plots.pareto_figure(data, title, p, colors, page.catalog.dataset_order))

    sel = pick(res_ok, ["model", "dataset", "resolution", "precision"]) if len(res_ok) else res_ok
    if sel.empty:
        out += ["### mIoU vs resolution", "", "_No plot: no measured mIoU yet._", ""]
    else:
        data = pd.DataFrame({"model": sel["model"], "label": sel["model"].map(labels), "dataset": sel["dataset"],
                             "dataset_label": sel["dataset_label"], "precision": sel["precision"],
                             "resolution": sel["resolution"], "miou": sel["mIoU"].map(num),
                             "at_protocol": sel["at_protocol"]})
        emit("### mIoU vs resolution", "mIoU vs resolution", "miou-vs-resolution",
             lambda p: plots.miou_vs_resolution_figure(data, p, colors, page.catalog.dataset_order, PRECISION_ORDER),
             "One line per model (and precision, by line style) per dataset: headline mIoU against the input short "
             "side; hollow markers are resolutions other than the model's protocol. Cells evaluated on part of a "
             "split are left out.")


def _compute_plots(page: Page, out: list[str], emit, colors: dict, labels: dict, crops: dict) -> None:
    rows = [r for r in compute_rows(page, crops) if r["_gmacs"] is not None]
    if not rows:
        out += ["### GMACs vs resolution", "", "_No plot: no FLOPs counted yet._", ""]
    else:
        data = pd.DataFrame({"model": [r["_model"] for r in rows], "label": [labels.get(r["_model"], r["_model"])
                                                                              for r in rows],
                             "resolution": [r["_res"] for r in rows], "gmacs": [r["_gmacs"] for r in rows],
                             "bound": [r["_bound"] for r in rows]})
        emit("### GMACs vs resolution", "GMACs vs resolution", "gmacs-vs-resolution",
             lambda p: plots.gmacs_vs_resolution_figure(data, p, colors),
             "Model-scope GMACs (1 MAC = 2 FLOPs) of one forward at a square input of the given side, text "
             "features cached; crop models at the crop count of the *Size and compute* table (hollow: the "
             "100-crop bound, no dataset evaluated yet). Missing cells count here: their FLOPs were measured.")
    if rows and any(r["_params"] is not None for r in rows):
        pts = [r for r in rows if r["_params"] is not None]
        data = pd.DataFrame({"model": [r["_model"] for r in pts], "label": [labels.get(r["_model"], r["_model"])
                                                                             for r in pts],
                             "resolution": [r["_res"] for r in pts], "gmacs": [r["_gmacs"] for r in pts],
                             "params_m": [r["_params"] / 1e6 for r in pts], "bound": [r["_bound"] for r in pts]})
        emit("### Parameters vs GMACs", "Parameters vs GMACs", "params-vs-gmacs",
             lambda p: plots.params_vs_gmacs_figure(data, p, colors),
             "Every parameter of the model as built (frozen CLIP included) against the model-scope GMACs of the "
             "*Size and compute* table, one point per model and input side (the number beside it).")
    else:
        out += ["### Parameters vs GMACs", "", "_No plot: no FLOPs counted yet._", ""]


def _speed_plot(page: Page, out: list[str], emit, colors: dict, labels: dict, crops: dict) -> None:
    devices = sorted(set(page.runs["device"])) if len(page.runs) else []
    rows = [dict(r, _device=d) for d in devices for r in speed_rows(page, d, crops)
            if r["_gflops"] is not None and r["_median"] is not None]
    if not rows:
        out += ["### Latency vs GFLOPs", "", "_No plot: no cell has both FLOPs and a latency yet._", ""]
        return
    data = pd.DataFrame({"model": [r["_model"] for r in rows], "label": [labels.get(r["_model"], r["_model"])
                                                                          for r in rows],
                         "device": [r["_device"] for r in rows], "precision": [r["_precision"] for r in rows],
                         "kind": [r["_kind"] for r in rows],
                         "gflops": [r["_gflops"] for r in rows], "latency_ms": [r["_median"] for r in rows],
                         "peak": [r["_peak"] if r["_peak"] else float("nan") for r in rows]})
    emit("### Latency vs GFLOPs", "Latency vs GFLOPs", "latency-vs-gflops",
         lambda p: plots.latency_vs_gflops_figure(data, p, colors),
         "One panel per device: model-scope median latency at batch 1 against the GFLOPs of the timed path, one "
         "point per row of the *Speed and memory* tables (log scales). Each grey line is the compute floor at one "
         "peak (latency = GFLOPs ÷ peak; a band where each cell measured its own peak of that kind): a point on it "
         "runs at the peak, the distance above it is the time lost; no point can lie below it. Missing cells "
         "count here: their speed was measured.")
