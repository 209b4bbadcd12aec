"""FLOP counting, the one definition every figure uses: `torch.utils.flop_counter.FlopCounterMode` over one call,
2 FLOPs per MAC, attention counted.

- PyTorch's CPU flash-attention kernel has no formula in the counter (it would count 0): it gets one,
  2·B·H·Lq·Lk·(D+Dv), what the math backend's two bmm's count; a probe fails loudly if attention goes uncounted.
- `count_flops_split(fn, shapes_of=model)` runs the call on fake tensors (`FakeTensorMode`: shapes only, no
  arithmetic; CAT-Seg's 3 TFLOP forward is counted in about a second) and puts the model's attributes back
  (`attributes_kept`); a call whose shapes depend on values, or whose measured time is under `REAL_COUNT_MS`, is
  counted on a real call. `counted_from` says which; the two agree (bench.testing.check_model).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from bench import BenchError

log = logging.getLogger(__name__)


def _flash_cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """2·B·H·Lq·Lk·D (Q·K^T) + 2·B·H·Lq·Lk·Dv (P·V): what the math backend's two bmm's count."""
    *batch, lq, d = query
    lk, dv = key[-2], value[-1]
    n = math.prod(batch)
    return 2 * n * lq * lk * d + 2 * n * lq * lk * dv


def _counter() -> FlopCounterMode:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return FlopCounterMode(display=False, custom_mapping={op: _flash_cpu_attention_flops} if op is not None else {})


# A call measured faster than this is counted on a real call even when shapes would do: fake tensors cost about a
# millisecond of Python dispatch per op whatever the tensor sizes (1-3 s for a model of a few thousand ops), a
# real call of a small model or input far less. Above it (a CAT-Seg forward: a minute on a CPU) shapes win.
REAL_COUNT_MS = 500.0


def count_flops_split(fn: Callable[[], object], shapes_of: torch.nn.Module | None = None,
                      call_ms: float | None = None) -> dict:
    """{'total', 'attention', 'by_op', 'counted_from'} FLOPs of one call of `fn` (2 per MAC), attention counted
    (see docstring). With `shapes_of` (the model `fn` runs), the call first runs on fake tensors
    (`FakeTensorMode`: shapes only, no arithmetic, the same FLOP formulas) and the model's attributes are put back
    afterwards; a call whose shapes depend on values (nonzero, masked selection, .item()) is then run for real, as
    is a call whose measured time `call_ms` is under REAL_COUNT_MS. `counted_from` says which ('shapes' | 'run');
    the two give the same count (bench.testing.check_model)."""
    _check_attention_counted()
    cheap = call_ms is not None and call_ms < REAL_COUNT_MS
    if shapes_of is not None and not cheap:
        try:
            with attributes_kept(shapes_of), FakeTensorMode(allow_non_fake_inputs=True):
                return dict(_count(fn), counted_from="shapes")
        except Exception as e:   # noqa: BLE001 - value-dependent shapes (or an op fake tensors lack): run it
            log.debug("FLOPs from shapes failed (%s: %s); counting a real call", type(e).__name__, e)
    return dict(_count(fn), counted_from="run")


def _count(fn: Callable[[], object]) -> dict:
    counter = _counter()
    with torch.inference_mode(), counter:
        fn()
    by_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for k, v in by_op.items() if "attention" in str(k))
    return {"total": int(counter.get_total_flops()), "attention": int(attention),
            "by_op": {str(k): int(v) for k, v in by_op.items()}}


@contextlib.contextmanager
def attributes_kept(model: torch.nn.Module):
    """Every module's attributes (and the contents of dict / list attributes, e.g. a text cache) as they were
    before the block: a forward on fake tensors must not leave a fake tensor behind in a cache."""
    saved = []
    for m in model.modules():
        attrs = dict(vars(m))
        saved.append((m, attrs, {k: (dict(v) if isinstance(v, dict) else list(v))
                                 for k, v in attrs.items() if isinstance(v, (dict, list))}))
    try:
        yield
    finally:
        for m, attrs, contents in saved:
            for k in [k for k in vars(m) if k not in attrs]:
                delattr(m, k)
            for k, v in attrs.items():
                if vars(m).get(k) is not v:
                    object.__setattr__(m, k, v)
                if k in contents and isinstance(v, dict):
                    v.clear()
                    v.update(contents[k])
                elif k in contents:
                    v[:] = contents[k]


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of one call of `fn` (2 per MAC), attention included."""
    return count_flops_split(fn)["total"]


@functools.cache
def _check_attention_counted() -> None:
    """Once per process: the counter sees SDPA's FLOPs in this torch build."""
    q = torch.zeros(1, 2, 8, 4)
    counter = _counter()
    with torch.inference_mode(), counter:
        F.scaled_dot_product_attention(q, q, q)
    if counter.get_total_flops() <= 0:
        raise BenchError("FLOP counter sees scaled_dot_product_attention as 0 FLOPs in this torch build; "
                         "attention would be missing from the GFLOPs (report this torch version)")
