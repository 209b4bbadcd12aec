"""One cell, top to bottom: config -> model -> profile -> checkpoint -> data -> evaluate -> record.

`run_cell(cfg)` never raises for a problem of the cell itself: a user-fixable problem (BenchError) or a crash
becomes a status=error record with a one-line reason, an absent checkpoint or dataset a status=missing record
that says where it was expected, so a sweep goes on and nothing computed earlier is lost.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from bench import BenchError, fingerprint, records
from bench import config as bench_config
from bench import profile as prof
from bench.efficiency import dataset_k_figures, efficiency_figures, profile_cache_path, speed_targets
from bench.data import (apply_class_name_overrides, build_dataset, proxy_predictions, spec_from_cfg,
                        vocabulary_names)
from bench.metrics import SemSegEvaluator
from bench.models import create_model
from bench.models.base import resize_uint8, shortest_edge_size
from bench.models.checkpoint import load_checkpoint
from bench.models import text_cache

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- config
def resolved_config(cfg: DictConfig) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    c.pop("hydra", None)
    return c


def resolve_device(name: str) -> torch.device:
    if name == "auto" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name == "auto":
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device={name} asked for, but no CUDA device is visible; use device=cpu or device=auto")
    return dev


def build_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype | None = None):
    """The model at the cell's protocol (resolution sets the short side, long side <= 4x), dtype and device.

    The random initialisation is seeded (`seed`), so synthesized weights are the same in every process."""
    torch.manual_seed(int(cfg.seed))
    kwargs = cfg.model.get("builder_kwargs")
    model = create_model(cfg.model.builder, **(OmegaConf.to_container(kwargs, resolve=True) if kwargs else {}))
    if cfg.resolution is not None:
        model.protocol.short_side = int(cfg.resolution)
        model.protocol.max_size = 4 * int(cfg.resolution)
    model.eval().requires_grad_(False)
    return model.to_precision(device, dtype or prof.model_dtype(cfg.precision))


def per_dataset(cfg: DictConfig, table: str):
    """The model config's entry of `table` for the cell's dataset; a scoring variant (`variant_of`) without its
    own entry takes the entry of the dataset it is a variant of."""
    entries = cfg.model.get(table) or {}
    for name in (cfg.dataset.name, cfg.dataset.get("variant_of")):
        if name is not None and name in entries:
            return entries[name]
    return None


def settings_not_published(cfg: DictConfig) -> bool:
    names = cfg.model.get("settings_not_published") or []
    return cfg.dataset.name in names or cfg.dataset.get("variant_of") in names


def dataset_settings(cfg: DictConfig) -> dict:
    """The model's per-dataset inference settings, plus settings it reads from elsewhere in the config
    (`settings_from_config`: name -> config path, e.g. void_reweight -> dataset.void_reweight)."""
    settings = dict(per_dataset(cfg, "dataset_settings") or {})
    for name, path in (cfg.model.get("settings_from_config") or {}).items():
        settings[name] = OmegaConf.select(cfg, path)
    return settings


def vocabulary(cfg: DictConfig) -> list[str]:
    """The names the model is asked for, in vocabulary-id order (the classes, or with proxies the dataset's
    `vocabulary_file`), with the model's own spelling where its registration differs (ids never change)."""
    names = vocabulary_names(spec_from_cfg(cfg.dataset))
    return apply_class_name_overrides(names, per_dataset(cfg, "class_name_overrides"))


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


# ---------------------------------------------------------------------------------------------------- evaluate
class ResizedImages(torch.utils.data.Dataset):
    """Decode + protocol resize in DataLoader workers: item -> (uint8 CHW tensor at the model's input size,
    label, original size, file name). Picklable: holds the dataset and the protocol, never the model."""

    def __init__(self, dataset, indices: list[int], protocol):
        self.dataset, self.indices, self.protocol = dataset, indices, protocol

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[self.indices[i]]
        image = item["image"]
        h, w = image.shape[:2]
        size = shortest_edge_size(h, w, self.protocol.short_side, self.protocol.max_size)
        resized = resize_uint8(image, size)
        if not resized.flags.writeable:    # an image already at the protocol size comes back as decoded (read-only)
            resized = resized.copy()
        resized = torch.from_numpy(resized).permute(2, 0, 1).contiguous()
        return {"image": resized, "label": torch.from_numpy(item["label"]), "size": (h, w),
                "file_name": item["file_name"]}


