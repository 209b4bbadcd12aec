"""The "Cost against vocabulary size" table and plot: cells of one model, device, precision and resolution measured
at several vocabulary sizes K (`make bench-vocab`: `+sweep=vocab_cost`, K = 20, 59, 150, 459, 847). A model whose
cost grows with K (a cost volume of image x class) shows it here; the text encoder's cost of each vocabulary is
given apart (it runs once per vocabulary, then its features are cached)."""
from __future__ import annotations

import pandas as pd
from matplotlib.lines import Line2D

from bench.board import plots
from bench.board.fmt import fmt, md_table, num
from bench.board.tables import Page

HEADING = "Cost against vocabulary size"
GROUP = ["model", "device", "precision", "resolution"]


def vocab_table(page: Page) -> pd.DataFrame:
    """One row per (model, device, precision, resolution, K) with FLOPs; groups with a single K are left out."""
    df = page.runs
    need = {"profile_vocabulary_size", "gflops_model"}
    if df.empty or not need <= set(df.columns):
        return pd.DataFrame()
    sub = df[df["status"].isin(["ok", "missing"]) & df["profile_vocabulary_size"].notna()
             & df["gflops_model"].notna()].copy()
    if sub.empty:
        return sub
    sub["K"] = sub["profile_vocabulary_size"].astype(int)
    sub["counted_from"] = "measured"
    sub = pd.concat([sub, shape_only_rows(sub)], ignore_index=True)
    sub = sub.sort_values(["counted_from", "timestamp"], ascending=[False, True]).drop_duplicates(GROUP + ["K"],
                                                                                                   keep="last")
    ks = sub.groupby(GROUP, dropna=False)["K"].transform("nunique")
    return page.sort(sub[ks >= 2], GROUP + ["K"])          # models in their configs' order, then K


def shape_only_rows(sub: pd.DataFrame) -> pd.DataFrame:
    """GFLOPs at the other vocabulary sizes every profiled record carries (`gflops_model_at_k_<K>`, counted from
    shapes; SAN, CAT-Seg): rows without latency or memory, so `make bench` alone draws the GFLOPs-vs-K lines. A
    measured row (`make bench-vocab`) at the same K wins."""
    cols = [c for c in sub.columns if c.startswith("gflops_model_at_k_")]
    if not cols:
        return pd.DataFrame()
    newest = sub.sort_values("timestamp").drop_duplicates(GROUP, keep="last")
    rows = []
    for _, r in newest.iterrows():
        for c in cols:
            if num(r.get(c)) is not None:
                rows.append({**{g: r[g] for g in GROUP}, "K": int(c.rsplit("_", 1)[1]), "gflops_model": num(r[c]),
                             "timestamp": r["timestamp"], "counted_from": "shapes"})
    return pd.DataFrame(rows)


def vocab_section(page: Page) -> list[str]:
    table = vocab_table(page)
    if table.empty:
        return []
    rows = [{"model": page.models[r["model"]].display if r["model"] in page.models else r["model"],
             "device": r["device"], "precision": r["precision"], "res": fmt(r["resolution"], 0), "K": int(r["K"]),
             "GFLOPs (model scope)": fmt(r["gflops_model"], 1),
             "median ms": fmt(r.get("latency_ms_model_median"), 1),
             "peak mem MB": fmt(r.get("peak_mem_mb"), 0),
             "text GFLOPs": fmt(r.get("gflops_text"), 1),
             "text s (uncached)": fmt(r.get("text_encode_s_uncached"), 2)}
            for _, r in table.iterrows()]
    return [f"## {HEADING}", "",
            "Model scope at batch 1 with the text features cached, at each vocabulary size K; the text encoder's "
            "cost of encoding the K class names with every prompt template is apart (measured on one class with "
            "the cache off, times K: each prompt runs through the text tower on its own). Crop models at the crop "
            "count of their cells. Rows without latency come from the GFLOPs every `make bench` profile counts "
            "from shapes at each dataset's K (SAN, CAT-Seg); `make bench-vocab` measures all columns.", "",
            md_table(rows, align={c: "right" for c in ("res", "K", "GFLOPs (model scope)", "median ms",
                                                        "peak mem MB", "text GFLOPs", "text s (uncached)")}), ""]


def vocab_plot(page: Page, emit, colors: dict, labels: dict) -> None:
    """GFLOPs (model scope) against K, one line per model (and device / precision / resolution group)."""
    table = vocab_table(page)
    if table.empty:
        return
    emit("### GFLOPs vs vocabulary size", "GFLOPs vs vocabulary size", "gflops-vs-vocabulary",
         lambda p: _figure(table, p, colors, labels),
         "Model-scope GFLOPs at each vocabulary size K (log scales), one line per model; see the "
         f"[{HEADING}](#{HEADING.lower().replace(' ', '-')}) table for latency, memory and the text encoder.")


def _figure(table: pd.DataFrame, path: str, colors: dict, labels: dict) -> None:
    fig, (ax,) = plots._panels(1, width=6.4, height=4.2)
    handles = []
    for key, g in table.groupby(GROUP, sort=False, dropna=False):
        model = key[0]
        g = g.sort_values("K")
        ax.plot(g["K"], g["gflops_model"], color=colors.get(model, "0.3"), marker="o", linewidth=1.4)
        handles.append(Line2D([], [], color=colors.get(model, "0.3"), marker="o",
                              label=f"{labels.get(model, model)} ({key[2]}, {num(key[3]):g})"))
    ax.set_xscale("log")
    ax.set_xticks(ks := _spaced(sorted(set(table["K"]))))
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xticks([], minor=True)
    plots._log_axis(ax.yaxis, table["gflops_model"])
    ax.set_xlabel("vocabulary size K (classes)")
    ax.set_ylabel("GFLOPs per image (model scope)")
    ax.grid(True, which="major", linewidth=0.4, alpha=0.5)
    ax.set_title("Compute vs vocabulary size (batch 1, text features cached)", fontsize=11)
    plots._legend(fig, handles)
    plots._save(fig, path)


def _spaced(ks: list[int], min_ratio: float = 1.15) -> list[int]:
    """Tick positions on the log K axis: a K closer than `min_ratio` to the previous tick is left unlabelled
    (PAS-20b's 21 beside PAS-20's 20 would print as one number); its points are still drawn."""
    out: list[int] = []
    for k in ks:
        if not out or k >= out[-1] * min_ratio:
            out.append(k)
    return out
