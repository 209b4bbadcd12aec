"""Records -> tidy tables and the markdown leaderboard (pandas + tabulate; nothing hand-formatted).

`build_leaderboard(results_dir)` rebuilds, from every record under `results/runs/`:
- `results/runs.csv`: one row per cell, fixed column order, numeric columns numeric;
- `results/per_class.csv`: tidy (key, model, dataset, resolution, class_id, class_name, IoU, ACC);
- `results/leaderboard.md`: per resolution a models x datasets mIoU table beside the published figure and the
  delta, SG-IoU where recorded, an efficiency table, and footnotes for every missing or failed cell.
`python -m bench.leaderboard [results_dir=...] [model=a,b] [dataset=...] [out=leaderboard-x.md]` runs it alone.
"""
from __future__ import annotations

import os
import sys

import pandas as pd
from omegaconf import OmegaConf

from bench import records

RUN_COLUMNS = [
    "key", "status", "reason", "model", "model_display", "dataset", "dataset_display", "resolution", "precision",
    "batch_size", "pipeline_check", "mIoU", "mIoU_current", "mIoU_v06", "miou_formula", "fwIoU", "mACC", "pACC",
    "SG-mIoU", "SG-mIoU_current", "SG-mIoU_v06", "sg_iou_table_official", "params_state_total", "params_total", "params_trainable",
    "params_trainable_published", "params_image_path", "gflops_model", "gflops_end_to_end", "gflops_model_fixed",
    "gflops_model_all_crops", "gflops_per_crop", "mean_crops", "latency_ms_model_median", "latency_ms_model_p90",
    "latency_model_cv", "latency_ms_end_to_end_median", "latency_ms_end_to_end_p90", "latency_ms_per_crop",
    "latency_warmup", "latency_iters", "timer", "threads", "peak_mem_mb", "peak_mem_kind", "profile_resolution",
    "profile_vocabulary_size", "images_evaluated", "dataset_images", "dataset_images_official", "eval_seconds",
    "dataset_settings", "note", "load_note", "checkpoint", "checkpoint_sha256", "git_sha", "torch_version",
    "cuda_version", "device_type", "device_name", "driver", "timestamp",
]
DATASET_ORDER = ["ade847", "pc459", "ade150", "pc59", "voc20", "voc20b", "synthetic"]
MODEL_ORDER = ["san_b", "san_l", "simseg", "scan_l", "scan_b"]
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


# ---------------------------------------------------------------------------------------------------- tables
def runs_table(recs: list[dict]) -> pd.DataFrame:
    rows = [{k: v for k, v in r.items() if k not in ("per_class", "config", "traceback")} for r in recs]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)
    extra = sorted(c for c in df.columns if c not in RUN_COLUMNS)
    df = df.reindex(columns=RUN_COLUMNS + extra)
    for col in df.columns:
        converted = pd.to_numeric(df[col], errors="coerce")
        if df[col].notna().sum() and converted.notna().sum() == df[col].notna().sum() and df[col].dtype == object:
            df[col] = converted
    return df.sort_values(["model", "dataset", "resolution", "precision"], key=_order_key).reset_index(drop=True)


def _order_key(col: pd.Series) -> pd.Series:
    order = {"model": MODEL_ORDER, "dataset": DATASET_ORDER}.get(col.name)
    if order is None:
        return col
    return col.map(lambda v: (order.index(v) if v in order else len(order), str(v)))


def per_class_table(recs: list[dict]) -> pd.DataFrame:
    rows = [{"key": r["key"], "model": r["model"], "dataset": r["dataset"], "resolution": r["resolution"],
             "precision": r["precision"], **pc} for r in recs if r.get("status") == "ok" for pc in r.get("per_class", [])]
    return pd.DataFrame(rows, columns=["key", "model", "dataset", "resolution", "precision", "class_id",
                                       "class_name", "IoU", "ACC"] if not rows else None)


# ---------------------------------------------------------------------------------------------------- published
def published_figures() -> dict[str, dict]:
    """model name -> {'miou': {dataset: value}, 'source': str, 'display': str} from conf/model/*.yaml."""
    out = {}
    folder = os.path.join(CONF_DIR, "model")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".yaml"):
            cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(folder, name)), resolve=False)
            pub = cfg.get("published") or {}
            out[cfg["name"]] = {"miou": pub.get("miou") or {}, "source": pub.get("source", ""),
                                "display": cfg.get("display", cfg["name"])}
    return out


# ---------------------------------------------------------------------------------------------------- markdown
def _fmt(v, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and v != v) else f"{v:.{digits}f}"


class Footnotes:
    def __init__(self):
        self.notes: list[str] = []

    def add(self, text: str) -> str:
        if text not in self.notes:
            self.notes.append(text)
        return f"[^{self.notes.index(text) + 1}]"

    def markdown(self) -> str:
        return "\n".join(f"[^{i + 1}]: {t}" for i, t in enumerate(self.notes))


def accuracy_table(df: pd.DataFrame, resolution, published: dict, notes: Footnotes, tolerance: float) -> str:
    sub = df[df["resolution"] == resolution]
    models = [m for m in MODEL_ORDER if m in set(sub["model"])] + sorted(set(sub["model"]) - set(MODEL_ORDER))
    datasets = [d for d in DATASET_ORDER if d in set(sub["dataset"])]
    rows = []
    for m in models:
        pub = published.get(m, {"miou": {}, "display": m, "source": ""})
        row = {"model": pub["display"]}
        for d in datasets:
            cell = sub[(sub["model"] == m) & (sub["dataset"] == d)]
            row[d] = _accuracy_cell(cell, pub, d, notes, tolerance)
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False) if rows else "_no cells_"