def _as_list(batch: list[dict]) -> list[dict]:
    return batch


def evaluate(cfg: DictConfig, model, dataset, device: torch.device, formula: str,
             reference=None) -> tuple[dict, float | None]:
    """Confusion matrix over the dataset (this rank's shard under torchrun), on the model's device.

    With a `reference` (the fp32 model, for a reduced-precision cell), the first `compare_fp32_images` images are
    also run in fp32 and the score maps compared (label agreement %, max abs score difference)."""
    evaluator = SemSegEvaluator(dataset.num_classes, dataset.ignore_label, dataset.class_names, device=device,
                                formula=formula, sg_iou_table=dataset.sg_iou_table)
    evaluator.reset()
    n = len(dataset) if cfg.max_images is None else min(len(dataset), int(cfg.max_images))
    rank, world = dist_rank_world()
    shard = list(range(rank, n, world))  # torchrun: image i goes to rank i % world
    loader = torch.utils.data.DataLoader(
        ResizedImages(dataset, shard, model.protocol), batch_size=int(cfg.batch_size), shuffle=False,
        num_workers=int(cfg.num_workers), collate_fn=_as_list, pin_memory=device.type == "cuda",
        persistent_workers=False)
    crops: list[int] = []
    agree = {"same": 0, "pixels": 0, "max_abs": 0.0, "images": 0}
    bar = tqdm(loader, desc=f"{cfg.model.name}/{cfg.dataset.name}", unit="batch",
               disable=not cfg.progress or rank != 0, leave=False)
    with torch.inference_mode(), prof.precision_context(cfg.precision, device):
        for items in bar:
            images = [it["image"].to(device, non_blocking=True).float() for it in items]
            x, sizes = model.normalize_and_pad(images)
            outputs = model(x, sizes)
            scores = model.postprocess(outputs, sizes, [it["size"] for it in items])
            crops.extend(int(c) for c in outputs.get("num_crops", []))
            if reference is not None and agree["images"] < int(cfg.compare_fp32_images):
                compare_with_reference(reference, x, sizes, items, scores, agree)
            for item, score in zip(items, scores):
                if not torch.isfinite(score).all():
                    raise BenchError(f"non-finite outputs on {item['file_name']}: the checkpoint holds NaN/Inf "
                                     "weights or the precision overflows; check the weights file")
                labels = proxy_predictions(score.argmax(dim=0), dataset.spec.proxy_label)
                evaluator.process(labels, item["label"].to(device, non_blocking=True))
    extra = {}
    if agree["images"]:
        extra = {"fp32_label_agreement_pct": 100.0 * agree["same"] / agree["pixels"],
                 "fp32_max_abs_score_diff": agree["max_abs"], "fp32_compared_images": agree["images"]}
    if world > 1:  # sum the shards: confusion matrices, image and crop counts
        import torch.distributed as dist

        stats = torch.tensor([evaluator.images, sum(crops), len(crops)], dtype=torch.int64, device=device)
        dist.all_reduce(evaluator.confusion)
        if evaluator.boundary_confusion is not None:
            dist.all_reduce(evaluator.boundary_confusion)
        dist.all_reduce(stats)
        evaluator.images = int(stats[0])
        mean_crops = float(stats[1]) / float(stats[2]) if int(stats[2]) else None
    else:
        mean_crops = float(np.mean(crops)) if crops else None
    k = dataset.num_classes
    conf = evaluator.confusion[:k, :k].cpu()  # rows: prediction, columns: ground truth (ignored pixels excluded)
    extra.update(pred_pixels_per_class=conf.sum(1).tolist(), gt_pixels_per_class=conf.sum(0).tolist())
    return {**evaluator.evaluate(), **extra}, mean_crops


