"""Efficiency figures of one model, the one measurement path of `make bench` and `make bench-cpu` alike:
parameter counts, FLOPs (attention counted), latency against a measured matmul peak, peak memory.

What is counted and timed (also written in the README and every record):
- Scopes (`scope_fns`, one definition for every model): `model` = normalised padded tensor in -> raw model outputs;
  `end_to_end` = decoded uint8 image in -> label map at the original size out (resize, normalise, pad, model,
  labels: the model's fused `postprocess_labels` when it has one, else the argmax of `postprocess`'s per-class
  score maps). Crop models (SimSeg, SCAN): the fixed part (`forward(..., skip_crops=True)`) plus a `crops` scope of
  one batch of `crop_batch` crops, scaled to the crop count (`with_crop_count`).
- FLOPs (`bench.flops.count_flops_split`): `torch.utils.flop_counter.FlopCounterMode` over one call, 2 FLOPs per MAC, on fake
  tensors where the model's shapes do not depend on values (no arithmetic runs: CAT-Seg's 3 TFLOP forward is
  counted in about a second), else over a real call (`flops_counted_from_<scope>` says which). PyTorch's CPU
  flash-attention kernel has no formula (it would count 0): it gets one, 2·B·H·Lq·Lk·(D+Dv), equal to what the math
  backend counts, kept apart as attention; a probe fails loudly if attention is not counted. Each scope is counted
  twice: in the published computation order (`gflops_<scope>`, comparable with the papers; `model.
  published_computation()`) and as the timed callable executes it (`gflops_timed_<scope>`: the floor's FLOPs).
- Latency (`timed`): CUDA events on GPU, perf_counter on CPU, after warm-up; median, p90, min, CV. With
  `interleave_peak` every timed iteration follows one peak-probe matmul, so each iteration is judged against the
  machine's speed at that moment (`latency_over_floor_interleaved_<scope>`: a shared host's speed swings).
- Floor (`add_floor`): `gflops_timed_<scope>` / the matmul peak of the precision's kind measured in the same cell
  (`measure_peak`); `peak_drift` = spread of every peak probe of the cell, `load1` = load average when timing began.
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
from tqdm import tqdm

from bench import BenchError
from bench import precision as precision_mod
from bench.flops import count_flops_split

COMPILE_MODES = ("eager", "default", "reduce-overhead", "max-autotune")  # reduce-overhead = CUDA graphs on GPU
CROP_QUERIES = 100  # upper bound on crops: one per query
SCOPES = ("model", "end_to_end")
# Crop models: a scope's figure (template) -> the fixed part's copy kept in the record, and the per-crop figure it
# is scaled with (`with_crop_count`): total = fixed + crops x per crop.
FIXED_PART = {"gflops_{}": "gflops_{}_fixed", "gflops_timed_{}": "gflops_timed_{}_fixed",
              "latency_ms_{}_median": "latency_ms_{}_fixed", "latency_ms_{}_p90": "latency_ms_{}_p90_fixed",
              "latency_ms_{}_min": "latency_ms_{}_min_fixed", "interleaved_work_{}": "interleaved_work_{}_fixed"}
PER_CROP = {"gflops_{}": "gflops_per_crop", "gflops_timed_{}": "gflops_timed_per_crop",
            "latency_ms_{}_median": "latency_ms_per_crop", "latency_ms_{}_p90": "latency_ms_per_crop",
            "latency_ms_{}_min": "latency_ms_per_crop_min", "interleaved_work_{}": "interleaved_work_per_crop"}
precision_context = precision_mod.context
model_dtype = precision_mod.model_dtype


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


# ---------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakProbe:
    """One n x n matmul in a precision's peak dtype; `gflops()` times one call (the interleaved probe)."""

    def __init__(self, device: torch.device, precision: str, n: int = 2048):
        g = torch.Generator().manual_seed(0)
        dtype = precision_mod.peak_dtype(precision)
        self.a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        self.b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        self.device, self.n = device, n
        self.flags = "tf32" if precision_mod.peak_kind(precision) == "tf32" else "fp32"

    def call(self) -> None:
        torch.mm(self.a, self.b)

    def gflops_of(self, ms: float) -> float:
        return 2 * self.n ** 3 / (ms * 1e-3) / 1e9

    def gflops(self) -> float:
        with precision_context(self.flags, self.device):
            return self.gflops_of(_time_once(self.call, self.device))


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int, probe: PeakProbe | None = None,
          desc: str | None = None, budget_s: float | None = None,
          beside: Callable[[], object] | None = None) -> tuple[list[float], list[float]]:
    """The one timing loop: (ms per iteration after `warmup` untimed calls, GFLOP/s of the peak probe run just
    before each iteration, or [] without a probe). `desc` shows a progress bar over warm-up + timed calls. With
    `budget_s`, timing stops early once the timed iterations add up to it (at least one is timed): a 60-second
    CPU forward is timed once or twice, not `iters` times; the record states the count. `beside` runs after each
    timed iteration, outside its time (the official code's call, timed by itself: interleaved, never at once)."""
    bar = tqdm(total=warmup + iters, desc=desc, unit="it", leave=False, disable=desc is None)
    times, peaks = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
            bar.update()
        _sync(device)
        for _ in range(iters):
            if probe is not None:
                peaks.append(probe.gflops())
            times.append(_time_once(fn, device))
            if beside is not None:
                beside()
            bar.update()
            if budget_s is not None and sum(times) >= 1e3 * budget_s:
                break
    bar.close()
    return times, peaks


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    return timed(fn, device, warmup, iters)[0]


