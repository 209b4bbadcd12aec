"""The accuracy part of the page: models x datasets mIoU matrices (`ours / published (delta)` with the flags and
their known reasons), the published-vs-measured table and the resolution sweep. Cells run with evaluation off
(timing only) never appear here."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from bench.board.fmt import as_str, fmt, fmt_int, fmt_pub, fmt_res, md_table, num, ordered
from bench.board.published import ModelInfo, Source
from bench.board.tables import Page, partial, pick, precisions

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
    headline = as_str(r.get("miou_formula")) or "current"
    if formula and num(r.get(f"mIoU_{formula}")) is not None:
        return num(r.get(f"mIoU_{formula}")), formula
    return num(r.get("mIoU")), headline


def compare(r, source: Source, tolerance: float) -> Compared | None:
    ref = source.miou.get(r["dataset"])
    if ref is None:
        return None
    ours, formula = _ours(r, source.formula)
    if ours is None:
        return None
    delta = ours - float(ref)
    codes, reasons = [], []
    if part := partial(r):
        codes.append("partial")
        reasons.append(part)
    if "settings not published" in as_str(r.get("note")):
        codes.append("settings")
        reasons.append(as_str(r.get("note")))
    if abs(delta) > tolerance:
        other = "v06" if formula == "current" else "current"
        alt = num(r.get(f"mIoU_{other}"))
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
    cur, v06 = num(r.get("mIoU_current")), num(r.get("mIoU_v06"))
    if cur is None or v06 is None or abs(cur - v06) < 0.05:
        return ""
    headline = as_str(r.get("miou_formula")) or "current"
    return f" (v0.6 {v06:.1f})" if headline == "current" else f" (current {cur:.1f})"


def _sg(r) -> str:
    sg = num(r.get("SG-mIoU"))
    if sg is None:
        return ""
    return f" · SG {sg:.1f}" + ("" if r.get("sg_iou_table_official") else "*")


def accuracy_matrix(page: Page, sub: pd.DataFrame, compare_published: bool, used_codes: set[str]) -> str:
    """Models x datasets; one selected record per cell."""
    cells = pick(sub, ["model", "dataset"])
    models = ordered(cells["model"], page.catalog.model_order)
    datasets = ordered(cells["dataset"], page.catalog.dataset_order)
    labels = {d: cells[cells["dataset"] == d]["dataset_label"].iloc[0] for d in datasets}
    best = {}
    for d in datasets:
        res = cells[(cells["dataset"] == d) & cells["ok_result"]]
        vals = [num(r.get("mIoU")) for _, r in res.iterrows() if num(r.get("mIoU")) is not None and not partial(r)]
        if len(vals) >= 2:
            best[d] = max(vals)
    rows = []
    for m in models:
        info = page.models.get(m)
        mrows = cells[cells["model"] == m]
        row = {"model": mrows["model_label"].iloc[0],
               "res": "/".join(fmt_res(v) for v in sorted(set(mrows["resolution"])))}
        for d in datasets:
            hit = mrows[mrows["dataset"] == d]
            row[labels[d]] = _accuracy_cell(hit.iloc[0] if len(hit) else None, info, d, page.tolerance,
                                             compare_published, best.get(d), used_codes)
        rows.append(row)
    align = {"res": "right", **{labels[d]: "right" for d in datasets}}
    return md_table(rows, align)


def _primary_source(info: ModelInfo | None, dataset: str) -> Source | None:
    for s in (info.sources if info else []):
        if dataset in s.miou:
            return s
    return None


def _accuracy_cell(r, info: ModelInfo | None, dataset: str, tolerance: float, compare_published: bool,
                   best: float | None, used_codes: set[str]) -> str:
    source = _primary_source(info, dataset) if compare_published else None
    pub = f" / {fmt_pub(source.miou[dataset])}{sup(source.tag)}" if source else ""
    if r is None:
        return f"–{pub}"
    if r["status"] != "ok":
        return f"– ({r['status']}){pub}"
    if r["pipeline_check"]:
        return "pipeline check"
    ours = num(r.get("mIoU"))
    text = fmt(ours)
    if best is not None and ours is not None and ours >= best and not partial(r):
        text = f"**{text}**"
    text += _both_formulas(r)
    codes: list[str] = []
    if source:
        c = compare(r, source, tolerance)
        if c is not None:
            text += f"{pub} ({c.delta:+.1f})"
            codes = c.codes
    elif partial(r):
        codes = ["partial"]
    if codes:
        used_codes.update(codes)
        text += " ⚠ " + ", ".join(codes)
    return text + _sg(r)


def sup(tag: str) -> str:
    return {"P": "ᴾ", "L": "ᴸ"}.get(tag, tag)


def published_vs_measured(page: Page, sub: pd.DataFrame) -> str:
    cells = pick(sub[sub["ok_result"]], ["model", "dataset", "precision"])
    cells = page.sort(cells, ["model", "dataset", "precision"])
    rows = []
    for _, r in cells.iterrows():
        info = page.models.get(r["model"])
        base = {"model": r["model_label"], "dataset": r["dataset_label"], "res": fmt_res(r["resolution"]),
                "precision": r["precision"], "device": r["device"],
                "images": f"{fmt_int(r.get('images_evaluated'))}/{fmt_int(r.get('dataset_images_official'))}",
                "mIoU current": fmt(r.get("mIoU_current"), 2), "mIoU v0.6": fmt(r.get("mIoU_v06"), 2),
                "SG-mIoU": fmt(r.get("SG-mIoU"), 2) + ("" if num(r.get("SG-mIoU")) is None or
                                                        r.get("sg_iou_table_official") else "*")}
        compared = [c for s in (info.sources if info else []) if (c := compare(r, s, page.tolerance))]
        if not compared:
            rows.append({**base, "published": "–", "source": "none published", "Δ": "–", "flag": "",
                         "reason": partial(r)})
        for c in compared:
            rows.append({**base, "published": fmt_pub(c.ref), "source": f"{c.source.kind} ({sup(c.source.tag)})",
                         "Δ": f"{c.delta:+.2f}" + (" (v0.6)" if c.formula == "v06" else ""),
                         "flag": ("⚠ " + ", ".join(c.codes)) if c.codes else "✓", "reason": "; ".join(c.reasons)})
    return md_table(rows, {k: "right" for k in ("res", "images", "mIoU current", "mIoU v0.6", "SG-mIoU",
                                              "published", "Δ")})


def protocol_notes(page: Page, sub: pd.DataFrame) -> list[str]:
    """How each shown dataset is scored, from its records' `dataset_protocol`, once at least two shown datasets
    say it (PAS-20b and PAS-20b (proxies)): a reader never compares across protocols without being told."""
    if "dataset_protocol" not in sub.columns:
        return []
    shown = sub[sub["dataset_protocol"].fillna("") != ""]
    if shown["dataset"].nunique() < 2:
        return []
    lines = []
    for d in ordered(shown["dataset"], page.catalog.dataset_order):
        r = shown[shown["dataset"] == d].iloc[-1]
        lines.append(f"**{r['dataset_label']}**: {r['dataset_protocol']}")
    return ["Protocols: " + "; ".join(lines) + ". A published figure sits in the column of the protocol its source "
            "used; figures under different protocols are not comparable.", ""]


def accuracy_section(page: Page) -> list[str]:
    df = page.runs[page.runs["status"].isin(["ok", "missing", "error"]) & ~page.runs["timing_only"]]
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
    for prec in precisions(proto["precision"]):
        sub = proto[proto["precision"] == prec]
        matrices += [f"### mIoU at each model's own protocol resolution, {prec}", "",
                     accuracy_matrix(page, sub, True, used), ""]
    sweep = []
    for res in sorted(set(df[~df["at_protocol"]]["resolution"].dropna())):
        at = df[df["resolution"] == res]
        for prec in precisions(at["precision"]):
            sweep += [f"#### Short side {res:g}, {prec}", "",
                      accuracy_matrix(page, at[at["precision"] == prec], False, used), ""]
    out += matrices
    out += protocol_notes(page, proto)
    if used:
        out += ["⚠ " + "; ".join(f"**{c}**: {FLAG_LEGEND[c]}" for c in FLAG_LEGEND if c in used) + ".", ""]
    if not proto[proto["ok_result"]].empty:
        out += ["### Published vs measured, cell by cell", "",
                f"Every measured cell at its model's protocol resolution against every published figure. Δ is ours "
                f"minus published, computed with the published source's mIoU formula where it is known (official "
                f"logs: current formula), else with our headline formula; ✓ = within {tol:g} mIoU.", "",
                published_vs_measured(page, proto), ""]
        notes = [DATASET_NOTES[d] for d in ordered(proto[proto["ok_result"]]["dataset"], page.catalog.dataset_order)
                 if d in DATASET_NOTES]
        out += [f"{n}." for n in notes] + ([""] if notes else [])
    if sweep:
        out += ["### Resolution sweep", "",
                "mIoU at other input sizes (short side as given, long side ≤ 4× it). Published figures are at each "
                "model's protocol resolution, so they are not compared here.", "", *sweep]
    return out
