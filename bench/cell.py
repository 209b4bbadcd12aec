"""One cell, top to bottom: config -> model -> profile -> checkpoint -> data -> evaluate -> record.

`run_cell(cfg)` never raises for a problem of the cell itself: a user-fixable problem (BenchError) or a crash
becomes a status=error record with a one-line reason, an absent checkpoint or dataset a status=missing record
that says where it was expected, so a sweep goes on and nothing computed earlier is lost.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from bench import BenchError, records
from bench import profile as prof
from bench.data import apply_class_name_overrides, build_dataset, load_class_names, spec_from_cfg
from bench.metrics import SemSegEvaluator
from bench.models import create_model
from bench.models.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- config
def resolved_config(cfg: DictConfig) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("hydra", None)
    return c


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device={name} asked for, but no CUDA device is visible; use device=cpu or device=auto")
    return dev


def short_side(cfg: DictConfig) -> int:
    return int(cfg.resolution) if cfg.resolution is not None else int(cfg.model.protocol.short_side)


def build_model(cfg: DictConfig, device: torch.device):
    """The model at the cell's protocol (resolution sets the short side, long side <= 4x), dtype and device."""
    kwargs = cfg.model.get("builder_kwargs")
    model = create_model(cfg.model.builder, **(OmegaConf.to_container(kwargs, resolve=True) if kwargs else {}))
    if cfg.resolution is not None:
        model.protocol.short_side = int(cfg.resolution)
        model.protocol.max_size = 4 * int(cfg.resolution)
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=prof.model_dtype(cfg.precision))


def dataset_settings(cfg: DictConfig) -> dict:
    """The model's per-dataset inference settings, plus the dataset flags the model consumes (e.g. void_reweight)."""
    settings = dict((cfg.model.get("dataset_settings") or {}).get(cfg.dataset.name) or {})
    for flag in cfg.model.get("dataset_flags") or ():
        settings[flag] = cfg.dataset[flag]
    return settings


def vocabulary(cfg: DictConfig) -> list[str]:
    """Class names in id order, with the model's own spelling where its registration differs (ids never change)."""
    names = load_class_names(cfg.dataset.classes_file)
    overrides = (cfg.model.get("class_name_overrides") or {}).get(cfg.dataset.name)
    return apply_class_name_overrides(names, overrides)


def dataset_absent(cfg: DictConfig) -> str:
    """'' if the dataset is (or can be generated) under data_root, else where it was expected."""
    spec = spec_from_cfg(cfg.dataset)
    if spec.generate:
        return ""
    for layout in spec.layouts:
        top = os.path.join(cfg.data_root, layout.label_dir.split("/")[0])
        if os.path.isdir(top):
            return ""  # something is there: a wrong layout is an error, not an absence
    return os.path.join(cfg.data_root, spec.layout.label_dir)


# ---------------------------------------------------------------------------------------------------- profile
def profile_figures(cfg: DictConfig, model, device: torch.device) -> tuple[dict, dict]:
    """Params + FLOPs + latency at resolution x resolution, cached per (model, protocol, precision, device)."""
    res = short_side(cfg)
    warmup, iters = prof.default_iters(device, cfg.profile.warmup, cfg.profile.iters)
    cache_key = records.cell_key({"builder": cfg.model.builder, "kwargs": str(cfg.model.builder_kwargs),
                                  "res": res, "precision": cfg.precision, "device": records.device_name(device),
                                  "threads": torch.get_num_threads(), "warmup": warmup, "iters": iters,
                                  "vocab": cfg.profile.vocabulary, "crop_batch": cfg.profile.crop_batch,
                                  "git": records.git_sha()})
    cache = os.path.join(cfg.results_dir, "cache", f"profile-{cache_key}.json")
    cached = records.read_record(cache)
    if cached is not None:
        return cached["figures"], cached["timings"]
    names = load_class_names(cfg.profile.vocabulary)
    model.encode_vocabulary(names)
    figures, timings = prof.profile_model(model, res, device, cfg.precision, warmup, iters,
                                          int(cfg.profile.crop_batch))
    figures["profile_vocabulary_size"] = len(names)
    records.atomic_write_json(cache, {"figures": figures, "timings": timings})
    return figures, timings


