"""CPU speed: every model's latency beside this machine's matmul floor, measured in the same process.

`python -m bench --config-name=bench_cpu` (`make bench-cpu`) calls `run_cpu_speed(cfg)`, which

1. measures the machine's peak: `torch.mm` on two `peak.size`^2 operands (2048) in fp32 and bf16 at the run's
   thread count, `peak.warmup` untimed calls, median of `peak.iters`; records the CPU model, its flags
   (avx512_bf16 / amx), the threads and the allocator setting;
2. times every model of `cpu_speed.models` (default: every conf/model/*.yaml, so a newly registered family is
   picked up; a model that fails to build becomes a `skipped` row with the reason, a variant that fails an `error`
   row) on one fixed image (the SAN golden input, 640x640) with the vocabulary of `dataset` (ADE-150), text
   features encoded once before any timing. Per precision (fp32; bf16 = the model cast to bfloat16; amp_bf16 =
   fp32 weights under CPU autocast) and compile flag (inductor, freezing; compile time reported apart), each scope
   gets `warmup` untimed runs and `iters` timed ones (median, p90). Scopes: `model` = normalised padded tensor in
   -> raw outputs; `end_to_end` = decoded uint8 image in -> label map at the image size out (PIL resize when the
   image is not at the protocol size, normalise, pad, model, the full-resolution per-class scores at K classes,
   argmax; the model's fused `postprocess_labels` when it has one). Crop models (SimSeg, SCAN) are timed as the
   fixed part (`forward(..., skip_crops=True)`) plus one batch of `crop_batch` crops, scaled to the crop count of
   the row (`crops`: measured on the benchmark image with the weights used, or a number from the config);
3. counts the GFLOPs of exactly each timed callable with FlopCounterMode (2 FLOPs per MAC); PyTorch's CPU flash
   attention kernel has no formula (it would count 0), so it is given one here (2·B·H·Lq·Lk·(D+Dv)), equal to
   what the math backend counts, and kept apart as `gflops_attention`;
4. writes one row per (model, precision, compile, scope): median / p90 ms, GFLOPs, the peak of the row's dtype,
   floor ms = GFLOPs / peak, latency / floor; for the other variants the label agreement with eager fp32 on the
   pixels whose fp32 top-2 margin is >= `agreement_margin` x the image's max |fp32 score|, the max abs score
   difference, the number of distinct fp32 labels (1 means the label check cannot fail: the golden_scaled fills
   give every query the same class at K = 150) and `mask_agreement`, the same rule on the argmax over queries of
   the mask logits (the mask branch, which those fills do make non-flat).

Shared machines: each timed iteration follows one timed `peak.size`^2 matmul in the row's dtype
(`interleave_peak`); `latency_over_floor_interleaved` divides every iteration by the floor at the peak measured just
before it, and `latency_over_floor_best` divides the fastest iteration by the floor at the fastest matmul seen.
Every row carries the 1-minute load average (`load1`) at the time it was timed. Targets are judged on the
interleaved ratio where it was measured (`judged_ratio`), else on the median over the start-up floor.

Outputs (under `results_dir`): `cpu_speed.csv` (atomic, rewritten after every model), `cpu_speed.timings.json`
(machine, peaks, every iteration, FLOPs by op), `cpu_speed.md` (the leaderboard's "CPU speed" section;
`cpu_speed_section(results_dir)` returns it), and `cpu_speed_profile_<model>_<variant>.txt` (torch.profiler time by
op category next to the GEMM and attention floors, phases of end_to_end, top ops) for every end_to_end row that
misses its target and every variant of a model without targets (its gap to the floor, named).
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import math
import os
import platform
import statistics
import time
import datetime as _dt
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from bench import BenchError, records
from bench import profile as prof

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
DEVICE = torch.device("cpu")

CSV_COLUMNS = [
    "model", "model_display", "status", "reason", "resolution", "input_hw", "precision", "compile", "scope",
    "threads", "warmup", "iters", "median_ms", "p90_ms", "mean_ms", "cv", "gflops", "gflops_attention",
    "peak_dtype", "peak_gflops", "floor_ms", "latency_over_floor", "peak_gflops_interleaved",
    "latency_over_floor_interleaved", "min_ms", "peak_gflops_best", "latency_over_floor_best", "label_agreement",
    "label_agreement_all", "margin_pixel_fraction",
    "max_abs_score_diff", "max_abs_score_diff_rel", "nonfinite_score_fraction", "fp32_labels_distinct",
    "mask_agreement",
    "mask_margin_pixel_fraction", "crops", "crops_source", "crop_batch", "fixed_median_ms",
    "fixed_p90_ms", "per_crop_ms", "gflops_fixed", "gflops_per_crop", "channels_last", "allocator", "weights",
    "vocabulary", "num_classes", "text_encode_s", "compile_s", "target", "target_met", "load1", "cpu_model",
    "cpu_flags", "torch_version", "timestamp",
]
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                     "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


# ---------------------------------------------------------------------------------------------------- machine
def cpu_flags() -> list[str]:
    """The instruction-set flags that matter for fp32 / bf16 GEMMs (from /proc/cpuinfo), in a fixed order."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [fl for fl in FLAGS_OF_INTEREST if fl in have]
    except OSError:
        pass
    return []


