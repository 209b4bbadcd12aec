"""Records -> tidy tables -> the markdown leaderboard and its figures (pandas + tabulate + matplotlib).

`build_leaderboard(results_dir)` rebuilds, from every record under `results/runs/`:
- `results/runs.csv`: one row per cell, fixed column order, numeric columns numeric;
- `results/per_class.csv`: tidy (key, model, dataset, resolution, precision, class_id, class_name, IoU, ACC[, SG-IoU]);
- `results/leaderboard.md`, generated from those two CSVs only (read back from disk, so the page cannot drift from
  them) and never edited by hand:
  accuracy matrices (ours / published (delta), flags with their known reason, SG-IoU beside mIoU), a
  published-vs-measured table, resolution-sweep matrices, efficiency tables (params, GMACs/GFLOPs, compute floor,
  latency, throughput, memory per device and precision), figures, a per-class drill-down, the cells without a
  result, and a provenance + protocol footer;
- the PNG figures it links, named `<stem>.<figure>.png` beside it (bench/plots.py). PNGs of an earlier build of the
  same page that it no longer links are removed.
The compute floor divides GFLOPs by a peak: the record's `peak_gflops`, else the matmul peak `make bench-cpu` measured
on the same CPU at the same thread count (`cpu_speed.csv`), else a datasheet (GPU_PEAKS). The unfiltered page also
carries the "CPU speed" section of `make bench-cpu` when it has run (bench.speed.cpu_speed_section).
`python -m bench.leaderboard [results_dir=...] [model=a,b] [dataset=...] [resolution=...] [precision=...]
[device=h100] [out=leaderboard-h100.md] [tolerance=0.3]` runs it alone (Hydra-style key=value overrides).
"""
from __future__ import annotations

import html
import math
import os
import re
import sys
from dataclasses import dataclass, field

import pandas as pd
from omegaconf import OmegaConf

from bench import BenchError, records

RUN_COLUMNS = [
    "key", "status", "reason", "model", "model_display", "dataset", "dataset_display", "resolution", "precision",
    "batch_size", "repeat", "pipeline_check", "mIoU", "mIoU_current", "mIoU_v06", "miou_formula", "fwIoU", "mACC", "pACC",
    "SG-mIoU", "SG-mIoU_current", "SG-mIoU_v06", "sg_iou_table_official", "params_state_total", "params_total", "params_trainable",
    "params_trainable_published", "params_image_path", "gflops_model", "gflops_end_to_end", "gflops_model_fixed",
    "gflops_model_all_crops", "gflops_per_crop", "mean_crops", "latency_ms_model_median", "latency_ms_model_p90",
    "latency_model_cv", "latency_ms_end_to_end_median", "latency_ms_end_to_end_p90", "latency_ms_per_crop",
    "latency_warmup", "latency_iters", "timer", "threads", "peak_mem_mb", "peak_mem_kind", "profile_resolution",
    "profile_vocabulary_size", "throughput_batch", "throughput_img_s", "images_evaluated", "dataset_images",
    "dataset_images_official", "eval_seconds", "eval_img_s",
    "dataset_settings", "note", "load_note", "checkpoint", "checkpoint_sha256", "git_sha", "torch_version",
    "cuda_version", "device_type", "device_name", "driver", "timestamp",
]
# Never parsed as numbers (a hex sha can look like "123e45"; CUDA "12.10" is not 12.1).
TEXT_COLUMNS = ["key", "status", "reason", "model", "model_display", "dataset", "dataset_display", "precision",
                "miou_formula", "timer", "peak_mem_kind", "dataset_settings", "note", "load_note", "checkpoint",
                "checkpoint_sha256", "git_sha", "torch_version", "cuda_version", "device_type", "device_name", "driver",
                "timestamp", "hostname", "class_name"]
PER_CLASS_COLUMNS = ["key", "model", "dataset", "resolution", "precision", "class_id", "class_name", "IoU", "ACC"]
DATASET_ORDER = ["ade847", "pc459", "ade150", "pc59", "voc20", "voc20b", "synthetic"]
MODEL_ORDER = ["san_b", "san_l", "simseg", "scan_l", "scan_b"]
PRECISION_ORDER = ["fp32", "tf32", "amp_bf16", "bf16", "fp16"]
FILTER_KEYS = ("model", "dataset", "resolution", "precision", "device")
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
CROP_QUERIES = 100      # bench.profile.CROP_QUERIES: crop models run at most one crop per query
STATUS_RANK = {"ok": 0, "error": 2, "missing": 3}   # an ok pipeline check ranks 1: below a real result

