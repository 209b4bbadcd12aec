"""The efficiency part of the page: size and compute per (model, resolution), speed and memory per device, and the
repeatability, harness-overhead and crop-cost tables. Cells without an accuracy result (missing weights or data,
timing only) count here: their efficiency figures were measured.

The compute floor of a row is the FLOPs of the timed path (`gflops_timed_model`, else `gflops_model`) over the peak
of that row's own record (measured `peak_gflops`, else a datasheet): a header never names a peak a row did not use.
A row is flagged "contended" when its CV or the drift of its cell's matmul peak probes passes the limits below.
"""
from __future__ import annotations

import pandas as pd

from bench.board.fmt import (as_str, captioned_table, flops_rate, fmt, fmt_crops, fmt_int, fmt_pct, fmt_res, md_table,
                             millions, num, ordered, sig)
from bench.board.published import peak_gflops, peak_kind
from bench.board.tables import Page, pick, precisions

CROP_QUERIES = 100      # bench.profile.CROP_QUERIES: crop models run at most one crop per query
CONTENDED_CV = 0.10             # timed iterations: std / mean above this = timed on a busy machine
CONTENDED_PEAK_DRIFT = 0.20     # matmul peak probes of one cell: (max - min) / median above this = the same
CONTENDED_NOTE = (f"⚠ contended = CV > {CONTENDED_CV:.0%} or the cell's matmul peak probes drifted by more than "
                  f"{CONTENDED_PEAK_DRIFT:.0%} ((max − min) ÷ median): timed on a busy machine, rerun it on an idle "
                  f"one before reading the figure.")


def has_crops(r) -> bool:
    return bool(r.get("has_crops")) or num(r.get("gflops_per_crop")) is not None


def contended(r, scope: str = "model") -> bool:
    cv, drift = num(r.get(f"latency_{scope}_cv")), num(r.get("peak_drift"))
    return (cv is not None and cv > CONTENDED_CV) or (drift is not None and drift > CONTENDED_PEAK_DRIFT)


def crop_counts(df: pd.DataFrame) -> dict[tuple, tuple[float, str]]:
    """(model, resolution) -> (crops the totals assume, how it was obtained) for crop models."""
    out = {}
    eff = df[df.apply(has_crops, axis=1)] if len(df) else df
    for (m, res), g in eff.groupby(["model", "resolution"]):
        measured = g[g["ok_result"]]["mean_crops"].map(num).dropna() if "mean_crops" in g else []
        if len(measured):
            n_ds = g[g["ok_result"] & g["mean_crops"].notna()]["dataset"].nunique()
            out[(m, res)] = (float(measured.mean()), f"mean of {n_ds} dataset{'s' if n_ds != 1 else ''}")
        else:
            out[(m, res)] = (float(CROP_QUERIES), "bound: one per query")
    return out


PLAIN_FIGURE = {"gflops_model_fixed": "gflops_model", "latency_ms_model_fixed": "latency_ms_model_median",
                "latency_ms_model_p90_fixed": "latency_ms_model_p90",
                "latency_ms_end_to_end_fixed": "latency_ms_end_to_end_median"}


def at_crops(r, fixed: str, n: float | None) -> float | None:
    """A crop model's total at n crops (fixed part + n x per crop); other models: the record's own figure."""
    if not has_crops(r) or n is None:
        return num(r.get(PLAIN_FIGURE[fixed]))
    base = num(r.get(fixed))
    per = num(r.get("latency_ms_per_crop" if fixed.startswith("latency") else "gflops_per_crop"))
    if base is None or per is None:
        return None
    return base + n * per