def machine_info() -> dict:
    flags = cpu_flags()
    try:
        bf16_onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16_onednn = False
    return {"cpu_model": records.cpu_name(), "cpu_flags": " ".join(flags), "avx512_bf16": "avx512_bf16" in flags,
            "amx": any(f.startswith("amx") for f in flags), "logical_cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "mkldnn_bf16": bf16_onednn, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), "hostname": platform.node(), "git_sha": records.git_sha(),
            "loadavg_start": list(os.getloadavg()),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def configure_allocator(mode: str | None) -> str:
    """`heap`: glibc keeps freed memory in the heap (M_MMAP_MAX = 0, M_TRIM_THRESHOLD = max), so a large temporary
    allocated again in the next iteration does not page-fault and get zeroed by the kernel again (the same effect
    as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... or a caching allocator such as jemalloc / tcmalloc). Measured
    here: a fresh 164 MB buffer costs ~65 ms of page faults, the upsample that fills it 12 ms. Returns what is set."""
    if mode in (None, "default", False):
        return "glibc default"
    if mode != "heap":
        raise BenchError(f"cpu_speed.allocator={mode!r}: use 'heap' or 'default'")
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 2 ** 31 - 1) == 1   # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        ok = False
    return "glibc heap (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)" if ok else "glibc default (mallopt unavailable)"


def _mm_operands(size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(size, size, generator=g).to(dtype), torch.randn(size, size, generator=g).to(dtype))


def measure_peak(size: int = 2048, warmup: int = 3, iters: int = 10) -> dict:
    """Median GFLOP/s of torch.mm on size x size operands, fp32 and bf16, at the current thread count."""
    out = {}
    with torch.inference_mode():
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = _mm_operands(size, dtype)
            for _ in range(warmup):
                torch.mm(a, b)
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                torch.mm(a, b)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            out[name] = {"gflops": 2 * size ** 3 / med / 1e9, "gflops_best": 2 * size ** 3 / min(times) / 1e9,
                         "ms_median": med * 1e3, "ms": [t * 1e3 for t in times], "size": size, "warmup": warmup,
                         "iters": iters}
    return out


def peak_dtype(precision: str) -> str:
    return "bf16" if precision in ("bf16", "amp_bf16") else "fp32"


# ---------------------------------------------------------------------------------------------------- FLOPs
def _flash_cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """2·B·H·Lq·Lk·D (Q·K^T) + 2·B·H·Lq·Lk·Dv (P·V): what the math backend's two bmm's count."""
    *batch, lq, d = query
    lk, dv = key[-2], value[-1]
    n = math.prod(batch)
    return 2 * n * lq * lk * d + 2 * n * lq * lk * dv


def _attention_ops() -> list:
    ops = []
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops.append(op)
    return ops


def count_flops_split(fn: Callable[[], object]) -> dict:
    """{'total', 'attention'} FLOPs of one call of `fn` (2 per MAC). The default SDPA backend runs, with the CPU
    flash kernel counted by `_flash_cpu_attention_flops`; any other attention path (math) decomposes into bmm's
    and is counted by FlopCounterMode itself (then it lands in the total, not in 'attention')."""
    ops = _attention_ops()
    counter = FlopCounterMode(display=False, custom_mapping={op: _flash_cpu_attention_flops for op in ops})
    with torch.inference_mode(), counter:
        fn()
    by_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for k, v in by_op.items() if "attention" in str(k))
    return {"total": int(counter.get_total_flops()), "attention": int(attention),
            "by_op": {str(k): int(v) for k, v in by_op.items()}}


# ---------------------------------------------------------------------------------------------------- agreement
def label_agreement(ref: torch.Tensor, other: torch.Tensor, margin: float = 1e-3) -> dict:
    """Compare per-class score maps [K, H, W] of a variant with the fp32 reference.

    label_agreement: fraction of pixels with the same argmax, over the pixels whose fp32 top-2 margin is at least
    `margin` x the largest fp32 |score| of the image (pixels closer to a tie than that are left out);
    label_agreement_all: the same over every pixel; margin_pixel_fraction: the share of pixels kept;
    max_abs_score_diff (and _rel, over max|ref|)."""
    ref = ref.detach().float()
    other = other.detach().float()
    if ref.shape != other.shape:
        raise BenchError(f"score maps differ in shape: {tuple(ref.shape)} vs {tuple(other.shape)}")
    same = ref.argmax(dim=0) == other.argmax(dim=0)
    if ref.shape[0] >= 2:
        top2 = ref.topk(2, dim=0).values
        keep = (top2[0] - top2[1]) >= margin * float(ref.abs().max())
    else:
        keep = torch.ones_like(same)
    n_keep = int(keep.sum())
    finite = torch.isfinite(other)
    diff = float((other - ref).abs().max())
    scale = float(ref.abs().max())
    return {"label_agreement": float(same[keep].float().mean()) if n_keep else float("nan"),
            "label_agreement_all": float(same.float().mean()), "margin_pixel_fraction": n_keep / same.numel(),
            "max_abs_score_diff": diff, "max_abs_score_diff_rel": diff / scale if scale > 0 else float("nan"),
            "nonfinite_score_fraction": 1.0 - float(finite.float().mean())}