# Dense (no 2:4 sparsity) datasheet peaks in TFLOP/s, for the compute floor when a record has no measured
# `peak_gflops`. amp_bf16 runs its matmuls in bf16. Sources: NVIDIA H100 / H200 / A100 / V100 / L4 datasheets
# (sparse figures halved), NVIDIA Ada (RTX 4090) and Ampere GA102 (RTX 3090) architecture whitepapers (tensor
# throughput with FP32 accumulate, as PyTorch uses); shared/specs/peers.md §7.1. Volta has no TF32/BF16 units:
# tf32 runs at the fp32 rate, bf16 is not listed. First matching pattern wins.
GPU_PEAKS: list[tuple[str, str, dict[str, float]]] = [
    (r"H100.*PCIe", "H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    (r"H100.*NVL", "H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"H200", "H200 SXM", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    (r"H100", "H100 SXM5", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    (r"A100", "A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    (r"V100.*PCIE", "V100 PCIe", {"fp32": 14.0, "tf32": 14.0, "fp16": 112.0}),
    (r"V100", "V100 SXM2", {"fp32": 15.7, "tf32": 15.7, "fp16": 125.0}),
    (r"RTX 4090", "RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}),
    (r"RTX 3090", "RTX 3090", {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0, "fp16": 71.0}),
    (r"\bL4\b", "L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
]
PEAK_PRECISION = {"fp32": "fp32", "tf32": "tf32", "amp_bf16": "bf16", "bf16": "bf16", "fp16": "fp16"}

FORMULA_NAMES = {"current": "current detectron2 formula (mean over classes present in the GT)",
                 "v06": "detectron2 v0.6 formula (sum over classes in the GT / number of classes in the GT or the "
                        "prediction)"}
# Dataset facts that explain a gap between the two formulas (specs/datasets.md, specs/san.md §5).
DATASET_NOTES = {"pc459": "PC-459: only 345 of its 459 classes occur in the val GT, so the v0.6 formula (÷ classes "
                          "in GT or prediction) gives a much lower mIoU than the current one (÷ classes in GT); SAN's "
                          "paper 12.6 vs its official log 16.71 is this gap (MendelXu/SAN issue #4)"}
FLAG_LEGEND = {
    "formula": "the published figure matches ours under the other detectron2 mIoU formula (both shown)",
    "partial": "evaluated on part of the split only (max_images): not comparable",
    "settings": "the model's inference settings for this dataset are not published",
    "unexplained": "no known reason: treat as a reproduction gap",
}


# ---------------------------------------------------------------------------------------------------- tables
def runs_table(recs: list[dict]) -> pd.DataFrame:
    rows = [{k: v for k, v in r.items() if k not in ("per_class", "config", "traceback")} for r in recs]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)
    extra = sorted(c for c in df.columns if c not in RUN_COLUMNS)
    df = df.reindex(columns=RUN_COLUMNS + extra)
    for col in df.columns:
        if df[col].dtype.kind in "biufc" or col in TEXT_COLUMNS:
            continue
        converted = pd.to_numeric(df[col], errors="coerce")
        if df[col].notna().sum() and converted.notna().sum() == df[col].notna().sum():
            df[col] = converted
    return df.sort_values(["model", "dataset", "resolution", "precision"], key=_order_key).reset_index(drop=True)


def _order_key(col: pd.Series) -> pd.Series:
    order = {"model": MODEL_ORDER, "dataset": DATASET_ORDER, "precision": PRECISION_ORDER}.get(col.name)
    if order is None:
        return col
    return col.map(lambda v: f"{order.index(v):03d}" if v in order else f"999{v}")


def per_class_table(recs: list[dict]) -> pd.DataFrame:
    rows = [{"key": r["key"], "model": r["model"], "dataset": r["dataset"], "resolution": r["resolution"],
             "precision": r["precision"], **pc} for r in recs if r.get("status") == "ok" for pc in r.get("per_class", [])]
    return pd.DataFrame(rows, columns=None if rows else PER_CLASS_COLUMNS)


# ---------------------------------------------------------------------------------------------------- published
@dataclass
class Source:
    tag: str                      # P (paper table) | L (official log)
    kind: str                     # paper table | official log
    text: str
    miou: dict[str, float]
    formula: str | None           # the mIoU formula the source used, where it is known


@dataclass
class ModelInfo:
    name: str
    display: str
    protocol: int | None
    sources: list[Source] = field(default_factory=list)


def published_figures(conf_dir: str | None = None) -> dict[str, ModelInfo]:
    """model name -> display name, protocol short side and published mIoU sources, from conf/model/*.yaml."""
    out = {}
    folder = os.path.join(conf_dir or CONF_DIR, "model")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".yaml"):
            continue
        cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(folder, name)), resolve=False)
        pub = cfg.get("published") or {}
        sources = []
        if pub.get("miou"):
            sources.append(Source("P", "paper table", pub.get("source", ""), dict(pub["miou"]), pub.get("formula")))
        if pub.get("log_miou"):
            text = pub.get("log_source", "")
            formula = pub.get("log_formula") or ("current" if "current" in text else None)
            sources.append(Source("L", "official log", text, dict(pub["log_miou"]), formula))
        protocol = (cfg.get("protocol") or {}).get("short_side")
        out[cfg["name"]] = ModelInfo(cfg["name"], cfg.get("display", cfg["name"]), protocol, sources)
    return out


# ---------------------------------------------------------------------------------------------------- helpers
def _num(v) -> float | None:
    """A finite float, or None (NaN, None, '', non-numeric)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(v, digits: int = 1) -> str:
    f = _num(v)
    return "–" if f is None else f"{f:,.{digits}f}".replace(",", " ")


def _sig(v) -> str:
    """About three significant figures without exponent notation (0.00287, 2.57, 46.9, 1 930)."""
    f = _num(v)
    if f is None:
        return "–"
    if abs(f) >= 100:
        return f"{f:,.0f}".replace(",", " ")
    return f"{f:.{max(0, 2 - math.floor(math.log10(abs(f))))}f}" if f else "0"


def _int(v) -> str:
    f = _num(v)
    return "–" if f is None else f"{f:.0f}"


def _fmt_pub(v: float) -> str:
    """A published figure with the decimals it was published with (12.6, 16.71)."""
    text = repr(float(v))
    decimals = len(text.split(".")[1]) if "." in text and "e" not in text else 1
    return f"{v:.{max(1, min(decimals, 2))}f}"


def _bool(v) -> bool | None:
    if isinstance(v, bool):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return str(v).strip().lower() in ("true", "1", "1.0", "yes")


def _str(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict], align: dict[str, str] | None = None) -> str:
    """A GitHub markdown table (tabulate); `align` maps a column to 'right'/'left'/'center' (default left)."""
    if not rows:
        return "_none_"
    df = pd.DataFrame(rows).fillna("–")
    df = df.map(lambda v: _cell(str(v)))
    colalign = [(align or {}).get(c, "left") for c in df.columns]
    return df.to_markdown(index=False, colalign=colalign, disable_numparse=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def _precisions(values) -> list[str]:
    vals = set(values)
    return [p for p in PRECISION_ORDER if p in vals] + sorted(vals - set(PRECISION_ORDER))


def _ordered(values, order: list[str]) -> list[str]:
    vals = set(values)
    return [v for v in order if v in vals] + sorted(vals - set(order))


def _res(v) -> str:
    f = _num(v)
    return "–" if f is None else f"{f:g}"


def peak_gflops(row, cpu_peaks: dict | None = None) -> tuple[float | None, str]:
    """Peak GFLOP/s for the row's device and precision: the record's measured `peak_gflops`, else the matmul peak
    `make bench-cpu` measured on the same CPU at the same thread count (cpu_speed.csv), else a datasheet."""
    measured = _num(row.get("peak_gflops"))
    if measured:
        return measured, "measured matmul peak, from the record"
    name = _str(row.get("device_name"))
    key = PEAK_PRECISION.get(_str(row.get("precision")))
    threads = _num(row.get("threads"))
    cpu = (cpu_peaks or {}).get((name, key, int(threads) if threads else None))
    if cpu:
        return cpu, "measured matmul peak, cpu_speed.csv"
    if _str(row.get("device_type")) == "cuda" or "NVIDIA" in name or "GeForce" in name:
        for pattern, label, peaks in GPU_PEAKS:
            if re.search(pattern, name, flags=re.IGNORECASE):
                if key in peaks:
                    return peaks[key] * 1e3, f"{label} datasheet, dense {key}"
                return None, ""
    return None, ""


# ---------------------------------------------------------------------------------------------------- prepare
@dataclass
class Page:
    runs: pd.DataFrame            # filtered, typed
    per_class: pd.DataFrame
    models: dict[str, ModelInfo]
    tolerance: float
    filters: dict
    stem: str
    cpu_peaks: dict = field(default_factory=dict)     # (cpu model, dtype, threads) -> GFLOP/s, from cpu_speed.csv


def read_tables(results_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    text = {c: str for c in TEXT_COLUMNS}
    runs = pd.read_csv(os.path.join(results_dir, "runs.csv"), low_memory=False, dtype=text)
    per_class = pd.read_csv(os.path.join(results_dir, "per_class.csv"), low_memory=False, dtype=text)
    return runs, per_class


def read_cpu_peaks(results_dir: str) -> dict[tuple[str, str, int], float]:
    """The matmul peaks of the newest `make bench-cpu` run per (CPU model, dtype, threads), from cpu_speed.csv."""
    path = os.path.join(results_dir, "cpu_speed.csv")
    if not os.path.isfile(path):
        return {}
    try:
        df = pd.read_csv(path, dtype={"cpu_model": str, "peak_dtype": str, "timestamp": str})
    except (OSError, ValueError):
        return {}
    if not {"cpu_model", "peak_dtype", "threads", "peak_gflops"} <= set(df.columns):
        return {}
    df = df[df["peak_gflops"].map(_num).notna() & df["threads"].map(_num).notna()]
    df = df.sort_values("timestamp", ascending=False, kind="mergesort") if "timestamp" in df else df
    out: dict[tuple[str, str, int], float] = {}
    for _, r in df.iterrows():
        out.setdefault((_str(r["cpu_model"]), _str(r["peak_dtype"]), int(r["threads"])), float(r["peak_gflops"]))
    return out


def cpu_speed_lines(results_dir: str) -> list[str]:
    """The "CPU speed" section that `make bench-cpu` writes (bench.speed.cpu_speed_section), if it has run."""
    try:
        from bench.speed import cpu_speed_section
    except ImportError:
        return []
    text = cpu_speed_section(results_dir).strip()
    return [text, ""] if text else []


def prepare(runs: pd.DataFrame, models: dict[str, ModelInfo]) -> pd.DataFrame:
    """Typed columns and derived ones (at_protocol, device label, ok_result) on the runs table read from CSV."""
    df = runs.copy()
    for col in ("status", "reason", "model", "dataset", "precision", "device_name", "device_type", "timestamp",
                "model_display", "dataset_display", "note", "key"):
        if col not in df:
            df[col] = ""
        df[col] = df[col].map(_str)
    for col in ("pipeline_check", "resolution_is_protocol", "sg_iou_table_official", "has_crops"):
        df[col] = df[col].map(_bool) if col in df else None
    df["resolution"] = pd.to_numeric(df["resolution"], errors="coerce")

    def at_protocol(r) -> bool:
        if r["resolution_is_protocol"] is not None:
            return bool(r["resolution_is_protocol"])
        info = models.get(r["model"])
        return bool(info and info.protocol is not None and _num(r["resolution"]) == float(info.protocol))

    df["at_protocol"] = df.apply(at_protocol, axis=1) if len(df) else pd.Series(dtype=bool)
    df["device"] = [n or t or "unknown device" for n, t in zip(df["device_name"], df["device_type"])]
    df["ok_result"] = (df["status"] == "ok") & ~df["pipeline_check"].fillna(False).astype(bool)
    df["model_label"] = [models[m].display if m in models else (d or m) for m, d in
                         zip(df["model"], df["model_display"])]
    df["dataset_label"] = [d or s for d, s in zip(df["dataset_display"], df["dataset"])]
    df["_rank"] = [(0 if ok else 1) if s == "ok" else STATUS_RANK.get(s, 4) for s, ok in zip(df["status"],
                                                                                             df["ok_result"])]
    return df


def apply_filters(df: pd.DataFrame, filters: dict | None) -> pd.DataFrame:
    """Keep rows whose model/dataset/resolution/precision is listed; `device` matches a substring of the device."""
    for col, allowed in (filters or {}).items():
        if allowed is None:
            continue
        if col not in FILTER_KEYS:
            raise BenchError(f"unknown leaderboard filter {col}=...; allowed: {', '.join(FILTER_KEYS)}")
        values = allowed if isinstance(allowed, (list, tuple)) else str(allowed).split(",")
        values = [str(v).strip() for v in values if str(v).strip()]
        if col == "device":
            pattern = "|".join(re.escape(v) for v in values)
            keep = df["device"].str.contains(pattern, case=False, regex=True) | \
                df["device_type"].str.fullmatch(pattern, case=False)
        elif col == "resolution":
            keep = df["resolution"].map(_res).isin([_res(v) for v in values])
        else:
            keep = df[col].astype(str).isin(values)
        df = df[keep]
    return df


def pick(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """One row per `by` group: ok before error before missing, then the newest record (then the key)."""
    if df.empty:
        return df
    ordered = df.sort_values(["_rank", "timestamp", "key"], ascending=[True, False, True], kind="mergesort")
    return ordered.drop_duplicates(subset=by, keep="first")


# ---------------------------------------------------------------------------------------------------- accuracy
@dataclass
class Compared:
    source: Source
    ref: float
    ours: float
    formula: str                  # our formula used for the delta
    delta: float
    codes: list[str]
    reasons: list[str]


def _ours(r, formula: str | None) -> tuple[float | None, str]:
    headline = _str(r.get("miou_formula")) or "current"
    if formula and _num(r.get(f"mIoU_{formula}")) is not None:
        return _num(r.get(f"mIoU_{formula}")), formula
    return _num(r.get("mIoU")), headline


def _partial(r) -> str:
    done, total = _num(r.get("images_evaluated")), _num(r.get("dataset_images_official"))
    if done is not None and total is not None and done < total:
        return f"evaluated {done:.0f} of {total:.0f} images"
    return ""


def compare(r, source: Source, tolerance: float) -> Compared | None:
    ref = source.miou.get(r["dataset"])
    if ref is None:
        return None
    ours, formula = _ours(r, source.formula)
    if ours is None:
        return None
    delta = ours - float(ref)
    codes, reasons = [], []
    if partial := _partial(r):
        codes.append("partial")
        reasons.append(partial)
    if "settings not published" in _str(r.get("note")):
        codes.append("settings")
        reasons.append(_str(r.get("note")))
    if abs(delta) > tolerance:
        other = "v06" if formula == "current" else "current"
        alt = _num(r.get(f"mIoU_{other}"))
        if source.formula is None and alt is not None and abs(alt - ref) <= tolerance:
            codes.append("formula")
            reasons.append(f"matches our mIoU under the {FORMULA_NAMES[other].split(' (')[0]}, {alt:.2f} "
                           f"(Δ {alt - ref:+.2f})" + (" (see below)" if r["dataset"] in DATASET_NOTES else ""))
        elif not codes:
            codes.append("unexplained")
            reasons.append(f"|Δ| > {tolerance:g} with no known reason" +
                           (f"; under the {FORMULA_NAMES[other].split(' (')[0]} ours is {alt:.2f}"
                            if alt is not None and abs(alt - ours) >= 0.05 else ""))
    return Compared(source, float(ref), ours, formula, delta, codes, reasons)


def _both_formulas(r) -> str:
    """' (v0.6 12.6)' when the other formula gives a visibly different mIoU, else ''."""
    cur, v06 = _num(r.get("mIoU_current")), _num(r.get("mIoU_v06"))
    if cur is None or v06 is None or abs(cur - v06) < 0.05:
        return ""
    headline = _str(r.get("miou_formula")) or "current"
    return f" (v0.6 {v06:.1f})" if headline == "current" else f" (current {cur:.1f})"


def _sg(r) -> str:
    sg = _num(r.get("SG-mIoU"))
    if sg is None:
        return ""
    return f" · SG {sg:.1f}" + ("" if r.get("sg_iou_table_official") else "*")


def accuracy_matrix(page: Page, sub: pd.DataFrame, compare_published: bool, used_codes: set[str]) -> str:
    """Models x datasets; one selected record per cell."""
    cells = pick(sub, ["model", "dataset"])
    models = _ordered(cells["model"], MODEL_ORDER)
    datasets = _ordered(cells["dataset"], DATASET_ORDER)
    labels = {d: cells[cells["dataset"] == d]["dataset_label"].iloc[0] for d in datasets}
    best = {}
    for d in datasets:
        res = cells[(cells["dataset"] == d) & cells["ok_result"]]
        vals = [_num(r.get("mIoU")) for _, r in res.iterrows() if _num(r.get("mIoU")) is not None and not _partial(r)]
        if len(vals) >= 2:
            best[d] = max(vals)
    rows = []
    for m in models:
        info = page.models.get(m)
        mrows = cells[cells["model"] == m]
        row = {"model": mrows["model_label"].iloc[0],
               "res": "/".join(_res(v) for v in sorted(set(mrows["resolution"])))}
        for d in datasets:
            hit = mrows[mrows["dataset"] == d]
            row[labels[d]] = _accuracy_cell(hit.iloc[0] if len(hit) else None, info, d, page.tolerance,
                                             compare_published, best.get(d), used_codes)
        rows.append(row)
    align = {"res": "right", **{labels[d]: "right" for d in datasets}}
    return _table(rows, align)


def _primary_source(info: ModelInfo | None, dataset: str) -> Source | None:
    for s in (info.sources if info else []):
        if dataset in s.miou:
            return s
    return None


def _accuracy_cell(r, info: ModelInfo | None, dataset: str, tolerance: float, compare_published: bool,
                   best: float | None, used_codes: set[str]) -> str:
    source = _primary_source(info, dataset) if compare_published else None
    pub = f" / {_fmt_pub(source.miou[dataset])}{_sup(source.tag)}" if source else ""
    if r is None:
        return f"–{pub}"
    if r["status"] != "ok":
        return f"– ({r['status']}){pub}"
    if r["pipeline_check"]:
        return "pipeline check"
    ours = _num(r.get("mIoU"))
    text = _fmt(ours)
    if best is not None and ours is not None and ours >= best and not _partial(r):
        text = f"**{text}**"
    text += _both_formulas(r)
    codes: list[str] = []
    if source:
        c = compare(r, source, tolerance)
        if c is not None:
            text += f"{pub} ({c.delta:+.1f})"
            codes = c.codes
    elif partial := _partial(r):
        codes = ["partial"]
    if codes:
        used_codes.update(codes)
        text += " ⚠ " + ", ".join(codes)
    return text + _sg(r)


def _sup(tag: str) -> str:
    return {"P": "ᴾ", "L": "ᴸ"}.get(tag, tag)


def published_vs_measured(page: Page, sub: pd.DataFrame) -> str:
    cells = pick(sub[sub["ok_result"]], ["model", "dataset", "precision"])
    cells = cells.sort_values(["model", "dataset", "precision"], key=_order_key, kind="mergesort")
    rows = []
    for _, r in cells.iterrows():
        info = page.models.get(r["model"])
        base = {"model": r["model_label"], "dataset": r["dataset_label"], "res": _res(r["resolution"]),
                "precision": r["precision"], "device": r["device"],
                "images": f"{_int(r.get('images_evaluated'))}/{_int(r.get('dataset_images_official'))}",
                "mIoU current": _fmt(r.get("mIoU_current"), 2), "mIoU v0.6": _fmt(r.get("mIoU_v06"), 2),
                "SG-mIoU": _fmt(r.get("SG-mIoU"), 2) + ("" if _num(r.get("SG-mIoU")) is None or
                                                        r.get("sg_iou_table_official") else "*")}
        compared = [c for s in (info.sources if info else []) if (c := compare(r, s, page.tolerance))]
        if not compared:
            rows.append({**base, "published": "–", "source": "none published", "Δ": "–", "flag": "",
                         "reason": _partial(r)})
        for c in compared:
            rows.append({**base, "published": _fmt_pub(c.ref), "source": f"{c.source.kind} ({_sup(c.source.tag)})",
                         "Δ": f"{c.delta:+.2f}" + (" (v0.6)" if c.formula == "v06" else ""),
                         "flag": ("⚠ " + ", ".join(c.codes)) if c.codes else "✓", "reason": "; ".join(c.reasons)})
    return _table(rows, {k: "right" for k in ("res", "images", "mIoU current", "mIoU v0.6", "SG-mIoU",
                                              "published", "Δ")})


def accuracy_section(page: Page) -> list[str]:
    df = page.runs[page.runs["status"].isin(["ok", "missing", "error"])]
    tol = page.tolerance
    out = ["## Accuracy", "",
           f"mIoU in %, single scale, argmax label map at the original image size. A cell reads "
           f"`ours / published (Δ)`; ᴾ = paper table, ᴸ = official release log (sources under *Provenance*). "
           f"`(v0.6 x)` is our mIoU under detectron2 v0.6's formula where it differs visibly from the headline "
           f"formula; `SG` is SCAN's SG-mIoU where the dataset has a relation table (* = table not from the "
           f"official release). ⚠ marks |Δ| > {tol:g} mIoU or a cell that is not comparable, with the reason; "
           f"**bold** is the best measured mIoU of a column. '–' is a cell without a result (see "
           f"[Cells without a result](#cells-without-a-result)); a pipeline check (synthesized weights or data) "
           f"never shows an mIoU.", ""]
    proto = df[df["at_protocol"]]
    if df.empty:
        return out + ["_No records yet: run `make bench`._", ""]
    used: set[str] = set()
    matrices = []
    for prec in _precisions(proto["precision"]):
        sub = proto[proto["precision"] == prec]
        matrices += [f"### mIoU at each model's own protocol resolution, {prec}", "",
                     accuracy_matrix(page, sub, True, used), ""]
    sweep = []
    for res in sorted(set(df[~df["at_protocol"]]["resolution"].dropna())):
        at = df[df["resolution"] == res]
        for prec in _precisions(at["precision"]):
            sweep += [f"#### Short side {res:g}, {prec}", "",
                      accuracy_matrix(page, at[at["precision"] == prec], False, used), ""]
    out += matrices
    if used:
        out += ["⚠ " + "; ".join(f"**{c}**: {FLAG_LEGEND[c]}" for c in FLAG_LEGEND if c in used) + ".", ""]
    if not proto[proto["ok_result"]].empty:
        out += ["### Published vs measured, cell by cell", "",
                f"Every measured cell at its model's protocol resolution against every published figure. Δ is ours "
                f"minus published, computed with the published source's mIoU formula where it is known (official "
                f"logs: current formula), else with our headline formula; ✓ = within {tol:g} mIoU.", "",
                published_vs_measured(page, proto), ""]
        notes = [DATASET_NOTES[d] for d in _ordered(proto[proto["ok_result"]]["dataset"], DATASET_ORDER)
                 if d in DATASET_NOTES]
        out += [f"{n}." for n in notes] + ([""] if notes else [])
    if sweep:
        out += ["### Resolution sweep", "",
                "mIoU at other input sizes (short side as given, long side ≤ 4× it). Published figures are at each "
                "model's protocol resolution, so they are not compared here.", "", *sweep]
    return out


# ---------------------------------------------------------------------------------------------------- efficiency
def _has_crops(r) -> bool:
    return bool(r.get("has_crops")) or _num(r.get("gflops_per_crop")) is not None


def crop_counts(df: pd.DataFrame) -> dict[tuple, tuple[float, str]]:
    """(model, resolution) -> (crops the totals assume, how it was obtained) for crop models."""
    out = {}
    eff = df[df.apply(_has_crops, axis=1)] if len(df) else df
    for (m, res), g in eff.groupby(["model", "resolution"]):
        measured = g[g["ok_result"]]["mean_crops"].map(_num).dropna() if "mean_crops" in g else []
        if len(measured):
            n_ds = g[g["ok_result"] & g["mean_crops"].notna()]["dataset"].nunique()
            out[(m, res)] = (float(measured.mean()), f"mean of {n_ds} dataset{'s' if n_ds != 1 else ''}")
        else:
            out[(m, res)] = (float(CROP_QUERIES), "bound: one per query")
    return out


PLAIN_FIGURE = {"gflops_model_fixed": "gflops_model", "latency_ms_model_fixed": "latency_ms_model_median",
                "latency_ms_model_p90_fixed": "latency_ms_model_p90",
                "latency_ms_end_to_end_fixed": "latency_ms_end_to_end_median"}


def _at_crops(r, fixed: str, n: float | None) -> float | None:
    """A crop model's total at n crops (fixed part + n x per crop); other models: the record's own figure."""
    if not _has_crops(r) or n is None:
        return _num(r.get(PLAIN_FIGURE[fixed]))
    base = _num(r.get(fixed))
    per = _num(r.get("latency_ms_per_crop" if fixed.startswith("latency") else "gflops_per_crop"))
    if base is None or per is None:
        return None
    return base + n * per


def _has_efficiency(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    g = df["gflops_model"].map(_num).notna() if "gflops_model" in df else False
    lat = df["latency_ms_model_median"].map(_num).notna() if "latency_ms_model_median" in df else False
    return df[g | lat]


def compute_rows(page: Page, crops: dict) -> list[dict]:
    eff = pick(_has_efficiency(page.runs), ["model", "resolution"])
    eff = eff.sort_values(["model", "resolution"], key=_order_key, kind="mergesort")
    rows = []
    for _, r in eff.iterrows():
        n, how = crops.get((r["model"], r["resolution"]), (None, ""))
        gflops = _at_crops(r, "gflops_model_fixed", n)
        crop = _has_crops(r)
        rows.append({
            "model": r["model_label"], "short side": _res(r["resolution"]),
            "input counted": f"{_res(r.get('profile_resolution'))}²",
            "K": _fmt(r.get("profile_vocabulary_size"), 0),
            "params (M)": _millions(r.get("params_total")),
            "trainable, published (M)": _millions(r.get("params_trainable_published")),
            "image path (M)": _millions(r.get("params_image_path")),
            "GMACs": _sig(gflops / 2 if gflops is not None else None),
            "GFLOPs (= 2 × GMACs)": _sig(gflops),
            "crops": f"{_crops(n)} ({how})" if crop and n is not None else "–",
            "GFLOPs per crop": _sig(r.get("gflops_per_crop")) if crop else "–",
            "GFLOPs at 100 crops": _sig(_at_crops(r, "gflops_model_fixed", float(CROP_QUERIES))) if crop else "–",
            "_model": r["model"], "_res": r["resolution"], "_gmacs": gflops / 2 if gflops is not None else None,
            "_bound": crop and how.startswith("bound"),
        })
    return rows


def speed_rows(page: Page, device: str, crops: dict) -> tuple[list[dict], dict]:
    sub = _has_efficiency(page.runs[page.runs["device"] == device])
    eff = pick(sub, ["model", "resolution", "precision"])
    eff = eff.sort_values(["model", "resolution", "precision"], key=_order_key, kind="mergesort")
    rows, peaks = [], {}
    for _, r in eff.iterrows():
        n = crops.get((r["model"], r["resolution"]), (None, ""))[0]
        gflops = _at_crops(r, "gflops_model_fixed", n)
        median = _at_crops(r, "latency_ms_model_fixed", n)
        p90 = _at_crops(r, "latency_ms_model_p90_fixed", n)
        e2e = _at_crops(r, "latency_ms_end_to_end_fixed", n)
        peak, source = peak_gflops(r, page.cpu_peaks)
        if peak:
            peaks[r["precision"]] = (peak, source)
        floor = gflops / peak * 1e3 if gflops is not None and peak else None
        below = floor is not None and median is not None and median < floor
        measured_tp = _num(r.get("throughput_img_s"))
        batch = _num(r.get("latency_batch_size")) or 1.0
        throughput = measured_tp if measured_tp is not None else (1e3 / median * batch if median else None)
        cv = _num(r.get("latency_model_cv"))
        kind = {"cuda_max_allocated": "CUDA", "process_max_rss": "RSS"}.get(_str(r.get("peak_mem_kind")), "")
        rows.append({
            "model": r["model_label"], "short side": _res(r["resolution"]), "precision": r["precision"],
            "threads": _int(r.get("threads")), "crops": _crops(n) if _has_crops(r) and n is not None else "–",
            "floor ms": _sig(floor), "median ms": _fmt(median, 1) + (" ⚠" if below else ""),
            "p90 ms": _fmt(p90, 1), "CV %": _fmt(cv * 100 if cv is not None else None, 1),
            "end-to-end ms": _fmt(e2e, 1),
            "img/s": _sig(throughput),
            "peak mem MB": f"{_fmt(r.get('peak_mem_mb'), 0)} {kind}".strip(),
            "timed iters": f"{_fmt(r.get('latency_iters'), 0)} (+{_fmt(r.get('latency_warmup'), 0)} warm-up)",
        })
    return rows, peaks


def _crops(n: float) -> str:
    return f"{n:.1f}".removesuffix(".0")


def _millions(v) -> str:
    f = _num(v)
    return "–" if f is None else f"{f / 1e6:.2f}"


def _flops_rate(gflops_per_s: float) -> str:
    return f"{gflops_per_s / 1e3:.1f} TFLOP/s" if gflops_per_s >= 1e3 else f"{gflops_per_s:.1f} GFLOP/s"


def crop_dataset_rows(page: Page) -> list[dict]:
    sub = page.runs[page.runs["ok_result"]]
    if sub.empty or "mean_crops" not in sub:
        return []
    sub = sub[sub["mean_crops"].map(_num).notna()]
    sub = pick(sub, ["model", "dataset", "resolution", "precision", "device"])
    sub = sub.sort_values(["model", "dataset", "resolution", "precision"], key=_order_key, kind="mergesort")
    return [{"model": r["model_label"], "dataset": r["dataset_label"], "short side": _res(r["resolution"]),
             "precision": r["precision"], "device": r["device"], "mean crops": _fmt(r.get("mean_crops"), 1),
             "GFLOPs": _sig(r.get("gflops_model")), "median ms": _fmt(r.get("latency_ms_model_median"), 1)}
            for _, r in sub.iterrows()]


REPEAT_GROUP = ["model", "dataset", "resolution", "precision", "device", "compile", "threads", "batch_size",
                "latency_iters"]


def repeatability_rows(page: Page) -> list[dict]:
    """Cells measured more than once (config `repeat=0,1,...`): the spread of the per-run median latencies."""
    df = page.runs
    if df.empty or "repeat" not in df or "latency_ms_model_median" not in df:
        return []
    df = df[df["latency_ms_model_median"].map(_num).notna() & df["repeat"].map(_num).notna()]
    cols = [c for c in REPEAT_GROUP if c in df]
    rows = []
    for _, g in df.groupby([df[c].astype(str) for c in cols], sort=False):
        g = g.drop_duplicates(subset=["repeat"], keep="last")
        if len(g) < 2:
            continue
        med = g["latency_ms_model_median"].astype(float)
        within = g["latency_model_cv"].map(_num).dropna() if "latency_model_cv" in g else pd.Series(dtype=float)
        e2e = g["latency_ms_end_to_end_median"].map(_num).dropna() if "latency_ms_end_to_end_median" in g \
            else pd.Series(dtype=float)
        r = g.iloc[0]
        rows.append({"model": r["model_label"], "dataset": r["dataset_label"], "short side": _res(r["resolution"]),
                     "precision": r["precision"], "device": r["device"], "threads": _int(r.get("threads")),
                     "runs": str(len(g)), "timed iters per run": _fmt(r.get("latency_iters"), 0),
                     "median of medians ms": _fmt(float(med.median()), 1),
                     "range ms": f"{med.min():.1f}–{med.max():.1f}",
                     "CV across runs %": _fmt(float(med.std(ddof=1) / med.mean() * 100), 2),
                     "mean CV within a run %": _fmt(float(within.mean() * 100) if len(within) else None, 2),
                     "end-to-end CV across runs %": _fmt(float(e2e.std(ddof=1) / e2e.mean() * 100)
                                                         if len(e2e) >= 2 else None, 2)})
    return rows


def overhead_rows(page: Page) -> list[dict]:
    """Full evaluation throughput (data loading, model, scores at full size, confusion) vs model-only throughput at
    the same batch and precision: the share of the model's speed the harness keeps."""
    df = page.runs
    need = ("eval_img_s", "throughput_img_s", "throughput_batch")
    if df.empty or any(c not in df for c in need):
        return []
    df = df[(df["status"] == "ok") & df["eval_img_s"].map(_num).notna() & df["throughput_img_s"].map(_num).notna()]
    rows = []
    for _, r in pick(df, ["model", "dataset", "resolution", "precision", "device", "batch_size"]).iterrows():
        ev, tp = float(r["eval_img_s"]), float(r["throughput_img_s"])
        same = _num(r.get("batch_size")) == _num(r.get("throughput_batch"))
        rows.append({"model": r["model_label"], "dataset": r["dataset_label"], "short side": _res(r["resolution"]),
                     "precision": r["precision"], "device": r["device"], "batch": _int(r.get("batch_size")),
                     "images": _int(r.get("images_evaluated")),
                     "evaluation img/s": _sig(ev), "model-only img/s": _sig(tp),
                     "evaluation ÷ model-only": f"{ev / tp:.1%}" + ("" if same else " (batches differ)")
                                              + (" (model-only: fixed part)" if _has_crops(r) else "")})
    return rows


def _captioned_table(heading: str, rows: list[dict], caption: str, right: tuple[str, ...]) -> list[str]:
    """A `###` subsection (heading, caption, table with `right` columns right-aligned); nothing without rows."""
    if not rows:
        return []
    return [f"### {heading}", "", caption, "", _table(rows, {k: "right" for k in right}), ""]


def efficiency_section(page: Page) -> list[str]:
    out = ["## Efficiency", ""]
    eff = _has_efficiency(page.runs)
    if eff.empty:
        return out + ["_No efficiency figures yet._", ""]
    crops = crop_counts(page.runs)
    rows = compute_rows(page, crops)
    out += ["### Size and compute", "",
            "Parameters in millions: `params` = every parameter of the model as built (frozen CLIP included), "
            "`trainable, published` = the trainable count the authors report, `image path` = everything but the "
            "text encoder. **FLOPs convention: `torch.utils.flop_counter` over one forward of a square input "
            "(`input counted`), batch 1, model scope (normalised padded tensor in → masks and class logits out), "
            "text features for K classes cached (text encoder not run), attention counted; 1 MAC = 2 FLOPs, so "
            "GMACs = GFLOPs / 2 — papers that say \"GFLOPs\" usually mean GMACs.** Norms, softmax, GELU, "
            "interpolation and other non-matmul ops are not counted. Crop models (SimSeg, SCAN) are counted as a "
            "fixed part plus a per-crop cost: totals at the `crops` shown (mean measured crop count of the "
            "evaluated datasets, else the bound of 100 = one per query) and at 100 crops.", "",
            _table([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
                   {k: "right" for k in ("short side", "input counted", "K", "params (M)", "trainable, published (M)",
                                         "image path (M)", "GMACs", "GFLOPs (= 2 × GMACs)", "GFLOPs per crop",
                                         "GFLOPs at 100 crops")}), ""]
    for device in sorted(set(eff["device"])):
        srows, peaks = speed_rows(page, device, crops)
        env = eff[eff["device"] == device].iloc[0]
        peak_txt = "; ".join(f"{p}: {_flops_rate(peaks[p][0])} ({peaks[p][1]})" for p in _precisions(peaks))
        driver = f", driver {_str(env.get('driver'))}" if _str(env.get("driver")) else ""
        out += [f"### Speed and memory on {device}", "",
                f"Device type {env['device_type'] or '–'}{driver}, torch {_str(env.get('torch_version')) or '–'} "
                f"(CUDA {_str(env.get('cuda_version')) or 'none'}), timer {_str(env.get('timer')) or '–'}. "
                f"Compute peaks used for the floor: {peak_txt or 'none known for this device (the floor is –)'}.", "",
                _table(srows, {k: "right" for k in ("short side", "threads", "crops", "floor ms", "median ms",
                                                    "p90 ms", "CV %", "end-to-end ms", "img/s", "peak mem MB")}), ""]
    out += ["Latency is per image at batch 1 after warm-up: `median ms`/`p90 ms` for the model scope (the "
            "FLOPs' scope), `end-to-end ms` from the decoded uint8 image to the label map at its original size "
            "(resize, normalise, pad, model, per-class scores, argmax). `floor ms` = GFLOPs ÷ the device's peak "
            "GFLOP/s for that precision: no implementation can be faster (⚠ = a median below the floor, i.e. "
            "something was not timed). `img/s` = 1000 ÷ median ms × batch (1) unless the record holds a measured "
            "throughput. `CV` = standard deviation ÷ mean of the timed iterations. Peak memory: CUDA = "
            "`torch.cuda.max_memory_allocated`, RSS = the process's peak resident set (includes the Python "
            "runtime and the weights).", ""]
    out += _captioned_table(
        "Repeatability", repeatability_rows(page),
        "The same cell measured as separate runs in a row (`repeat=0,1,...`, each its own record and process): the "
        "spread of the per-run median latency (model scope) across runs, beside the spread of the timed iterations "
        "within a run.",
        ("short side", "threads", "runs", "timed iters per run", "median of medians ms", "range ms",
         "CV across runs %", "mean CV within a run %", "end-to-end CV across runs %"))
    out += _captioned_table(
        "Harness overhead", overhead_rows(page),
        "Images/s of a full evaluation (DataLoader decode and resize, model, per-class scores at the original size, "
        "argmax, confusion matrix) over the images/s of the model scope alone on a pre-made batch, at the same "
        "batch and precision.",
        ("short side", "batch", "images", "evaluation img/s", "model-only img/s", "evaluation ÷ model-only"))
    out += _captioned_table(
        "Crop models: cost per dataset", crop_dataset_rows(page),
        "SimSeg and SCAN classify one CLIP crop per kept mask proposal, so their cost depends on the data: the mean "
        "crop count of each evaluated dataset and the totals at that count.",
        ("short side", "mean crops", "GFLOPs", "median ms"))
    return out


# ---------------------------------------------------------------------------------------------------- plots
def plots_section(page: Page, results_dir: str) -> tuple[list[str], list[str]]:
    """The figures (written now) and their markdown; returns (markdown lines, file names written)."""
    from bench import plots

    out = ["## Plots", ""]
    written: list[str] = []
    all_models = _ordered(page.runs["model"], MODEL_ORDER)
    colors = plots.model_colors(all_models, MODEL_ORDER)
    labels = {m: page.models[m].display if m in page.models else m for m in all_models}
    res_ok = page.runs[page.runs["ok_result"] & page.runs["mIoU"].map(_num).notna()] if len(page.runs) else page.runs
    if len(res_ok):  # a partial evaluation (max_images) is no point of comparison
        res_ok = res_ok[[not _partial(r) for _, r in res_ok.iterrows()]]

    def emit(heading: str, title: str, name: str, draw, caption: str = "") -> None:
        fname = f"{page.stem}.{name}.png"
        draw(os.path.join(results_dir, fname))
        written.append(fname)
        out.extend([heading, "", *([caption, ""] if caption else []), f"![{title}]({fname})", ""])

    # Pareto fronts: per resolution group and device, one panel per dataset
    pts = res_ok[res_ok["latency_ms_model_median"].map(_num).notna()] if len(res_ok) else res_ok
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
                             "latency_ms": g["latency_ms_model_median"].map(_num), "miou": g["mIoU"].map(_num)})
        title = f"mIoU vs latency {where}, {device}"
        emit(f"#### {where[0].upper()}{where[1:]}, {device}", title, f"pareto-{gname}-{_slug(device)}",
             lambda p, data=data, title=title: plots.pareto_figure(data, title, p, colors, DATASET_ORDER))

    sel = pick(res_ok, ["model", "dataset", "resolution", "precision"]) if len(res_ok) else res_ok
    if sel.empty:
        out += ["### mIoU vs resolution", "", "_No plot: no measured mIoU yet._", ""]
    else:
        data = pd.DataFrame({"model": sel["model"], "label": sel["model"].map(labels), "dataset": sel["dataset"],
                             "dataset_label": sel["dataset_label"], "precision": sel["precision"],
                             "resolution": sel["resolution"], "miou": sel["mIoU"].map(_num),
                             "at_protocol": sel["at_protocol"]})
        emit("### mIoU vs resolution", "mIoU vs resolution", "miou-vs-resolution",
             lambda p: plots.miou_vs_resolution_figure(data, p, colors, DATASET_ORDER, PRECISION_ORDER),
             "One line per model (and precision, by line style) per dataset: headline mIoU against the input short "
             "side; hollow markers are resolutions other than the model's protocol. Cells evaluated on part of a "
             "split are left out.")

    crops = crop_counts(page.runs)
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
    return out, written


