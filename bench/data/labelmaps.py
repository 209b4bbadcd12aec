"""The pure converters of `bench.data.prepare`: raw label arrays -> prepared label arrays, and the id tables they
use (data files in `prepare_tables/`, each with its source in the header). What each does, and which official
script it follows, is in bench/data/prepare.py's docstring."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

TABLES_DIR = Path(__file__).with_name("prepare_tables")


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