# ---------------------------------------------------------------------------------------------------- scopes
def _labels(model, outputs: dict, sizes, out_sizes) -> list[torch.Tensor]:
    """Label maps from raw outputs: the model's fused path when it has one, else argmax of the score maps."""
    fast = getattr(model, "postprocess_labels", None)
    if fast is not None:
        return fast(outputs, sizes, out_sizes)
    return [s.argmax(dim=0) for s in model.postprocess(outputs, sizes, out_sizes)]


def scope_fns(model, runner, image: np.ndarray, crop_batch: int, phases: bool = False) -> dict[str, Callable]:
    """The timed callables. `runner` is the module that runs the forward (the model, or its compiled wrapper);
    `model` supplies preprocess / postprocess / crop_cost_fn. With `phases`, end_to_end marks its three phases
    for torch.profiler (used for the gap tables only, never while timing)."""
    with torch.inference_mode():   # an inference tensor, as in end_to_end: one compiled graph serves both scopes
        x, sizes = model.preprocess([image])
    has_crops = hasattr(model, "crop_cost_fn")
    kw = {"skip_crops": True} if has_crops else {}
    out_size = [image.shape[:2]]
    mark = torch.profiler.record_function if phases else (lambda _name: contextlib.nullcontext())

    def run_model():
        return runner(x, sizes, **kw)

    def run_end_to_end():
        with mark("phase: preprocess (resize, normalise, pad)"):
            xx, ss = model.preprocess([image])
        with mark("phase: model"):
            outputs = runner(xx, ss, **kw)
        with mark("phase: postprocess (scores at K, argmax)"):
            return _labels(model, outputs, ss, out_size)

    fns = {"model": run_model, "end_to_end": run_end_to_end}
    if has_crops:
        with torch.inference_mode():
            fns["crops"] = model.crop_cost_fn(x, sizes, crop_batch)
    return fns


def full_scores(model, runner, image: np.ndarray) -> tuple[torch.Tensor, int | None, torch.Tensor | None]:
    """Per-class scores [K, H, W] (fp32) of the full model (crops included), its crop count, and its per-query
    mask logits [Q, h, w] at their own resolution (fp32) when the outputs carry `mask_pred`."""
    with torch.inference_mode():
        x, sizes = model.preprocess([image])
        outputs = runner(x, sizes)
        scores = model.postprocess(outputs, sizes, [image.shape[:2]])[0].float()
    masks = outputs.get("mask_pred") if isinstance(outputs, dict) else None
    masks = masks[0].float() if isinstance(masks, torch.Tensor) and masks.dim() == 4 else None
    return scores, _num_crops(outputs), masks


def _num_crops(outputs: dict) -> int | None:
    n = outputs.get("num_crops") if isinstance(outputs, dict) else None
    if n is None:
        return None
    if isinstance(n, torch.Tensor):
        n = n.flatten()[0]
    elif isinstance(n, (list, tuple)):
        n = n[0] if n else 0
    return int(n)


def timed(fn: Callable, warmup: int, iters: int, probe: tuple[torch.Tensor, torch.Tensor] | None) -> tuple:
    """(ms per iteration, GFLOP/s of the peak probe run just before each iteration, or [])."""
    times, peaks = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        for _ in range(iters):
            if probe is not None:
                a, b = probe
                t0 = time.perf_counter()
                torch.mm(a, b)
                peaks.append(2 * a.shape[0] ** 3 / (time.perf_counter() - t0) / 1e9)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times, peaks