def _remove_stale_pngs(results_dir: str, stem: str, written: list[str]) -> None:
    """Delete `<stem>.*.png` that this build did not write, unless another page in results_dir links it, and the
    temp files of a killed build."""
    linked: set[str] = set(written)
    for name in os.listdir(results_dir):
        if name.endswith(".md") and name != f"{stem}.md":
            try:
                with open(os.path.join(results_dir, name)) as f:
                    linked.update(re.findall(r"\]\(([^)\s]+\.png)\)", f.read()))
            except OSError:
                pass
    for name in os.listdir(results_dir):
        if name.startswith(f"{stem}.") and name.endswith(".png") and name not in linked:
            os.unlink(os.path.join(results_dir, name))
        elif (m := re.fullmatch(rf"\.tmp-(\d+)-{re.escape(stem)}\..+\.png", name)) and not _alive(int(m.group(1))):
            os.unlink(os.path.join(results_dir, name))     # left by a build that was killed while saving


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# ---------------------------------------------------------------------------------------------------- drill-down
def drill_down_section(page: Page) -> list[str]:
    out = ["## Per-class drill-down", ""]
    ok = page.runs[page.runs["ok_result"]]
    pc = page.per_class[page.per_class["key"].isin(set(ok["key"]))] if len(page.per_class) else page.per_class
    ok = ok[ok["key"].isin(set(pc["key"]))] if len(pc) else ok.iloc[0:0]
    if ok.empty:
        return out + ["_No per-class results yet._", ""]
    ok = ok.assign(_proto=~ok["at_protocol"],
                   _prec=ok["precision"].map(lambda p: PRECISION_ORDER.index(p) if p in PRECISION_ORDER else 99))
    ok = ok.sort_values(["_proto", "_prec", "timestamp", "key"], ascending=[True, True, False, True], kind="mergesort")
    ok = ok.drop_duplicates(["model", "dataset"], keep="first")
    ok = ok.sort_values(["model", "dataset"], key=_order_key, kind="mergesort")
    exact = "pred_pixels" in pc.columns
    out += ["For each (model, dataset), from `per_class.csv`, the cell at the model's protocol resolution (else "
            "the newest run at another resolution), fp32 first: the 10 best and 10 worst classes by IoU (%) among "
            "the classes present in the val GT, and the classes "
            + ("never predicted (present in the GT, not one pixel of the class in any prediction)." if exact else
               "never predicted correctly (present in the GT, IoU = 0: not one true-positive pixel)."), ""]
    for _, r in ok.iterrows():
        rows = pc[pc["key"] == r["key"]].copy()
        rows["IoU"] = pd.to_numeric(rows["IoU"], errors="coerce")
        present = rows[rows["IoU"].notna()]
        best = present.sort_values(["IoU", "class_id"], ascending=[False, True], kind="mergesort").head(10)
        worst = present.sort_values(["IoU", "class_id"], ascending=[True, True], kind="mergesort").head(10)
        if exact:
            never = present[pd.to_numeric(present["pred_pixels"], errors="coerce") == 0]
        else:
            never = present[present["IoU"] == 0]
        never = never.sort_values("class_id")
        table = []
        for i in range(max(len(best), len(worst))):
            b = best.iloc[i] if i < len(best) else None
            w = worst.iloc[i] if i < len(worst) else None
            table.append({"#": str(i + 1), "best class": _str(b["class_name"]) if b is not None else "",
                          "IoU": _fmt(b["IoU"]) if b is not None else "",
                          "worst class": _str(w["class_name"]) if w is not None else "",
                          "IoU ": _fmt(w["IoU"]) if w is not None else ""})
        absent = len(rows) - len(present)
        partial = f", {_partial(r)}" if _partial(r) else ""
        summary = (f"{r['model_label']} · {r['dataset_label']} (short side {_res(r['resolution'])}, {r['precision']}, "
                   f"mIoU {_fmt(r.get('mIoU'))}{partial}): {len(present)} of {len(rows)} classes in the GT, "
                   f"{len(never)} never predicted{'' if exact else ' correctly'}")
        names = "; ".join(_str(n) for n in never["class_name"]) or "none"
        out += ["<details>", f"<summary>{html.escape(summary)}</summary>", "",
                _table(table, {"#": "right", "IoU": "right", "IoU ": "right"}), "",
                f"Never predicted{'' if exact else ' correctly'} ({len(never)}): {_cell(names)}."]
        if absent:
            out.append(f"Absent from the val GT (IoU undefined): {_plural(absent, 'class')}.")
        out += ["", "</details>", ""]
    return out


