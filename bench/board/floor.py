"""The "Speed against the compute floor" part of the page: every record timed with an interleaved matmul peak probe
(the CPU speed sweep's cells, usually run with evaluation off), one row per record and scope, each against the peak
its own cell measured; then per record the state of the machine while it was timed (load, peak drift), how far a
reduced precision's labels stay from fp32's, and the op-category table written beside the record.

Record fields read (per scope s in model, end_to_end): gflops_{s}, gflops_timed_{s}, latency_ms_{s}_median / _p90,
latency_{s}_cv, floor_ms_{s}, latency_over_floor_{s}, latency_over_floor_interleaved_{s},
latency_over_floor_best_{s}, speed_target_{s}; per record: peak_gflops, peak_kind, peak_gflops_interleaved,
peak_drift, load1, threads, compile, the agreement fields, speed_target_agreement and gap_table; where measured,
background_load_procs, official_ms, ours_over_official and official_skipped (bench.official).
"""
from __future__ import annotations

import pandas as pd

from bench.board.efficiency import CONTENDED_CV, CONTENDED_PEAK_DRIFT, contended, differs, has_crops
from bench.board.fmt import as_str, flops_rate, fmt, fmt_crops, fmt_int, fmt_pct, fmt_res, md_table, num, sig
from bench.board.tables import Page

SCOPES = ("model", "end_to_end")
HEADING = "Speed against the compute floor"


def floor_records(df: pd.DataFrame) -> pd.DataFrame:
    """Records with an interleaved latency / floor ratio for at least one scope."""
    cols = [f"latency_over_floor_interleaved_{s}" for s in SCOPES if f"latency_over_floor_interleaved_{s}" in df]
    if df.empty or not cols:
        return df.iloc[0:0]
    return df[df[cols].apply(lambda row: any(num(v) is not None for v in row), axis=1)]


def _ratio(v) -> str:
    f = num(v)
    return "–" if f is None else f"{f:.2f}"


def _judged(r, scope: str) -> float | None:
    """The ratio a target is judged on: the interleaved one where it was measured, else the median one."""
    inter = num(r.get(f"latency_over_floor_interleaved_{scope}"))
    return inter if inter is not None else num(r.get(f"latency_over_floor_{scope}"))


def _target(limit, value, at_least: bool = False, pct: bool = False) -> str:
    limit = num(limit)
    if limit is None:
        return "–"
    shown = f"{limit:.2%}" if pct else f"{limit:.2f}"
    text = f"{'≥' if at_least else '≤'} {shown}"
    if value is None:
        return f"{text} (not measured)"
    met = value >= limit if at_least else value <= limit
    return f"{text} {'✓' if met else '✗ missed'}"


def _peak(r) -> str:
    peak = num(r.get("peak_gflops"))
    return f"{flops_rate(peak)} {as_str(r.get('peak_kind'))}".strip() if peak else "–"


def _floor(r, scope: str) -> float | None:
    floor = num(r.get(f"floor_ms_{scope}"))
    if floor is not None:
        return floor
    gflops, peak = _timed(r, scope), num(r.get("peak_gflops"))
    return gflops / peak * 1e3 if gflops is not None and peak else None


def _timed(r, scope: str) -> float | None:
    timed = num(r.get(f"gflops_timed_{scope}"))
    return timed if timed is not None else num(r.get(f"gflops_{scope}"))


def _ordered_records(page: Page, df: pd.DataFrame) -> pd.DataFrame:
    df = df.assign(_compile=df["compile"].map(as_str) if "compile" in df else "")
    df = df.sort_values(["_compile", "timestamp", "key"], kind="mergesort")
    return page.sort(df, ["model", "resolution", "precision"])