# ---------------------------------------------------------------------------------------------------- models
def model_entries(models) -> list[dict]:
    """Model configs to run: None = every conf/model/*.yaml; names refer to those files; mappings are inline
    model configs (name, builder, builder_kwargs, ...)."""
    if models is None:
        models = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    entries = []
    for m in models:
        if isinstance(m, str):
            path = CONF_DIR / "model" / f"{m}.yaml"
            if not path.is_file():
                entries.append({"name": m, "_error": f"no model config {path}"})
                continue
            entries.append(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
        else:
            entries.append(OmegaConf.to_container(m, resolve=True) if isinstance(m, DictConfig) else dict(m))
    return entries


def build(entry: dict, resolution: int):
    from bench.models import create_model

    model = create_model(entry["builder"], **(entry.get("builder_kwargs") or {}))
    model.protocol.short_side = int(resolution)
    model.protocol.max_size = 4 * int(resolution)
    return model.eval().requires_grad_(False).to(DEVICE, torch.float32)


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def load_weights(model, entry: dict, weights_cfg: dict | None) -> str:
    """Load the golden fill named for this model in the config (fill module + manifest); returns what the row
    says about the weights. Without one (or if it does not load) the builder's initialisation stays."""
    spec = (weights_cfg or {}).get(entry["name"])
    if not spec:
        return "builder init (random; no golden fill for this model)"
    fill, manifest = _resolve(spec["fill"]), _resolve(spec["manifest"])
    if not fill.is_file() or not manifest.is_file():
        return f"builder init (random; {fill.name if not fill.is_file() else manifest.name} absent)"
    from bench.models.checkpoint import load_state_dict_strict

    module_spec = importlib.util.spec_from_file_location(f"_fill_{entry['name']}", fill)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    scaled = bool(spec.get("scaled", True))
    state_dict = module.golden_state_dict(str(manifest), scaled=scaled)
    ck = entry.get("checkpoint") or {}
    try:
        load_state_dict_strict(model, state_dict, str(manifest), tuple(ck.get("ignore_prefixes") or ()),
                               tuple(ck.get("optional_keys") or ()))
    except BenchError as e:
        return f"builder init (random; golden fill did not load: {str(e).splitlines()[0][:160]})"
    finally:
        del state_dict
    kind = "golden_scaled" if scaled else "golden"
    return f"{kind} fill ({manifest.parent.name})"


def vocabulary(cfg: DictConfig, entry: dict) -> tuple[str, list[str]]:
    from bench.data import apply_class_name_overrides, load_class_names

    sc = cfg.cpu_speed
    dataset = cfg.get("dataset") or {}
    file = sc.get("vocabulary") or dataset.get("classes_file")
    names = load_class_names(file)
    overrides = (entry.get("class_name_overrides") or {}).get(dataset.get("name"))
    return str(file), apply_class_name_overrides(names, overrides)


def dataset_settings(cfg: DictConfig, entry: dict) -> dict:
    dataset = cfg.get("dataset") or {}
    settings = dict((entry.get("dataset_settings") or {}).get(dataset.get("name")) or {})
    for flag in entry.get("dataset_flags") or ():
        if flag in dataset:
            settings[flag] = dataset[flag]
    return settings


def benchmark_image(sc: DictConfig, resolution: int) -> np.ndarray:
    path = sc.get("image")
    if path and _resolve(path).is_file():
        image = np.load(_resolve(path))
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
            return image
    return prof.deterministic_image(resolution)


# ---------------------------------------------------------------------------------------------------- targets
def target_for(targets: dict, model: str, precision: str, scope: str, best_bf16: bool) -> tuple[str, float | None,
                                                                                                 float | None]:
    """(label, max latency/floor, min label agreement) of the row, or ('', None, None)."""
    t = (targets or {}).get(model) or {}
    if precision == "fp32":
        limit = t.get(f"fp32_{scope}")
        return (f"<= {limit} x fp32 floor", limit, None) if limit else ("", None, None)
    if best_bf16:
        limit = t.get(f"bf16_{scope}")
        agree = t.get("bf16_agreement")
        if limit:
            label = f"<= {limit} x bf16 floor" + (f", agreement >= {agree:.0%}" if agree else "")
            return label, limit, agree
    return "", None, None


# ---------------------------------------------------------------------------------------------------- profile
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


# ---------------------------------------------------------------------------------------------------- one model
def _stats(times: list[float]) -> dict:
    s = prof.summarize_times(times)
    return {"median": s["median"], "p90": s["p90"], "cv": s["cv"], "mean": float(np.mean(times)) if times else
            float("nan")}


def _figures(runs: dict, scope: str, flops: dict, peak: dict, crops: int | None, crop_batch: int | None) -> dict:
    """Latency, FLOPs and floor figures of one scope; crop models add crops / crop_batch x one crop batch.

    Interleaved: each iteration's time x the GFLOP/s of the peak probe run just before it is the work it stood
    for at that moment's speed; the median of that (per part, fixed + crops) over the FLOPs is latency / floor.
    Best: fastest iteration(s) over the floor at the fastest matmul seen in the run."""
    fixed = runs[scope]
    st = _stats(fixed["ms"])
    gf = flops[scope]["total"] / 1e9
    gf_attn = flops[scope]["attention"] / 1e9
    med, p90, fastest = st["median"], st["p90"], min(fixed["ms"])
    parts = [(fixed, 1.0)]
    out: dict = {}
    if crop_batch:
        cr = runs["crops"]
        cst = _stats(cr["ms"])
        scale = crops / crop_batch
        out.update(fixed_median_ms=med, fixed_p90_ms=p90, per_crop_ms=cst["median"] / crop_batch, gflops_fixed=gf,
                   gflops_per_crop=flops["crops"]["total"] / 1e9 / crop_batch)
        med, p90, fastest = med + scale * cst["median"], p90 + scale * cst["median"], fastest + scale * min(cr["ms"])
        gf += scale * flops["crops"]["total"] / 1e9
        gf_attn += scale * flops["crops"]["attention"] / 1e9
        parts.append((cr, scale))
    floor = gf / peak["gflops"] * 1e3
    ratio_i = pk_i = float("nan")
    if all(part["peak_probe_gflops"] for part, _ in parts) and gf > 0:
        work = sum(w * statistics.median(t * p for t, p in zip(part["ms"], part["peak_probe_gflops"]))
                   for part, w in parts)               # ms x GFLOP/s
        ratio_i = work / (gf * 1e3)
        pk_i = statistics.median(fixed["peak_probe_gflops"])
    best_peak = max([peak.get("gflops_best", peak["gflops"])]
                    + [p for part, _ in parts for p in part["peak_probe_gflops"]])
    out.update(median_ms=med, p90_ms=p90, mean_ms=st["mean"], cv=st["cv"], gflops=gf, gflops_attention=gf_attn,
               floor_ms=floor, latency_over_floor=med / floor if floor else None, peak_gflops_interleaved=pk_i,
               latency_over_floor_interleaved=ratio_i, min_ms=fastest, peak_gflops_best=best_peak,
               latency_over_floor_best=fastest / (gf / best_peak * 1e3) if gf > 0 else None)
    return out


def _variants(sc: DictConfig, name: str) -> list[tuple[str, bool]]:
    precisions = list(sc.precisions)
    order = {"fp32": 0, "amp_bf16": 1, "bf16": 2}   # bf16 casts the model: last
    precisions.sort(key=lambda p: order.get(p, 1))
    compile_axis = [bool(c) for c in sc.compile]
    compile_models = sc.get("compile_models")
    compile_precisions = sc.get("compile_precisions")
    out = []
    for p in precisions:
        for c in compile_axis:
            if c and compile_models is not None and name not in compile_models:
                continue
            if c and compile_precisions is not None and p not in compile_precisions:
                continue
            out.append((p, c))
    if ("fp32", False) not in out:
        out.insert(0, ("fp32", False))   # the reference of the agreement figures
    return out


def bench_model(cfg: DictConfig, entry: dict, peak: dict, machine: dict, results_dir: str) -> tuple[list, dict]:
    sc = cfg.cpu_speed
    name = entry["name"]
    res = int(sc.resolution)
    warmup, iters, crop_batch = int(sc.warmup), int(sc.iters), int(sc.crop_batch)
    model = build(entry, res)
    weights = load_weights(model, entry, OmegaConf.to_container(sc.weights, resolve=True) if sc.get("weights")
                           else None)
    model.configure(**dataset_settings(cfg, entry))
    channels_last = name in (sc.get("channels_last") or ())
    if channels_last:
        model.to(memory_format=torch.channels_last)   # convolution weights NHWC: oneDNN keeps activations NHWC
    vocab_file, names = vocabulary(cfg, entry)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.encode_vocabulary(names)   # once per (weights, vocabulary); cached by the model for every scope
    text_s = time.perf_counter() - t0
    image = benchmark_image(sc, res)
    fns = scope_fns(model, model, image, crop_batch)
    has_crops = "crops" in fns
    input_hw = "x".join(str(v) for v in model.preprocess([image])[0].shape[-2:])

    flops = {scope: count_flops_split(fn) for scope, fn in fns.items()}   # fp32 eager, each callable once
    ref_scores, measured_crops, ref_masks = full_scores(model, model, image)
    crops, crops_source = None, ""
    if has_crops:
        if sc.get("crop_count") in (None, "measured"):
            crops, crops_source = int(measured_crops or 0), "measured on the benchmark image with these weights"
        else:
            crops, crops_source = int(sc.crop_count), "config"
    base = {"model": name, "model_display": entry.get("display", name), "status": "ok", "reason": "",
            "resolution": res, "input_hw": input_hw, "threads": torch.get_num_threads(), "warmup": warmup,
            "iters": iters, "weights": weights, "vocabulary": vocab_file, "num_classes": len(names),
            "text_encode_s": text_s, "crop_batch": crop_batch if has_crops else None, "crops": crops,
            "crops_source": crops_source, "fp32_labels_distinct": int(ref_scores.argmax(dim=0).unique().numel()),
            "channels_last": channels_last, "allocator": machine.get("allocator"),
            "cpu_model": machine["cpu_model"],
            "cpu_flags": machine["cpu_flags"], "torch_version": machine["torch_version"]}
    timings: dict = {"flops": {k: {kk: vv for kk, vv in v.items()} for k, v in flops.items()}, "runs": {}}
    rows: list[dict] = []
    profiles: dict[str, dict] = {}
    cast = False
    for precision, compiled in _variants(sc, name):
        key = f"{precision}{'+compile' if compiled else ''}"
        try:
            if precision == "bf16" and not cast:
                model.to(torch.bfloat16)
                cast = True
            variant_rows, runs, profile = _bench_variant(sc, model, image, precision, compiled, flops,
                                                         (ref_scores, ref_masks), crops, base, peak)
        except Exception as e:  # one variant failing (e.g. a dtype the model does not support) skips only it
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"[cpu-speed] {name} {key}: error ({reason})", flush=True)
            rows += [dict(base, status="error", reason=reason, precision=precision, compile=compiled, scope=scope,
                          peak_dtype=peak_dtype(precision), peak_gflops=peak[peak_dtype(precision)]["gflops"])
                     for scope in ("model", "end_to_end")]
            continue
        finally:
            torch._dynamo.reset()
        rows += variant_rows
        timings["runs"][key] = runs
        if profile is not None:
            profiles[key] = profile

    _judge_targets(rows, OmegaConf.to_container(sc.targets, resolve=True) if sc.get("targets") else {})
    _write_gap_tables(sc, name, rows, profiles, flops, peak, results_dir)
    del model, fns

    gc.collect()
    return rows, timings


