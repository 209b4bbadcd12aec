"""The cell's efficiency step: params, FLOPs, latency against the measured peak (bench.profile) for the cell's
model, precision and compile mode, with what the profile settings add (golden-fill weights, label agreement with
fp32 on the benchmark image, an op-category gap table, the speed targets), cached per (model, resolution,
precision, device, threads, profile settings, library versions) so a sweep profiles each model once.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bench import BenchError, records
from bench import precision as precision_mod
from bench import profile as prof
from bench.data import load_class_names
from bench.flops import attributes_kept, count_flops, count_flops_split


def short_side(cfg: DictConfig) -> int:
    return int(cfg.resolution) if cfg.resolution is not None else int(cfg.model.protocol.short_side)


def is_compiled(cfg: DictConfig) -> bool:
    return cfg.compile != "eager"


def profile_cache_path(cfg: DictConfig, device: torch.device) -> str:
    """Efficiency figures do not depend on the weights or the dataset: one cache entry per (model, protocol,
    precision, compile, device, threads, profile settings, library versions) serves every dataset of a sweep.
    The git sha is not part of it (a results folder inside the repository would make it '-dirty' mid-run)."""
    import bench

    model = records.key_inputs({"model": OmegaConf.to_container(cfg.model, resolve=True)})["model"]
    for name in ("dataset_settings", "class_name_overrides", "settings_not_published", "checkpoint"):
        model.pop(name, None)
    blob = {"model": model, "res": short_side(cfg), "precision": cfg.precision, "compile": cfg.compile,
            "device": records.device_name(device), "threads": torch.get_num_threads(),
            "profile": OmegaConf.to_container(cfg.profile, resolve=True), "repeat": cfg.get("repeat", 0),
            "seed": cfg.seed, "versions": [bench.__version__, torch.__version__]}
    digest = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(cfg.results_dir, "cache", f"profile-{digest}.json")


def efficiency_figures(cfg: DictConfig, model, device: torch.device) -> tuple[dict, dict]:
    """Params, and (if profile.enabled) FLOPs + latency at resolution x resolution, plus what the profile settings
    ask for (label agreement with fp32, an op-category gap table); written to the profile cache."""
    pc = cfg.model.params
    figures = prof.count_params(model, pc.trainable_prefixes or (), pc.text_prefixes or ())
    figures["params_trainable_published"] = pc.get("trainable_published")
    timings: dict = {}
    if cfg.profile.enabled:
        p = cfg.profile
        compiled = is_compiled(cfg)
        warmup, iters = prof.default_iters(device, p.warmup, p.iters, compiled)
        figures["allocator"] = prof.configure_allocator(p.allocator)
        figures["profile_weights"] = profile_weights(cfg, model)
        if p.channels_last:
            model.to(memory_format=torch.channels_last)
        names = load_class_names(p.vocabulary)
        figures.update(text_encoding_cost(model, names))
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.encode_vocabulary(names)
        figures["text_encode_s"] = time.perf_counter() - t0   # may come from the on-disk text cache
        image = benchmark_image(p.image, short_side(cfg))
        with contextlib.ExitStack() as stack:
            official = start_official(stack, cfg, device, image, names, warmup, figures)
            stack.enter_context(prof.background_load(int(p.background_load)))
            measured, timings = prof.profile_model(
                model, short_side(cfg), device, cfg.precision, warmup, iters, int(p.crop_batch), cfg.compile,
                p.throughput_batch, bool(p.interleave_peak), int(p.peak_size), image, bool(p.compile_freezing),
                progress=f"{cfg.model.name} {cfg.precision}" if cfg.progress else None,
                budget_s=prof.cpu_latency_budget(device, p.iters), beside=official and official.call)
            if official is not None:
                figures.update(official.figures(timings["end_to_end"]))
                timings["official_end_to_end"] = list(official.times)
        figures.update(measured, profile_vocabulary_size=len(names), cpu_flags=" ".join(cpu_flags()),
                       background_load_procs=int(p.background_load))
        figures["gflops_model_at_k"] = model_flops_at_k(model, image, standard_vocabulary_sizes() | {len(names)},
                                                        call_ms=measured.get("latency_ms_model_median"))
        if figures.get("has_crops") or p.agreement:
            figures.update(benchmark_image_figures(cfg, model, device, image, names))
        if p.gap_table:
            figures["gap_table_text"] = gap_table_text(cfg, model, image, figures)
    records.atomic_write_json(profile_cache_path(cfg, device), {"figures": figures, "timings": timings})
    return figures, timings


def start_official(stack: contextlib.ExitStack, cfg: DictConfig, device: torch.device, image: np.ndarray,
                   names: list[str], warmup: int, figures: dict):
    """The official code's timing server for this cell (bench.official), started and warmed up on `stack` before
    any background load starts; None with `official_skipped` in `figures` saying why when it cannot run or its
    build fails (the cell's own figures still count); None and nothing said with profile.official=false."""
    if not cfg.profile.official:
        return None
    from bench import official

    block = cfg.model.get("official")
    spec = OmegaConf.to_container(block, resolve=True) if block else {}
    env = official.reference_env(cfg.profile.official_env)
    reason = official.skip_reason(spec, env, cfg.precision) or (
        None if device.type == "cpu" else f"device {device}: the official code is timed on the CPU only")
    timer = None
    if reason is None:
        timer = official.OfficialTimer(spec, env, cfg.precision, torch.get_num_threads(), image, names)
        try:
            stack.enter_context(timer).warm_up(warmup)
        except BenchError as e:
            timer, reason = None, str(e)
    if reason is not None:
        figures["official_skipped"] = reason
        print(f"[official] skipped: {reason}", flush=True)
    return timer


def standard_vocabulary_sizes() -> set[int]:
    """K of every real dataset config in conf/dataset (its vocabulary file, else its classes): 20, 21, 59, 150, ..."""
    from bench.data import spec_from_cfg, vocabulary_names
    from bench.data.synth import CONF_DIR, load_dataset_cfg

    specs = [spec_from_cfg(load_dataset_cfg(p.stem)) for p in sorted(CONF_DIR.glob("*.yaml"))]
    return {len(vocabulary_names(spec)) for spec in specs if not spec.generate}   # not the synthetic test set


def model_flops_at_k(model, image: np.ndarray, ks, call_ms: float | None = None) -> dict[str, float]:
    """{K: GFLOPs of the model scope (published computation order) with a K-class vocabulary}, counted from shapes
    (bench.flops.count_flops_split on fake tensors: no forward runs). The K-class vocabulary repeats the names
    already encoded (the models cache text per name, so no text tower runs either); the model's attributes are put
    back afterwards. Each dataset cell takes its own K from it (`dataset_k_figures`). {} for a model whose forward
    has value-dependent shapes (SimSeg, SCAN: the mask threshold picks the crops), which would need a real forward
    per K. The first K is always counted from shapes (that is the test); with a measured model call `call_ms`
    under bench.flops.REAL_COUNT_MS the other K are counted on real calls (the same count, faster)."""
    names = list(model.vocabulary or [])
    if not names:
        return {}
    with torch.inference_mode():
        x, sizes = model.preprocess([image])
    kw = {"skip_crops": True} if hasattr(model, "crop_cost_fn") else {}
    out: dict[str, float] = {}
    for k in sorted(ks):
        with attributes_kept(model), torch.inference_mode():
            model.encode_vocabulary((names * (k // len(names) + 1))[:k])
            with model.published_computation():
                counted = count_flops_split(lambda: model(x, sizes, **kw), shapes_of=model,
                                                 call_ms=call_ms if out else None)
        if not out and counted["counted_from"] != "shapes":
            return {}
        out[str(k)] = counted["total"] / 1e9
    return out


def dataset_k_figures(rec: dict, k: int) -> dict:
    """The cell's own vocabulary size and the model scope's GFLOPs at it: the headline `gflops_model` (measured at
    the profile vocabulary) moved by the shape-only difference between the two K (so crop models keep their crop
    term); None where the model has no per-K figures."""
    at_k = rec.get("gflops_model_at_k") or {}
    k_profile = rec.get("profile_vocabulary_size")
    out: dict = {"dataset_vocabulary_size": k, "gflops_model_dataset_k": None}
    if rec.get("gflops_model") is None:
        return out
    if k == k_profile:
        out["gflops_model_dataset_k"] = rec["gflops_model"]
    elif str(k) in at_k and str(k_profile) in at_k:
        out["gflops_model_dataset_k"] = rec["gflops_model"] + at_k[str(k)] - at_k[str(k_profile)]
    return out


def text_encoding_cost(model, names: list[str]) -> dict:
    """The text tower's cost of a vocabulary, apart from the image path: FLOPs and seconds of encoding one class
    name (every template) with the text cache off, times K. Each prompt goes through the tower on its own, so the
    cost is linear in K; measuring one class keeps the 847-class figure cheap (14 x 847 prompts would take
    minutes on a CPU). The count and the timing each encode a name never encoded before (models keep the features
    of names they have seen: a repeated name would time a dictionary lookup). Called before the real vocabulary
    is encoded (it leaves a one-class vocabulary behind)."""
    from bench.models import text_cache

    saved = text_cache.cache_dir()
    text_cache.set_cache_dir(None)
    try:
        counted, timed_name = [f"{names[0]} (counted)"], [f"{names[0]} (timed)"]
        flops = count_flops(lambda: model.encode_vocabulary(counted))
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.encode_vocabulary(timed_name)
        seconds = time.perf_counter() - t0
    finally:
        text_cache.set_cache_dir(saved)
    k = len(names)
    return {"gflops_text": flops / 1e9 * k, "text_encode_s_uncached": seconds * k,
            "text_cost_basis": "one class measured, x K"}


def benchmark_image(path: str | None, resolution: int) -> np.ndarray:
    if path is None:
        return prof.deterministic_image(resolution)
    try:
        image = np.load(path)
    except (OSError, ValueError) as e:
        raise BenchError(f"profile.image={path}: cannot read it as a .npy array ({e}); give an HxWx3 uint8 .npy") \
            from None
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BenchError(f"profile.image={path}: {image.dtype} {image.shape}; need an HxWx3 uint8 array")
    return image


def profile_weights(cfg: DictConfig, model, label_check: bool = False) -> str:
    """The weights profiling runs on: the seeded builder init, or the model's golden fill (non-flat scores, as in
    the golden fixtures: label agreement and crop counts then mean something). `label_check`: the weights of the
    agreement check under `profile.agreement_fill=label_check` (bench.testing.fills: a fill variant whose fp32
    label map has many classes; the scaled fill for a family without one)."""
    from bench.testing import fills

    if label_check:
        return fills.fill_model(model, cfg.model.get("golden_fill"), label_check=True)
    if cfg.profile.weights != "golden":
        return "builder init (seeded random)"
    return fills.fill_model(model, cfg.model.get("golden_fill"))


def benchmark_image_figures(cfg: DictConfig, model, device: torch.device, image: np.ndarray,
                            names: list[str]) -> dict:
    """On the benchmark image: the crop count of crop models with these weights, and for a reduced precision the
    label agreement with the same model in fp32 (the cell's own dataset settings, same weights). The crop count
    alone needs only the fixed part: the full forward (all crops) runs when there is an agreement to judge."""
    judged = cfg.profile.agreement and precision_mod.is_reduced(cfg.precision)
    label_check = judged and cfg.profile.agreement_fill == "label_check" and bool(cfg.model.get("golden_fill"))
    with prof.precision_context(cfg.precision, device):
        if not judged:
            return {"crops_on_benchmark_image": prof.crop_count(model, image)}
        out: dict = {"crops_on_benchmark_image": prof.crop_count(model, image)} if label_check else {}
        if label_check:   # the check's own weights; the timed weights are put back below
            out["agreement_weights"] = profile_weights(cfg, model, label_check=True)
            with torch.inference_mode():
                model.encode_vocabulary(names)
        scores, crops, masks = prof.full_scores(model, image)
    out.setdefault("crops_on_benchmark_image", crops)
    from bench.cell import build_model, dataset_settings

    reference = build_model(cfg, device, dtype=torch.float32)
    profile_weights(cfg, reference, label_check=label_check)
    reference.configure(**dataset_settings(cfg))
    with torch.inference_mode():
        reference.encode_vocabulary(names)
    ref_scores, _, ref_masks = prof.full_scores(reference, image)
    del reference
    margin = float(cfg.profile.agreement_margin)
    out.update(prof.label_agreement(ref_scores, scores, margin))
    out["fp32_labels_distinct"] = int(ref_scores.argmax(dim=0).unique().numel())
    if masks is not None and ref_masks is not None and masks.shape == ref_masks.shape:
        m = prof.label_agreement(ref_masks, masks, margin)
        out.update(mask_agreement=m["label_agreement"], mask_margin_pixel_fraction=m["margin_pixel_fraction"])
    if label_check:
        profile_weights(cfg, model)
        with torch.inference_mode():
            model.encode_vocabulary(names)
    return out


def gap_table_text(cfg: DictConfig, model, image: np.ndarray, figures: dict) -> str:
    """The op-category table of end_to_end (crop models: + the crops scaled to the crop count), eager."""
    from bench import gaptable

    crop_batch = int(cfg.profile.crop_batch)
    fns = prof.scope_fns(model, image, crop_batch, phases=True)
    crops = cfg.profile.crop_count or figures.get("crops_on_benchmark_image") or 0
    parts = [(fns["end_to_end"], 1.0)] + ([(fns["crops"], crops / crop_batch)] if "crops" in fns else [])
    with prof.precision_context(cfg.precision, torch.device("cpu")):
        profile = gaptable.collect_profile(parts)
    flops = {"total": figures["gflops_timed_end_to_end"] * 1e9,
             "attention": figures.get("gflops_attention_end_to_end", 0.0) * 1e9}
    median = figures["latency_ms_end_to_end_median"]
    if "crops" in fns:
        flops["total"] += crops * figures["gflops_timed_per_crop"] * 1e9
        median += crops * figures["latency_ms_per_crop"]
    title = (f"{cfg.model.get('display') or cfg.model.name}: end_to_end, {cfg.precision}, compile {cfg.compile}, "
             f"input {figures['input_hw']}, {figures['threads']} threads, K = {figures.get('profile_vocabulary_size')}"
             + (f", fixed part + {crops} crops" if "crops" in fns else ""))
    extra = [f"load average (1 min) when timed: {figures['load1']:.2f} on {os.cpu_count()} logical CPUs; weights: "
             f"{figures.get('profile_weights')}"]
    return gaptable.gap_table(title, profile, flops, figures["peak_gflops"], median, extra)


def cpu_flags() -> list[str]:
    """The instruction-set flags that matter for fp32 / bf16 GEMMs (from /proc/cpuinfo), in a fixed order."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
              "amx_bf16", "amx_int8", "amx_fp16")
    try:
        with open("/proc/cpuinfo") as f:
            have = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        have = set()
    return [fl for fl in wanted if fl in have]


def speed_targets(cfg: DictConfig) -> dict:
    """The latency / floor limits (and minimum label agreement) the sweep set for this model and precision kind."""
    mine = (cfg.profile.get("targets") or {}).get(cfg.model.name) or {}
    kind = precision_mod.peak_kind(cfg.precision)
    out = {f"speed_target_{scope}": mine.get(f"{kind}_{scope}") for scope in prof.SCOPES}
    out["speed_target_agreement"] = mine.get(f"{kind}_agreement")
    return {k: v for k, v in out.items() if v is not None}