def scope_rows(page: Page, df: pd.DataFrame) -> list[dict]:
    rows = []
    for _, r in _ordered_records(page, df).iterrows():
        for scope in SCOPES:
            if num(r.get(f"latency_ms_{scope}_median")) is None:
                continue
            rows.append({
                "model": r["model_label"], "short side": fmt_res(r["resolution"]), "precision": r["precision"],
                "compile": as_str(r.get("compile")) or "–", "threads": fmt_int(r.get("threads")), "scope": scope,
                "crops": fmt_crops(num(r.get("crops_assumed"))) if has_crops(r) and num(r.get("crops_assumed"))
                is not None else "–",
                "GFLOPs": sig(r.get(f"gflops_{scope}")), "GFLOPs, timed path": sig(_timed(r, scope)),
                "peak": _peak(r), "floor ms": sig(_floor(r, scope)),
                "median ms": fmt(r.get(f"latency_ms_{scope}_median"), 1),
                "p90 ms": fmt(r.get(f"latency_ms_{scope}_p90"), 1), "CV %": fmt_pct(r.get(f"latency_{scope}_cv")),
                "× floor": _ratio(r.get(f"latency_over_floor_{scope}")),
                "× floor (interleaved)": _ratio(r.get(f"latency_over_floor_interleaved_{scope}")),
                "× floor (best)": _ratio(r.get(f"latency_over_floor_best_{scope}")),
                "target": _target(r.get(f"speed_target_{scope}"), _judged(r, scope)),
                "timing": "⚠ contended" if contended(r, scope) else "ok",
                "_timed_differs": differs(num(r.get(f"gflops_{scope}")), _timed(r, scope)),
            })
    if not any(r["_timed_differs"] for r in rows):
        for r in rows:
            del r["GFLOPs, timed path"]
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def record_rows(page: Page, df: pd.DataFrame) -> list[dict]:
    rows = []
    for _, r in _ordered_records(page, df).iterrows():
        distinct = fmt_int(r.get("fp32_labels_distinct"))
        agreement = fmt_pct(r.get("label_agreement"), 2)
        gap = as_str(r.get("gap_table"))
        rows.append({
            "model": r["model_label"], "short side": fmt_res(r["resolution"]), "precision": r["precision"],
            "compile": as_str(r.get("compile")) or "–", "load (1 min)": fmt(r.get("load1"), 2),
            "peak, interleaved": flops_rate(num(r.get("peak_gflops_interleaved")))
            if num(r.get("peak_gflops_interleaved")) else "–",
            "peak drift %": fmt_pct(r.get("peak_drift")) + (" ⚠" if (num(r.get("peak_drift")) or 0)
                                                              > CONTENDED_PEAK_DRIFT else ""),
            "label agr. % (fp32 labels)": agreement + (f" ({distinct})" if agreement != "–" and distinct != "–"
                                                       else ""),
            "all pixels %": fmt_pct(r.get("label_agreement_all"), 2),
            "margin pixels %": fmt_pct(r.get("margin_pixel_fraction")),
            "mask agr. %": fmt_pct(r.get("mask_agreement"), 2),
            "max abs Δ score": _sci(r.get("max_abs_score_diff")),
            "non-finite scores %": fmt_pct(r.get("nonfinite_score_fraction"), 2),
            "agreement target": _target(r.get("speed_target_agreement"), num(r.get("label_agreement")),
                                        at_least=True, pct=True),
            "ops": f"[{gap}](runs/{gap})" if gap else "–",
            "background procs": fmt_int(r.get("background_load_procs")) if num(r.get("background_load_procs"))
            else "–",
            "official e2e ms": fmt(r.get("official_ms"), 1) if num(r.get("official_ms")) is not None
            else ("skipped" if as_str(r.get("official_skipped")) else "–"),
            "ours / official": _ratio(r.get("ours_over_official")),
        })
    for col in ("background procs", "official e2e ms", "ours / official"):   # only where some record has them
        if all(row[col] == "–" for row in rows):
            for row in rows:
                del row[col]
    return rows


def _sci(v) -> str:
    f = num(v)
    return "–" if f is None else f"{f:.2e}"


def floor_section(page: Page) -> list[str]:
    """The section's markdown lines; nothing when no record was timed with an interleaved peak probe."""
    recs = floor_records(page.runs)
    if recs.empty:
        return []
    out = [f"## {HEADING}", "",
           "Cells timed with an interleaved matmul peak probe (`make bench-cpu`), one row per cell and scope. "
           "Scopes: `model` = normalised padded tensor in → raw outputs; `end_to_end` = decoded image in → label "
           "map out (resize, normalise, pad, model, per-class scores at full size, argmax). `floor ms` = GFLOPs of "
           "the timed path ÷ the matmul peak that cell measured (`peak`, in its precision's peak kind): every row "
           "has its own. `GFLOPs` is the published computation order (as in *Size and compute*); where a model's "
           "fast path skips work, `GFLOPs, timed path` counts what was timed. `× floor` = median ÷ floor; "
           "`(interleaved)` divides each timed iteration by the floor at a peak probe run just before it; `(best)` "
           "= the fastest iteration over the floor at the fastest probe. A target is judged on the interleaved "
           "ratio where it was measured, else on the median one. `timing`: ⚠ contended = CV > "
           f"{CONTENDED_CV:.0%} or the cell's peak probes drifted by more than {CONTENDED_PEAK_DRIFT:.0%} "
           "((max − min) ÷ median): the machine was busy, rerun before reading the ratio.", ""]
    for device in sorted(set(recs["device"])):
        sub = recs[recs["device"] == device]
        env = sub.iloc[0]
        out += [f"### {device}", "",
                f"torch {as_str(env.get('torch_version')) or '–'}, timer {as_str(env.get('timer')) or '–'}.", "",
                md_table(scope_rows(page, sub), {k: "right" for k in (
                    "short side", "threads", "crops", "GFLOPs", "GFLOPs, timed path", "peak", "floor ms",
                    "median ms", "p90 ms", "CV %", "× floor", "× floor (interleaved)", "× floor (best)")}), "",
                md_table(record_rows(page, sub), {k: "right" for k in (
                    "short side", "load (1 min)", "peak, interleaved", "peak drift %", "label agr. % (fp32 labels)",
                    "all pixels %", "margin pixels %", "mask agr. %", "max abs Δ score", "non-finite scores %")}), ""]
    out += ["Per cell: `load (1 min)` = the 1-minute load average when timing started; `peak, interleaved` = the "
            "median of the interleaved probes. Reduced precisions against an fp32 run of the same cell: `label agr.` "
            "= share of pixels with the fp32 argmax label, on the pixels whose fp32 top-2 score margin is not a "
            "near-tie (`margin pixels` = their share), with the number of distinct fp32 labels in brackets (1: the "
            "check cannot fail); `all pixels` = the same on every pixel; `mask agr.` = the same rule on the argmax "
            "over queries of the mask logits; `max abs Δ score` = the largest score difference; `non-finite "
            "scores` = NaN/Inf share. `ops` links the op-category table (where the time goes) written beside the "
            "record.", ""]
    return out
