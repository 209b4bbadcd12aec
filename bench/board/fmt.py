"""How the board writes a value: numbers to a fixed number of decimals or significant figures, '–' for a missing
one, published figures with their own decimals, and GitHub markdown tables (tabulate through pandas)."""
from __future__ import annotations

import math
import re

import pandas as pd


def num(v) -> float | None:
    """A finite float, or None (NaN, None, '', non-numeric)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt(v, digits: int = 1) -> str:
    f = num(v)
    return "–" if f is None else f"{f:,.{digits}f}".replace(",", " ")


def sig(v) -> str:
    """About three significant figures without exponent notation (0.00287, 2.57, 46.9, 1 930)."""
    f = num(v)
    if f is None:
        return "–"
    if abs(f) >= 100:
        return f"{f:,.0f}".replace(",", " ")
    return f"{f:.{max(0, 2 - math.floor(math.log10(abs(f))))}f}" if f else "0"


def fmt_int(v) -> str:
    f = num(v)
    return "–" if f is None else f"{f:.0f}"


def fmt_pct(v, digits: int = 1) -> str:
    """A fraction as a percentage (0.0123 -> '1.2')."""
    f = num(v)
    return "–" if f is None else fmt(f * 100, digits)


def fmt_pub(v: float) -> str:
    """A published figure with the decimals it was published with (12.6, 16.71)."""
    text = repr(float(v))
    decimals = len(text.split(".")[1]) if "." in text and "e" not in text else 1
    return f"{v:.{max(1, min(decimals, 2))}f}"


def fmt_res(v) -> str:
    f = num(v)
    return "–" if f is None else f"{f:g}"


def fmt_crops(n: float) -> str:
    return f"{n:.1f}".removesuffix(".0")


def millions(v) -> str:
    f = num(v)
    return "–" if f is None else f"{f / 1e6:.2f}"


def flops_rate(gflops_per_s: float) -> str:
    """1.63 TFLOP/s, 66.9 TFLOP/s, 182.6 GFLOP/s."""
    if gflops_per_s >= 1e4:
        return f"{gflops_per_s / 1e3:.1f} TFLOP/s"
    return f"{gflops_per_s / 1e3:.2f} TFLOP/s" if gflops_per_s >= 1e3 else f"{gflops_per_s:.1f} GFLOP/s"


def as_bool(v) -> bool | None:
    if isinstance(v, bool):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return str(v).strip().lower() in ("true", "1", "1.0", "yes")


def as_str(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(rows: list[dict], align: dict[str, str] | None = None) -> str:
    """A GitHub markdown table (tabulate); `align` maps a column to 'right'/'left'/'center' (default left)."""
    if not rows:
        return "_none_"
    df = pd.DataFrame(rows).fillna("–")
    df = df.map(lambda v: md_cell(str(v)))
    colalign = [(align or {}).get(c, "left") for c in df.columns]
    return df.to_markdown(index=False, colalign=colalign, disable_numparse=True)


def captioned_table(heading: str, rows: list[dict], caption: str, right: tuple[str, ...]) -> list[str]:
    """A `###` subsection (heading, caption, table with `right` columns right-aligned); nothing without rows."""
    if not rows:
        return []
    return [f"### {heading}", "", caption, "", md_table(rows, {k: "right" for k in right}), ""]


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def ordered(values, order: list[str]) -> list[str]:
    """The distinct `values`, those named in `order` first in its order, the rest sorted."""
    vals = set(values)
    return [v for v in order if v in vals] + sorted(vals - set(order))