def _bench_variant(sc, model, image, precision: str, compiled: bool, flops: dict, ref: tuple, crops, base: dict,
                   peak: dict) -> tuple[list[dict], dict, dict | None]:
    """Time one (precision, compile) variant of a built model: rows of its scopes, per-iteration timings, profile."""
    warmup, iters, crop_batch = int(sc.warmup), int(sc.iters), int(sc.crop_batch)
    dtype_name = peak_dtype(precision)
    runner, compile_s = model, None
    if compiled:
        torch._dynamo.reset()
        runner = torch.compile(model, backend="inductor", dynamic=False)
    vfns = scope_fns(model, runner, image, crop_batch)
    has_crops = "crops" in vfns
    probe = _mm_operands(int(sc.peak.size), torch.bfloat16 if dtype_name == "bf16" else torch.float32) \
        if sc.get("interleave_peak", True) else None
    runs: dict = {}
    profile = None
    freeze = contextlib.nullcontext()
    if compiled:
        import torch._inductor.config as inductor_config

        # freezing: weights become constants, so inductor pre-packs them for oneDNN (what makes bf16 GEMMs fast)
        freeze = inductor_config.patch(freezing=bool(sc.get("compile_freezing", True)))
    with prof.precision_context(precision, DEVICE), freeze:
        if compiled:
            t0 = time.perf_counter()
            with torch.inference_mode():
                vfns["end_to_end"]()   # compiles the forward (the same graph serves both scopes)
            compile_s = time.perf_counter() - t0
        for scope, fn in vfns.items():
            times, peaks = timed(fn, warmup, iters, probe)
            runs[scope] = {"ms": times, "peak_probe_gflops": peaks, "load1": os.getloadavg()[0]}
        scores = masks = None
        if precision != "fp32" or compiled:
            scores, _, masks = full_scores(model, runner, image)
        if sc.get("profile_tables", "gap") not in (None, "none", False):
            pfns = scope_fns(model, runner, image, crop_batch, phases=True)
            parts = [(pfns["end_to_end"], 1.0)] + ([(pfns["crops"], crops / crop_batch)] if has_crops else [])
            profile = collect_profile(parts)
    agree = {}
    if scores is not None:
        margin = float(sc.agreement_margin)
        agree = label_agreement(ref[0], scores, margin)
        if masks is not None and ref[1] is not None and masks.shape == ref[1].shape:
            m = label_agreement(ref[1], masks, margin)
            agree.update(mask_agreement=m["label_agreement"], mask_margin_pixel_fraction=m["margin_pixel_fraction"])
    rows = []
    for scope in (s for s in vfns if s != "crops"):
        row = dict(base, precision=precision, compile=compiled, scope=scope, compile_s=compile_s,
                   peak_dtype=dtype_name, peak_gflops=peak[dtype_name]["gflops"], load1=runs[scope]["load1"],
                   timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **agree)
        row.update(_figures(runs, scope, flops, peak[dtype_name], crops, crop_batch if has_crops else None))
        rows.append(row)
    return rows, runs, profile