def compare_with_reference(reference, x: torch.Tensor, sizes, items: list[dict], scores, agree: dict) -> None:
    """Run the fp32 reference on the same padded batch (autocast off) and accumulate agreement statistics."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        ref_scores = reference.postprocess(reference(x.float(), sizes), sizes, [it["size"] for it in items])
    for score, ref in zip(scores, ref_scores):
        agree["same"] += int((score.argmax(0) == ref.argmax(0)).sum())
        agree["pixels"] += ref[0].numel()
        agree["max_abs"] = max(agree["max_abs"], float((score.float() - ref).abs().max()))
        agree["images"] += 1


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) under torchrun; the process group is created on first use (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


# ---------------------------------------------------------------------------------------------------- the cell
def base_record(c: dict, key: str, device_name: str = "") -> dict:
    m, d = c["model"], c["dataset"]
    return {"key": key, "status": None, "reason": "", "model": m["name"], "model_display": m.get("display", m["name"]),
            "dataset": d["name"], "dataset_display": d.get("display_name", d["name"]),
            "dataset_protocol": d.get("protocol"), "dataset_variant_of": d.get("variant_of"),
            "resolution": c["resolution"] if c["resolution"] is not None else m["protocol"]["short_side"],
            "resolution_is_protocol": c["resolution"] is None, "precision": c["precision"],
            "batch_size": c["batch_size"], "miou_formula": c["miou_formula"], "repeat": c.get("repeat", 0),
            "pipeline_check": bool(c["synthesize_weights"] or d.get("generate", False)),
            "evaluated": bool(c.get("evaluate", True)), "compile": c.get("compile", "eager"),
            "published": m.get("published") or {}, "model_order": m.get("order", 1000),
            "dataset_order": d.get("order", 1000), "allow_unsafe_pickle": bool(c.get("allow_unsafe_pickle")),
            "config": records.key_inputs(c)}


def absent_inputs(cfg: DictConfig) -> list[str]:
    absent = []
    ckpt = os.path.join(cfg.weights_dir, cfg.model.checkpoint.file)
    if not cfg.synthesize_weights and not os.path.isfile(ckpt):
        absent.append(f"no checkpoint at {ckpt}")
    if missing_data := dataset_absent(cfg):
        absent.append(f"no dataset at {missing_data}")
    return absent


def _run(cfg: DictConfig, rec: dict) -> dict:
    """Fill `rec` in place; returns the per-iteration latency timings (if measured now)."""
    device = resolve_device(cfg.device)
    prof.set_threads(cfg.threads)
    rec.update(records.provenance(device))
    text_cache.set_cache_dir(os.path.join(cfg.results_dir, "cache", "text") if cfg.text_cache else None)
    settings = dataset_settings(cfg)
    rec["dataset_settings"] = json.dumps(settings, sort_keys=True)
    if settings_not_published(cfg):
        rec["note"] = "settings not published (PAS-20's used)"
    rec.update(speed_targets(cfg))
    absent = absent_inputs(cfg) if cfg.evaluate else []
    cached = records.read_record(profile_cache_path(cfg, device))
    if absent and cached is not None:  # nothing to evaluate and the efficiency figures are known: no model build
        rec.update(cached["figures"])
        rec["status"], rec["reason"] = records.STATUS_MISSING, "; ".join(absent)
        _finish_crop_figures(cfg, rec, None)
        return {}

    model = build_model(cfg, device)
    model.configure(**settings)
    rec["applied_settings"] = json.dumps({k: getattr(model, k) for k in settings}, sort_keys=True, default=str)
    figures, timings = {}, {}
    if cached is not None:
        figures = cached["figures"]
    elif is_rank_zero():  # under torchrun only rank 0 measures (and writes) the efficiency figures
        figures, timings = efficiency_figures(cfg, model, device)
    rec.update(figures)
    if absent or not cfg.evaluate:
        rec["status"], rec["reason"] = (records.STATUS_MISSING, "; ".join(absent)) if absent else \
            (records.STATUS_OK, "")
        _finish_crop_figures(cfg, rec, None)
        return timings

    if cfg.synthesize_weights:
        rec["checkpoint_sha256"], rec["checkpoint"] = "", "synthesized (random init)"
    else:
        ck = cfg.model.checkpoint
        ckpt = os.path.join(cfg.weights_dir, ck.file)
        report = load_checkpoint(model, ckpt, tuple(ck.ignore_prefixes or ()), tuple(ck.optional_keys or ()),
                                 allow_unsafe_pickle=bool(cfg.allow_unsafe_pickle),
                                 expected_size=ck.get("size"), expected_sha256=ck.get("sha256"))
        model.to_precision(device, prof.model_dtype(cfg.precision))
        rec.update(checkpoint=ckpt, checkpoint_sha256=report.sha256, ignored_keys=len(report.ignored_keys),
                   load_note=report.note())
    dataset = build_dataset(cfg.dataset, cfg.data_root)
    rec["dataset_images"] = len(dataset)
    rec["dataset_images_official"] = cfg.dataset.get("official_val_images")
    rec["sg_iou_table_official"] = dataset.sg_iou_table_official if dataset.sg_iou_table else None
    model.encode_vocabulary(vocabulary(cfg))
    reference = fp32_reference(cfg, model, device)
    t0 = time.perf_counter()
    metrics, mean_crops = evaluate(cfg, model, dataset, device, cfg.miou_formula, reference)
    rec["eval_seconds"] = time.perf_counter() - t0
    rec["eval_img_s"] = (metrics.get("images") or 0) / rec["eval_seconds"] if rec["eval_seconds"] > 0 else None
    rec["images_evaluated"] = metrics.pop("images", None) or rec["dataset_images"]
    rec["per_class"] = per_class_rows(metrics, dataset.class_names)
    rec.update(metrics)
    _finish_crop_figures(cfg, rec, mean_crops)
    rec["status"] = records.STATUS_OK
    return timings


def fp32_reference(cfg: DictConfig, model, device: torch.device):
    """For a reduced-precision cell: the same model in fp32 with the same weights (None for fp32/tf32 cells)."""
    if cfg.precision in ("fp32", "tf32") or not int(cfg.compare_fp32_images):
        return None
    reference = build_model(cfg, device, dtype=torch.float32)  # seeded: synthesized weights are the same
    if not cfg.synthesize_weights:
        ck = cfg.model.checkpoint
        load_checkpoint(reference, os.path.join(cfg.weights_dir, ck.file), tuple(ck.ignore_prefixes or ()),
                        tuple(ck.optional_keys or ()), allow_unsafe_pickle=bool(cfg.allow_unsafe_pickle),
                        expected_size=ck.get("size"), expected_sha256=ck.get("sha256"))
    reference.configure(**dataset_settings(cfg))
    reference.encode_vocabulary(vocabulary(cfg))
    return reference


def per_class_rows(metrics: dict, class_names: list[str]) -> list[dict]:
    """Pop the per-class entries (IoU-, ACC-, SG-IoU-, BoundaryIoU-, min(IoU, B-Iou)-<name>) into tidy rows."""
    rows = []
    pred = metrics.pop("pred_pixels_per_class", [None] * len(class_names))
    gt = metrics.pop("gt_pixels_per_class", [None] * len(class_names))
    for i, name in enumerate(class_names):
        row = {"class_id": i, "class_name": name, "IoU": metrics.pop(f"IoU-{name}", math.nan),
               "ACC": metrics.pop(f"ACC-{name}", math.nan), "pred_pixels": pred[i], "gt_pixels": gt[i]}
        for metric in ("SG-IoU", "BoundaryIoU", "min(IoU, B-Iou)"):
            if f"{metric}-{name}" in metrics:
                row[metric] = metrics.pop(f"{metric}-{name}")
        rows.append(row)
    return rows


def _finish_crop_figures(cfg: DictConfig, rec: dict, mean_crops: float | None) -> None:
    """Crop models: totals at the evaluated mean crop count, else `profile.crop_count`, else (efficiency-only
    cells) the crop count on the benchmark image, else all 100 queries; then every model: the compute floor and
    the model scope's GFLOPs at the cell's own vocabulary size."""
    if rec.get("has_crops"):
        n = mean_crops
        if n is None:
            n = cfg.profile.crop_count if cfg.profile.crop_count is not None else \
                None if cfg.evaluate else rec.get("crops_on_benchmark_image")
        rec.update(prof.with_crop_count(rec, n))
        rec["mean_crops"] = mean_crops
    if rec.get("peak_gflops"):
        rec.update(prof.add_floor(rec, rec["peak_gflops"]))
    rec.update(dataset_k_figures(rec, len(vocabulary(cfg))))


def input_fingerprints(cfg: DictConfig) -> dict:
    """The inputs an evaluation cell reads, as they are on disk now: the checkpoint (size, mtime, sha256 cached by
    size + mtime) and the dataset (image count, hash of the file list). Efficiency-only cells read neither."""
    out: dict = {"checkpoint": None, "dataset": None}
    if not cfg.evaluate:
        return out
    ckpt = os.path.join(cfg.weights_dir, cfg.model.checkpoint.file)
    if not cfg.synthesize_weights and os.path.isfile(ckpt):
        out["checkpoint"] = fingerprint.checkpoint_fingerprint(ckpt, os.path.join(cfg.results_dir, "cache"))
    if not dataset_absent(cfg):
        try:
            pairs = build_dataset(cfg.dataset, cfg.data_root).pairs
        except BenchError:
            return out   # a wrong layout: the cell itself reports it
        out["dataset"] = fingerprint.dataset_fingerprint([str(p) for pair in pairs for p in pair], root=cfg.data_root,
                                                         n_images=len(pairs))
    return out


def _label(rec: dict) -> str:
    return f"{rec['model']}/{rec['dataset']}@{rec['resolution']} {rec['precision']}"


def run_cell(cfg: DictConfig, locked: bool = False) -> dict:
    """Run one cell, or skip it when its ok record exists and names the inputs present now; write its record
    atomically. A failed recompute (forced, or of a stale cell) keeps the last ok record, with the failure noted
    in it (`rerun_failed`). `locked`: the caller holds the cell's lock (run_cell_isolated)."""
    cfg = bench_config.plain(cfg)
    c = resolved_config(cfg)
    key = records.cell_key(c)
    with contextlib.nullcontext() if locked or not is_rank_zero() else records.cell_lock(cfg.results_dir, key):
        return _run_cell_locked(cfg, c, key)


