"""Where a scope's time goes: one torch.profiler pass, time by op category next to the floor of the GEMM and
attention FLOPs at the cell's measured peak (`gap_table`), written beside the record (`profile.gap_table=true`).

Categories are exact aten op names plus a few prefixes; anything unlisted is "other ops", and the wall time the
profiler did not attribute to an op is "Python overhead / untraced". Attention that runs as GEMMs (bf16 on the CPU,
`bench.models.attention`) counts its two products, time and FLOPs, as GEMM and its softmax as attention.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

CATEGORIES = ("GEMM", "attention", "norm/activation/elementwise", "resize/pad/post-processing", "other ops",
              "Python overhead / untraced")
_GEMM = {"addmm", "addmm_", "mm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution", "conv2d",
         "mkldnn_convolution", "mkldnn_linear", "mkldnn_matmul", "einsum", "_addmm_activation", "dot", "mv", "addmv",
         "_mkl_linear", "mkl_linear", "_linear_pointwise", "_convolution_pointwise", "conv1d", "conv3d",
         "_slow_conv2d_forward", "thnn_conv2d", "_nnpack_spatial_convolution", "slow_conv_dilated2d"}
_ATTN = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu", "softmax", "_softmax",
         "_safe_softmax", "_scaled_dot_product_attention_math", "log_softmax", "_log_softmax"}
_NORM = {"layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "batch_norm", "native_batch_norm",
         "_native_batch_norm_legit_no_training", "_batch_norm_impl_index", "gelu", "sigmoid", "sigmoid_", "relu",
         "relu_", "silu", "tanh", "mul", "mul_", "add", "add_", "sub", "sub_", "div", "div_", "exp", "exp_", "pow",
         "neg", "rsqrt", "sqrt", "clamp", "clamp_", "clamp_min", "where", "threshold", "masked_fill",
         "masked_fill_", "addcmul", "addcdiv", "rsub", "log", "abs", "norm", "linalg_vector_norm", "sum", "mean",
         "hardtanh", "erf", "maximum", "minimum", "reciprocal", "square", "cumsum", "lerp"}
_RESIZE_PREFIX = ("upsample_", "_upsample_", "adaptive_", "max_pool", "avg_pool", "constant_pad", "reflection_pad",
                  "replication_pad", "grid_sampler", "index", "_index", "scatter", "gather")
_RESIZE = {"pad", "interpolate", "argmax", "argmin", "max", "min", "topk", "sort", "copy_", "cat", "stack",
           "_to_copy", "to", "clone", "contiguous", "fill_", "zero_", "zeros", "zeros_like", "ones", "full",
           "full_like", "new_zeros", "new_ones", "new_full", "round", "round_", "nonzero", "any", "all", "roll",
           "flip", "repeat", "masked_select", "eq", "gt", "lt", "ge", "le", "ne", "unique", "_unique2", "arange",
           "item", "_local_scalar_dense", "empty", "empty_like", "empty_strided", "resize_", "select_scatter",
           "slice_scatter", "narrow_copy", "unfold", "im2col", "col2im", "one_hot", "floor", "ceil", "trunc",
           "bitwise_and", "bitwise_or", "logical_and", "logical_or", "logical_not", "_reshape_alias", "reshape",
           "view", "permute", "transpose", "expand", "as_strided", "slice", "select", "unsqueeze", "squeeze",
           "flatten", "split", "chunk", "unbind", "narrow", "t", "detach", "alias", "lift_fresh", "clamp_max"}


def op_category(name: str) -> str:
    """Category of a profiler event name such as 'aten::addmm' (exact op names, a few prefixes)."""
    base = name.split("::", 1)[1] if "::" in name else name
    if base in _ATTN or "attention" in base:
        return "attention"
    if base in _GEMM:
        return "GEMM"
    if base in _NORM:
        return "norm/activation/elementwise"
    if base in _RESIZE or base.startswith(_RESIZE_PREFIX):
        return "resize/pad/post-processing"
    return "other ops"


def profile_categories(fn: Callable) -> tuple[dict, dict, float, list]:
    """One profiled call of `fn`: (ms per category, ms per phase label, wall ms, top ops [(name, ms, calls)])."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()  # warm
        with profile(activities=[ProfilerActivity.CPU]) as p:
            t0 = time.perf_counter()
            fn()
            wall = (time.perf_counter() - t0) * 1e3
    cats = dict.fromkeys(CATEGORIES, 0.0)
    phases: dict[str, float] = {}
    ops = []
    traced = 0.0
    for ev in p.key_averages():
        self_ms = ev.self_cpu_time_total / 1e3
        if ev.key.startswith("phase: "):
            phases[ev.key[len("phase: "):]] = ev.cpu_time_total / 1e3
            continue
        if self_ms <= 0:
            continue
        traced += self_ms
        cats[op_category(ev.key)] += self_ms
        ops.append((ev.key, self_ms, ev.count))
    cats["Python overhead / untraced"] = max(0.0, wall - traced)
    ops.sort(key=lambda r: -r[1])
    return cats, phases, wall, ops