# ---------------------------------------------------------------------------------------------------- evaluate
def evaluate(cfg: DictConfig, model, dataset, device: torch.device, formula: str) -> tuple[dict, float | None]:
    evaluator = SemSegEvaluator(dataset.num_classes, dataset.ignore_label, dataset.class_names, device=device,
                                formula=formula, sg_iou_table=dataset.sg_iou_table)
    evaluator.reset()
    n = len(dataset) if cfg.max_images is None else min(len(dataset), int(cfg.max_images))
    crops: list[int] = []
    bs = int(cfg.batch_size)
    bar = tqdm(range(0, n, bs), desc=f"{cfg.model.name}/{cfg.dataset.name}", unit="batch",
               disable=not cfg.progress, leave=False)
    with torch.inference_mode(), prof.precision_context(cfg.precision, device):
        for start in bar:
            items = [dataset[i] for i in range(start, min(n, start + bs))]
            images = [it["image"] for it in items]
            x, sizes = model.preprocess(images)
            outputs = model(x, sizes)
            scores = model.postprocess(outputs, sizes, [im.shape[:2] for im in images])
            crops.extend(int(c) for c in outputs.get("num_crops", []))
            for item, score in zip(items, scores):
                if not torch.isfinite(score).all():
                    raise BenchError(f"non-finite outputs on {item['file_name']}: the checkpoint holds NaN/Inf "
                                     "weights or the precision overflows; check the weights file")
                evaluator.process(score.argmax(dim=0), torch.from_numpy(item["label"]).to(device))
    return evaluator.evaluate(), (float(np.mean(crops)) if crops else None)


# ---------------------------------------------------------------------------------------------------- the cell
def base_record(c: dict, key: str, device_name: str = "") -> dict:
    m, d = c["model"], c["dataset"]
    return {"key": key, "status": None, "reason": "", "model": m["name"], "model_display": m.get("display", m["name"]),
            "dataset": d["name"], "dataset_display": d.get("display_name", d["name"]),
            "resolution": c["resolution"] if c["resolution"] is not None else m["protocol"]["short_side"],
            "resolution_is_protocol": c["resolution"] is None, "precision": c["precision"],
            "batch_size": c["batch_size"], "miou_formula": c["miou_formula"],
            "pipeline_check": bool(c["synthesize_weights"] or d.get("generate", False)),
            "config": records.key_inputs(c)}


def _run(cfg: DictConfig, rec: dict) -> None:
    device = resolve_device(cfg.device)
    prof.set_threads(cfg.threads)
    rec.update(records.provenance(device))
    model = build_model(cfg, device)
    settings = dataset_settings(cfg)
    model.configure(**settings)
    rec["dataset_settings"] = json.dumps(settings, sort_keys=True)
    if cfg.dataset.name in (cfg.model.get("settings_not_published") or []):
        rec["note"] = "settings not published (PAS-20's used)"
    pc = cfg.model.params
    rec.update(prof.count_params(model, pc.trainable_prefixes or (), pc.text_prefixes or ()))
    rec["params_trainable_published"] = pc.get("trainable_published")
    timings: dict = {}
    if cfg.profile.enabled:
        figures, timings = profile_figures(cfg, model, device)
        rec.update(figures)

    ckpt = os.path.join(cfg.weights_dir, cfg.model.checkpoint.file)
    absent = []
    if not cfg.synthesize_weights and not os.path.isfile(ckpt):
        absent.append(f"no checkpoint at {ckpt}")
    if missing_data := dataset_absent(cfg):
        absent.append(f"no dataset at {missing_data}")
    if absent:
        rec["status"], rec["reason"] = records.STATUS_MISSING, "; ".join(absent)
        _finish_crop_figures(rec, None)
        return timings

    if cfg.synthesize_weights:
        rec["checkpoint_sha256"], rec["checkpoint"] = "", "synthesized (random init)"
    else:
        ck = cfg.model.checkpoint
        report = load_checkpoint(model, ckpt, tuple(ck.ignore_prefixes or ()), tuple(ck.optional_keys or ()),
                                 allow_unsafe_pickle=bool(cfg.allow_unsafe_pickle))
        model.to(device=device, dtype=prof.model_dtype(cfg.precision))
        rec.update(checkpoint=ckpt, checkpoint_sha256=report.sha256, ignored_keys=len(report.ignored_keys),
                   load_note=report.note())
    dataset = build_dataset(cfg.dataset, cfg.data_root)
    rec["dataset_images"] = len(dataset)
    rec["dataset_images_official"] = cfg.dataset.get("official_val_images")
    rec["sg_iou_table_official"] = dataset.sg_iou_table_official if dataset.sg_iou_table else None
    names = vocabulary(cfg)
    model.encode_vocabulary(names)
    t0 = time.perf_counter()
    metrics, mean_crops = evaluate(cfg, model, dataset, device, cfg.miou_formula)
    rec["eval_seconds"] = time.perf_counter() - t0
    rec["images_evaluated"] = metrics.pop("images", None) or rec["dataset_images"]
    rec["per_class"] = per_class_rows(metrics, dataset.class_names)
    rec.update(metrics)
    _finish_crop_figures(rec, mean_crops)
    rec["status"] = records.STATUS_OK
    return timings