def judged_ratio(r: dict) -> float | None:
    """The latency / floor a target is judged on: the interleaved one where the peak was probed before every
    iteration (each iteration against the machine's speed at that moment: a shared host's speed was seen to swing
    by up to 2x within minutes), else median latency over the floor at the run's start-up peak."""
    inter = r.get("latency_over_floor_interleaved")
    if inter is not None and math.isfinite(inter):
        return float(inter)
    return r.get("latency_over_floor")


def _judge_targets(rows: list[dict], targets: dict) -> None:
    """Fill `target` / `target_met`. The bf16 target applies to the faster bf16 variant (by end_to_end median)."""
    bf16 = [r for r in rows if r["precision"] in ("bf16", "amp_bf16") and r["scope"] == "end_to_end"
            and r["status"] == "ok"]
    best = min(bf16, key=lambda r: r["median_ms"]) if bf16 else None
    best_key = (best["precision"], best["compile"]) if best else None
    for r in rows:
        label, limit, agree = target_for(targets, r["model"], r["precision"], r["scope"],
                                         (r["precision"], r["compile"]) == best_key)
        r["target"] = label
        if r["status"] != "ok":
            r["target_met"] = False if limit is not None else None
            continue
        if limit is None:
            r["target_met"] = None
            continue
        ratio = judged_ratio(r)
        ok = ratio is not None and ratio <= limit
        if agree is not None:
            ok = ok and r.get("label_agreement") is not None and r["label_agreement"] >= agree
        r["target_met"] = bool(ok)


