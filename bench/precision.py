"""Numeric precisions of a cell, each defined once: weight dtype, autocast, TF32 flags, and the matmul peak its
compute floor is judged against (plus how plots draw it).

Adding a precision is one entry in `PRECISIONS`; the config check, the cell runner, the profiler, the leaderboard
and the plots all read it from here. Importing this module does not import torch (the board reads it too).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    name: str
    weights: str                 # dtype the model's weights are cast to (torch dtype name)
    autocast: str | None = None  # autocast dtype around the forward, or None
    tf32: bool = False           # TF32 matmuls / convolutions allowed (CUDA); "highest" fp32 matmul precision if not
    peak: str = "fp32"           # which measured / datasheet matmul peak the compute floor uses
    marker: str = "o"            # plots
    linestyle: object = "-"


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "float32", peak="fp32", marker="o", linestyle="-"),
    Precision("tf32", "float32", tf32=True, peak="tf32", marker="s", linestyle="--"),
    Precision("amp_bf16", "float32", autocast="bfloat16", peak="bf16", marker="D", linestyle="-."),
    Precision("bf16", "bfloat16", peak="bf16", marker="^", linestyle=":"),
    Precision("fp16", "float16", peak="fp16", marker="v", linestyle=(0, (5, 1, 1, 1))),
)}
PRECISION_NAMES: tuple[str, ...] = tuple(PRECISIONS)


def get(name: str) -> Precision:
    """The precision called `name`, or a BenchError listing the valid names."""
    if name not in PRECISIONS:
        from bench import BenchError

        raise BenchError(f"unknown precision {name!r}; choose one of {', '.join(PRECISION_NAMES)}")
    return PRECISIONS[name]


def peak_kind(name: str) -> str:
    """The matmul peak ('fp32', 'tf32', 'bf16', 'fp16') a cell of this precision is judged against."""
    return get(name).peak


def is_reduced(name: str) -> bool:
    """Whether the precision computes in fewer mantissa bits than fp32 (so it is compared with an fp32 run)."""
    return get(name).peak in ("bf16", "fp16")


def model_dtype(name: str):
    import torch

    return getattr(torch, get(name).weights)


def peak_dtype(name: str):
    """The torch dtype of the matmul that measures this precision's peak."""
    import torch

    return {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        peak_kind(name)]


@contextlib.contextmanager
def context(name: str, device):
    """Backend flags and autocast for one cell; every flag is restored afterwards."""
    import torch

    p = get(name)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = p.tf32
    torch.backends.cudnn.allow_tf32 = p.tf32
    torch.set_float32_matmul_precision("high" if p.tf32 else "highest")
    try:
        if p.autocast is not None:
            with torch.autocast(device_type=device.type, dtype=getattr(torch, p.autocast)):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
        torch.set_float32_matmul_precision(saved[2])
