"""The board's figures (matplotlib, Agg canvas, no pyplot state): mIoU vs latency with its Pareto front, mIoU vs
resolution, GMACs vs resolution, latency vs GFLOPs with the compute floor, parameters vs GMACs. Inputs are small
tidy DataFrames prepared by bench.board.figures; one colour per model, the same in every figure (`model_colors`);
markers and line styles per precision from bench.precision. Every figure has labelled axes with units and a legend
outside the data, so nothing overlaps the points.
"""
from __future__ import annotations

import math
import os
import textwrap

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from bench.board.fmt import flops_rate
from bench.precision import PRECISION_NAMES, PRECISIONS

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]   # matplotlib's tab10
MARKERS = {name: p.marker for name, p in PRECISIONS.items()}
LINESTYLES = {name: p.linestyle for name, p in PRECISIONS.items()}
FLOOR_STYLES = ["--", ":", "-.", (0, (5, 1, 1, 1))]   # one per peak kind in a panel of latency vs GFLOPs
KINDS = list(dict.fromkeys(p.peak for p in PRECISIONS.values()))


def model_colors(models: list[str], order: list[str]) -> dict[str, str]:
    """Known models keep their place in `order` (so their colour never depends on which others are shown)."""
    ranked = list(order) + sorted(m for m in set(models) if m not in order)
    return {m: PALETTE[ranked.index(m) % len(PALETTE)] for m in models}