def _run_cell_locked(cfg: DictConfig, c: dict, key: str) -> dict:
    path = records.record_path(cfg.results_dir, key)
    previous = records.read_record(path)
    previous_ok = previous if previous is not None and previous.get("status") == records.STATUS_OK else None
    inputs = input_fingerprints(cfg)
    if previous_ok is not None and not cfg.force:
        change = fingerprint.describe_change(previous_ok.get("inputs") or {}, inputs)
        if not change:
            print(f"[skip] {_label(previous_ok)}: done ({path})")
            return previous_ok
        print(f"[recompute] {_label(previous_ok)}: {change}")
    rec = base_record(c, key)
    rec["inputs"] = inputs
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
    if not is_rank_zero():
        return rec  # torchrun: only rank 0 writes the (identical) record
    if previous_ok is not None and rec["status"] != records.STATUS_OK:
        return keep_previous(path, previous_ok, rec)
    gap_text = rec.pop("gap_table_text", None)
    if gap_text:
        rec["gap_table"] = f"{key}.gap.txt"
        records.atomic_write_text(os.path.join(os.path.dirname(path), rec["gap_table"]), gap_text)
    if timings:
        records.atomic_write_json(path[:-len(".json")] + ".timings.json", timings)
    records.atomic_write_json(path, rec)   # last: an ok record means everything beside it is written
    print(summary_line(rec))
    return rec