def _write_gap_tables(sc, name, rows, profiles, flops, peak, results_dir) -> None:
    """cpu_speed_profile_<model>_<variant>.txt for the end_to_end rows that miss their target, and for every
    variant of a model without targets (its gap to the floor, named); profile_tables=all writes every one."""
    mode = sc.get("profile_tables", "gap")
    if mode in (None, "none", False):
        return
    has_target = any(r["target"] for r in rows)
    for r in rows:
        key = f"{r['precision']}{'+compile' if r['compile'] else ''}"
        if r["scope"] != "end_to_end" or key not in profiles or r["status"] != "ok":
            continue
        wanted = mode == "all" or r["target_met"] is False or (mode == "gap" and not has_target)
        if not wanted:
            continue
        fl = dict(flops["end_to_end"])
        crops_txt = ""
        if r.get("crops") is not None and "crops" in flops:
            scale = r["crops"] / r["crop_batch"]
            fl = {k: fl[k] + scale * flops["crops"][k] for k in ("total", "attention")}
            crops_txt = f", fixed part + {r['crops']} crops (one profiled batch of {r['crop_batch']}, scaled)"
        title = (f"{r['model_display']} — end_to_end, {r['precision']}{' + torch.compile' if r['compile'] else ''}, "
                 f"input {r['input_hw']}, {r['threads']} threads, K = {r['num_classes']}{crops_txt}")
        extra = [f"target: {r['target'] or 'none (gap to the floor named)'}"
                 + ("" if r["target_met"] is None else f" -> {'met' if r['target_met'] else 'MISSED'}"),
                 f"load average (1 min) when timed: {r['load1']:.2f} on {os.cpu_count()} logical CPUs; weights: "
                 f"{r['weights']}"]
        text = gap_table(title, profiles[key], fl, r["peak_gflops"], r["median_ms"], extra)
        suffix = key.replace("+", "_")
        records.atomic_write_text(os.path.join(results_dir, f"cpu_speed_profile_{name}_{suffix}.txt"), text)


# ---------------------------------------------------------------------------------------------------- output
def write_csv(path: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    import csv

    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt_csv(r.get(k)) for k in CSV_COLUMNS})
    records.atomic_write_text(path, buf.getvalue())


