"""Semantic-segmentation metrics, numerically compatible with detectron2's `SemSegEvaluator`, plus SCAN's SG-IoU.

One confusion matrix of shape (K+1)×(K+1), rows = prediction, columns = ground truth, the ignore value mapped to
index K, accumulated with `bincount` on the evaluator's device (detectron2 `evaluation/sem_seg_evaluation.py`).
Metrics use the top-left K×K block, so pixels with ignored GT count nowhere. All results are percentages.

Two mIoU formulas exist in detectron2 and both are reported (specs/datasets.md, specs/san.md §5):
  * `current` (after commit f3c1bc19, 2022-07-06): mean IoU over classes present in the GT;
  * `v06` (v0.6 and earlier): Σ IoU over GT-present classes / #classes present in GT *or* predictions, so a class
    predicted but absent from the GT adds 0 to the numerator and 1 to the denominator.
`mIoU` is the one named by `formula`. fwIoU, mACC, pACC and the per-class values are the same under both.

SG-IoU (SCAN's Semantic-Guided IoU, specs/scan.md §5.2): a pixel of GT class c predicted as a related class f
(relation table, `bench/data/sg_iou/*.json`) earns β = (conf[f,c] + conf[f,f]) / pos_pred[f] of a true positive
(β = 1 when f is never predicted); the union keeps the original TP. Reported under both formulas, headlined like
mIoU (clarifications §10), so an empty table gives SG-IoU == mIoU for each formula.

BoundaryIoU, as detectron2's current `SemSegEvaluator` computes it (facebookresearch/detectron2@02b5c4e2,
`detectron2/evaluation/sem_seg_evaluation.py`, `_mask_to_boundary` and `_b_conf_matrix`): each uint8 *label map*
(prediction, and GT with ignore mapped to K) minus its grey-scale erosion by a 3×3 square `d` times, with a one-pixel
zero border (d = max(1, round(0.02 · image diagonal))); a second confusion matrix of these two difference maps gives
`BoundaryIoU-<name>` (NaN where that class's boundary union is empty) and `min(IoU, B-Iou)-<name>` (Python's `min`
of the two, so NaN IoU stays NaN and NaN BoundaryIoU gives the IoU). The maps are label differences, not per-class
binary boundaries: every interior pixel is the pair (0, 0), so class 0 collects them; that is detectron2's number.
detectron2 skips it for K ≥ 255 (uint8) and without OpenCV; here OpenCV is optional: `cv2.erode` when installed, else
the same erosion as a separable window minimum in torch (equal bit for bit, tested), which also runs on the GPU.
Means (ours; detectron2 reports per class only): `BoundaryIoU` over classes with a non-empty boundary union,
`min(IoU, B-Iou)` over the classes whose value is defined (those in the GT). `boundary_iou` says how it was computed
or why it was skipped.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from bench import BenchError

FORMULAS = ("current", "v06")
BOUNDARY_BACKENDS = ("auto", "cv2", "torch", "off")
BOUNDARY_DILATION_RATIO = 0.02   # detectron2 `_mask_to_boundary(dilation_ratio=0.02)`
BOUNDARY_MAX_CLASSES = 254       # detectron2 computes B-IoU only for num_classes < np.iinfo(np.uint8).max
MIN_IOU_BIOU = "min(IoU, B-Iou)"  # detectron2's key, spelling included
SG_IOU_DIR = Path(__file__).resolve().parent / "data" / "sg_iou"

SGTable = Mapping[int, Sequence[int]]


# --------------------------------------------------------------------------------------------------------------
# SG-IoU relation tables


def sg_iou_table_checksum(table: Mapping[int, Any]) -> str:
    """sha256 of `json.dumps({str(k): v for k in sorted(keys)}, separators=(',', ':'))` (specs/scan.md §5.1)."""
    payload = {str(k): table[k] for k in sorted(table)}
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def load_sg_iou_table_raw(name: str) -> tuple[dict[int, Any], dict[str, Any]]:
    """(effective table with values as written — int or list —, file metadata). Duplicate keys: last one wins."""
    path = Path(name) if name.endswith(".json") else SG_IOU_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in SG_IOU_DIR.glob("*.json"))
        raise BenchError(f"SG-IoU table {path} not found; known tables: {known} (dataset sg_iou_table.name)")
    doc = json.loads(path.read_text())
    table: dict[int, Any] = {}
    for key, value in doc["entries"]:
        table[int(key)] = value          # a later duplicate overwrites, as in a Python dict literal
    meta = {k: v for k, v in doc.items() if k != "entries"}
    return table, meta


def load_sg_iou_table(name: str) -> dict[int, tuple[int, ...]]:
    """Relation table `name` (ade847 | pc459 | ade150, or a path to such a JSON) as {gt id: (related ids, ...)}."""
    table, _ = load_sg_iou_table_raw(name)
    return normalize_sg_iou_table(table)


def normalize_sg_iou_table(table: Mapping[int, Any] | None) -> dict[int, tuple[int, ...]]:
    """{c: f} or {c: [f, ...]} -> {c: (f, ...)}; order of the related ids is kept."""
    out: dict[int, tuple[int, ...]] = {}
    for c, f in (table or {}).items():
        out[int(c)] = tuple(int(x) for x in f) if isinstance(f, (list, tuple)) else (int(f),)
    return out


# --------------------------------------------------------------------------------------------------------------
# boundary maps (detectron2 `_mask_to_boundary`)


@functools.lru_cache(maxsize=1)
def _cv2():
    """The OpenCV module, or None when it is not installed."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def boundary_dilation(h: int, w: int, dilation_ratio: float = BOUNDARY_DILATION_RATIO) -> int:
    """Erosion count for an h×w map: max(1, round(ratio · diagonal)), with detectron2's rounding."""
    return max(1, int(round(dilation_ratio * np.sqrt(h ** 2 + w ** 2))))