def keep_previous(path: str, previous_ok: dict, failed: dict) -> dict:
    """A recompute that failed never replaces a result: the ok record stays, with the failure written into it."""
    kept = dict(previous_ok, rerun_failed=f"{failed['status']}: {failed.get('reason', '')}",
                rerun_failed_at=failed.get("timestamp") or records.provenance(torch.device("cpu"))["timestamp"])
    records.atomic_write_json(path, kept)
    print(f"[kept] {_label(kept)}: rerun failed ({kept['rerun_failed']}); the last ok record is kept ({path})")
    return dict(kept, rerun_failed_now=True)   # not written: tells the entry point this run produced no result


def summary_line(rec: dict) -> str:
    head = f"[{rec['status']}] {rec['model']}/{rec['dataset']}@{rec['resolution']} {rec['precision']}"
    eff = ""
    if "gflops_model" in rec:
        eff = f" | {rec['gflops_model'] / 2:.1f} GMACs, {rec.get('latency_ms_model_median', math.nan):.0f} ms"
    if rec["status"] == records.STATUS_OK and not rec.get("evaluated", True):
        return f"{head}: efficiency only{eff}"
    if rec["status"] == records.STATUS_OK:
        tag = " (pipeline check)" if rec.get("pipeline_check") else ""
        return f"{head}: mIoU {rec.get('mIoU', math.nan):.2f}{tag}{eff}"
    return f"{head}: {rec['reason']}{eff}"