def measure_peak(device: torch.device, precision: str, n: int = 2048, warmup: int = 3, reps: int = 10) -> float:
    """Measured peak: median GFLOP/s of torch.mm on n x n operands in the precision's peak dtype, in this process."""
    probe = PeakProbe(device, precision, n)
    with precision_context(probe.flags, device):
        times, _ = timed(probe.call, device, warmup, reps)
    return probe.gflops_of(float(np.median(times)))


def summarize_times(times: list[float]) -> dict:
    if not times:
        return {"median": float("nan"), "p90": float("nan"), "cv": float("nan"), "min": float("nan")}
    arr = np.asarray(times)
    mean = float(arr.mean())
    return {"median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)), "min": float(arr.min()),
            "cv": float(arr.std() / mean) if mean > 0 and len(arr) > 1 else 0.0}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; process peak


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def default_iters(device: torch.device, warmup: int | None, iters: int | None,
                  compiled: bool = False) -> tuple[int, int]:
    """GPU: >= 20 warm-up (50 with torch.compile) and 100 timed iterations; CPU: 1 and 3 (stated in the record),
    fewer timed ones for a slow model (`cpu_latency_budget`)."""
    if device.type == "cuda":
        return (warmup if warmup is not None else 50 if compiled else 20), (100 if iters is None else iters)
    return (warmup if warmup is not None else 2 if compiled else 1), (3 if iters is None else iters)


CPU_LATENCY_BUDGET_S = 20.0   # per scope, when profile.iters is left at its default on CPU


def cpu_latency_budget(device: torch.device, iters: int | None) -> float | None:
    """Seconds of timed iterations per scope: CPU with the default iteration count only (an explicit
    `profile.iters` is timed in full; GPU iterations are milliseconds)."""
    return CPU_LATENCY_BUDGET_S if device.type == "cpu" and iters is None else None


# ---------------------------------------------------------------------------------------------------- scopes
def deterministic_image(resolution: int, seed: int = 0) -> np.ndarray:
    """The benchmark image: seeded noise (the SAN golden input is this image at 640)."""
    return np.random.default_rng(seed).integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)


def labels_of(model, outputs: dict, sizes, out_sizes) -> list[torch.Tensor]:
    """Label maps from raw outputs: the model's fused path when it has one, else argmax of the score maps."""
    fast = getattr(model, "postprocess_labels", None)
    if fast is not None:
        return fast(outputs, sizes, out_sizes)
    return [s.argmax(dim=0) for s in model.postprocess(outputs, sizes, out_sizes)]


def scope_fns(model, image: np.ndarray, crop_batch: int, runner=None,
              phases: bool = False) -> dict[str, Callable[[], object]]:
    """The callables that are counted and timed (module docstring). `runner` replaces `model.__call__` (a
    torch.compile'd module); `model` supplies preprocess / postprocess / crop_cost_fn. With `phases`, end_to_end
    marks its three phases for torch.profiler (gap tables only, never while timing)."""
    runner = model if runner is None else runner   # not `or`: a compiled module refuses bool() (no len())
    mark = torch.profiler.record_function if phases else (lambda _name: contextlib.nullcontext())
    with torch.inference_mode():   # an inference tensor, as in end_to_end: one compiled graph serves both scopes
        x, sizes = model.preprocess([image])
    has_crops = hasattr(model, "crop_cost_fn")
    kw = {"skip_crops": True} if has_crops else {}
    out_size = [image.shape[:2]]

    def run_model():
        return runner(x, sizes, **kw)

    def run_end_to_end():
        with mark("phase: preprocess (resize, normalise, pad)"):
            xx, ss = model.preprocess([image])
        with mark("phase: model"):
            outputs = runner(xx, ss, **kw)
        with mark("phase: postprocess (labels)"):
            return labels_of(model, outputs, ss, out_size)

    fns = {"model": run_model, "end_to_end": run_end_to_end}
    if has_crops:
        with torch.inference_mode():
            fns["crops"] = model.crop_cost_fn(x, sizes, crop_batch)
    return fns