def collect_profile(parts: list[tuple[Callable, float]]) -> dict:
    """Profile each (callable, weight) once and add up: weight 1 for the fixed part, crops / crop_batch for one
    batch of crops."""
    cats = dict.fromkeys(CATEGORIES, 0.0)
    phases: dict[str, float] = {}
    wall = 0.0
    ops_all: dict[str, list] = {}
    for fn, weight in parts:
        c, ph, w, ops = profile_categories(fn)
        wall += weight * w
        for k, v in c.items():
            cats[k] += weight * v
        for k, v in ph.items():
            phases[k] = phases.get(k, 0.0) + weight * v
        for name, ms, count in ops:
            acc = ops_all.setdefault(name, [0.0, 0])
            acc[0] += weight * ms
            acc[1] += count
    return {"categories": cats, "phases": phases, "wall_ms": wall, "ops": ops_all}


def gap_table(title: str, prof_data: dict, flops: dict, peak_gflops: float, median_ms: float,
              extra: list[str]) -> str:
    """Time by op category next to the floor of the GEMM and attention FLOPs at the measured peak."""
    cats, phases, wall, ops_all = prof_data["categories"], prof_data["phases"], prof_data["wall_ms"], prof_data["ops"]
    total_gf = flops["total"] / 1e9
    attn_gf = flops["attention"] / 1e9
    gemm_gf = total_gf - attn_gf
    floors = {"GEMM": gemm_gf / peak_gflops * 1e3, "attention": attn_gf / peak_gflops * 1e3}
    floor_total = total_gf / peak_gflops * 1e3
    lines = [title, "",
             f"timed median {median_ms:.1f} ms; profiled call {wall:.1f} ms; floor {floor_total:.1f} ms "
             f"({total_gf:.2f} GFLOPs at {peak_gflops:.1f} GFLOP/s); latency / floor {median_ms / floor_total:.3f}",
             *extra, "",
             f"{'category':32s} {'ms':>10s} {'share':>7s} {'GFLOPs':>8s} {'floor ms':>9s} {'GFLOP/s':>8s} "
             f"{'over floor ms':>13s}"]
    for cat in CATEGORIES:
        ms = cats[cat]
        gf = {"GEMM": gemm_gf, "attention": attn_gf}.get(cat)
        fl = floors.get(cat, 0.0)
        rate = f"{gf / ms * 1e3:8.1f}" if gf and ms > 0 else f"{'':8s}"
        lines.append(f"{cat:32s} {ms:10.1f} {ms / wall:7.1%} {gf if gf is not None else 0.0:8.2f} {fl:9.1f} "
                     f"{rate} {ms - fl:13.1f}")
    lines.append(f"{'total':32s} {wall:10.1f} {1:7.1%} {total_gf:8.2f} {floor_total:9.1f} "
                 f"{total_gf / wall * 1e3:8.1f} {wall - floor_total:13.1f}")
    if phases:
        lines += ["", "phases of end_to_end (inclusive ms):"]
        lines += [f"  {k:45s} {v:10.1f}" for k, v in phases.items()]
    lines += ["", "top ops by self time (ms, calls):"]
    top = sorted(ops_all.items(), key=lambda kv: -kv[1][0])[:25]
    lines += [f"  {name:60s} {ms:10.2f} {count:6d}  [{op_category(name)}]" for name, (ms, count) in top]
    return "\n".join(lines) + "\n"
