"""Efficiency figures of one model: parameter counts, FLOPs (attention counted), latency, peak memory.

What is counted and timed (also written in the README and every record):
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one forward at a resolution x resolution input, batch 1,
  text features cached (the text tower is not run). SDPA is forced onto the math backend while counting (on CPU
  the fused kernel is counted as 0), and a probe checks that attention is counted; 1 MAC = 2 FLOPs.
- Scopes: `model` = normalised padded tensor in -> raw model outputs (masks + class logits);
  `end_to_end` = decoded uint8 image in -> label map at the original size out (resize, normalise, pad, model,
  per-class score maps, argmax).
- Crop models (SimSeg, SCAN): fixed part (everything but the CLIP crop forward) + per-crop cost from one batch of
  `crop_batch` crops; totals are given for the mean crop count of the evaluated images and for all 100 queries.
- Latency: CUDA events on GPU, perf_counter on CPU, after warm-up; median, p90, coefficient of variation; the
  per-iteration timings are returned so they can be saved beside the record.
"""
from __future__ import annotations

import contextlib
import os
import resource
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import BenchError
from bench import precision as precision_mod

COMPILE_MODES = (False, "default", "reduce-overhead", "max-autotune")  # reduce-overhead = CUDA graphs on GPU
CROP_QUERIES = 100  # upper bound on crops: one per query


# ---------------------------------------------------------------------------------------------------- params
def count_params(model: torch.nn.Module, trainable_prefixes=(), text_prefixes=()) -> dict:
    state = model.state_dict()
    total_state = sum(t.numel() for t in state.values())
    params = dict(model.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for k, p in params.items() if k.startswith(tuple(trainable_prefixes))) \
        if trainable_prefixes else None
    text = sum(p.numel() for k, p in params.items() if k.startswith(tuple(text_prefixes))) if text_prefixes else 0
    return {"params_state_total": total_state, "params_total": n_params, "params_trainable": trainable,
            "params_image_path": n_params - text}


# ---------------------------------------------------------------------------------------------------- precision
precision_context = precision_mod.context   # one definition of each precision: bench/precision.py
model_dtype = precision_mod.model_dtype


