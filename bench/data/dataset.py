"""The torch Dataset over one split's (image, label) pairs, and the full-scan check of a prepared dataset.

Images are read as detectron2's `read_image(format="RGB")` reads them (EXIF orientation applied, PIL conversion to
RGB), except that 16-bit greyscale images are scaled to 8 bits instead of clipped. Labels are read as detectron2's
SemSegEvaluator reads them: `np.asarray(Image.open(f))`, so a palette PNG gives its indices, never colours.
Every problem a user can fix is a one-line BenchError naming the file.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from bench import BenchError
from bench.data.layouts import (DatasetSpec, Layout, find_layout, label_order_lut, load_class_names, pair_files,
                                spec_from_cfg)

log = logging.getLogger(__name__)

try:
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover - torch is a dependency
    _TorchDataset = object  # type: ignore[assignment,misc]

_EXIF_ORIENTATION = 274
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
_LABEL_MODES_8 = {"L", "P", "1"}
_LABEL_MODES_16 = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_UNREADABLE = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def _open(path: Path, what: str) -> Image.Image:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BenchError(f"cannot read {what} {path}: {e.strerror}; restore the file") from None
    if size == 0:
        raise BenchError(f"{what} {path} is empty (0 bytes); re-copy or re-create it")
    try:
        with open(path, "rb") as f:   # closed here: pixels are loaded, nothing stays open
            im = Image.open(f)
            im.load()
    except _UNREADABLE as e:
        reason = str(e).splitlines()[0] if str(e) else "corrupt"
        raise BenchError(f"{what} {path} is unreadable ({type(e).__name__}: {reason}); "
                         f"re-copy or re-create it") from None
    return im


def _exif_transpose(im: Image.Image) -> Image.Image:
    """detectron2 `_apply_exif_orientation`: rotate/flip by the EXIF Orientation tag, ignoring broken EXIF."""
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - broken EXIF is ignored, as detectron2 does
        return im
    method = _TRANSPOSE.get(orientation)
    return im.transpose(method) if method is not None else im


def read_image(path: str | os.PathLike) -> np.ndarray:
    """HWC uint8 RGB. Greyscale, palette, CMYK, RGBA, YCbCr go through PIL's RGB conversion; 16-bit greyscale is
    scaled by 1/257 (PIL's own conversion would clip it)."""
    path = Path(path)
    im = _exif_transpose(_open(path, "image"))
    if im.mode in _LABEL_MODES_16:
        a = np.asarray(im).astype(np.float64)
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    if im.mode in ("F",):
        raise BenchError(f"image {path} is a float (mode F) image; save it as 8-bit RGB JPEG")
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except (ValueError, OSError) as e:
            raise BenchError(f"image {path} has mode {im.mode}, which cannot be converted to RGB ({e}); save it as an "
                             f"8-bit RGB JPEG") from None
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def read_label(path: str | os.PathLike, label_bits: int = 8) -> np.ndarray:
    """HW int64 class ids as stored (no value check). Colour-coded (RGB) labels and 8-bit labels in a 16-bit dataset
    raise BenchError naming the file."""
    path = Path(path)
    im = _open(path, "label")
    if im.mode in _LABEL_MODES_8:
        if label_bits == 16:
            raise BenchError(f"label {path} is 8-bit ({im.mode}) but this dataset's labels are 16-bit TIFF (ids up to "
                             f"65535, ignore 65535); re-create it as uint16 TIFF")
    elif im.mode not in _LABEL_MODES_16:
        raise BenchError(f"label {path} has mode {im.mode} (colour-coded or float); labels must be single-channel "
                         f"class ids ({'16-bit TIFF' if label_bits == 16 else '8-bit PNG'}); convert it with the "
                         f"dataset's prepare script")
    return np.asarray(im).astype(np.int64)


def bad_label_values(label: np.ndarray, num_classes: int, ignore_label: int) -> np.ndarray:
    """Sorted distinct values outside [0, num_classes) ∪ {ignore_label}."""
    bad = ((label < 0) | (label >= num_classes)) & (label != ignore_label)
    return np.unique(label[bad]) if bad.any() else np.zeros(0, dtype=label.dtype)


class SemSegDataset(_TorchDataset):
    """Items: dict(image=HWC uint8 RGB, label=HW int64, file_name=str, label_file=str).

    Each label is checked when read: values must be in [0, num_classes) or equal `ignore_label`, and the label must
    have the image's size. Labels written in another id order (`label_order`) are remapped to the dataset's ids.
    """

    def __init__(self, spec: DatasetSpec, layout: Layout, pairs: list[tuple[Path, Path]], class_names: list[str],
                 data_root: str | os.PathLike, label_lut: list[int] | None = None):
        self.spec = spec
        self.layout = layout
        self.pairs = pairs
        self.class_names = class_names
        self.data_root = str(data_root)
        self._lut = None
        if label_lut is not None:
            size = max(spec.ignore_label, len(label_lut)) + 1
            self._lut = np.arange(size, dtype=np.int64)
            self._lut[: len(label_lut)] = label_lut

    # -- metadata ---------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def ignore_label(self) -> int:
        return self.spec.ignore_label

    @property
    def file_names(self) -> list[str]:
        return [str(i) for i, _ in self.pairs]

    @property
    def sg_iou_table(self) -> str | None:
        """Name of the SG-IoU relation table for this dataset (`bench/data/sg_iou/<name>.json`), or None."""
        return (self.spec.sg_iou_table or {}).get("name")

    @property
    def sg_iou_table_official(self) -> bool:
        """True only where SCAN's official evaluator uses the table (A-847)."""
        return bool((self.spec.sg_iou_table or {}).get("official", False))

    @property
    def is_complete(self) -> bool:
        """True when the number of pairs equals the official val count."""
        return self.spec.official_val_images is None or len(self) == self.spec.official_val_images

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return (f"SemSegDataset({self.spec.display_name}: {len(self)} images, {self.num_classes} classes, "
                f"ignore {self.ignore_label}, {self.data_root}/{self.layout.label_dir})")

    # -- items ------------------------------------------------------------------------------------------------
    def load_label(self, index: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        """The checked (and, if needed, remapped) label of item `index`."""
        img_path, lbl_path = self.pairs[index]
        label = read_label(lbl_path, self.layout.label_bits)
        bad = bad_label_values(label, self.num_classes, self.ignore_label)
        if bad.size:
            shown = ", ".join(str(int(v)) for v in bad[:5]) + (" ..." if bad.size > 5 else "")
            raise BenchError(f"label {lbl_path} has values {shown} outside [0, {self.num_classes}) and not the "
                             f"ignore value {self.ignore_label}; re-create it with the {self.spec.display_name} "
                             f"prepare script")
        if shape is not None and label.shape != tuple(shape):
            raise BenchError(f"label {lbl_path} is {label.shape[1]}x{label.shape[0]} (WxH) but its image {img_path} is "
                             f"{shape[1]}x{shape[0]}; labels must have the image's size")
        if self._lut is not None:
            label = self._lut[label]
        return label

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        img_path, lbl_path = self.pairs[index]
        image = read_image(img_path)
        label = self.load_label(index, image.shape[:2])
        return {"image": image, "label": label, "file_name": str(img_path), "label_file": str(lbl_path)}


def build_dataset(cfg_dataset: Any, data_root: str | os.PathLike) -> SemSegDataset:
    """Dataset config (`cfg.dataset`, DictConfig or dict) + data root -> `SemSegDataset`.

    A config with `generate: true` (the synthetic set) is written under `data_root` on first use.
    """
    spec = cfg_dataset if isinstance(cfg_dataset, DatasetSpec) else spec_from_cfg(cfg_dataset)
    class_names = load_class_names(spec.classes_file)
    if len(class_names) != spec.num_classes:
        raise BenchError(f"conf/dataset/{spec.name}.yaml: num_classes={spec.num_classes} but {spec.classes_file} lists "
                         f"{len(class_names)} classes; fix one of them")
    if spec.generate and not (Path(data_root) / spec.layout.label_dir).is_dir():
        from bench.data.synth import synthesize_spec

        synthesize_spec(spec, data_root, atomic=True)
    layout = find_layout(spec, data_root)
    pairs = pair_files(spec, layout, data_root)
    lut = label_order_lut(spec)
    if lut is not None:
        log.info("%s: labels in %r id order are remapped to %s", spec.display_name, spec.label_order, spec.classes_file)
    return SemSegDataset(spec, layout, pairs, class_names, data_root, lut)


# --------------------------------------------------------------------------------------------------------------
# full scan (bench.data.check)


@dataclass
class CheckReport:
    """What `check_dataset` found: counts, per-class pixel totals, one line per bad file (`problems`) and remarks
    that are not errors (`notes`, e.g. fewer pairs than the official split)."""

    dataset: str
    root: str
    layout: str
    n_pairs: int
    official_val_images: int | None
    n_checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pixels_per_class: np.ndarray | None = None
    ignore_pixels: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def classes_present(self) -> int:
        return 0 if self.pixels_per_class is None else int((self.pixels_per_class > 0).sum())

    def summary(self) -> str:
        count = f"{self.n_pairs} pairs"
        if self.official_val_images and self.n_pairs != self.official_val_images:
            count += f" (official val split: {self.official_val_images})"
        k = 0 if self.pixels_per_class is None else len(self.pixels_per_class)
        state = "ok" if self.ok else f"{len(self.problems)} bad file(s)"
        return (f"{self.dataset}: {state}; {count}, {self.n_checked} checked, {self.classes_present}/{k} classes "
                f"present, layout {self.layout}")


def check_dataset(cfg_dataset: Any, data_root: str | os.PathLike, max_images: int | None = None) -> CheckReport:
    """Read every pair (or the first `max_images`) and collect each problem as one line instead of stopping.

    Layout problems (missing folders, unpaired files) still raise BenchError: nothing can be scanned without pairs.
    """
    ds = build_dataset(cfg_dataset, data_root)
    report = CheckReport(ds.spec.display_name, str(data_root), ds.layout.describe(data_root), len(ds),
                         ds.spec.official_val_images)
    if not ds.is_complete:
        report.notes.append(f"{len(ds)} image/label pairs, the official val split has {ds.spec.official_val_images}")
    counts = np.zeros(ds.num_classes, dtype=np.int64)
    n = len(ds) if max_images is None else min(len(ds), max_images)
    for i in range(n):
        try:
            item = ds[i]
        except BenchError as e:
            report.problems.append(str(e))
            continue
        label = item["label"]
        valid = label != ds.ignore_label
        counts += np.bincount(label[valid].ravel(), minlength=ds.num_classes)[: ds.num_classes]
        report.ignore_pixels += int((~valid).sum())
        report.n_checked += 1
    report.pixels_per_class = counts
    return report