def _crop_count(outputs: dict) -> int | None:
    n = outputs.get("num_crops")
    if isinstance(n, torch.Tensor):
        n = n.flatten()[0]
    elif isinstance(n, (list, tuple)):
        n = n[0] if n else 0
    return None if n is None else int(n)


def crop_count(model, image: np.ndarray) -> int | None:
    """A crop model's crop count on `image` from its fixed part alone (`forward(..., skip_crops=True)` counts the
    crops it would run, as the full forward does; the crops themselves are what costs); None for other models."""
    if not hasattr(model, "crop_cost_fn"):
        return None
    with torch.inference_mode():
        x, sizes = model.preprocess([image])
        return _crop_count(model(x, sizes, skip_crops=True))


def full_scores(model, image: np.ndarray) -> tuple[torch.Tensor, int | None, torch.Tensor | None]:
    """Per-class scores [K, H, W] (fp32) of the full model (crops included), its crop count, and its per-query
    mask logits [Q, h, w] (fp32) when the outputs carry `mask_pred`."""
    with torch.inference_mode():
        x, sizes = model.preprocess([image])
        outputs = model(x, sizes)
        scores = model.postprocess(outputs, sizes, [image.shape[:2]])[0].float()
    masks = outputs.get("mask_pred")
    masks = masks[0].float() if isinstance(masks, torch.Tensor) and masks.dim() == 4 else None
    return scores, _crop_count(outputs), masks


def label_agreement(ref: torch.Tensor, other: torch.Tensor, margin: float = 1e-3) -> dict:
    """Score maps [K, H, W] of a variant against the fp32 reference: label agreement on the pixels whose fp32 top-2
    margin is >= `margin` x the image's max |fp32 score| (near ties left out), over all pixels, the share of pixels
    kept, the max abs score difference (and over max |ref|), the non-finite fraction."""
    ref, other = ref.detach().float(), other.detach().float()
    if ref.shape != other.shape:
        raise BenchError(f"score maps differ in shape: {tuple(ref.shape)} vs {tuple(other.shape)}")
    same = ref.argmax(dim=0) == other.argmax(dim=0)
    keep = torch.ones_like(same)
    if ref.shape[0] >= 2:
        top2 = ref.topk(2, dim=0).values
        keep = (top2[0] - top2[1]) >= margin * float(ref.abs().max())
    n_keep = int(keep.sum())
    diff, scale = float((other - ref).abs().max()), float(ref.abs().max())
    return {"label_agreement": float(same[keep].float().mean()) if n_keep else float("nan"),
            "label_agreement_all": float(same.float().mean()), "margin_pixel_fraction": n_keep / same.numel(),
            "max_abs_score_diff": diff, "max_abs_score_diff_rel": diff / scale if scale > 0 else float("nan"),
            "nonfinite_score_fraction": 1.0 - float(torch.isfinite(other).float().mean())}


# ---------------------------------------------------------------------------------------------------- one model
def scope_figures(times: dict[str, list[float]], peaks: dict[str, list[float]], flops: dict[str, float],
                  crop_batch: int) -> dict:
    """Flat latency figures per scope (and per crop) from the per-iteration times; `interleaved_work_<scope>` is
    median(ms x probe GFLOP/s), the work an iteration stood for at the moment's speed (divided by the FLOPs later)."""
    out: dict = {}
    for scope, ms in times.items():
        s = summarize_times(ms)
        if scope == "crops":
            out.update(latency_ms_per_crop=s["median"] / crop_batch, latency_ms_per_crop_min=s["min"] / crop_batch)
        else:
            out.update({f"latency_ms_{scope}_median": s["median"], f"latency_ms_{scope}_p90": s["p90"],
                        f"latency_ms_{scope}_min": s["min"], f"latency_{scope}_cv": s["cv"]})
        if peaks.get(scope):
            work = statistics.median(t * p for t, p in zip(ms, peaks[scope]))
            out[f"interleaved_work_{'per_crop' if scope == 'crops' else scope}"] = \
                work / (crop_batch if scope == "crops" else 1)
    for scope, gf in flops.items():
        out["gflops_per_crop" if scope == "crops" else f"gflops_{scope}"] = gf / (crop_batch if scope == "crops"
                                                                                  else 1)
    return out