# ---------------------------------------------------------------------------------------------------- the rest
def no_result_section(page: Page) -> list[str]:
    df = page.runs
    bad = df[(df["status"] != "ok") | df["pipeline_check"].fillna(False).astype(bool)]
    out = ["## Cells without a result", ""]
    if bad.empty:
        return out + ["_Every cell has a result._" if len(df) else "_No cells._", ""]
    bad = bad.sort_values(["model", "dataset", "resolution", "precision"], key=_order_key, kind="mergesort")
    rows = []
    for _, r in bad.iterrows():
        pipeline = r["status"] == "ok"
        reason = ("pipeline check: synthesized weights or data ran end to end; its mIoU is not a result"
                  if pipeline else _str(r["reason"]) or "–")
        has_eff = _num(r.get("gflops_model")) is not None
        rows.append({"model": r["model_label"], "dataset": r["dataset_label"], "short side": _res(r["resolution"]),
                     "precision": r["precision"], "device": r["device"],
                     "status": "pipeline check" if pipeline else r["status"], "reason": reason,
                     "efficiency figures": "yes" if has_eff else "no"})
    out += ["`missing` = weights or data not found where expected (the reason says where; `make weights`, "
            "`bench.data.prepare`); `error` = the cell failed (one-line reason; full traceback in its record). "
            "Efficiency figures of a missing cell still appear in the efficiency tables and the GMACs plot, never "
            "in an mIoU table or plot.", "",
            _table(rows, {"short side": "right"}), ""]
    return out