# ---------------------------------------------------------------------------------------------------- isolation
def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def run_cell_isolated(cfg: DictConfig, job_num: int) -> dict:
    """Run the cell in a fresh child process; if it dies, write the error record it could not write."""
    cfg = bench_config.plain(cfg)
    gpus = _visible_gpus() if cfg.device in ("auto", "cuda") else []
    gpu = gpus[job_num % len(gpus)] if gpus else None
    c = resolved_config(cfg)
    key = records.cell_key(c)
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
    path = records.record_path(cfg.results_dir, key)
    try:
        lock = records.cell_lock(cfg.results_dir, key)
        lock.__enter__()
    except BenchError as e:   # another sweep computes this cell now: report it, write nothing
        rec = dict(base_record(c, key), status="busy", reason=str(e))
        print(f"[busy] {_label(rec)}: {e}")
        return rec
    try:
        before = records.read_record(path)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(c, f)
        try:  # a plain child process: works the same under every launcher (basic, joblib/loky, submitit, torchrun)
            proc = subprocess.run([sys.executable, "-m", "bench.cell", f.name], env=env, preexec_fn=_die_with_parent)
        finally:
            os.unlink(f.name)
        rec = records.read_record(path)
        if proc.returncode != 0 and rec is not None and rec != before and rec.get("rerun_failed"):
            return dict(rec, rerun_failed_now=True)
        if proc.returncode != 0 and (rec is None or rec == before):   # died before writing: never silent
            failed = dict(base_record(c, key), status=records.STATUS_ERROR,
                          reason=f"cell process died with exit code {proc.returncode} (killed or out of memory?)")
            if before is not None and before.get("status") == records.STATUS_OK:
                return keep_previous(path, before, failed)
            records.atomic_write_json(path, failed)
            print(f"[error] {_label(failed)}: {failed['reason']}")
            rec = failed
        return rec
    finally:
        lock.__exit__(None, None, None)


def _die_with_parent() -> None:
    """In the cell's child process: be killed when the sweep process dies (Linux PR_SET_PDEATHSIG), so a killed
    sweep never leaves its cell computing beside the rerun."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":  # `python -m bench.cell CONFIG.json`: the child of run_cell_isolated
    with open(sys.argv[1]) as fh:
        done = run_cell(OmegaConf.create(json.load(fh)), locked=True)   # the parent holds the cell's lock
    sys.exit(0 if done["status"] == records.STATUS_OK and not done.get("rerun_failed_now") else 1)