# ---------------------------------------------------------------------------------------------------- FLOPs
def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of `fn()` (2 per MAC), attention included (math SDPA backend forced)."""
    with sdpa_kernel(SDPBackend.MATH), torch.inference_mode():
        _check_attention_counted()
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
    return int(counter.get_total_flops())


def _check_attention_counted() -> None:
    q = torch.zeros(1, 2, 8, 4)
    counter = FlopCounterMode(display=False)
    with counter:
        F.scaled_dot_product_attention(q, q, q)
    if counter.get_total_flops() <= 0:
        raise BenchError("FLOP counter sees scaled_dot_product_attention as 0 FLOPs in this torch build; "
                         "attention would be missing from the GFLOPs (report this torch version)")


# ---------------------------------------------------------------------------------------------------- latency
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Per-iteration milliseconds of `fn()` after `warmup` untimed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def summarize_times(times: list[float]) -> dict:
    if not times:
        return {"median": float("nan"), "p90": float("nan"), "cv": float("nan")}
    arr = np.asarray(times)
    mean = float(arr.mean())
    return {"median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)),
            "cv": float(arr.std() / mean) if mean > 0 and len(arr) > 1 else 0.0}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; process peak


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------------- one model
def deterministic_image(resolution: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)


def scope_fns(model, image: np.ndarray, crop_batch: int, forward=None) -> dict[str, Callable[[], object]]:
    """The callables that are counted and timed: model / end_to_end, split fixed + per-crop for crop models.
    `forward` replaces `model.__call__` in both scopes (a torch.compile'd module)."""
    forward = forward or model
    x, sizes = model.preprocess([image])
    has_crops = hasattr(model, "crop_cost_fn")
    kw = {"skip_crops": True} if has_crops else {}
    out_size = [image.shape[:2]]

    def run_model():
        return forward(x, sizes, **kw)

    def run_end_to_end():
        xx, ss = model.preprocess([image])
        scores = model.postprocess(forward(xx, ss, **kw), ss, out_size)
        return [s.argmax(dim=0) for s in scores]

    fns = {"model": run_model, "end_to_end": run_end_to_end}
    if has_crops:
        fns["crops"] = model.crop_cost_fn(x, sizes, crop_batch)
    return fns


def profile_model(model, resolution: int, device: torch.device, precision: str, warmup: int, iters: int,
                  crop_batch: int = 8, compile_mode=False, throughput_batch: int | None = None) -> tuple[dict, dict]:
    """Returns (flat figures for the record, per-iteration timings by scope).

    FLOPs are always counted on the eager model; with `compile_mode` the timed scopes call the compiled module and
    the compile time (first call) is reported apart. `throughput_batch` adds a max-batch images/s figure."""
    image = deterministic_image(resolution)
    out: dict = {"profile_resolution": resolution, "threads": torch.get_num_threads(),
                 "latency_warmup": warmup, "latency_iters": iters, "timer": "cuda_events" if device.type == "cuda"
                 else "perf_counter", "compile": compile_mode or "eager"}
    timings: dict[str, list[float]] = {}
    with precision_context(precision, device):
        eager = scope_fns(model, image, crop_batch)
        fns = eager
        if compile_mode:
            compiled = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
            fns = scope_fns(model, image, crop_batch, forward=compiled)
            t0 = time.perf_counter()
            with torch.inference_mode():
                fns["model"]()
            _sync(device)
            out["compile_seconds"] = time.perf_counter() - t0
        for scope, fn in fns.items():
            with model.published_computation():    # the papers' count (a fast path may skip unread work)
                flops = count_flops(eager[scope])
            reset_peak_memory(device)
            times = time_fn(fn, device, warmup, iters)
            timings[scope] = times
            stats = summarize_times(times)
            if scope == "crops":  # per-crop figures
                out["gflops_per_crop"] = flops / crop_batch / 1e9
                out["latency_ms_per_crop"] = stats["median"] / crop_batch
                out["crop_batch"] = crop_batch
                continue
            out[f"gflops_{scope}"] = flops / 1e9
            out[f"latency_ms_{scope}_median"] = stats["median"]
            out[f"latency_ms_{scope}_p90"] = stats["p90"]
            out[f"latency_{scope}_cv"] = stats["cv"]
        out["peak_mem_mb"] = peak_memory_mb(device)
        out["peak_mem_kind"] = "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"
        if throughput_batch:
            out.update(throughput(model, image, throughput_batch, device, warmup, iters))
    out["has_crops"] = "crops" in timings
    if out["has_crops"]:
        for scope in ("model", "end_to_end"):
            out[f"gflops_{scope}_fixed"] = out[f"gflops_{scope}"]
            out[f"gflops_{scope}_all_crops"] = out[f"gflops_{scope}"] + CROP_QUERIES * out["gflops_per_crop"]
            out[f"latency_ms_{scope}_fixed"] = out[f"latency_ms_{scope}_median"]
            out[f"latency_ms_{scope}_p90_fixed"] = out[f"latency_ms_{scope}_p90"]
            out[f"latency_ms_{scope}_all_crops"] = (out[f"latency_ms_{scope}_median"]
                                                    + CROP_QUERIES * out["latency_ms_per_crop"])
    return out, timings


def throughput(model, image: np.ndarray, batch: int, device: torch.device, warmup: int, iters: int) -> dict:
    """Images/s of the `model` scope at a large batch (crop models: fixed part only), beside batch-1 latency."""
    x, sizes = model.preprocess([image] * batch)
    kw = {"skip_crops": True} if hasattr(model, "crop_cost_fn") else {}
    times = time_fn(lambda: model(x, sizes, **kw), device, warmup, iters)
    return {"throughput_batch": batch, "throughput_img_s": batch * 1e3 / float(np.median(times))}


def with_crop_count(figures: dict, mean_crops: float | None) -> dict:
    """Totals for crop models at the measured mean crop count (the headline), kept beside the all-crops bound."""
    out = dict(figures)
    if not out.get("has_crops"):
        return out
    n = CROP_QUERIES if mean_crops is None else mean_crops
    out["crops_assumed"] = n
    out["crops_measured"] = mean_crops is not None
    for scope in ("model", "end_to_end"):
        out[f"gflops_{scope}"] = out[f"gflops_{scope}_fixed"] + n * out["gflops_per_crop"]
        out[f"latency_ms_{scope}_median"] = out[f"latency_ms_{scope}_fixed"] + n * out["latency_ms_per_crop"]
        out[f"latency_ms_{scope}_p90"] = out[f"latency_ms_{scope}_p90_fixed"] + n * out["latency_ms_per_crop"]
    return out


def default_iters(device: torch.device, warmup: int | None, iters: int | None,
                  compiled: bool = False) -> tuple[int, int]:
    """GPU: >= 20 warm-up (50 with torch.compile) and 100 timed iterations; CPU: 1 and 3 (stated in the record)."""
    if device.type == "cuda":
        return (warmup if warmup is not None else 50 if compiled else 20), (100 if iters is None else iters)
    return (warmup if warmup is not None else 2 if compiled else 1), (3 if iters is None else iters)


# ---------------------------------------------------------------------------------------------------- floor
def matmul_peak_gflops(device: torch.device, precision: str, n: int = 2048, warmup: int = 3, reps: int = 10) -> float:
    """Measured peak: median GFLOP/s of torch.mm on n x n operands in the precision's dtype, in this process."""
    dtype = precision_mod.peak_dtype(precision)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    with precision_context("tf32" if precision == "tf32" else "fp32", device):
        times = time_fn(lambda: torch.mm(a, b), device, warmup, reps)
    return 2 * n ** 3 / (float(np.median(times)) * 1e-3) / 1e9


def add_floor(figures: dict, peak_gflops: float) -> dict:
    """Compute floor (GFLOPs / peak) and the latency / floor ratio for every scope with both figures."""
    out = dict(figures, peak_gflops=peak_gflops)
    for scope in ("model", "end_to_end"):
        gflops, lat = out.get(f"gflops_{scope}"), out.get(f"latency_ms_{scope}_median")
        if gflops and peak_gflops:
            out[f"floor_ms_{scope}"] = gflops / peak_gflops * 1e3
            if lat:
                out[f"latency_over_floor_{scope}"] = lat / out[f"floor_ms_{scope}"]
    return out


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