def provenance_section(page: Page) -> list[str]:
    df = page.runs
    out = ["## Provenance and protocol", ""]
    if df.empty:
        return out + ["_No records._", ""]
    envs = []
    cols = ["device", "device_type", "driver", "torch_version", "cuda_version"]
    for col in cols + ["git_sha"]:
        if col not in df:
            df = df.assign(**{col: ""})
    keyed = df.assign(**{c: df[c].map(_str) for c in cols + ["git_sha"]})
    for env, g in keyed.groupby(cols, sort=True):
        stamps = sorted(t for t in g["timestamp"] if t)
        envs.append({"device": env[0], "type": env[1] or "–", "driver": env[2] or "–", "torch": env[3] or "–",
                     "CUDA": env[4] or "none", "git sha": ", ".join(sorted(set(g["git_sha"]) - {""})) or "–",
                     "records": str(len(g)),
                     "dates (UTC)": (f"{stamps[0][:10]} – {stamps[-1][:10]}" if stamps and stamps[0][:10] !=
                                     stamps[-1][:10] else (stamps[0][:10] if stamps else "–"))})
    formulas = sorted(set(df["miou_formula"].map(_str)) - {""}) if "miou_formula" in df else []
    out += [_table(envs, {"records": "right"}), "",
            "**Protocol.**",
            "- *Accuracy*: single-scale inference at the model's protocol resolution ("
            + "".join(f"{page.models[m].display} short side {page.models[m].protocol}; " for m in
                      _ordered(set(df["model"]) & set(page.models), MODEL_ORDER) if page.models[m].protocol) +
            "long side ≤ 4× the short side) unless a resolution is given; the argmax label map at the "
            "original image size is scored with a detectron2-compatible `SemSegEvaluator`. Headline mIoU formula: "
            + (", ".join(FORMULA_NAMES.get(f, f) for f in formulas) or "–") +
            "; the other formula is in `runs.csv` (`mIoU_current`, `mIoU_v06`). SG-mIoU: SCAN's semantic-guided IoU "
            "with the same denominator as the headline mIoU.",
            "- *Counted*: `torch.utils.flop_counter.FlopCounterMode`, one forward at batch 1 of a square input, "
            "model scope, cached text features, attention forced onto the math kernel so it is counted; "
            "2 FLOPs per MAC; parameters from the built model.",
            "- *Timed*: CUDA events on GPU, `perf_counter` on CPU; warm-up iterations untimed, then median, p90 and "
            "CV over the timed iterations (counts in the speed tables); model scope and end-to-end scope as above; "
            "crop models timed as the fixed part plus one batch of crops, scaled to the crop count.",
            f"- *Compared*: |Δ| > {page.tolerance:g} mIoU is flagged. Published sources:"]
    for m in _ordered(list(page.models), MODEL_ORDER):
        info = page.models[m]
        if m not in set(df["model"]):
            continue
        for s in info.sources:
            out.append(f"  - {info.display} {_sup(s.tag)} ({s.kind}): {s.text or 'source not recorded'}")
    out += ["", "Generated by `bench/leaderboard.py` from `runs.csv` and `per_class.csv` (themselves rebuilt from "
                "`runs/*.json`); every number above comes from those files or from `conf/model/*.yaml` "
                "(published figures).", ""]
    return out