def _panels(n: int, width: float = 4.4, height: float = 3.5):
    ncols = min(3, max(1, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(max(width * ncols, 6.4), height * nrows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _log_axis(axis, values, force: bool = False) -> bool:
    """Log scale (ticks at 1, 2, 5 x 10^k, plain numbers) when the values span more than a factor of 8 (or always,
    with `force`)."""
    vals = [v for v in values if v and v > 0]
    if not vals or (not force and max(vals) / min(vals) < 8):
        return False
    (axis.axes.set_xscale if axis.axis_name == "x" else axis.axes.set_yscale)("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())
    return True


def _legend(fig, handles: list) -> None:
    """One legend below the panels, as many entries per row as fit the figure's width."""
    if handles:
        # about 0.075 in per character at font size 9, plus the marker and the padding
        entry = max(0.075 * len(h.get_label()) + 0.7 for h in handles)
        ncols = max(1, min(len(handles), int(0.95 * fig.get_figwidth() / entry)))
        # matplotlib fills a legend column by column: reorder so that it reads row by row
        grid = [handles[i:i + ncols] for i in range(0, len(handles), ncols)]
        ordered = [row[c] for c in range(ncols) for row in grid if c < len(row)]
        fig.legend(handles=ordered, loc="outside lower center", ncols=ncols, frameon=False, fontsize=9)


def _title(fig, text: str) -> None:
    fig.suptitle(textwrap.fill(text, width=int(fig.get_figwidth() * 10)), fontsize=11)


def _clamp_at_zero(ax) -> None:
    left, right = ax.get_xlim()
    if ax.get_xscale() == "linear" and left < 0:
        ax.set_xlim(0, right)


def _model_handles(data: pd.DataFrame, colors: dict[str, str], order: list[str], lines: bool = True) -> list:
    seen = []
    for m in order + sorted(set(data["model"]) - set(order)):
        if m in set(data["model"]):
            label = data[data["model"] == m]["label"].iloc[0]
            seen.append(Line2D([], [], color=colors[m], marker="o", linestyle="-" if lines else "", label=label))
    return seen


def _precision_handles(precisions: list[str], lines: bool) -> list:
    return [Line2D([], [], color="0.35", marker=MARKERS.get(p, "o"), linestyle=LINESTYLES.get(p, "-") if lines else "",
                   label=p) for p in precisions]


def _save(fig: Figure, path: str) -> None:
    """Write through a temp file + rename, so a reader never sees half a PNG."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}")
    try:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _order(values, order: list[str]) -> list[str]:
    vals = set(values)
    return [v for v in order if v in vals] + sorted(vals - set(order))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both lower latency (x) and higher mIoU (y), sorted by x."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def pareto_figure(data: pd.DataFrame, title: str, path: str, colors: dict[str, str], dataset_order: list[str]) -> None:
    """data: model, label, dataset, dataset_label, precision, latency_ms, miou."""
    datasets = _order(data["dataset"], dataset_order)
    precisions = _order(data["precision"], list(PRECISION_NAMES))
    fig, axes = _panels(len(datasets))
    drew_front = False
    for ax, d in zip(axes, datasets):
        sub = data[data["dataset"] == d]
        for _, r in sub.iterrows():
            ax.scatter(r["latency_ms"], r["miou"], color=colors[r["model"]], marker=MARKERS.get(r["precision"], "o"),
                       s=48, zorder=3, edgecolors="white", linewidths=0.6)
        front = pareto_front(list(zip(sub["latency_ms"], sub["miou"])))
        if len(front) > 1:
            xs, ys = zip(*front)
            ax.plot(xs, ys, linestyle="--", color="0.55", linewidth=1, zorder=2, drawstyle="steps-post")
            drew_front = True
        logx = _log_axis(ax.xaxis, sub["latency_ms"])
        ax.margins(x=0.25 if not logx else 0.1, y=0.2)
        _clamp_at_zero(ax)
        ax.set_title(sub["dataset_label"].iloc[0], fontsize=10)
        ax.set_xlabel("latency, median (ms" + (", log scale)" if logx else ")"))
        ax.set_ylabel("mIoU (%)")
        ax.grid(True, linewidth=0.4, alpha=0.5)
    _title(fig, title)
    handles = _model_handles(data, colors, list(colors), lines=False)
    if len(precisions) > 1:
        handles += _precision_handles(precisions, lines=False)
    if drew_front:
        handles.append(Line2D([], [], color="0.55", linestyle="--", label="Pareto front"))
    _legend(fig, handles)
    _save(fig, path)


def miou_vs_resolution_figure(data: pd.DataFrame, path: str, colors: dict[str, str], dataset_order: list[str],
                              precision_order: list[str]) -> None:
    """data: model, label, dataset, dataset_label, precision, resolution, miou, at_protocol."""
    datasets = _order(data["dataset"], dataset_order)
    precisions = _order(data["precision"], precision_order)
    fig, axes = _panels(len(datasets))
    for ax, d in zip(axes, datasets):
        sub = data[data["dataset"] == d]
        for (m, p), g in sub.groupby(["model", "precision"], sort=True):
            g = g.sort_values("resolution")
            ax.plot(g["resolution"], g["miou"], color=colors[m], linestyle=LINESTYLES.get(p, "-"), linewidth=1.4)
            for _, r in g.iterrows():
                ax.plot([r["resolution"]], [r["miou"]], color=colors[m], marker=MARKERS.get(p, "o"), markersize=6,
                        markerfacecolor=colors[m] if r["at_protocol"] else "white", linestyle="")
        res = sorted(set(sub["resolution"]))
        ax.set_xticks(res)
        ax.set_xticklabels([f"{r:g}" for r in res])
        ax.margins(x=0.15 if len(res) > 1 else 0.5, y=0.2)
        ax.set_title(sub["dataset_label"].iloc[0], fontsize=10)
        ax.set_xlabel("input short side (px)")
        ax.set_ylabel("mIoU (%)")
        ax.grid(True, linewidth=0.4, alpha=0.5)
    _title(fig, "mIoU vs input resolution")
    handles = _model_handles(data, colors, list(colors))
    if len(precisions) > 1:
        handles += _precision_handles(precisions, lines=True)
    if not data["at_protocol"].all():
        handles.append(Line2D([], [], color="0.35", marker="o", markerfacecolor="white", linestyle="",
                              label="not the model's protocol resolution"))
    _legend(fig, handles)
    _save(fig, path)


def gmacs_vs_resolution_figure(data: pd.DataFrame, path: str, colors: dict[str, str]) -> None:
    """data: model, label, resolution, gmacs, bound (crop model at the 100-crop bound), one row per model x res."""
    fig, (ax,) = _panels(1, width=6.4, height=4.2)
    for m, g in data.groupby("model", sort=False):
        g = g.sort_values("resolution")
        ax.plot(g["resolution"], g["gmacs"], color=colors[m], linewidth=1.4)
        for _, r in g.iterrows():
            ax.plot([r["resolution"]], [r["gmacs"]], color=colors[m], marker="o", markersize=6, linestyle="",
                    markerfacecolor="white" if r["bound"] else colors[m])
    res = sorted(set(data["resolution"]))
    ax.set_xticks(res)
    ax.set_xticklabels([f"{r:g}" for r in res])
    ax.margins(x=0.15 if len(res) > 1 else 0.5, y=0.15)
    logy = _log_axis(ax.yaxis, data["gmacs"])
    ax.set_xlabel("input side (px), square input")
    ax.set_ylabel("GMACs per image" + (" (log scale)" if logy else ""))
    ax.grid(True, which="major", linewidth=0.4, alpha=0.5)
    ax.set_title("Compute vs input resolution (model scope, batch 1)", fontsize=11)
    handles = _model_handles(data, colors, list(colors))
    if data["bound"].any():
        handles.append(Line2D([], [], color="0.35", marker="o", markerfacecolor="white", linestyle="",
                              label="crop model at 100 crops (bound)"))
    _legend(fig, handles)
    _save(fig, path)


def _floor_lines(ax, sub: pd.DataFrame, xs: list[float]) -> bool:
    """The compute floor (latency = GFLOPs / peak) per peak kind in `sub`: a line where the rows of that kind used
    one peak, the band between the lowest and the highest where each cell measured its own; returns whether anything
    was drawn."""
    drawn = False
    for i, kind in enumerate(_order(sub["kind"], KINDS)):
        peaks = sorted({p for p in sub[sub["kind"] == kind]["peak"] if p == p and p > 0})
        if not peaks:
            continue
        style = FLOOR_STYLES[i % len(FLOOR_STYLES)]
        if len(peaks) == 1:
            ax.plot(xs, [x / peaks[0] * 1e3 for x in xs], color="0.4", linestyle=style, linewidth=1, zorder=2,
                    label=f"floor at {flops_rate(peaks[0])} ({kind})")
        else:
            ax.fill_between(xs, [x / peaks[-1] * 1e3 for x in xs], [x / peaks[0] * 1e3 for x in xs], color="0.55",
                            alpha=0.3, linewidth=1, linestyle=style, edgecolor="0.4", zorder=2,
                            label=f"floor at {flops_rate(peaks[0])} – {flops_rate(peaks[-1])} ({kind}, "
                                  f"{len(peaks)} measured peaks)")
        drawn = True
    return drawn


def latency_vs_gflops_figure(data: pd.DataFrame, path: str, colors: dict[str, str]) -> None:
    """data: model, label, device, precision, kind (peak kind), gflops (timed path), latency_ms (median), peak
    (GFLOP/s, NaN = none known); one panel per device, log-log, with the floor of every peak the rows used."""
    devices = list(dict.fromkeys(data["device"]))
    fig, axes = _panels(len(devices), width=5.2, height=4.2)
    for ax, device in zip(axes, devices):
        sub = data[data["device"] == device]
        for _, r in sub.iterrows():
            ax.scatter(r["gflops"], r["latency_ms"], color=colors[r["model"]], marker=MARKERS.get(r["precision"], "o"),
                       s=48, zorder=3, edgecolors="white", linewidths=0.6)
        xs = [float(sub["gflops"].min()) / 1.6, float(sub["gflops"].max()) * 1.6]
        floors = _floor_lines(ax, sub, xs)
        _log_axis(ax.xaxis, xs, force=True)
        _log_axis(ax.yaxis, list(sub["latency_ms"]), force=True)
        ax.set_xlim(*xs)
        ax.set_title(textwrap.fill(device, 40), fontsize=10)
        ax.set_xlabel("GFLOPs per image, timed path (log scale)")
        ax.set_ylabel("latency, median (ms, log scale)")
        ax.grid(True, which="major", linewidth=0.4, alpha=0.5)
        if floors:
            ax.legend(loc="lower right", fontsize=7.5, framealpha=0.9)
    _title(fig, "Latency vs compute, against the compute floor (model scope, batch 1)")
    handles = _model_handles(data, colors, list(colors), lines=False)
    precisions = _order(data["precision"], list(PRECISION_NAMES))
    if len(precisions) > 1:
        handles += _precision_handles(precisions, lines=False)
    _legend(fig, handles)
    _save(fig, path)


def params_vs_gmacs_figure(data: pd.DataFrame, path: str, colors: dict[str, str]) -> None:
    """data: model, label, resolution, gmacs, params_m, bound (crop model at the 100-crop bound); one point per
    model x input side, labelled with the side."""
    fig, (ax,) = _panels(1, width=6.4, height=4.2)
    for m, g in data.groupby("model", sort=False):
        g = g.sort_values("gmacs")
        if len(g) > 1:
            ax.plot(g["gmacs"], g["params_m"], color=colors[m], linewidth=1, alpha=0.6)
        for _, r in g.iterrows():
            ax.plot([r["gmacs"]], [r["params_m"]], color=colors[m], marker="o", markersize=6, linestyle="",
                    markerfacecolor="white" if r["bound"] else colors[m])
            ax.annotate(f"{r['resolution']:g}", (r["gmacs"], r["params_m"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=7.5, color=colors[m])
    logx = _log_axis(ax.xaxis, data["gmacs"])
    ax.margins(x=0.15, y=0.2)
    ax.set_xlabel("GMACs per image, model scope, batch 1" + (" (log scale)" if logx else ""))
    ax.set_ylabel("parameters as built (M)")
    ax.grid(True, which="major", linewidth=0.4, alpha=0.5)
    ax.set_title("Size vs compute (point label: input side, px)", fontsize=11)
    handles = _model_handles(data, colors, list(colors), lines=False)
    if data["bound"].any():
        handles.append(Line2D([], [], color="0.35", marker="o", markerfacecolor="white", linestyle="",
                              label="crop model at 100 crops (bound)"))
    _legend(fig, handles)
    _save(fig, path)