def _accuracy_cell(cell: pd.DataFrame, pub: dict, dataset: str, notes: Footnotes, tolerance: float) -> str:
    ref = pub["miou"].get(dataset)
    ref_txt = f" / {ref:.1f}" if ref is not None else ""
    if cell.empty:
        return f"–{ref_txt}"
    r = cell.iloc[-1]
    if r["status"] != "ok":
        return f"–{ref_txt} " + notes.add(f"{r['model']}/{r['dataset']}@{r['resolution']}: {r['status']}: {r['reason']}")
    if bool(r.get("pipeline_check")):
        return "pipeline check " + notes.add("synthesized weights or data: the pipeline ran end to end; "
                                             "its mIoU is not a result")
    text = _fmt(r["mIoU"])
    if ref is not None:
        delta = r["mIoU"] - ref
        text += f" / {ref:.1f} ({delta:+.1f})"
        if abs(delta) > tolerance:
            text += " ⚠"
    sg = r.get("SG-mIoU")
    if sg is not None and sg == sg:
        text += f" · SG {_fmt(sg)}" + ("" if r.get("sg_iou_table_official") else "*")
    return text


def efficiency_table(df: pd.DataFrame) -> str:
    cols = {"model_display": "model", "resolution": "res", "precision": "precision", "params_total": "params (M)",
            "params_trainable_published": "trainable (M)", "params_image_path": "image path (M)",
            "gflops_model": "GFLOPs", "gmacs": "GMACs", "gflops_model_all_crops": "GFLOPs (100 crops)",
            "latency_ms_model_median": "latency ms (median)", "latency_ms_model_p90": "p90 ms",
            "latency_ms_end_to_end_median": "end-to-end ms", "peak_mem_mb": "peak MB", "device_name": "device"}
    if "gflops_model" not in df:
        return "_no efficiency figures yet_"
    eff = df.dropna(subset=["gflops_model"]).copy()
    if eff.empty:
        return "_no efficiency figures yet_"
    eff["gmacs"] = eff["gflops_model"] / 2
    eff = eff.drop_duplicates(subset=["model", "resolution", "precision", "device_name"], keep="last")
    for c in ("params_total", "params_trainable_published", "params_image_path"):
        eff[c] = pd.to_numeric(eff[c], errors="coerce") / 1e6
    eff = eff.reindex(columns=list(cols)).rename(columns=cols)
    return eff.to_markdown(index=False, floatfmt=".1f")


def provenance_footer(df: pd.DataFrame) -> str:
    if df.empty:
        return ""
    r = df.iloc[-1]
    devices = ", ".join(sorted(set(df["device_name"].dropna().astype(str))))
    return (f"Made by ovseg-bench {r.get('git_sha', '')} with torch {r.get('torch_version', '')} "
            f"(CUDA {r.get('cuda_version') or 'none'}) on {devices}; latest record {r.get('timestamp', '')}.\n"
            "Protocol: mIoU from the argmax label map at the original image size (detectron2 SemSegEvaluator; "
            "headline formula: classes present in the ground truth). FLOPs from torch.utils.flop_counter over one "
            "forward at res x res, batch 1, text features cached, attention counted; GMACs = GFLOPs / 2. "
            "Latency: `model` scope = normalised padded tensor in -> model outputs; `end-to-end` = decoded image in -> "
            "label map out; median after warm-up (iterations in runs.csv).")


def markdown(df: pd.DataFrame, tolerance: float = 0.3) -> str:
    published = published_figures()
    notes = Footnotes()
    parts = ["# ovseg-bench leaderboard", "",
             "Generated by `make leaderboard` from `results/runs/*.json`; do not edit by hand. "
             "Accuracy cells read `ours / published (delta)`; ⚠ marks |delta| > "
             f"{tolerance} mIoU; '–' is a cell without a result (footnotes say why).", ""]
    for res in sorted(set(df["resolution"].dropna())) if not df.empty else []:
        parts += [f"## mIoU at short side {res:g}", "", accuracy_table(df, res, published, notes, tolerance), ""]
    parts += ["## Efficiency", "", efficiency_table(df), ""]
    sources = [f"- {p['display']}: {p['source']}" for p in published.values() if p["source"]]
    parts += ["### Published figures", "", *sources, ""]
    if notes.notes:
        parts += ["### Notes", "", notes.markdown(), ""]
    parts += ["---", "", provenance_footer(df), ""]
    return "\n".join(parts)


def build_leaderboard(results_dir: str = "results", out: str = "leaderboard.md", filters: dict | None = None,
                      tolerance: float = 0.3) -> str:
    recs = records.load_records(results_dir)
    df = runs_table(recs)
    if filters:
        for col, allowed in filters.items():
            if allowed is not None and col in df:
                allowed = [str(a) for a in (allowed if isinstance(allowed, (list, tuple)) else [allowed])]
                df = df[df[col].astype(str).isin(allowed)]
    os.makedirs(results_dir, exist_ok=True)
    if not filters:
        records.atomic_write_text(os.path.join(results_dir, "runs.csv"), df.to_csv(index=False))
        records.atomic_write_text(os.path.join(results_dir, "per_class.csv"),
                                  per_class_table(recs).to_csv(index=False))
    path = os.path.join(results_dir, out)
    records.atomic_write_text(path, markdown(df, tolerance))
    return path


def main(argv: list[str]) -> int:
    args = OmegaConf.from_dotlist(argv)
    results_dir = args.get("results_dir", "results")
    filters = {k: args[k] for k in ("model", "dataset", "resolution", "precision") if k in args}
    path = build_leaderboard(results_dir, args.get("out", "leaderboard.md"), filters or None,
                             float(args.get("tolerance", 0.3)))
    print(f"leaderboard written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