def markdown(page: Page, plots_lines: list[str], cpu_speed: list[str] = ()) -> str:
    df = page.runs
    n_ok = int(df["ok_result"].sum()) if len(df) else 0
    n_pipe = int(((df["status"] == "ok") & df["pipeline_check"].fillna(False).astype(bool)).sum()) if len(df) else 0
    counts = (f"{_plural(len(df), 'record')}: {n_ok} with a result, {int((df['status'] == 'missing').sum())} "
              f"missing, {int((df['status'] == 'error').sum())} failed, {_plural(n_pipe, 'pipeline check')}."
              if len(df) else "No records yet.")
    filt = "; ".join(f"{k} = {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                     for k, v in page.filters.items() if v is not None)
    parts = ["# ovseg-bench leaderboard", "",
             "Zero-shot (open-vocabulary) semantic segmentation: our measurements beside the published figures. "
             "Generated by `make leaderboard` (also after every `make bench`) from `runs.csv` and `per_class.csv`; "
             f"do not edit by hand. {counts}" + (f" **Filtered: {filt}.**" if filt else ""), "",
             "Contents: [Accuracy](#accuracy) · [Efficiency](#efficiency) · [Plots](#plots) · "
             "[Per-class drill-down](#per-class-drill-down) · [Cells without a result](#cells-without-a-result) · "
             "[Provenance and protocol](#provenance-and-protocol)", ""]
    parts += accuracy_section(page)
    parts += efficiency_section(page)
    parts += cpu_speed
    parts += plots_lines
    parts += drill_down_section(page)
    parts += no_result_section(page)
    parts += provenance_section(page)
    return "\n".join(parts).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------- entry points
def build_leaderboard(results_dir: str = "results", out: str = "leaderboard.md", filters: dict | None = None,
                      tolerance: float = 0.3, *, conf_dir: str | None = None) -> str:
    """Rebuild runs.csv and per_class.csv from the records, then the page `out` (and its PNGs) from those CSVs."""
    recs = records.load_records(results_dir)
    os.makedirs(results_dir, exist_ok=True)
    records.atomic_write_text(os.path.join(results_dir, "runs.csv"), runs_table(recs).to_csv(index=False))
    records.atomic_write_text(os.path.join(results_dir, "per_class.csv"), per_class_table(recs).to_csv(index=False))
    runs, per_class = read_tables(results_dir)
    models = published_figures(conf_dir)
    df = apply_filters(prepare(runs, models), filters)
    stem = os.path.splitext(os.path.basename(out))[0]
    page = Page(df, per_class, models, float(tolerance), dict(filters or {}), stem, read_cpu_peaks(results_dir))
    plot_lines, written = plots_section(page, results_dir)
    path = os.path.join(results_dir, out)
    cpu_speed = [] if filters else cpu_speed_lines(results_dir)    # unfiltered page only: it has no filters
    records.atomic_write_text(path, markdown(page, plot_lines, cpu_speed))
    _remove_stale_pngs(results_dir, stem, written)
    return path


def main(argv: list[str]) -> int:
    args = OmegaConf.to_container(OmegaConf.from_dotlist(argv))
    allowed = set(FILTER_KEYS) | {"results_dir", "out", "tolerance", "conf_dir"}
    unknown = sorted(set(args) - allowed)
    if unknown:
        print(f"error: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}",
              file=sys.stderr)
        return 2
    filters = {k: args[k] for k in FILTER_KEYS if args.get(k) is not None}
    try:
        path = build_leaderboard(str(args.get("results_dir", "results")), str(args.get("out", "leaderboard.md")),
                                 filters or None, float(args.get("tolerance", 0.3)), conf_dir=args.get("conf_dir"))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"leaderboard written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