def has_efficiency(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    g = df["gflops_model"].map(num).notna() if "gflops_model" in df else False
    lat = df["latency_ms_model_median"].map(num).notna() if "latency_ms_model_median" in df else False
    return df[g | lat]


def timed_gflops(r, n: float | None) -> float | None:
    """The FLOPs of the timed model-scope path (the floor's numerator): a model's fast path may skip work the
    published computation order does (`gflops_timed_model`); crop models at n crops."""
    timed = num(r.get("gflops_timed_model"))
    return at_crops(r, "gflops_model_fixed", n) if has_crops(r) or timed is None else timed


def differs(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) > 5e-4 * max(abs(a), abs(b))


def compute_rows(page: Page, crops: dict) -> list[dict]:
    eff = page.sort(pick(has_efficiency(page.runs), ["model", "resolution"]), ["model", "resolution"])
    rows = []
    for _, r in eff.iterrows():
        n, how = crops.get((r["model"], r["resolution"]), (None, ""))
        gflops, timed = at_crops(r, "gflops_model_fixed", n), timed_gflops(r, n)
        crop = has_crops(r)
        rows.append({
            "model": r["model_label"], "short side": fmt_res(r["resolution"]),
            "input counted": f"{fmt_res(r.get('profile_resolution'))}²",
            "K": fmt(r.get("profile_vocabulary_size"), 0),
            "params (M)": millions(r.get("params_total")),
            "trainable, published (M)": millions(r.get("params_trainable_published")),
            "image path (M)": millions(r.get("params_image_path")),
            "GMACs": sig(gflops / 2 if gflops is not None else None),
            "GFLOPs (= 2 × GMACs)": sig(gflops),
            "GFLOPs, timed path": sig(timed),
            "crops": f"{fmt_crops(n)} ({how})" if crop and n is not None else "–",
            "GFLOPs per crop": sig(r.get("gflops_per_crop")) if crop else "–",
            "GFLOPs at 100 crops": sig(at_crops(r, "gflops_model_fixed", float(CROP_QUERIES))) if crop else "–",
            "_model": r["model"], "_res": r["resolution"], "_gmacs": gflops / 2 if gflops is not None else None,
            "_bound": crop and how.startswith("bound"), "_params": num(r.get("params_total")),
            "_timed_differs": differs(gflops, timed),
        })
    if not any(r["_timed_differs"] for r in rows):
        for r in rows:
            del r["GFLOPs, timed path"]
    return rows


def speed_rows(page: Page, device: str, crops: dict) -> list[dict]:
    """One row per (model, resolution, precision) on `device`; hidden `_peak`/`_peak_source` = the peak it used."""
    sub = has_efficiency(page.runs[page.runs["device"] == device])
    eff = page.sort(pick(sub, ["model", "resolution", "precision"]), ["model", "resolution", "precision"])
    rows = []
    for _, r in eff.iterrows():
        n = crops.get((r["model"], r["resolution"]), (None, ""))[0]
        median = at_crops(r, "latency_ms_model_fixed", n)
        peak, source = peak_gflops(r)
        gflops = timed_gflops(r, n)
        floor = gflops / peak * 1e3 if gflops is not None and peak else None
        below = floor is not None and median is not None and median < floor
        measured_tp = num(r.get("throughput_img_s"))
        batch = num(r.get("latency_batch_size")) or 1.0
        throughput = measured_tp if measured_tp is not None else (1e3 / median * batch if median else None)
        kind = {"cuda_max_allocated": "CUDA", "process_max_rss": "RSS"}.get(as_str(r.get("peak_mem_kind")), "")
        rows.append({
            "model": r["model_label"], "short side": fmt_res(r["resolution"]), "precision": r["precision"],
            "threads": fmt_int(r.get("threads")), "crops": fmt_crops(n) if has_crops(r) and n is not None else "–",
            "peak": flops_rate(peak) if peak else "–",
            "floor ms": sig(floor), "median ms": fmt(median, 1) + (" ⚠" if below else ""),
            "p90 ms": fmt(at_crops(r, "latency_ms_model_p90_fixed", n), 1),
            "CV %": fmt_pct(r.get("latency_model_cv")) + (" ⚠ contended" if contended(r) else ""),
            "end-to-end ms": fmt(at_crops(r, "latency_ms_end_to_end_fixed", n), 1),
            "img/s": sig(throughput),
            "peak mem MB": f"{fmt(r.get('peak_mem_mb'), 0)} {kind}".strip(),
            "timed iters": f"{fmt(r.get('latency_iters'), 0)} (+{fmt(r.get('latency_warmup'), 0)} warm-up)",
            "_precision": r["precision"], "_peak": peak, "_peak_source": source, "_contended": contended(r),
            "_model": r["model"], "_gflops": gflops, "_median": median,
            "_kind": as_str(r.get("peak_kind")) or peak_kind(r["precision"]) or "",
        })
    return rows


def peaks_used(rows: list[dict]) -> tuple[str, bool]:
    """The header's 'compute peaks used' text, and whether the rows need their own `peak` column (a precision whose
    rows used different peaks is never summarised by one of them)."""
    by_prec: dict[str, set] = {}
    for r in rows:
        if r["_peak"]:
            by_prec.setdefault(r["_precision"], set()).add((r["_peak"], r["_peak_source"]))
    parts, per_row = [], False
    for p in precisions(by_prec):
        if len(by_prec[p]) == 1:
            (peak, source), = by_prec[p]
            parts.append(f"{p}: {flops_rate(peak)} ({source})")
        else:
            parts.append(f"{p}: each row's own (column `peak`; {len(by_prec[p])} different measured peaks)")
            per_row = True
    return "; ".join(parts), per_row


def crop_dataset_rows(page: Page) -> list[dict]:
    sub = page.runs[page.runs["ok_result"]]
    if sub.empty or "mean_crops" not in sub:
        return []
    sub = sub[sub["mean_crops"].map(num).notna()]
    sub = pick(sub, ["model", "dataset", "resolution", "precision", "device"])
    sub = page.sort(sub, ["model", "dataset", "resolution", "precision"])
    return [{"model": r["model_label"], "dataset": r["dataset_label"], "short side": fmt_res(r["resolution"]),
             "precision": r["precision"], "device": r["device"], "mean crops": fmt(r.get("mean_crops"), 1),
             "GFLOPs": sig(r.get("gflops_model")), "median ms": fmt(r.get("latency_ms_model_median"), 1)}
            for _, r in sub.iterrows()]


def dataset_k_rows(page: Page) -> list[dict]:
    """Model scope GFLOPs at each dataset's own vocabulary size (records' `gflops_model_dataset_k`), one row per
    model at its protocol resolution (the newest record of each model and dataset)."""
    df = page.runs
    if df.empty or "gflops_model_dataset_k" not in df or "dataset_vocabulary_size" not in df:
        return []
    sub = df[df["at_protocol"] & df["gflops_model_dataset_k"].map(num).notna()]
    if sub.empty:
        return []
    sub = sub.sort_values("timestamp").drop_duplicates(["model", "dataset"], keep="last")
    datasets = ordered(sub["dataset"], page.catalog.dataset_order)
    label = {d: f"{r['dataset_label']} (K={int(num(r['dataset_vocabulary_size']))})"
             for d in datasets for _, r in sub[sub["dataset"] == d].head(1).iterrows()}
    rows = []
    for m in ordered(sub["model"], page.catalog.model_order):
        mine = sub[sub["model"] == m]
        row = {"model": mine["model_label"].iloc[0], "short side": fmt_res(mine["resolution"].iloc[0])}
        row.update({label[d]: sig(mine[mine["dataset"] == d]["gflops_model_dataset_k"].iloc[0])
                    if (mine["dataset"] == d).any() else "–" for d in datasets})
        rows.append(row)
    return rows


REPEAT_GROUP = ["model", "dataset", "resolution", "precision", "device", "compile", "threads", "batch_size",
                "latency_iters"]


def repeatability_rows(page: Page) -> list[dict]:
    """Cells measured more than once (config `repeat=0,1,...`): the spread of the per-run median latencies."""
    df = page.runs
    if df.empty or "repeat" not in df or "latency_ms_model_median" not in df:
        return []
    df = df[df["latency_ms_model_median"].map(num).notna() & df["repeat"].map(num).notna()]
    cols = [c for c in REPEAT_GROUP if c in df]
    rows = []
    for _, g in df.groupby([df[c].astype(str) for c in cols], sort=False):
        g = g.drop_duplicates(subset=["repeat"], keep="last")
        if len(g) < 2:
            continue
        med = g["latency_ms_model_median"].astype(float)
        within = g["latency_model_cv"].map(num).dropna() if "latency_model_cv" in g else pd.Series(dtype=float)
        e2e = g["latency_ms_end_to_end_median"].map(num).dropna() if "latency_ms_end_to_end_median" in g \
            else pd.Series(dtype=float)
        r = g.iloc[0]
        rows.append({"model": r["model_label"], "dataset": r["dataset_label"], "short side": fmt_res(r["resolution"]),
                     "precision": r["precision"], "device": r["device"], "threads": fmt_int(r.get("threads")),
                     "runs": str(len(g)), "timed iters per run": fmt(r.get("latency_iters"), 0),
                     "median of medians ms": fmt(float(med.median()), 1),
                     "range ms": f"{med.min():.1f}–{med.max():.1f}",
                     "CV across runs %": fmt(float(med.std(ddof=1) / med.mean() * 100), 2),
                     "mean CV within a run %": fmt(float(within.mean() * 100) if len(within) else None, 2),
                     "end-to-end CV across runs %": fmt(float(e2e.std(ddof=1) / e2e.mean() * 100)
                                                         if len(e2e) >= 2 else None, 2)})
    return rows


def overhead_rows(page: Page) -> list[dict]:
    """Full evaluation throughput (data loading, model, scores at full size, confusion) vs model-only throughput at
    the same batch and precision: the share of the model's speed the harness keeps."""
    df = page.runs
    need = ("eval_img_s", "throughput_img_s", "throughput_batch")
    if df.empty or any(c not in df for c in need):
        return []
    df = df[(df["status"] == "ok") & df["eval_img_s"].map(num).notna() & df["throughput_img_s"].map(num).notna()]
    rows = []
    for _, r in pick(df, ["model", "dataset", "resolution", "precision", "device", "batch_size"]).iterrows():
        ev, tp = float(r["eval_img_s"]), float(r["throughput_img_s"])
        same = num(r.get("batch_size")) == num(r.get("throughput_batch"))
        rows.append({"model": r["model_label"], "dataset": r["dataset_label"], "short side": fmt_res(r["resolution"]),
                     "precision": r["precision"], "device": r["device"], "batch": fmt_int(r.get("batch_size")),
                     "images": fmt_int(r.get("images_evaluated")),
                     "evaluation img/s": sig(ev), "model-only img/s": sig(tp),
                     "evaluation ÷ model-only": f"{ev / tp:.1%}" + ("" if same else " (batches differ)")
                                              + (" (model-only: fixed part)" if has_crops(r) else "")})
    return rows


def efficiency_section(page: Page) -> list[str]:
    out = ["## Efficiency", ""]
    eff = has_efficiency(page.runs)
    if eff.empty:
        return out + ["_No efficiency figures yet._", ""]
    crops = crop_counts(page.runs)
    rows = compute_rows(page, crops)
    timed = any(r["_timed_differs"] for r in rows)
    out += ["### Size and compute", "",
            "Parameters in millions: `params` = every parameter of the model as built (frozen CLIP included), "
            "`trainable, published` = the trainable count the authors report, `image path` = everything but the "
            "text encoder. **FLOPs convention: `torch.utils.flop_counter` over one forward of a square input "
            "(`input counted`), batch 1, model scope (normalised padded tensor in → masks and class logits out), "
            "text features for K classes cached (text encoder not run), attention counted; 1 MAC = 2 FLOPs, so "
            "GMACs = GFLOPs / 2 — papers that say \"GFLOPs\" usually mean GMACs.** Norms, softmax, GELU, "
            "interpolation and other non-matmul ops are not counted. Crop models (SimSeg, SCAN) are counted as a "
            "fixed part plus a per-crop cost: totals at the `crops` shown (mean measured crop count of the "
            "evaluated datasets, else the bound of 100 = one per query) and at 100 crops."
            + (" GMACs and GFLOPs follow the published computation order; `GFLOPs, timed path` counts the path that "
               "is timed, where a model's fast path skips work whose result is never read (the floors use it)."
               if timed else ""), "",
            md_table([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
                     {k: "right" for k in ("short side", "input counted", "K", "params (M)", "trainable, published (M)",
                                           "image path (M)", "GMACs", "GFLOPs (= 2 × GMACs)", "GFLOPs, timed path",
                                           "GFLOPs per crop", "GFLOPs at 100 crops")}), ""]
    flagged = False
    for device in sorted(set(eff["device"])):
        srows = speed_rows(page, device, crops)
        env = eff[eff["device"] == device].iloc[0]
        peak_txt, per_row = peaks_used(srows)
        flagged |= any(r["_contended"] for r in srows)
        shown = [{k: v for k, v in r.items() if not k.startswith("_") and (per_row or k != "peak")} for r in srows]
        driver = f", driver {as_str(env.get('driver'))}" if as_str(env.get("driver")) else ""
        out += [f"### Speed and memory on {device}", "",
                f"Device type {env['device_type'] or '–'}{driver}, torch {as_str(env.get('torch_version')) or '–'} "
                f"(CUDA {as_str(env.get('cuda_version')) or 'none'}), timer {as_str(env.get('timer')) or '–'}. "
                f"Compute peaks used for the floor: {peak_txt or 'none known for this device (the floor is –)'}.", "",
                md_table(shown, {k: "right" for k in ("short side", "threads", "crops", "peak", "floor ms",
                                                      "median ms", "p90 ms", "CV %", "end-to-end ms", "img/s",
                                                      "peak mem MB")}), ""]
    out += ["Latency is per image at batch 1 after warm-up: `median ms`/`p90 ms` for the model scope (the "
            "FLOPs' scope), `end-to-end ms` from the decoded uint8 image to the label map at its original size "
            "(resize, normalise, pad, model, per-class scores, argmax). `floor ms` = GFLOPs ÷ the device's peak "
            "GFLOP/s for that precision: no implementation can be faster (⚠ = a median below the floor, i.e. "
            "something was not timed). `img/s` = 1000 ÷ median ms × batch (1) unless the record holds a measured "
            "throughput. `CV` = standard deviation ÷ mean of the timed iterations. Peak memory: CUDA = "
            "`torch.cuda.max_memory_allocated`, RSS = the process's peak resident set (includes the Python "
            "runtime and the weights)." + (f" {CONTENDED_NOTE}" if flagged else ""), ""]
    out += captioned_table(
        "Repeatability", repeatability_rows(page),
        "The same cell measured as separate runs in a row (`repeat=0,1,...`, each its own record and process): the "
        "spread of the per-run median latency (model scope) across runs, beside the spread of the timed iterations "
        "within a run.",
        ("short side", "threads", "runs", "timed iters per run", "median of medians ms", "range ms",
         "CV across runs %", "mean CV within a run %", "end-to-end CV across runs %"))
    out += captioned_table(
        "Harness overhead", overhead_rows(page),
        "Images/s of a full evaluation (DataLoader decode and resize, model, per-class scores at the original size, "
        "argmax, confusion matrix) over the images/s of the model scope alone on a pre-made batch, at the same "
        "batch and precision.",
        ("short side", "batch", "images", "evaluation img/s", "model-only img/s", "evaluation ÷ model-only"))
    k_rows = dataset_k_rows(page)
    out += captioned_table(
        "GFLOPs at each dataset's vocabulary", k_rows,
        "Model scope GFLOPs (FLOPs convention above) with the text features of each dataset's own K classes "
        "cached, so a model whose cost grows with the vocabulary (CAT-Seg's image × class cost volume) shows it "
        "per dataset; the tables above are at the profile vocabulary. Counted from shapes (fake tensors); '–' for "
        "a model whose shapes depend on values (SimSeg, SCAN: crops follow the masks), see "
        "[Cost against vocabulary size](#cost-against-vocabulary-size) for those.",
        tuple(k for k in (k_rows[0] if k_rows else {}) if k != "model"))
    out += captioned_table(
        "Crop models: cost per dataset", crop_dataset_rows(page),
        "SimSeg and SCAN classify one CLIP crop per kept mask proposal, so their cost depends on the data: the mean "
        "crop count of each evaluated dataset and the totals at that count.",
        ("short side", "mean crops", "GFLOPs", "median ms"))
    return out
