"""Records -> the two tidy tables the page is built from, and the typed, filtered view of them every section reads.

`runs.csv`: one row per cell, fixed column order (RUN_COLUMNS, then any other field sorted), numeric columns
numeric; `per_class.csv`: one row per (cell, class). `load_records` reads `results/runs/*.json` and warns (one line
naming the file) about a record it cannot use instead of dropping it silently.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

import pandas as pd

from bench import BenchError
from bench.board.fmt import as_bool, as_str, fmt_res, num
from bench.board.published import PRECISION_ORDER, Catalog, ModelInfo

log = logging.getLogger(__name__)

RUN_COLUMNS = [
    "key", "status", "reason", "model", "model_display", "dataset", "dataset_display", "dataset_protocol", "resolution",
    "precision", "batch_size", "repeat", "pipeline_check", "mIoU", "mIoU_current", "mIoU_v06", "miou_formula", "fwIoU", "mACC", "pACC",
    "SG-mIoU", "SG-mIoU_current", "SG-mIoU_v06", "sg_iou_table_official", "params_state_total", "params_total", "params_trainable",
    "params_trainable_published", "params_image_path", "gflops_model", "gflops_end_to_end", "gflops_model_fixed",
    "dataset_vocabulary_size", "gflops_model_dataset_k",
    "gflops_model_all_crops", "gflops_per_crop", "mean_crops", "latency_ms_model_median", "latency_ms_model_p90",
    "latency_model_cv", "latency_ms_end_to_end_median", "latency_ms_end_to_end_p90", "latency_ms_per_crop",
    "latency_warmup", "latency_iters", "timer", "threads", "peak_mem_mb", "peak_mem_kind", "profile_resolution",
    "profile_vocabulary_size", "throughput_batch", "throughput_img_s", "images_evaluated", "dataset_images",
    "dataset_images_official", "eval_seconds", "eval_img_s",
    "dataset_settings", "note", "load_note", "checkpoint", "checkpoint_sha256", "git_sha", "torch_version",
    "cuda_version", "device_type", "device_name", "driver", "timestamp",
]
# Never parsed as numbers (a hex sha can look like "123e45"; CUDA "12.10" is not 12.1).
TEXT_COLUMNS = ["key", "status", "reason", "model", "model_display", "dataset", "dataset_display", "dataset_protocol",
                "precision",
                "miou_formula", "timer", "peak_mem_kind", "dataset_settings", "note", "load_note", "checkpoint",
                "checkpoint_sha256", "git_sha", "torch_version", "cuda_version", "device_type", "device_name", "driver",
                "timestamp", "hostname", "class_name", "compile", "peak_kind", "gap_table"]
NOT_IN_RUNS = ("per_class", "config", "traceback", "published", "gflops_model_at_k")     # nested: kept in the records only
FLATTENED = {"gflops_model_at_k": "gflops_model_at_k_{}"}   # nested mappings the runs table spreads into columns
PER_CLASS_COLUMNS = ["key", "model", "dataset", "resolution", "precision", "pipeline_check", "class_id", "class_name",
                     "IoU", "ACC"]
FILTER_KEYS = ("model", "dataset", "resolution", "precision", "device")
STATUS_RANK = {"ok": 0, "error": 2, "missing": 3}   # an ok pipeline check or timing-only cell ranks 1


# ---------------------------------------------------------------------------------------------------- records
def load_records(results_dir: str) -> list[dict]:
    """Every cell record `results_dir/runs/<key>.json`; a file there that is not one is skipped with a warning."""
    folder = os.path.join(results_dir, "runs")
    if not os.path.isdir(folder):
        return []
    out = []
    # <key>.json; a temp file (.tmp-*) is a write in flight, <key>.<what>.json a sidecar (per-iteration timings)
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".json") and "." not in n[:-5]
                       and not n.startswith(".")):
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                rec = json.load(f)
        except OSError as e:
            log.warning("skipping record %s: cannot read it (%s)", path, e.strerror)
            continue
        except ValueError as e:
            log.warning("skipping record %s: not valid JSON (%s); delete it or rerun its cell with force=true",
                        path, str(e).splitlines()[0])
            continue
        if not isinstance(rec, dict) or "key" not in rec:
            log.warning("skipping record %s: not a cell record (no \"key\"); delete it", path)
            continue
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------------- tables
def order_key(cat: Catalog):
    """A `sort_values` key putting models, datasets and precisions in their table order (others after, by name)."""
    orders = {"model": cat.model_order, "dataset": cat.dataset_order, "precision": PRECISION_ORDER}

    def key(col: pd.Series) -> pd.Series:
        order = orders.get(col.name)
        if order is None:
            return col
        return col.map(lambda v: f"{order.index(v):03d}" if v in order else f"999{v}")
    return key


def _flat(rec: dict) -> dict:
    row = {k: v for k, v in rec.items() if k not in NOT_IN_RUNS}
    for name, column in FLATTENED.items():
        if isinstance(rec.get(name), dict):
            row.update({column.format(k): v for k, v in rec[name].items()})
    return row


def runs_table(recs: list[dict], cat: Catalog) -> pd.DataFrame:
    rows = [_flat(r) for r in recs]
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
    return df.sort_values(["model", "dataset", "resolution", "precision"], key=order_key(cat)).reset_index(drop=True)


def per_class_table(recs: list[dict]) -> pd.DataFrame:
    rows = [{"key": r["key"], "model": r["model"], "dataset": r["dataset"], "resolution": r["resolution"],
             "precision": r["precision"], "pipeline_check": bool(r.get("pipeline_check")), **pc}
            for r in recs if r.get("status") == "ok" for pc in r.get("per_class", [])]
    return pd.DataFrame(rows, columns=None if rows else PER_CLASS_COLUMNS)


def read_tables(results_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    text = {c: str for c in TEXT_COLUMNS}
    runs = pd.read_csv(os.path.join(results_dir, "runs.csv"), low_memory=False, dtype=text)
    per_class = pd.read_csv(os.path.join(results_dir, "per_class.csv"), low_memory=False, dtype=text)
    return runs, per_class


# ---------------------------------------------------------------------------------------------------- the view
@dataclass
class Page:
    runs: pd.DataFrame            # filtered, typed (prepare)
    per_class: pd.DataFrame
    catalog: Catalog
    tolerance: float
    filters: dict
    stem: str

    @property
    def models(self) -> dict[str, ModelInfo]:
        return self.catalog.models

    def sort(self, df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
        return df.sort_values(by, key=order_key(self.catalog), kind="mergesort")


def prepare(runs: pd.DataFrame, models: dict[str, ModelInfo]) -> pd.DataFrame:
    """Typed columns and derived ones (at_protocol, device label, ok_result, timing_only) on the runs table."""
    df = runs.copy()
    for col in ("status", "reason", "model", "dataset", "precision", "device_name", "device_type", "timestamp",
                "model_display", "dataset_display", "note", "key"):
        if col not in df:
            df[col] = ""
        df[col] = df[col].map(as_str)
    for col in ("pipeline_check", "resolution_is_protocol", "sg_iou_table_official", "has_crops", "evaluated"):
        df[col] = df[col].map(as_bool) if col in df else None
    df["resolution"] = pd.to_numeric(df["resolution"], errors="coerce")

    def at_protocol(r) -> bool:
        if r["resolution_is_protocol"] is not None:
            return bool(r["resolution_is_protocol"])
        info = models.get(r["model"])
        return bool(info and info.protocol is not None and num(r["resolution"]) == float(info.protocol))

    df["at_protocol"] = df.apply(at_protocol, axis=1) if len(df) else pd.Series(dtype=bool)
    df["device"] = [n or t or "unknown device" for n, t in zip(df["device_name"], df["device_type"])]
    df["timing_only"] = df["evaluated"].map(lambda v: v is False)        # evaluation off: speed figures only
    df["ok_result"] = (df["status"] == "ok") & ~df["pipeline_check"].fillna(False).astype(bool) & ~df["timing_only"]
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
            keep = df["resolution"].map(fmt_res).isin([fmt_res(v) for v in values])
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


def partial(r) -> str:
    """'evaluated n of N images' for a cell evaluated on part of its split (max_images), else ''."""
    done, total = num(r.get("images_evaluated")), num(r.get("dataset_images_official"))
    if done is not None and total is not None and done < total:
        return f"evaluated {done:.0f} of {total:.0f} images"
    return ""


def precisions(values) -> list[str]:
    """The distinct precisions of `values` in bench.precision's order (unknown names after, sorted)."""
    vals = set(values)
    return [p for p in PRECISION_ORDER if p in vals] + sorted(vals - set(PRECISION_ORDER))