def _warmup_of(scope: str, warmup: int, times: dict, budget_s: float | None) -> int:
    """Warm-up calls before timing `scope`: none for end_to_end when a single model-scope call already took the
    whole CPU budget (the same forward on the same input has just run; a minute-long CAT-Seg forward is not run
    again only to be thrown away), else `warmup`."""
    slow = budget_s is not None and times.get("model") and min(times["model"]) >= 1e3 * budget_s
    return 0 if scope == "end_to_end" and slow else warmup


def profile_model(model, resolution: int, device: torch.device, precision: str, warmup: int, iters: int,
                  crop_batch: int = 8, compile_mode: str = "eager", throughput_batch: int | None = None,
                  interleave_peak: bool = False, peak_size: int = 2048, image: np.ndarray | None = None,
                  freezing: bool = True, progress: str | None = None,
                  budget_s: float | None = None, beside: Callable[[], object] | None = None) -> tuple[dict, dict]:
    """Returns (flat figures for the record, per-iteration timings by scope).

    FLOPs are counted on the eager model, in the published order and as timed; with a `compile_mode` other than
    eager the timed scopes call the compiled module (compile time reported apart). Figures are per scope of the
    fixed part; `with_crop_count` and `add_floor` finish them once the crop count is known. `beside` runs after
    each timed end_to_end iteration (bench.official: the official code's call, interleaved with ours)."""
    image = deterministic_image(resolution) if image is None else image
    out: dict = {"profile_resolution": resolution, "threads": torch.get_num_threads(), "latency_warmup": warmup,
                 "latency_iters": iters, "timer": "cuda_events" if device.type == "cuda" else "perf_counter",
                 "compile": compile_mode, "peak_kind": precision_mod.peak_kind(precision),
                 "input_hw": "x".join(str(v) for v in model.preprocess([image])[0].shape[-2:])}
    say = (lambda msg: print(f"[profile] {progress}: {msg}", flush=True)) if progress else (lambda msg: None)
    eager = scope_fns(model, image, crop_batch)
    probes = []
    with precision_context(precision, device):
        fns = eager
        if compile_mode != "eager":
            fns = _compiled_fns(model, image, crop_batch, compile_mode, freezing, out)
        out["load1"] = os.getloadavg()[0]
        out["peak_gflops"] = measure_peak(device, precision, peak_size)
        probe = PeakProbe(device, precision, peak_size) if interleave_peak else None
        times, peaks = {}, {}
        for scope, fn in fns.items():
            reset_peak_memory(device)
            w = _warmup_of(scope, warmup, times, budget_s)
            out[f"latency_warmup_{scope}"] = w
            times[scope], peaks[scope] = timed(fn, device, w, iters, probe,
                                               desc=f"{progress} {scope}" if progress else None, budget_s=budget_s,
                                               beside=beside if scope == "end_to_end" else None)
            probes += peaks[scope]
        out["latency_iters"] = min(len(t) for t in times.values())   # fewer than asked when the budget ran out
        out["latency_budget_s"] = budget_s
        out["peak_gflops_end"] = measure_peak(device, precision, peak_size)
        out["peak_mem_mb"] = peak_memory_mb(device)
        out["peak_mem_kind"] = "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"
        if throughput_batch:
            out.update(throughput(model, image, throughput_batch, device, warmup, iters))
    say("counting FLOPs")
    flops, flops_timed = {}, {}
    for scope, fn in eager.items():    # after timing: a scope's measured call decides shapes or a real call
        call_ms = float(np.median(times[scope])) if times.get(scope) else None
        with model.published_computation():    # the papers' count (a fast path may skip unread work)
            flops[scope] = count_flops_split(fn, shapes_of=model, call_ms=call_ms)["total"] / 1e9
        flops_timed[scope] = count_flops_split(fn, shapes_of=model, call_ms=call_ms)
        out[f"flops_counted_from_{scope}"] = flops_timed[scope]["counted_from"]
    out["gflops_attention_end_to_end"] = flops_timed["end_to_end"]["attention"] / 1e9
    out.update(scope_figures(times, peaks, flops, crop_batch))
    for scope in SCOPES:
        out[f"gflops_timed_{scope}"] = flops_timed[scope]["total"] / 1e9
    if "crops" in flops_timed:
        out["gflops_timed_per_crop"] = flops_timed["crops"]["total"] / 1e9 / crop_batch
    all_probes = [out["peak_gflops"], out["peak_gflops_end"], *probes]
    out["peak_drift"] = (max(all_probes) - min(all_probes)) / statistics.median(all_probes)
    if probes:
        out["peak_gflops_interleaved"] = statistics.median(probes)
    out["peak_gflops_best"] = max(all_probes)
    out["has_crops"] = "crops" in times
    if out["has_crops"]:
        out["crop_batch"] = crop_batch
        for scope in SCOPES:
            for name, fixed in FIXED_PART.items():
                if name.format(scope) in out:
                    out[fixed.format(scope)] = out[name.format(scope)]
            out[f"gflops_{scope}_all_crops"] = out[f"gflops_{scope}"] + CROP_QUERIES * out["gflops_per_crop"]
            out[f"latency_ms_{scope}_all_crops"] = (out[f"latency_ms_{scope}_median"]
                                                    + CROP_QUERIES * out["latency_ms_per_crop"])
    return out, times


