"""Verify a prepared split: which tree it is, pairing, counts against the official ones, label dtypes and values,
and a per-class pixel histogram.

    python -m bench.data.check dataset=ade150 [data_root=DIR] [max_images=N] [expect_images=N] [layout=san|ovseg]
                               [top=10] [dataset.label_order=scan]

Exit status 0 when everything is right, 1 with every problem on its own `problem:` line, 2 for bad arguments.
A pair count other than the official val size (clarifications §12) is a problem unless `expect_images=N` says
what to expect (a subset on purpose, or a synthetic copy).
"""
from __future__ import annotations

import logging
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench import BenchError
from bench.cli import error, parse_overrides
from bench.data.dataset import CheckReport, check_dataset
from bench.data.layouts import DatasetSpec, detect_layout, load_class_names, resolve_data_root, spec_from_cfg

_MODES = {8: {"L", "P"}, 16: {"I;16", "I;16L", "I;16B", "I;16N"}}
_ARGS = {"dataset": str, "data_root": str, "max_images": int, "expect_images": int, "layout": str, "top": int}


def label_modes(spec: DatasetSpec, data_root: str | Path, limit: int | None = None) -> tuple[Counter, list[str]]:
    """PIL modes of the label files (header only) and one problem line per kind of wrong mode."""
    lay = spec.layout
    files = sorted(p for p in (Path(data_root) / lay.label_dir).iterdir() if p.name.endswith(lay.label_ext))
    modes: Counter = Counter()
    wrong: dict[str, list[str]] = {}
    for p in files[:limit]:
        try:
            with Image.open(p) as im:
                mode = im.mode
        except (OSError, SyntaxError, ValueError):
            continue                                   # unreadable files are reported by check_dataset
        modes[mode] += 1
        if mode not in _MODES[lay.label_bits]:
            wrong.setdefault(mode, []).append(p.name)
    want = "8-bit PNG (mode L or P)" if lay.label_bits == 8 else "16-bit TIFF (mode I;16)"
    problems = [f"{len(names)} label(s) are mode {mode}, expected {want}: {', '.join(names[:3])}"
                f"{' ...' if len(names) > 3 else ''}" for mode, names in sorted(wrong.items())]
    return modes, problems


def histogram_lines(counts: np.ndarray, names: list[str], ignore_pixels: int, top: int = 10) -> list[str]:
    """Text histogram: the `top` most and least frequent present classes (share of labelled pixels, bar) and the
    absent ones."""
    total = int(counts.sum())
    present = np.flatnonzero(counts > 0)
    absent = np.flatnonzero(counts == 0)
    share = f"{100.0 * ignore_pixels / max(total + ignore_pixels, 1):.1f}%"
    lines = [f"per-class pixels: {total} labelled, {ignore_pixels} ignore ({share}); {len(present)}/{len(counts)} "
             f"classes present"]
    if total == 0:
        return lines
    order = present[np.argsort(-counts[present], kind="stable")]
    peak = counts[order[0]]
    width = max(len(n) for n in names) if names else 10
    width = min(width, 32)

    def row(c: int) -> str:
        bar = "#" * max(1, int(round(30 * counts[c] / peak)))
        return f"  {c:>4} {names[c][:width]:<{width}} {100.0 * counts[c] / total:6.2f}% {bar}"

    if len(order) <= 2 * top:
        lines += [row(int(c)) for c in order]
    else:
        lines += [f" top {top}:"] + [row(int(c)) for c in order[:top]]
        lines += [f" bottom {top}:"] + [row(int(c)) for c in order[-top:]]
    if absent.size:
        shown = "; ".join(f"{int(c)} {names[c]}" for c in absent[:8])
        lines.append(f" absent ({absent.size}): {shown}{' ...' if absent.size > 8 else ''}")
    return lines


def run_check(cfg: dict, data_root: str, max_images: int | None = None, expect_images: int | None = None,
              layout: str | None = None, top: int = 10) -> tuple[list[str], list[str]]:
    """(report lines, problem lines) for one dataset config; problems empty = the split is right."""
    spec = spec_from_cfg(cfg)
    lines: list[str] = []
    try:
        match = detect_layout(spec, data_root, prefer=layout)
    except BenchError as e:
        return lines, [str(e)]
    lines.append(f"{spec.display_name}: found the {match.family} tree [layout={match.key}]: "
                 f"{match.layout.describe(data_root)}")
    pinned = replace(spec, layout=match.layout, alt_layouts=())
    try:
        report: CheckReport = check_dataset(pinned, data_root, max_images=max_images)
    except BenchError as e:
        return lines, [str(e)]
    problems = list(report.problems)
    expected = expect_images if expect_images is not None else spec.official_val_images
    what = "expected" if expect_images is not None else "official val split"
    count_ok = expected is None or report.n_pairs == expected
    lines.append(f"pairs: {report.n_pairs} image/label pairs ({what}: {expected if expected else '?'}) "
                 f"{'ok' if count_ok else 'MISMATCH'}")
    if not count_ok:
        problems.append(f"{report.n_pairs} image/label pairs under {data_root}, the {what} has {expected}; "
                        f"re-run the prepare step (or pass expect_images={report.n_pairs} if that is intended)")
    modes, mode_problems = label_modes(pinned, data_root, max_images)
    problems += mode_problems
    counts = report.pixels_per_class if report.pixels_per_class is not None else np.zeros(spec.num_classes, int)
    present = np.flatnonzero(counts > 0)
    seen = f"seen {int(present.min())}..{int(present.max())}" if present.size else "no labelled pixels"
    kind = "16-bit TIFF" if match.layout.label_bits == 16 else "8-bit PNG"
    lines.append(f"labels: {kind} ({', '.join(f'{m}: {n}' for m, n in sorted(modes.items())) or 'none read'}); "
                 f"values in [0, {spec.num_classes}) or ignore {spec.ignore_label}: "
                 f"{report.n_checked - len(report.problems)}/{report.n_checked} checked files ok; {seen}")
    if spec.label_order is not None:
        lines.append(f"labels remapped from the {spec.label_order!r} id order to {spec.classes_file}")
    names = load_class_names(spec.classes_file)
    lines += histogram_lines(counts, names, report.ignore_pixels, top)
    if max_images is not None and report.n_checked < report.n_pairs:
        lines.append(f"note: only the first {report.n_checked} of {report.n_pairs} pairs were read (max_images)")
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    from bench.data.synth import load_dataset_cfg

    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    usage = "dataset=ade150 [data_root=DIR] [max_images=N] [expect_images=N] [layout=san|ovseg] [top=10]"
    try:
        args, overrides = parse_overrides(argv, _ARGS, usage, passthrough=lambda a: a.startswith("dataset."))
        if not args.get("dataset"):
            raise BenchError(f"missing dataset=NAME; usage: {usage}")
        cfg: dict[str, Any] = load_dataset_cfg(str(args["dataset"]))
        if overrides:
            from omegaconf import OmegaConf

            extra = OmegaConf.to_container(OmegaConf.from_dotlist([a[len("dataset."):] for a in overrides]))
            cfg.update(extra)  # type: ignore[arg-type]
    except (BenchError, ValueError) as e:
        return error(e)
    try:
        lines, problems = run_check(cfg, resolve_data_root(args), args.get("max_images"), args.get("expect_images"),
                                    args.get("layout"), args.get("top", 10))
    except BenchError as e:
        lines, problems = [], [str(e)]
    for line in lines:
        print(line)
    for p in problems:
        print(f"problem: {p}")
    print(f"{cfg.get('display_name', args['dataset'])}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