def per_class_rows(metrics: dict, class_names: list[str]) -> list[dict]:
    """Pop the per-class entries (IoU-<name>, ACC-<name>, SG-IoU-<name>) into tidy rows."""
    rows = []
    for i, name in enumerate(class_names):
        row = {"class_id": i, "class_name": name, "IoU": metrics.pop(f"IoU-{name}", math.nan),
               "ACC": metrics.pop(f"ACC-{name}", math.nan)}
        if f"SG-IoU-{name}" in metrics:
            row["SG-IoU"] = metrics.pop(f"SG-IoU-{name}")
        rows.append(row)
    return rows


def _finish_crop_figures(rec: dict, mean_crops: float | None) -> None:
    if rec.get("has_crops"):
        rec.update(prof.with_crop_count(rec, mean_crops))
        rec["mean_crops"] = mean_crops


def run_cell(cfg: DictConfig) -> dict:
    """Run one cell (or skip it when its ok record exists) and write its record atomically."""
    c = resolved_config(cfg)
    key = records.cell_key(c)
    path = records.record_path(cfg.results_dir, key)
    if not cfg.force and records.is_done(cfg.results_dir, key):
        rec = records.read_record(path)
        print(f"[skip] {rec['model']}/{rec['dataset']}@{rec['resolution']} {rec['precision']}: done ({path})")
        return rec
    rec = base_record(c, key)
    timings: dict = {}
    try:
        timings = _run(cfg, rec) or {}
    except BenchError as e:
        rec["status"], rec["reason"] = records.STATUS_ERROR, str(e).splitlines()[0]
    except Exception as e:  # a crash in one cell must not stop the sweep; the reason goes into the record
        log.debug("cell crashed", exc_info=True)
        rec["status"] = records.STATUS_ERROR
        rec["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rec["traceback"] = traceback.format_exc(limit=8)
    records.atomic_write_json(path, rec)
    if timings:
        records.atomic_write_json(path[:-len(".json")] + ".timings.json", timings)
    print(summary_line(rec))
    return rec


def summary_line(rec: dict) -> str:
    head = f"[{rec['status']}] {rec['model']}/{rec['dataset']}@{rec['resolution']} {rec['precision']}"
    eff = ""
    if "gflops_model" in rec:
        eff = f" | {rec['gflops_model'] / 2:.1f} GMACs, {rec.get('latency_ms_model_median', math.nan):.0f} ms"
    if rec["status"] == records.STATUS_OK:
        tag = " (pipeline check)" if rec.get("pipeline_check") else ""
        return f"{head}: mIoU {rec.get('mIoU', math.nan):.2f}{tag}{eff}"
    return f"{head}: {rec['reason']}{eff}"
