"""Convert the official raw downloads into the prepared layouts the benchmark reads (SAN's tree under data_root).

    python -m bench.data.prepare dataset=ade150 src=RAW_DIR [data_root=DIR] [force=false] [images=copy|symlink]
                                 [progress=true] [allow_unsafe_pickle=false] [pc59_source=json|mat] [anno_dir=DIR]

What each converter does is what the official `prepare_*.py` script does (specs/datasets.md "How the labels are
produced"); the id tables are data in `bench/data/prepare_tables/` with their sources:

  ade150  ADEChallengeData2016/annotations/validation/*.png (uint8, 0 = other)  -> `value - 1` on uint8 (0 -> 255)
          detectron2/SAN datasets/prepare_ade20k_sem_seg.py L12-16. Images are used as they are.
  ade847  ADE20K_2021_17_01/index_ade20k.pkl + <folder>/<ADE_val_*>_seg.png: class = int(R/10)*256 + G, mapped through
          the 847-entry id table (everything else -> 65535), uint16 TIFF; image and label resized to short side 512
          when the short side is > 512 (bilinear / nearest, as cv2.resize) and the image re-saved as JPEG with PIL's
          defaults. MaskFormer datasets/prepare_ade20k_full_sem_seg.py L932-1007 (validation entries only).
  pc59    VOC2010/trainval_merged.json (PASCAL in Detail): each val image's segmentation RLEs painted with their
          category id in file order (Detail.getMask), then rank among the 60 sorted ids {0 + 59 classes} - 1 as uint8
          (0 -> 255). SAN datasets/prepare_pcontext_sem_seg_59cls.py L37-150. `pc59_source=mat` derives the same
          values from the Pascal-Context .mat LabelMap instead (SCAN's route, values in SAN's order).
  pc459   <anno_dir>/<id>.mat `LabelMap` (Pascal-Context trainval.tar.gz) - 1 on uint16 (0 -> 65535), TIFF, for the
          val ids of trainval_merged.json (or CAT-Seg's pascalcontext_val.txt). SAN prepare_pcontext_sem_seg_459cls.py.
  voc20   VOC2012/SegmentationClassAug (else SegmentationClass) PNGs of ImageSets/Segmentation/val.txt: 0 -> 255,
          k -> k-1, everything else 255; files that end up all-255 are not written. SAN prepare_voc_sem_seg.py.
  voc20b  the same with background 0 -> 20. CAT-Seg datasets/prepare_voc.py L15-77.

Everything is written into a temporary folder under data_root and renamed into place at the end, so a failure
(printed as one line) leaves nothing half-written. Only the standard library, numpy and PIL are needed. The .mat
files are read with `scipy.io.loadmat` and the COCO RLEs decoded with `pycocotools.mask` (what the official scripts
use) when those are installed (`pip install -e .[prepare]`), else with the MATLAB v5 reader and the RLE decoder
here, which give the same labels (tests/test_prepare.py checks both routes on the synthetic raw files). A
restricted pickle loader is here too. The one thing that can differ from the official output is ADE-847's *image*
pixels when cv2 is not installed (see `resize_linear_u8`); labels are exact.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import shutil
import struct
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from bench import BenchError
from bench.cli import error, parse_overrides
from bench.data.layouts import DatasetSpec, Layout, layout_family, layout_status, resolve_data_root, spec_from_cfg

log = logging.getLogger(__name__)

TABLES_DIR = Path(__file__).with_name("prepare_tables")
DATASETS = ("ade150", "ade847", "pc59", "pc459", "voc20", "voc20b")


# --------------------------------------------------------------------------------------------------------------
# id tables (data files with their sources in the header)


def _read_table(name: str) -> list[tuple[int, int, str]]:
    rows = []
    for line in (TABLES_DIR / name).read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            a, b, n = line.split("\t")
            rows.append((int(a), int(b), n))
    return rows


@lru_cache(maxsize=None)
def ade847_id_table() -> dict[int, int]:
    """ADE20K_2021_17_01 object id -> A-847 trainId (MaskFormer's 847-entry table)."""
    return {ade_id: train_id for train_id, ade_id, _ in _read_table("ade847_ade_ids.tsv")}


@lru_cache(maxsize=None)
def pc59_ids() -> tuple[int, ...]:
    """The 59 Pascal-Context / Detail category ids in label order (sorted; label k = k-th id)."""
    return tuple(pc_id for _, pc_id, _ in _read_table("pc59_detail_ids.tsv"))


# --------------------------------------------------------------------------------------------------------------
# pure converters: raw array -> prepared label array


def ade150_label(raw: np.ndarray) -> np.ndarray:
    """ADEChallengeData2016 annotation (uint8, 0 = other, 1..150 classes) -> class - 1 on uint8 (0 wraps to 255)."""
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError(f"expected a single-channel uint8 annotation, got {raw.dtype} {raw.shape}")
    return raw - np.uint8(1)


def ade_full_class_mask(seg: np.ndarray) -> np.ndarray:
    """ADE20K full `*_seg.png` (RGB) -> object class id int32 = int(R / 10) * 256 + G."""
    if seg.ndim != 3 or seg.shape[2] < 2:
        raise ValueError(f"expected an RGB *_seg.png, got shape {seg.shape}")
    r = seg[:, :, 0].astype(np.int32)
    g = seg[:, :, 1].astype(np.int32)
    return (r // 10) * 256 + g


def ade847_label(class_mask: np.ndarray) -> np.ndarray:
    """Object class ids -> uint16 trainIds through the 847-entry table; every other id (0 included) -> 65535."""
    table = ade847_id_table()
    lut = np.full(max(int(class_mask.max(initial=0)), max(table)) + 1, 65535, dtype=np.uint16)
    for ade_id, train_id in table.items():
        lut[ade_id] = train_id
    return lut[class_mask]


def ade847_target_size(h: int, w: int, max_size: int = 512) -> tuple[int, int] | None:
    """(h, w) after MaskFormer's resize (short side -> 512 when it is > 512; Python round), or None."""
    if w >= h > max_size:
        return max_size, round(w / float(h) * max_size)
    if h >= w > max_size:
        return round(h / float(w) * max_size), max_size
    return None


def _nn_index(src: int, dst: int) -> np.ndarray:
    # cv2 resizeNN: sx = floor(x * (1 / (dst / src))), clipped to src - 1 (double arithmetic)
    inv = 1.0 / (float(dst) / float(src))
    return np.minimum(np.floor(np.arange(dst, dtype=np.float64) * inv).astype(np.int64), src - 1)


def resize_nearest(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """cv2.resize(a, (w, h), interpolation=INTER_NEAREST), index for index."""
    return a[_nn_index(a.shape[0], h)[:, None], _nn_index(a.shape[1], w)[None, :]]


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # cv2 resizeGeneric (INTER_LINEAR): fx = float((d + 0.5) * scale - 0.5), sx = floor, edge-clamped; 11-bit weights
    scale = 1.0 / (float(dst) / float(src))
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    low = s < 0
    f[low], s[low] = 0, 0
    high = s >= src - 1
    f[high], s[high] = 0, src - 1
    a0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int64)
    a1 = np.rint(f * np.float32(2048)).astype(np.int64)
    return s, a0, a1


def resize_linear_u8(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """cv2.resize(img, (w, h), interpolation=INTER_LINEAR) for uint8 HW or HWC images.

    Uses cv2 itself when it is installed (what the official script runs). Otherwise a numpy re-implementation of
    OpenCV's fixed-point path: float32 source coordinates, 11-bit weights rounded separately, horizontal pass in
    int32, vertical pass as OpenCV's SIMD kernel ((b0*(D0>>4))>>16 + (b1*(D1>>4))>>16 + 2) >> 2 on every value.
    Bit-exact with opencv-python-headless 5.0.0.93 (checked on ~15M values, HWC and HW, the A-847 size rule); a
    build that rounds some values with its scalar kernel instead may differ by 1 there. Labels never go through this.
    """
    try:
        import cv2  # type: ignore[import-not-found]

        return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    except ImportError:
        pass
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    squeeze = img.ndim == 2
    a = img[:, :, None] if squeeze else img
    sh, sw, cn = a.shape
    sx, a0, a1 = _linear_taps(sw, w)
    sy, b0, b1 = _linear_taps(sh, h)
    sx1 = np.minimum(sx + 1, sw - 1)
    src = a.astype(np.int64)
    horiz = src[:, sx, :] * a0[None, :, None] + src[:, sx1, :] * a1[None, :, None]       # (sh, w, cn)
    d0 = horiz[sy].reshape(h, w * cn)
    d1 = horiz[np.minimum(sy + 1, sh - 1)].reshape(h, w * cn)
    bb0, bb1 = b0[:, None], b1[:, None]
    out = ((((d0 >> 4) * bb0) >> 16) + (((d1 >> 4) * bb1) >> 16) + 2) >> 2      # OpenCV's SIMD vertical kernel
    out = np.clip(out, 0, 255).astype(np.uint8).reshape(h, w, cn)
    return out[:, :, 0] if squeeze else out


def pc59_label(detail_mask: np.ndarray) -> np.ndarray:
    """Detail class mask (0 = background, else a category id) -> uint8 rank among {0} ∪ 59 ids, minus 1 (0 -> 255).
    Ids outside the 60 raise ValueError, as the official script's assert does."""
    ids = (0,) + pc59_ids()
    m = np.asarray(detail_mask).astype(np.int64)
    lut = np.full(max(int(m.max(initial=0)), ids[-1]) + 1, -1, dtype=np.int64)
    lut[list(ids)] = np.arange(len(ids))
    if (m < 0).any() or (lut[m] < 0).any():
        bad = sorted(set(np.unique(m).tolist()) - set(ids))[:5]
        raise ValueError(f"category ids {bad} are not among the 59 PC-59 classes")
    return (lut[m].astype(np.uint8) - np.uint8(1)).astype(np.uint8)


def pc59_label_from_labelmap(label_map: np.ndarray) -> np.ndarray:
    """Pascal-Context LabelMap (labels.txt ids, 0 = unlabeled) -> PC-59 label in SAN's order; other ids -> 255."""
    ids = pc59_ids()
    m = _as_uint16_ids(label_map).astype(np.int64)
    lut = np.full(max(int(m.max(initial=0)), ids[-1]) + 1, 255, dtype=np.uint8)
    lut[list(ids)] = np.arange(len(ids), dtype=np.uint8)
    return lut[m]


def _as_uint16_ids(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D LabelMap, got shape {a.shape}")
    if a.dtype == np.uint16:
        return a
    if not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise ValueError(f"LabelMap holds non-integer values ({a.dtype})")
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise ValueError(f"LabelMap values {a.min()}..{a.max()} do not fit uint16")
    return a.astype(np.uint16)


def pc459_label(label_map: np.ndarray) -> np.ndarray:
    """Pascal-Context LabelMap (1..459, 0 = unlabeled) -> LabelMap - 1 on uint16 (0 wraps to 65535)."""
    return _as_uint16_ids(label_map) - np.uint16(1)


def voc_label(raw: np.ndarray, background: bool) -> np.ndarray:
    """VOC SegmentationClass indices -> k-1 for k = 1..20; 0 -> 20 if `background` else 255; all else 255."""
    if raw.ndim != 2:
        raise ValueError(f"expected palette/greyscale indices, got shape {raw.shape} (a colour PNG?)")
    lut = np.full(256, 255, dtype=np.uint8)
    lut[1:21] = np.arange(20, dtype=np.uint8)
    lut[0] = 20 if background else 255
    a = np.asarray(raw).astype(np.int64)
    return np.where((a >= 0) & (a < 256), lut[np.clip(a, 0, 255)], 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# raw formats: COCO RLE, MATLAB v5 .mat, restricted pickle


def rle_counts_from_string(s: str | bytes) -> list[int]:
    """COCO compressed RLE string -> run lengths (pycocotools/Detail `rleFrString`: 5-bit groups + 48, sign bit 0x10,
    continuation 0x20, counts after the 3rd stored as differences to the count two back)."""
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(rle: dict) -> np.ndarray:
    """{'size': [h, w], 'counts': str | list} -> uint8 HxW mask (runs alternate 0/1 from 0, column-major)."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = list(counts) if isinstance(counts, (list, tuple)) else rle_counts_from_string(counts)
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise ValueError(f"RLE runs sum to {sum(counts)}, expected {h}x{w} = {h * w}")
    flat = np.repeat(np.arange(len(counts), dtype=np.uint8) % 2, counts)
    return flat.reshape(w, h).T.copy()


def optional_module(name: str):
    """The module `name` (scipy.io, pycocotools.mask) if it is installed, else None (our own reader is used)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def decode_rle(rle: dict) -> np.ndarray:
    """A COCO RLE -> uint8 HxW mask: pycocotools.mask (the Detail API's decoder) when installed, else `rle_decode`."""
    mask_api = optional_module("pycocotools.mask")
    if mask_api is None:
        return rle_decode(rle)
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (list, tuple)):
        if any(c < 0 for c in counts) or sum(counts) != h * w:
            raise ValueError(f"RLE runs sum to {sum(counts)}, expected {h}x{w} = {h * w}")
        compressed = mask_api.frPyObjects({"size": [h, w], "counts": list(counts)}, h, w)
    else:
        compressed = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():   # pycocotools 2.0.x's __array__ use warns under numpy 2 (same values)
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_api.decode(compressed)


def detail_class_mask(anns: Iterable[dict], height: int, width: int) -> np.ndarray:
    """Detail.getMask(img) for a whole image: zeros, then each annotation's RLE painted with its category_id, in
    the given (file) order, later ones on top."""
    mask = np.zeros((height, width), dtype=np.int64)
    for ann in anns:
        m = decode_rle(ann["segmentation"])
        if m.shape != mask.shape:
            raise ValueError(f"annotation {ann.get('id')} is {m.shape[1]}x{m.shape[0]}, the image {width}x{height}")
        mask[m != 0] = int(ann["category_id"])
    return mask


_MI_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MX_CLASSES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15


def _mat_element(buf: bytes, pos: int, e: str) -> tuple[int, bytes, int]:
    """(type, payload, next position) of the data element at `pos`; small-element format included."""
    word = struct.unpack_from(e + "I", buf, pos)[0]
    if word >> 16:
        n = word >> 16
        return word & 0xFFFF, buf[pos + 4: pos + 4 + n], pos + 8
    typ, n = struct.unpack_from(e + "II", buf, pos)
    start = pos + 8
    nxt = start + n if typ == _MI_COMPRESSED else start + (n + 7) // 8 * 8
    return typ, buf[start: start + n], nxt


def _mat_matrix(buf: bytes, e: str) -> tuple[str, np.ndarray | None]:
    typ, flags, pos = _mat_element(buf, 0, e)
    cls = struct.unpack_from(e + "I", flags)[0] & 0xFF
    _, dims, pos = _mat_element(buf, pos, e)
    _, name, pos = _mat_element(buf, pos, e)
    var = name.decode("latin-1")
    if cls not in _MX_CLASSES:                  # cell, struct, char, sparse, object: not needed here
        return var, None
    rtyp, real, _ = _mat_element(buf, pos, e)
    if rtyp not in _MI_TYPES:
        raise ValueError(f"variable {var!r}: unsupported storage type {rtyp}")
    shape = tuple(int(d) for d in np.frombuffer(dims, np.dtype("i4").newbyteorder(e)))
    values = np.frombuffer(real, np.dtype(_MI_TYPES[rtyp]).newbyteorder(e)).astype(_MX_CLASSES[cls])
    return var, values.reshape(shape, order="F")


def read_mat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Numeric variables of a MATLAB v5 .mat file (what scipy.io.loadmat returns for them; compressed or not)."""
    buf = Path(path).read_bytes()
    if len(buf) < 128:
        raise ValueError("shorter than a MAT-file header")
    if buf[:10] == b"MATLAB 7.3":
        raise ValueError("MATLAB v7.3 (HDF5) file; re-save it with -v7, or convert it with h5py")
    e = {b"IM": "<", b"MI": ">"}.get(buf[126:128])
    if e is None or not buf.startswith(b"MATLAB"):
        raise ValueError("not a MATLAB v5 MAT-file")
    out: dict[str, np.ndarray] = {}

    def walk(data: bytes, pos: int) -> None:
        while pos + 8 <= len(data):
            typ, payload, pos = _mat_element(data, pos, e)
            if typ == _MI_COMPRESSED:
                walk(zlib.decompress(payload), 0)
            elif typ == _MI_MATRIX:
                name, arr = _mat_matrix(payload, e)
                if arr is not None:
                    out[name] = arr

    walk(buf, 128)
    return out


def load_mat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Numeric variables of a .mat file: scipy.io.loadmat when installed, else `read_mat`; ValueError if unreadable."""
    sio = optional_module("scipy.io")
    if sio is None:
        return read_mat(path)
    try:
        variables = sio.loadmat(path)
    except (NotImplementedError, TypeError, sio.matlab.MatReadError) as e:    # v7.3 (HDF5), not a MAT-file
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return {k: v for k, v in variables.items() if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


_PICKLE_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def load_index_pickle(path: Path, allow_unsafe: bool = False) -> dict:
    """index_ade20k.pkl: containers, strings, numbers and numpy arrays only, unless `allow_unsafe`."""
    with open(path, "rb") as f:
        if allow_unsafe:
            return pickle.load(f)
        try:
            return _RestrictedUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise BenchError(f"{path}: the pickle needs {err}, which is not on the allow-list (containers, numpy "
                             f"arrays); if you trust the file pass allow_unsafe_pickle=true") from None


# --------------------------------------------------------------------------------------------------------------
# raw trees -> plans


@dataclass
class Plan:
    """What to convert: `items` are opaque to the writer; `convert(item)` -> (stem, image, label or None = skip)."""

    raw_root: Path
    route: str
    items: list
    convert: Callable[[Any], tuple[str, Any, "np.ndarray | None"]]
    image_src_dir: Path | None = None        # raw folder of the images when they are copied as files
    notes: list[str] = field(default_factory=list)


def _find_raw(name: str, src: Path, subdirs: tuple[str, ...], markers: tuple[str, ...], what: str) -> Path:
    """The folder among src, src/<subdir>... that holds every marker (`a|b`: either); a one-line BenchError
    otherwise."""
    tried = [src] + [src / s for s in subdirs]
    for cand in tried:
        if all(any((cand / alt).exists() for alt in m.split("|")) for m in markers):
            return cand
    if not src.exists():
        raise BenchError(f"src {src} does not exist; point src= at the unpacked {what}")
    looked = ", ".join(str(c / markers[0].split("|")[0]) for c in tried)
    needs = " + ".join(m.replace("|", " or ") for m in markers)
    raise BenchError(f"{name}: no {what} under src={src} (looked for {looked}; needs {needs}); point src= at the "
                     f"unpacked download")


def _read(path: Path, what: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im)
    except FileNotFoundError:
        raise BenchError(f"{what} {path} is missing; the raw download is incomplete") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else "corrupt"
        raise BenchError(f"{what} {path} is unreadable ({type(e).__name__}: {reason}); re-extract the download") \
            from None


def plan_ade150(src: Path, opts: dict) -> Plan:
    root = _find_raw("A-150", src, ("ADEChallengeData2016",), ("annotations/validation", "images/validation"),
                     "ADEChallengeData2016 (SceneParsing ADEChallengeData2016.zip)")
    ann_dir, img_dir = root / "annotations/validation", root / "images/validation"
    items = sorted(p for p in ann_dir.iterdir() if p.suffix == ".png")
    if not items:
        raise BenchError(f"A-150: no *.png annotations in {ann_dir}; re-extract ADEChallengeData2016.zip")

    def convert(p: Path) -> tuple[str, Path, np.ndarray]:
        raw = _read(p, "annotation")
        if raw.dtype != np.uint8 or raw.ndim != 2:
            raise BenchError(f"annotation {p} is {raw.dtype} {raw.shape}, expected 8-bit single-channel (0 = other, "
                             f"1..150); is this ADEChallengeData2016?")
        return p.stem, img_dir / f"{p.stem}.jpg", ade150_label(raw)

    return Plan(root, "ADEChallengeData2016 annotations - 1 (uint8)", items, convert, img_dir)


def plan_ade847(src: Path, opts: dict) -> Plan:
    root = _find_raw("A-847", src, ("ADE20K_2021_17_01",), ("index_ade20k.pkl",),
                     "ADE20K_2021_17_01 (index_ade20k.pkl + images/ADE/...)")
    index = load_index_pickle(root / "index_ade20k.pkl", bool(opts.get("allow_unsafe_pickle")))
    if not isinstance(index, dict) or "folder" not in index or "filename" not in index:
        raise BenchError(f"{root / 'index_ade20k.pkl'} has no 'folder'/'filename' lists; is it ADE20K_2021_17_01's?")
    items = []
    for folder, file_name in zip(index["folder"], index["filename"]):
        folder, file_name = str(folder), str(file_name)
        parts = file_name.split("_")
        if len(parts) > 1 and parts[1] == "val":           # MaskFormer L966: split from the file name
            base = root.parent if Path(folder).parts[:1] == (root.name,) else root
            items.append(base / folder / file_name)
    if not items:
        raise BenchError(f"A-847: {root / 'index_ade20k.pkl'} lists no ADE_val_* images")
    try:
        import cv2  # type: ignore[import-not-found]  # noqa: F401
        notes = []
    except ImportError:
        notes = ["cv2 not installed: images resized with bench's re-implementation of cv2 INTER_LINEAR "
                 "(labels are exact; image pixels may differ by 1 from some OpenCV builds)"]

    def convert(jpg: Path) -> tuple[str, np.ndarray, np.ndarray]:
        img = _read(jpg, "image")
        seg = _read(jpg.with_name(jpg.name.replace(".jpg", "_seg.png")), "segmentation")
        try:
            lab = ade_full_class_mask(seg)
        except ValueError as e:
            raise BenchError(f"{jpg.name.replace('.jpg', '_seg.png')}: {e}") from None
        if lab.shape != img.shape[:2]:
            raise BenchError(f"{jpg} is {img.shape[1]}x{img.shape[0]} but its _seg.png is "
                             f"{lab.shape[1]}x{lab.shape[0]}")
        size = ade847_target_size(*img.shape[:2])
        if size is not None:
            img = resize_linear_u8(img, *size)
            lab = resize_nearest(lab, *size)
        return jpg.stem, img, ade847_label(lab)

    return Plan(root, "ADE20K_2021_17_01 *_seg.png class ids via the 847-id table (uint16, 65535 ignore), "
                      "short side 512", items, convert, None, notes)


def _pc_root(name: str, src: Path, markers: tuple[str, ...]) -> Path:
    return _find_raw(name, src, ("VOC2010", "VOCdevkit/VOC2010"), ("JPEGImages",) + markers,
                     "VOCdevkit/VOC2010 with Pascal-Context annotations")


def _pc_val_images(root: Path) -> tuple[list[dict], dict | None, str]:
    """Val images (Detail `phase == 'val'`, file order), the parsed trainval_merged.json and where the list came
    from; without the json: the ids of `<root>/pascalcontext_val.txt`, else bench's copy of CAT-Seg's list."""
    js = root / "trainval_merged.json"
    if js.is_file():
        try:
            data = json.loads(js.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise BenchError(f"{js} is not valid JSON ({e}); re-download trainval_merged.json") from None
        if not isinstance(data, dict) or "images" not in data:
            raise BenchError(f"{js} has no 'images' list; is it PASCAL in Detail's trainval_merged.json?")
        imgs = [im for im in data["images"] if im.get("phase") == "val" and str(im["file_name"]).endswith(".jpg")]
        return imgs, data, f"{js.name} (phase val)"
    txt = root / "pascalcontext_val.txt"
    if not txt.is_file():
        txt = TABLES_DIR / "pascal_context_val.txt"          # bench's copy of CAT-Seg's list (5104 ids)
    ids = [s.strip() for s in txt.read_text().splitlines() if s.strip() and not s.startswith("#")]
    where = str(txt) if txt.parent == root else "bench's copy of CAT-Seg's pascalcontext_val.txt"
    return [{"file_name": f"{s}.jpg"} for s in ids], None, where


def _read_label_map(path: Path) -> np.ndarray:
    if not path.is_file():
        raise BenchError(f"Pascal-Context annotation {path} is missing; unpack trainval.tar.gz there or set anno_dir=")
    try:
        variables = load_mat(path)
    except (ValueError, zlib.error, struct.error) as e:
        raise BenchError(f"{path}: cannot read ({e})") from None
    if "LabelMap" not in variables:
        raise BenchError(f"{path} has no numeric LabelMap variable (has {sorted(variables)})")
    return variables["LabelMap"]


def plan_pc59(src: Path, opts: dict) -> Plan:
    source = opts.get("pc59_source") or "json"
    if source not in ("json", "mat"):
        raise BenchError(f"pc59_source={source!r}; allowed: json (SAN's route, trainval_merged.json) or mat")
    if source == "mat":
        return _plan_pc_mat(src, opts, pc59=True)
    root = _pc_root("PC-59", src, ())
    if not (root / "trainval_merged.json").is_file():
        raise BenchError(f"PC-59: {root / 'trainval_merged.json'} (PASCAL in Detail annotations) is missing; add it, "
                         f"or build the labels from the Pascal-Context .mat files with pc59_source=mat")
    images, data, _ = _pc_val_images(root)
    by_image: dict[Any, list[dict]] = {}
    for ann in data.get("annos_segmentation", []):            # type: ignore[union-attr]
        by_image.setdefault(ann["image_id"], []).append(ann)

    def convert(im: dict) -> tuple[str, Path, np.ndarray]:
        stem = Path(im["file_name"]).stem
        try:
            mask = detail_class_mask(by_image.get(im["image_id"], []), int(im["height"]), int(im["width"]))
            return stem, root / "JPEGImages" / im["file_name"], pc59_label(mask)
        except (ValueError, KeyError) as e:
            raise BenchError(f"trainval_merged.json, image {im.get('file_name')}: {e}") from None

    return Plan(root, "trainval_merged.json Detail masks -> rank among the 59 sorted ids - 1 (uint8)", images,
                convert, root / "JPEGImages")


def _plan_pc_mat(src: Path, opts: dict, pc59: bool) -> Plan:
    root = _pc_root("PC-59" if pc59 else "PC-459", src, ())
    anno_dir = Path(opts["anno_dir"]) if opts.get("anno_dir") else root / "trainval"
    if not anno_dir.is_dir():
        raise BenchError(f"{'PC-59' if pc59 else 'PC-459'}: Pascal-Context .mat folder {anno_dir} is missing; unpack "
                         f"trainval.tar.gz (Pascal-Context) into {root} or set anno_dir=DIR")
    images, _, where = _pc_val_images(root)

    def convert(im: dict) -> tuple[str, Path, np.ndarray]:
        stem = Path(im["file_name"]).stem
        lm = _read_label_map(anno_dir / f"{stem}.mat")
        try:
            label = pc59_label_from_labelmap(lm) if pc59 else pc459_label(lm)
        except ValueError as e:
            raise BenchError(f"{anno_dir / (stem + '.mat')}: {e}") from None
        return stem, root / "JPEGImages" / im["file_name"], label

    route = ("Pascal-Context LabelMap -> SAN's 59-id order (uint8, 255 ignore; SCAN's route, not SAN's Detail json)"
             if pc59 else "Pascal-Context LabelMap - 1 (uint16, 65535 ignore)")
    notes = [f"val ids from {where}"]
    if pc59:
        notes.append("pc59_source=mat: labels from the .mat LabelMap, not from trainval_merged.json as SAN's script "
                     "does")
    return Plan(root, route, images, convert, root / "JPEGImages", notes)


def plan_pc459(src: Path, opts: dict) -> Plan:
    return _plan_pc_mat(src, opts, pc59=False)


def _plan_voc(src: Path, opts: dict, background: bool) -> Plan:
    name = "PAS-20b" if background else "PAS-20"
    root = _find_raw(name, src, ("VOC2012", "VOCdevkit/VOC2012"),
                     ("JPEGImages", "SegmentationClassAug|SegmentationClass", "ImageSets/Segmentation/val.txt|val.txt"),
                     "VOCdevkit/VOC2012 (VOCtrainval_11-May-2012.tar)")
    lists = [root / "ImageSets/Segmentation/val.txt", root / "val.txt"]
    val = next((p for p in lists if p.is_file()), None)
    if val is None:
        raise BenchError(f"{name}: no val list in {root} (looked for {lists[0]} and {lists[1]})")
    label_dir = next((root / d for d in ("SegmentationClassAug", "SegmentationClass") if (root / d).is_dir()), None)
    if label_dir is None:
        raise BenchError(f"{name}: no SegmentationClassAug/ or SegmentationClass/ in {root}; unpack the VOC2012 "
                         f"segmentation annotations")
    stems = [s.split()[0] for s in val.read_text().splitlines() if s.strip()]

    def convert(stem: str) -> tuple[str, Path, np.ndarray | None]:
        p = label_dir / f"{stem}.png"
        raw = _read(p, "VOC label")
        try:
            label = voc_label(raw, background)
        except ValueError as e:
            raise BenchError(f"VOC label {p}: {e}") from None
        if (label == 255).all():                           # SAN L96-97 / CAT-Seg L54-55: not written
            return stem, root / "JPEGImages" / f"{stem}.jpg", None
        return stem, root / "JPEGImages" / f"{stem}.jpg", label

    route = f"{label_dir.name} of {val.relative_to(root)}: k -> k-1, background -> {20 if background else 255}"
    return Plan(root, route, stems, convert, root / "JPEGImages")


PLANNERS: dict[str, Callable[[Path, dict], Plan]] = {
    "ade150": plan_ade150, "ade847": plan_ade847, "pc59": plan_pc59, "pc459": plan_pc459,
    "voc20": lambda s, o: _plan_voc(s, o, background=False), "voc20b": lambda s, o: _plan_voc(s, o, background=True),
}


# --------------------------------------------------------------------------------------------------------------
# writing: stage in a temporary folder, rename into place


@dataclass
class Summary:
    dataset: str
    written: int
    skipped: int
    classes_seen: int
    num_classes: int
    official: int | None
    label_dir: Path
    image_dir: Path
    family: str
    route: str
    images: str
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        count = f"{self.written} images"
        if self.official:
            count += f" (official val split: {self.official})"
        skipped = f", {self.skipped} all-ignore label(s) not written (as the official script)" if self.skipped else ""
        return (f"{self.dataset}: prepared {count}{skipped}; {self.classes_seen}/{self.num_classes} classes seen; "
                f"labels {self.label_dir}, images {self.image_dir} ({self.images}); {self.family} layout")


def _save_label(label: np.ndarray, path: Path, bits: int) -> None:
    want = np.uint16 if bits == 16 else np.uint8
    if label.dtype != want:
        raise BenchError(f"internal: {path.name} label is {label.dtype}, expected {np.dtype(want).name}")
    Image.fromarray(label).save(path, format="TIFF" if bits == 16 else "PNG")


def _place_image(image: Any, dst: Path, mode: str) -> None:
    if isinstance(image, np.ndarray):
        Image.fromarray(image).save(dst)                   # JPEG, PIL defaults (MaskFormer L1004)
        return
    if not Path(image).is_file():
        raise BenchError(f"image {image} is missing; the raw download is incomplete")
    if mode == "symlink":
        os.symlink(Path(image).resolve(), dst)
    else:
        shutil.copyfile(image, dst)


def _same_dir(a: Path, b: Path | None) -> bool:
    return b is not None and a.exists() and b.exists() and a.resolve() == b.resolve()


def write_prepared(spec: DatasetSpec, plan: Plan, data_root: str | os.PathLike, force: bool = False,
                   images: str = "copy", progress: bool = True) -> Summary:
    """Convert every item of `plan` into `spec.layout` under `data_root`, atomically (temp folder + renames)."""
    from tqdm import tqdm

    layout: Layout = spec.layout
    root = Path(data_root)
    lbl_target, img_target = root / layout.label_dir, root / layout.image_dir
    in_place = _same_dir(img_target, plan.image_src_dir)
    if lbl_target.exists() and not force:
        raise BenchError(f"{spec.display_name}: {lbl_target} already exists; nothing written (pass force=true to "
                         f"replace it, or check it with python -m bench.data.check dataset={spec.name})")
    if img_target.exists() and not (in_place or layout.extra_images or force):
        raise BenchError(f"{spec.display_name}: {img_target} already exists; nothing written (pass force=true to "
                         f"replace it)")
    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".prepare-{spec.name}-", dir=root))
    staged_lbl, staged_img = tmp / "labels", tmp / "images"
    staged_lbl.mkdir()
    staged_img.mkdir()
    seen = np.zeros(spec.num_classes, dtype=bool)
    written = skipped = 0
    done: list[Callable[[], None]] = []                    # undo steps of the commit
    made: list[Path] = []
    try:
        for item in tqdm(plan.items, desc=f"prepare {spec.display_name}", unit="img", disable=not progress,
                         file=sys.stderr, dynamic_ncols=True):
            stem, image, label = plan.convert(item)
            if label is None:
                skipped += 1
                continue
            values = np.unique(label)
            bad = values[(values >= spec.num_classes) & (values != spec.ignore_label)]
            if bad.size:
                raise BenchError(f"internal: {stem} label has values {bad[:5].tolist()} outside the classes")
            seen[values[values < spec.num_classes].astype(np.int64)] = True
            _save_label(label, staged_lbl / f"{stem}{layout.label_ext}", layout.label_bits)
            if not in_place:
                _place_image(image, staged_img / f"{stem}{layout.image_ext}", images)
            written += 1
        if written == 0:
            raise BenchError(f"{spec.display_name}: no labels written from {plan.raw_root} (every label was empty "
                             f"or ignore); is this the right download?")
        # ---- commit: images first, labels last (the label folder is what marks a prepared dataset)
        for d in (lbl_target.parent, img_target.parent):
            for p in reversed([d, *d.parents]):
                if not p.exists():
                    p.mkdir()
                    made.append(p)
        if not in_place:
            if not img_target.exists():
                os.rename(staged_img, img_target)
                done.append(lambda: os.rename(img_target, staged_img))
            elif layout.extra_images:                      # shared pool (VOC JPEGImages): add what is missing
                for f in sorted(staged_img.iterdir()):
                    dst = img_target / f.name
                    if not dst.exists() and not dst.is_symlink():
                        os.rename(f, dst)
                        done.append(lambda f=f, dst=dst: os.rename(dst, f))
            else:                                          # force: replace the old image folder
                os.rename(img_target, tmp / "old_images")
                done.append(lambda: os.rename(tmp / "old_images", img_target))
                os.rename(staged_img, img_target)
                done.append(lambda: os.rename(img_target, staged_img))
        if lbl_target.exists():
            os.rename(lbl_target, tmp / "old_labels")
            done.append(lambda: os.rename(tmp / "old_labels", lbl_target))
        os.rename(staged_lbl, lbl_target)
        done.clear()
    except BaseException:
        for undo in reversed(done):
            try:
                undo()
            except OSError:  # pragma: no cover - best effort
                pass
        for p in reversed(made):
            try:
                p.rmdir()
            except OSError:
                pass
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_root and not any(root.iterdir()):
            root.rmdir()
    _, family = layout_family(layout)
    img_mode = "in place" if in_place else ("re-encoded" if plan.image_src_dir is None else images)
    return Summary(spec.display_name, written, skipped, int(seen.sum()), spec.num_classes, spec.official_val_images,
                   lbl_target, img_target, family, plan.route, img_mode, list(plan.notes))


def prepare(dataset: str, src: str | os.PathLike, data_root: str | os.PathLike, force: bool = False,
            images: str = "copy", progress: bool = True, **opts: Any) -> Summary:
    """Raw download at `src` -> `dataset`'s prepared layout under `data_root`; returns the summary."""
    from bench.data.synth import load_dataset_cfg

    if dataset not in PLANNERS:
        raise BenchError(f"no converter for dataset {dataset!r}; allowed: {list(DATASETS)}")
    if images not in ("copy", "symlink"):
        raise BenchError(f"images={images!r}; allowed: copy, symlink")
    spec = spec_from_cfg(load_dataset_cfg(dataset))
    others = [m for m in (layout_status(spec, lay, data_root) for lay in spec.alt_layouts) if m.state != "absent"]
    plan = PLANNERS[dataset](Path(src), opts)
    summary = write_prepared(spec, plan, data_root, force=force, images=images, progress=progress)
    for m in others:
        summary.notes.append(f"a {m.family} tree of {spec.display_name} is also under {data_root} "
                             f"({Path(data_root) / m.layout.label_dir}); bench.data.check will call the root "
                             f"ambiguous until one is removed or chosen with layout=")
    return summary


# --------------------------------------------------------------------------------------------------------------
# command line


_ARGS = {"dataset": str, "src": str, "data_root": str, "force": bool, "images": str, "progress": bool,
         "allow_unsafe_pickle": bool, "pc59_source": str, "anno_dir": str}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    usage = "dataset=ade150 src=RAW_DIR [data_root=DIR] [force=true] [images=copy|symlink]"
    try:
        args, _ = parse_overrides(argv, _ARGS, usage)
        if not args.get("dataset"):
            raise BenchError(f"missing dataset=NAME ({'|'.join(DATASETS)}); usage: {usage}")
    except BenchError as e:
        return error(e)
    data_root = resolve_data_root(args)
    src = args.get("src") or data_root
    opts = {k: args[k] for k in ("allow_unsafe_pickle", "pc59_source", "anno_dir") if args.get(k) is not None}
    try:
        summary = prepare(str(args["dataset"]), str(src), data_root, force=bool(args.get("force", False)),
                          images=str(args.get("images", "copy")), progress=bool(args.get("progress", True)), **opts)
    except BenchError as e:
        return error(e, 1)
    except OSError as e:
        return error(f"{e}; nothing was written", 1)
    except KeyboardInterrupt:
        return error("interrupted; nothing was written", 130)
    for note in summary.notes:
        print(f"note: {note}")
    print(summary.line())
    print(f"next: python -m bench.data.check dataset={args['dataset']} data_root={data_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
