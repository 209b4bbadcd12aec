"""The closing parts of the page: the per-class drill-down, the cells without a result (grouped: per model without
a checkpoint, per dataset without data, then the failed cells and pipeline checks one by one) and the provenance
and protocol footer."""
from __future__ import annotations

import html
import re

import pandas as pd

from bench.board.accuracy import FORMULA_NAMES, sup
from bench.board.fmt import as_str, fmt, fmt_res, md_cell, md_table, num, ordered, plural
from bench.board.published import PRECISION_ORDER
from bench.board.tables import Page, partial

NO_CHECKPOINT = re.compile(r"no checkpoint at (.+)")
NO_DATA = re.compile(r"no dataset at (.+)")


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
    ok = page.sort(ok, ["model", "dataset"])
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
            table.append({"#": str(i + 1), "best class": as_str(b["class_name"]) if b is not None else "",
                          "IoU": fmt(b["IoU"]) if b is not None else "",
                          "worst class": as_str(w["class_name"]) if w is not None else "",
                          "IoU ": fmt(w["IoU"]) if w is not None else ""})
        absent = len(rows) - len(present)
        part = f", {partial(r)}" if partial(r) else ""
        summary = (f"{r['model_label']} · {r['dataset_label']} (short side {fmt_res(r['resolution'])}, "
                   f"{r['precision']}, "
                   f"mIoU {fmt(r.get('mIoU'))}{part}): {len(present)} of {len(rows)} classes in the GT, "
                   f"{len(never)} never predicted{'' if exact else ' correctly'}")
        names = "; ".join(as_str(n) for n in never["class_name"]) or "none"
        out += ["<details>", f"<summary>{html.escape(summary)}</summary>", "",
                md_table(table, {"#": "right", "IoU": "right", "IoU ": "right"}), "",
                f"Never predicted{'' if exact else ' correctly'} ({len(never)}): {md_cell(names)}."]
        if absent:
            out.append(f"Absent from the val GT (IoU undefined): {plural(absent, 'class')}.")
        out += ["", "</details>", ""]
    return out


# ---------------------------------------------------------------------------------------------------- no result
def _absent(reason: str) -> tuple[str | None, str | None] | None:
    """(checkpoint path, data path) a missing cell's reason names, or None if it says anything else."""
    ckpt = data = None
    for part in (p.strip() for p in reason.split(";") if p.strip()):
        if m := NO_CHECKPOINT.fullmatch(part):
            ckpt = m.group(1)
        elif m := NO_DATA.fullmatch(part):
            data = m.group(1)
        else:
            return None
    return (ckpt, data) if ckpt or data else None


def _group_rows(page: Page, cells: pd.DataFrame, col: str, which: int) -> list[dict]:
    rows = []
    order = page.catalog.model_order if col == "model" else page.catalog.dataset_order
    for name in ordered(cells[col], order):
        g = cells[cells[col] == name]
        paths = sorted({p[which] for p in g["_absent"] if p[which]})
        if not paths:
            continue
        label = g["model_label" if col == "model" else "dataset_label"].iloc[0]
        n = int(sum(1 for p in g["_absent"] if p[which]))
        command = (f"`make weights MODEL={name}`" if col == "model" else
                   f"`python -m bench.data.prepare dataset={name} src=RAW_DIR`")
        rows.append({col: f"{label} (`{name}`)", "expected at": "; ".join(f"`{p}`" for p in paths),
                     "cells": str(n), "fetch" if col == "model" else "prepare": command})
    return rows