def _compiled_fns(model, image, crop_batch: int, mode: str, freezing: bool, out: dict) -> dict:
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    compiled = torch.compile(model, mode=None if mode == "default" else mode)
    fns = scope_fns(model, image, crop_batch, runner=compiled)
    t0 = time.perf_counter()
    with inductor_config.patch(freezing=freezing), torch.inference_mode():
        fns["end_to_end"]()   # compiles the forward (the same graph serves both scopes)
    out["compile_seconds"] = time.perf_counter() - t0
    return fns


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
    for scope in SCOPES:
        for name, fixed in FIXED_PART.items():
            base, per_crop = out.get(fixed.format(scope)), out.get(PER_CROP[name])
            if base is not None and per_crop is not None:
                out[name.format(scope)] = base + n * per_crop
    return out


def add_floor(figures: dict, peak_gflops: float) -> dict:
    """Compute floor (timed GFLOPs / peak) and latency / floor for every scope with both figures: against the
    cell's start-up peak, the interleaved probes (where measured) and the best iteration at the best peak."""
    out = dict(figures, peak_gflops=peak_gflops)
    for scope in SCOPES:
        gflops = out.get(f"gflops_timed_{scope}") or out.get(f"gflops_{scope}")
        lat = out.get(f"latency_ms_{scope}_median")
        if not (gflops and peak_gflops):
            continue
        out[f"floor_ms_{scope}"] = gflops / peak_gflops * 1e3
        if lat:
            out[f"latency_over_floor_{scope}"] = lat / out[f"floor_ms_{scope}"]
        if out.get(f"interleaved_work_{scope}"):
            out[f"latency_over_floor_interleaved_{scope}"] = out[f"interleaved_work_{scope}"] / (gflops * 1e3)
        if out.get(f"latency_ms_{scope}_min") and out.get("peak_gflops_best"):
            out[f"latency_over_floor_best_{scope}"] = out[f"latency_ms_{scope}_min"] / (
                gflops / out["peak_gflops_best"] * 1e3)
    return out


# A CPU-bound loop that ends by itself when its parent is gone (a cell killed with -9 leaves no busy process).
_BUSY_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    sum(range(20000))\n"


@contextlib.contextmanager
def background_load(n: int):
    """`n` CPU-bound processes (pure-Python loops) running for the duration of the block, stopped after it: the
    busy machine of `profile.background_load`, where threads are preempted. Yields their pids."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _BUSY_LOOP], stdin=subprocess.DEVNULL) for _ in range(n)]
    try:
        time.sleep(0.5 if procs else 0.0)   # let them start before timing begins
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def configure_allocator(mode: str) -> str:
    """`heap`: glibc keeps freed memory in the heap (M_MMAP_MAX = 0, M_TRIM_THRESHOLD = max), so a large temporary
    allocated again in the next iteration does not page-fault and get zeroed again (measured here: a fresh 164 MB
    buffer cost ~65 ms of page faults). Returns what is in effect (recorded)."""
    if mode != "heap":
        return "glibc default"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 2 ** 31 - 1) == 1   # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        ok = False
    return "glibc heap (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)" if ok else "glibc default (mallopt unavailable)"