def _fmt_csv(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def _f(v, fmt: str = ".0f", empty: str = "–") -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return empty
    return empty if math.isnan(v) else format(v, fmt)


def markdown(rows: list[dict], machine: dict, peak: dict) -> str:
    """The leaderboard's "CPU speed" section."""
    lines = ["## CPU speed", "",
             f"{machine['cpu_model']} ({machine['cpu_flags'] or 'no AVX-512'}; "
             f"AMX {'yes' if machine['amx'] else 'no'}), "
             f"{machine['threads']} threads, torch {machine['torch_version']}. Peak (torch.mm "
             f"{peak['fp32']['size']}², median of {peak['fp32']['iters']}): "
             f"fp32 {peak['fp32']['gflops']:.0f} GFLOP/s, "
             f"bf16 {peak['bf16']['gflops']:.0f} GFLOP/s. Load average at start "
             f"{machine['loadavg_start'][0]:.2f} on {machine['logical_cpus']} logical CPUs.", "",
             "| model | precision | compile | scope | median ms | p90 ms | GFLOPs | floor ms | × floor | × floor "
             "(interleaved) | × floor (best) | label agr. (fp32 labels) | mask agr. | max abs Δ | crops | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            compiled = "yes" if r.get("compile") else "no" if "compile" in r else "–"
            lines.append(f"| {r.get('model_display', r['model'])} | {r.get('precision', '–')} | {compiled} | "
                         f"{r.get('scope', '–')} | " + "– | " * 11 + f"{r['status']}: {r.get('reason', '')} |")
            continue
        n_labels = f" ({r['fp32_labels_distinct']})" if r.get("label_agreement") is not None else ""
        if r.get("nonfinite_score_fraction"):
            n_labels += f", {r['nonfinite_score_fraction']:.0%} NaN/Inf scores"
        tgt = r.get("target") or ""
        if r.get("target_met") is not None:
            tgt += " ✓" if r["target_met"] else " ✗"
        lines.append(
            f"| {r['model_display']} | {r['precision']} | {'yes' if r['compile'] else 'no'} | {r['scope']} | "
            f"{_f(r['median_ms'])} | {_f(r['p90_ms'])} | {_f(r['gflops'], '.1f')} | {_f(r['floor_ms'])} | "
            f"{_f(r['latency_over_floor'], '.2f')} | {_f(r.get('latency_over_floor_interleaved'), '.2f')} | "
            f"{_f(r.get('latency_over_floor_best'), '.2f')} | "
            f"{_f(r.get('label_agreement'), '.2%')}{n_labels} | "
            f"{_f(r.get('mask_agreement'), '.2%')} | {_f(r.get('max_abs_score_diff'), '.2e')} | "
            f"{r['crops'] if r.get('crops') is not None else '–'} | {tgt} |")
    lines += ["", "Scopes: `model` = normalised padded tensor in -> raw outputs; `end_to_end` = decoded image in -> "
              "label map out (resize, normalise, pad, model, per-class scores at full resolution, argmax). "
              "Floor = GFLOPs ÷ the peak of the row's dtype (FlopCounterMode, 2 FLOPs per MAC, attention "
              "counted); '(interleaved)' divides each iteration by the floor at a peak probe run just before it; "
              "'(best)' is the fastest iteration over the floor at the fastest matmul seen (a shared machine's quiet "
              "moments). Targets are judged on the interleaved ratio where it was measured (the host's speed "
              "moves between probes at start-up and the timed runs), else on the median one. "
              "Crop models: fixed part + one batch of crops scaled to the crop count. Label agreement: bf16 vs "
              "fp32 argmax on pixels whose fp32 top-2 margin ≥ 1e-3 × the max score, with the number of distinct "
              "fp32 labels in brackets (1 = every pixel has the same class: the check cannot fail); mask agr.: the "
              "same rule on the argmax over queries of the mask logits (the mask branch). Weights per row in "
              "cpu_speed.csv.", ""]
    return "\n".join(lines)


def cpu_speed_section(results_dir: str = "results") -> str:
    """The "CPU speed" section for the leaderboard ('' when `make bench-cpu` has not run)."""
    path = os.path.join(results_dir, "cpu_speed.md")
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------- entry
def run_cpu_speed(cfg: DictConfig) -> list[dict]:
    """Steps 1-4 of the module docstring in this process; returns the rows (also written to results_dir)."""
    sc = cfg.cpu_speed
    if cfg.get("device") not in (None, "auto", "cpu"):
        raise BenchError(f"the CPU speed benchmark runs on the CPU; got device={cfg.device}")
    threads = int(cfg.threads) if cfg.get("threads") else torch.get_num_threads()
    prof.set_threads(threads)
    torch.manual_seed(int(cfg.get("seed") or 0))
    results_dir = cfg.results_dir
    started = time.perf_counter()
    allocator = configure_allocator(sc.get("allocator", "heap"))
    machine = dict(machine_info(), allocator=allocator)
    peak = measure_peak(int(sc.peak.size), int(sc.peak.warmup), int(sc.peak.iters))
    print(f"[cpu-speed] {machine['cpu_model']} ({machine['cpu_flags']}), {machine['threads']} threads, "
          f"torch {machine['torch_version']}: peak fp32 {peak['fp32']['gflops']:.0f}, bf16 "
          f"{peak['bf16']['gflops']:.0f} GFLOP/s (load {machine['loadavg_start'][0]:.2f})", flush=True)
    rows: list[dict] = []
    timings = {"machine": machine, "peak": peak, "config": OmegaConf.to_container(sc, resolve=True), "models": {}}
    csv_path = os.path.join(results_dir, sc.get("out", "cpu_speed.csv"))
    budget = float(sc.get("max_minutes") or 0) * 60
    for entry in model_entries(OmegaConf.to_container(sc.models, resolve=True) if sc.get("models") is not None
                               else None):
        name = entry.get("name", "?")
        skip = {"model": name, "model_display": entry.get("display", name), "status": "skipped",
                "cpu_model": machine["cpu_model"], "torch_version": machine["torch_version"]}
        if "_error" in entry:
            rows.append(dict(skip, reason=entry["_error"]))
            continue
        if budget and time.perf_counter() - started > budget:
            rows.append(dict(skip, reason=f"time budget of {sc.max_minutes} min spent before this model"))
            continue
        t0 = time.perf_counter()
        try:
            model_rows, model_timings = bench_model(cfg, entry, peak, machine, results_dir)
        except Exception as e:  # a model that does not build / run is skipped with the reason, the rest go on
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"[cpu-speed] {name}: skipped ({reason})", flush=True)
            rows.append(dict(skip, reason=reason))
            gc.collect()
            continue
        rows += model_rows
        timings["models"][name] = dict(model_timings, seconds=time.perf_counter() - t0)
        for r in (r for r in model_rows if r["status"] == "ok"):
            print(f"[cpu-speed] {name} {r['precision']}{'+compile' if r['compile'] else ''} {r['scope']}: "
                  f"{r['median_ms']:.0f} ms (p90 {r['p90_ms']:.0f}), {r['gflops']:.1f} GFLOPs, floor "
                  f"{r['floor_ms']:.0f} ms, x{r['latency_over_floor']:.2f} (interleaved "
                  f"x{r['latency_over_floor_interleaved']:.2f}, best x{r['latency_over_floor_best']:.2f})"
                  + (f", agreement {r['label_agreement']:.4f}" if r.get("label_agreement") is not None else "")
                  + (f" [{r['target']}: {'met' if r['target_met'] else 'MISSED'}]" if r.get("target") else ""),
                  flush=True)
        write_csv(csv_path, rows)   # after every model: a killed run keeps what it measured
    timings["seconds"] = time.perf_counter() - started
    timings["loadavg_end"] = list(os.getloadavg())
    timings["peak_end"] = measure_peak(int(sc.peak.size), int(sc.peak.warmup), int(sc.peak.iters))
    write_csv(csv_path, rows)
    base = os.path.splitext(csv_path)[0]
    records.atomic_write_json(base + ".timings.json", timings)
    records.atomic_write_text(base + ".md", markdown(rows, machine, peak))
    print(f"[cpu-speed] {len(rows)} rows in {timings['seconds'] / 60:.1f} min -> {csv_path}", flush=True)
    return rows