def no_result_section(page: Page) -> list[str]:
    df = page.runs
    bad = df[((df["status"] != "ok") | df["pipeline_check"].fillna(False).astype(bool))
             & (~df["timing_only"] | (df["status"] == "error"))]
    out = ["## Cells without a result", ""]
    if bad.empty:
        return out + ["_Every cell has a result._" if len(df) else "_No cells._", ""]
    bad = page.sort(bad, ["model", "dataset", "resolution", "precision"])
    bad = bad.assign(_absent=[_absent(r["reason"]) if r["status"] == "missing" else None for _, r in bad.iterrows()])
    grouped = bad[bad["_absent"].notna()]
    rows = []
    for _, r in bad[bad["_absent"].isna()].iterrows():
        pipeline = r["status"] == "ok"
        reason = ("pipeline check: synthesized weights or data ran end to end; its mIoU is not a result"
                  if pipeline else as_str(r["reason"]) or "–")
        has_eff = num(r.get("gflops_model")) is not None
        rows.append({"model": r["model_label"], "dataset": r["dataset_label"], "short side": fmt_res(r["resolution"]),
                     "precision": r["precision"], "device": r["device"],
                     "status": "pipeline check" if pipeline else r["status"], "reason": reason,
                     "efficiency figures": "yes" if has_eff else "no"})
    out += [f"{plural(len(bad), 'cell')} without a result. `missing` = weights or data not found where expected; "
            "`error` = the cell failed (one-line reason; full traceback in its record). Efficiency figures of a "
            "missing cell still appear in the efficiency tables and plots, never in an mIoU table or plot.", ""]
    models, datasets = _group_rows(page, grouped, "model", 0), _group_rows(page, grouped, "dataset", 1)
    if models:
        out += ["**No checkpoint** (`make weights` fetches every model's):", "", md_table(models, {"cells": "right"}),
                ""]
    if datasets:
        out += ["**No data** (RAW_DIR = the dataset as downloaded; the README's *Datasets* section says where from):",
                "", md_table(datasets, {"cells": "right"}), ""]
    if models and datasets and grouped["_absent"].map(lambda p: bool(p[0] and p[1])).any():
        out += ["A cell missing both counts in both lists.", ""]
    if rows:
        out += ["**Failed cells and pipeline checks**, one by one:", ""] if models or datasets else []
        out += [md_table(rows, {"short side": "right"}), ""]
    return out


# ---------------------------------------------------------------------------------------------------- provenance
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
    keyed = df.assign(**{c: df[c].map(as_str) for c in cols + ["git_sha"]})
    for env, g in keyed.groupby(cols, sort=True):
        stamps = sorted(t for t in g["timestamp"] if t)
        envs.append({"device": env[0], "type": env[1] or "–", "driver": env[2] or "–", "torch": env[3] or "–",
                     "CUDA": env[4] or "none", "git sha": ", ".join(sorted(set(g["git_sha"]) - {""})) or "–",
                     "records": str(len(g)),
                     "dates (UTC)": (f"{stamps[0][:10]} – {stamps[-1][:10]}" if stamps and stamps[0][:10] !=
                                     stamps[-1][:10] else (stamps[0][:10] if stamps else "–"))})
    formulas = sorted(set(df["miou_formula"].map(as_str)) - {""}) if "miou_formula" in df else []
    out += [md_table(envs, {"records": "right"}), "",
            "**Protocol.**",
            "- *Accuracy*: single-scale inference at the model's protocol resolution ("
            + "".join(f"{page.models[m].display} short side {page.models[m].protocol}; "
                      for m in ordered(set(df["model"]) & set(page.models), page.catalog.model_order)
                      if page.models[m].protocol) +
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
    for m in ordered(list(page.models), page.catalog.model_order):
        info = page.models[m]
        if m not in set(df["model"]):
            continue
        for s in info.sources:
            out.append(f"  - {info.display} {sup(s.tag)} ({s.kind}): {s.text or 'source not recorded'}")
    out += ["", "Generated by `bench/board/` from `runs.csv` and `per_class.csv` (themselves rebuilt from "
                "`runs/*.json`); every number above comes from those files, or for the published figures from the "
                "copy of its model config each record carries (`conf/model/*.yaml` for a record without one).", ""]
    return out
