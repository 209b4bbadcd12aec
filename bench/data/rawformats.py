"""Raw annotation formats of the official downloads: COCO RLE (PASCAL in Detail's trainval_merged.json), MATLAB v5
.mat (Pascal-Context LabelMap) and ADE20K's index pickle (restricted unpickling).

`decode_rle` and `load_mat` use pycocotools.mask and scipy.io.loadmat, the readers the official scripts use, when
they are installed (the `[prepare]` extra); otherwise this module's own decoder and MATLAB v5 reader
(`rle_decode`, `read_mat`), which give the same arrays (tests/test_prepare.py compares both routes).
"""
from __future__ import annotations

import importlib
import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from bench import BenchError


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
        try:
            return read_mat(path)
        except (zlib.error, struct.error) as e:                       # a truncated or corrupt file
            raise ValueError(str(e)) from None
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