def _window_min(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Minimum over every window of k consecutive elements along `dim` (length n -> n - k + 1), by doubling."""
    p = 1 << (k.bit_length() - 1)          # largest power of two <= k: two overlapping p-windows cover a k-window
    m, s = x, 1
    while s < p:
        n = m.shape[dim]
        m = torch.minimum(m.narrow(dim, 0, n - s), m.narrow(dim, s, n - s))
        s *= 2
    n = x.shape[dim] - k + 1
    return torch.minimum(m.narrow(dim, 0, n), m.narrow(dim, k - p, n))


def _erode_torch(maps: torch.Tensor, d: int) -> torch.Tensor:
    """`d` 3×3 erosions with zeros beyond the edge = one (2d+1)² window minimum over the zero-padded maps."""
    padded = torch.nn.functional.pad(maps, (d, d, d, d), value=0)
    return _window_min(_window_min(padded, 2 * d + 1, -2), 2 * d + 1, -1)


def _erode_cv2(maps: torch.Tensor, d: int) -> torch.Tensor:
    """detectron2's own calls: copyMakeBorder(1, constant 0), erode(ones 3×3, iterations=d), crop."""
    cv2 = _cv2()
    kernel = np.ones((3, 3), dtype=np.uint8)
    out = []
    for m in maps.reshape(-1, *maps.shape[-2:]).cpu().numpy():
        padded = cv2.copyMakeBorder(m, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        out.append(cv2.erode(padded, kernel, iterations=d)[1:-1, 1:-1])
    return torch.from_numpy(np.stack(out)).reshape(maps.shape).to(maps.device)


def label_boundary(maps: torch.Tensor, dilation_ratio: float = BOUNDARY_DILATION_RATIO,
                   backend: str = "torch") -> torch.Tensor:
    """detectron2's `_mask_to_boundary` of uint8 label maps [..., H, W] (all one size): map − eroded map."""
    if maps.dtype != torch.uint8:
        raise ValueError(f"label_boundary takes uint8 label maps, got {maps.dtype}")
    d = boundary_dilation(maps.shape[-2], maps.shape[-1], dilation_ratio)
    eroded = _erode_cv2(maps, d) if backend == "cv2" else _erode_torch(maps, d)
    return maps - eroded                   # eroded <= map (the window holds the pixel itself): no wrap-around


def _boundary_backend(requested: str, num_classes: int, device: torch.device) -> tuple[str | None, str]:
    """(backend or None, the record's `boundary_iou` note) for a BoundaryIoU request."""
    if requested not in BOUNDARY_BACKENDS:
        raise BenchError(f"boundary_iou={requested!r}; allowed: {list(BOUNDARY_BACKENDS)}")
    if requested == "off":
        return None, "skipped: boundary_iou=off"
    if num_classes > BOUNDARY_MAX_CLASSES:
        return None, (f"skipped: {num_classes} classes (detectron2 computes BoundaryIoU on uint8 label maps, "
                      f"for at most {BOUNDARY_MAX_CLASSES} classes)")
    if requested == "cv2" and _cv2() is None:
        raise BenchError("boundary_iou=cv2 but OpenCV is not installed; pip install opencv-python-headless, "
                         "or use boundary_iou=auto (an exact torch erosion)")
    backend = requested
    if requested == "auto":   # OpenCV as detectron2 when it is there and the maps are on the CPU
        backend = "cv2" if _cv2() is not None and device.type == "cpu" else "torch"
    return backend, f"{backend} erosion, dilation_ratio {BOUNDARY_DILATION_RATIO}"


# --------------------------------------------------------------------------------------------------------------
# metrics from a confusion matrix


def _safe_div(a: np.ndarray | float, b: np.ndarray | float) -> Any:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.true_divide(a, b)


def _mean_ious(iou: np.ndarray, gt_present: np.ndarray, any_present: np.ndarray) -> dict[str, float]:
    """Both detectron2 mIoU formulas, as fractions."""
    n_gt, n_any = int(gt_present.sum()), int(any_present.sum())
    s = float(np.sum(iou[gt_present]))
    return {"current": s / n_gt if n_gt else float("nan"), "v06": s / n_any if n_any else float("nan")}


def evaluate_from_confusion(conf: np.ndarray | torch.Tensor, class_names: Sequence[str] | None = None, *,
                            formula: str = "current", sg_iou_table: Mapping[int, Any] | None = None,
                            per_class: bool = True,
                            boundary_conf: np.ndarray | torch.Tensor | None = None) -> dict[str, Any]:
    """Metrics (percent) from a (K+1)×(K+1) confusion matrix (rows = prediction, columns = GT, last = ignore).

    Keys: mIoU (per `formula`), mIoU_current, mIoU_v06, fwIoU, mACC, pACC, IoU-<name>, ACC-<name> (NaN for
    classes absent from the GT), classes_in_gt, classes_in_gt_or_pred, pixels; with a relation table also
    SG-mIoU (per `formula`), SG-mIoU_current, SG-mIoU_v06, SG-fwIoU, SG-mACC, SG-pACC, SG-IoU-<name>; with the
    boundary confusion matrix also BoundaryIoU, min(IoU, B-Iou), BoundaryIoU-<name>, min(IoU, B-Iou)-<name>.
    """
    if formula not in FORMULAS:
        raise BenchError(f"miou_formula={formula!r}; allowed: {list(FORMULAS)}")
    if isinstance(conf, torch.Tensor):
        conf = conf.detach().cpu().numpy()
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] < 2:
        raise ValueError(f"confusion matrix must be (K+1)x(K+1), got {conf.shape}")
    k = conf.shape[0] - 1
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix")

    block = conf[:k, :k]
    tp = np.diagonal(block).copy()
    pos_gt = block.sum(axis=0)
    pos_pred = block.sum(axis=1)
    union = pos_gt + pos_pred - tp
    total = pos_gt.sum()
    gt_present = pos_gt > 0
    any_present = (pos_gt + pos_pred) > 0

    acc = np.full(k, np.nan)
    iou = np.full(k, np.nan)
    acc[gt_present] = tp[gt_present] / pos_gt[gt_present]
    iou[gt_present] = tp[gt_present] / union[gt_present]     # union >= pos_gt > 0
    weights = _safe_div(pos_gt, total)
    mious = _mean_ious(iou, gt_present, any_present)

    res: dict[str, Any] = {
        "mIoU": 100 * mious[formula],
        "mIoU_current": 100 * mious["current"],
        "mIoU_v06": 100 * mious["v06"],
        "fwIoU": 100 * float(np.sum(iou[gt_present] * weights[gt_present])) if total else float("nan"),
        "mACC": 100 * float(np.mean(acc[gt_present])) if gt_present.any() else float("nan"),
        "pACC": 100 * float(_safe_div(tp.sum(), total)),
        "mIoU_formula": formula,
        "classes_in_gt": int(gt_present.sum()),
        "classes_in_gt_or_pred": int(any_present.sum()),
        "pixels": int(total),
    }
    if per_class:
        for i, n in enumerate(names):
            res[f"IoU-{n}"] = 100 * float(iou[i])
        for i, n in enumerate(names):
            res[f"ACC-{n}"] = 100 * float(acc[i])

    if sg_iou_table is not None:
        table = normalize_sg_iou_table(sg_iou_table)
        _check_table(table, k)
        tp_sg = tp.copy()
        for c in range(k):
            for f in table.get(c, ()):
                beta = (conf[f, c] + conf[f, f]) / pos_pred[f] if pos_pred[f] > 0 else 1.0
                tp_sg[c] += conf[f, c] * beta
        iou_sg = np.full(k, np.nan)
        iou_sg[gt_present] = tp_sg[gt_present] / union[gt_present]   # union with the ORIGINAL tp
        sg = _mean_ious(iou_sg, gt_present, any_present)
        res.update({
            "SG-mIoU": 100 * sg[formula],
            "SG-mIoU_current": 100 * sg["current"],
            "SG-mIoU_v06": 100 * sg["v06"],
            "SG-fwIoU": 100 * float(np.sum(iou_sg[gt_present] * weights[gt_present])) if total else float("nan"),
            "SG-mACC": (100 * float(np.mean(tp_sg[gt_present] / pos_gt[gt_present]))
                        if gt_present.any() else float("nan")),
            "SG-pACC": 100 * float(_safe_div(tp_sg.sum(), total)),
        })
        if per_class:
            for i, n in enumerate(names):
                res[f"SG-IoU-{n}"] = 100 * float(iou_sg[i])
    if boundary_conf is not None:
        res.update(_boundary_metrics(boundary_conf, iou, names, per_class))
    return res


def _boundary_metrics(b_conf: np.ndarray | torch.Tensor, iou: np.ndarray, names: Sequence[str],
                      per_class: bool) -> dict[str, Any]:
    """detectron2's BoundaryIoU from the boundary confusion matrix, min(IoU, B-Iou), and their means."""
    b = np.asarray(b_conf.detach().cpu().numpy() if isinstance(b_conf, torch.Tensor) else b_conf, dtype=np.float64)
    k = len(names)
    if b.shape != (k + 1, k + 1):
        raise ValueError(f"boundary confusion matrix {b.shape} for {k} classes")
    tp = np.diagonal(b)[:k]
    union = b[:k, :k].sum(axis=0) + b[:k, :k].sum(axis=1) - tp
    valid = union > 0
    b_iou = np.full(k, np.nan)
    b_iou[valid] = tp[valid] / union[valid]
    low = np.where(b_iou < iou, b_iou, iou)          # Python's min(iou, b_iou): NaN iou stays, NaN b_iou -> iou
    res: dict[str, Any] = {
        "BoundaryIoU": 100 * float(np.mean(b_iou[valid])) if valid.any() else float("nan"),
        MIN_IOU_BIOU: 100 * float(np.mean(low[~np.isnan(low)])) if (~np.isnan(low)).any() else float("nan"),
    }
    if per_class:
        for i, n in enumerate(names):
            res[f"BoundaryIoU-{n}"] = 100 * float(b_iou[i])
            res[f"{MIN_IOU_BIOU}-{n}"] = 100 * float(low[i])
    return res


def _check_table(table: Mapping[int, Sequence[int]], k: int) -> None:
    bad = sorted({c for c in table if not 0 <= c < k} | {f for fs in table.values() for f in fs if not 0 <= f < k})
    if bad:
        raise BenchError(f"SG-IoU relation table has class ids {bad[:5]} outside [0, {k}); it belongs to another "
                         f"dataset (check the dataset's sg_iou_table)")


# --------------------------------------------------------------------------------------------------------------
# the evaluator


class SemSegEvaluator:
    """detectron2-style `reset / process / evaluate` over label maps.

    `process(pred, gt)` takes one image: pred = argmax class ids [H, W] in [0, K), gt = ids [H, W] in [0, K) or
    `ignore_label` (torch tensors or numpy arrays). For sharded runs, all-reduce `evaluator.confusion` in place (it
    is the live buffer), or `merge()` evaluators, or ship `state_dict()`s and `evaluate_from_confusion` the sum.
    """

    def __init__(self, num_classes: int, ignore_label: int, class_names: Sequence[str] | None = None,
                 device: str | torch.device = "cpu", sg_iou_table: str | Mapping[int, Any] | None = None,
                 formula: str = "current", boundary_iou: str = "auto"):
        if formula not in FORMULAS:
            raise BenchError(f"miou_formula={formula!r}; allowed: {list(FORMULAS)}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for num_classes={self.num_classes}")
        if 0 <= self.ignore_label < self.num_classes:
            raise ValueError(f"ignore_label {self.ignore_label} is a class id (num_classes={self.num_classes})")
        self.device = torch.device(device)
        self.formula = formula
        if isinstance(sg_iou_table, str):
            sg_iou_table = load_sg_iou_table(sg_iou_table)
        self.sg_iou_table = None if sg_iou_table is None else normalize_sg_iou_table(sg_iou_table)
        if self.sg_iou_table is not None:
            _check_table(self.sg_iou_table, self.num_classes)
        self.boundary_backend, self.boundary_note = _boundary_backend(boundary_iou, self.num_classes, self.device)
        self.reset()

    def reset(self) -> None:
        n = self.num_classes + 1
        self.confusion = torch.zeros((n, n), dtype=torch.int64, device=self.device)
        # detectron2's `_b_conf_matrix` (None when BoundaryIoU is skipped); all-reduce it like `confusion`
        self.boundary_confusion = (torch.zeros_like(self.confusion) if self.boundary_backend else None)
        self.images = 0

    def _as_tensor(self, x: Any) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        return t.to(device=self.device, dtype=torch.int64)

    def process(self, pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray) -> None:
        pred, gt = self._as_tensor(pred), self._as_tensor(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(gt.shape)} differ in size")
        k = self.num_classes
        gt = torch.where(gt == self.ignore_label, torch.full_like(gt, k), gt)
        if bool(((gt < 0) | (gt > k)).any()):
            bad = torch.unique(gt[(gt < 0) | (gt > k)])[:5].tolist()
            raise ValueError(f"label values {bad} outside [0, {k}) and not ignore {self.ignore_label}")
        if bool(((pred < 0) | (pred >= k)).any()):
            bad = torch.unique(pred[(pred < 0) | (pred >= k)])[:5].tolist()
            raise ValueError(f"prediction values {bad} outside [0, {k})")
        self.confusion += self._bincount(pred, gt)
        if self.boundary_backend:
            b_pred, b_gt = label_boundary(torch.stack([pred, gt]).to(torch.uint8), backend=self.boundary_backend)
            self.boundary_confusion += self._bincount(b_pred.long(), b_gt.long())
        self.images += 1

    def _bincount(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        k = self.num_classes
        idx = ((k + 1) * pred + gt).reshape(-1)
        return torch.bincount(idx, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)

    def merge(self, other: "SemSegEvaluator | torch.Tensor | np.ndarray") -> "SemSegEvaluator":
        """Add another shard's confusion matrix (an evaluator, with its boundary matrix, or the matrix itself)."""
        conf = other.confusion if isinstance(other, SemSegEvaluator) else torch.as_tensor(np.asarray(other))
        if tuple(conf.shape) != tuple(self.confusion.shape):
            raise ValueError(f"cannot merge a {tuple(conf.shape)} confusion matrix into {tuple(self.confusion.shape)}")
        self.confusion += conf.to(self.confusion)
        if isinstance(other, SemSegEvaluator):
            self.images += other.images
            if self.boundary_confusion is not None and other.boundary_confusion is not None:
                self.boundary_confusion += other.boundary_confusion.to(self.boundary_confusion)
        return self

    def state_dict(self) -> dict[str, Any]:
        b = self.boundary_confusion
        return {"confusion": self.confusion.detach().cpu().clone(), "images": self.images,
                "num_classes": self.num_classes, "ignore_label": self.ignore_label,
                "boundary_confusion": None if b is None else b.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["num_classes"]) != self.num_classes:
            raise ValueError(f"state is for {state['num_classes']} classes, evaluator has {self.num_classes}")
        self.confusion = torch.as_tensor(state["confusion"]).to(self.confusion).clone()
        self.images = int(state.get("images", 0))
        if self.boundary_confusion is not None and state.get("boundary_confusion") is not None:
            self.boundary_confusion = torch.as_tensor(state["boundary_confusion"]).to(self.confusion).clone()
        elif self.boundary_confusion is not None:   # an older state without it: no BoundaryIoU for this one
            self.boundary_backend, self.boundary_note = None, "skipped: state without a boundary confusion matrix"
            self.boundary_confusion = None

    def evaluate(self, per_class: bool = True) -> dict[str, Any]:
        res = evaluate_from_confusion(self.confusion, self.class_names, formula=self.formula,
                                      sg_iou_table=self.sg_iou_table, per_class=per_class,
                                      boundary_conf=self.boundary_confusion)
        res["images"] = self.images
        res["boundary_iou"] = self.boundary_note
        return res


def merge_confusions(confusions: Iterable[torch.Tensor | np.ndarray]) -> torch.Tensor:
    """Sum of shard confusion matrices (CPU int64)."""
    out = None
    for c in confusions:
        t = torch.as_tensor(np.asarray(c) if not isinstance(c, torch.Tensor) else c).to("cpu", torch.int64)
        out = t.clone() if out is None else out + t
    if out is None:
        raise ValueError("no confusion matrices to merge")
    return out
