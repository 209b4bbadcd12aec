"""Tiny datasets written in exactly the prepared layouts of the benchmarks, for tests and pipeline checks.

    python -m bench.data.synth root=DIR [datasets=[ade150,voc20]] [n_images=4] [seed=0]

Each dataset gets `n_images` JPEG images of different sizes (square and non-square) and labels in the layout's
format (8-bit PNG, or 16-bit TIFF with ignore 65535) holding random blobs of a few of its classes — ids above 255
where the dataset has them — plus some ignore pixels. Layouts whose image folder is a shared pool (VOC
`JPEGImages`) also get an image without a label, as the real folder has. Output is deterministic in `seed`.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from bench import BenchError
from bench.cli import error, parse_overrides
from bench.data.layouts import DatasetSpec, Layout, spec_from_cfg

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "dataset"
DATASETS = ("ade847", "pc459", "ade150", "pc59", "voc20", "voc20b", "synthetic")
SIZES = ((48, 64), (64, 48), (40, 40), (36, 60), (56, 44), (52, 52))   # (H, W)


def load_dataset_cfg(name: str) -> dict:
    """`conf/dataset/<name>.yaml` as a plain dict."""
    from omegaconf import OmegaConf

    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
        raise BenchError(f"no dataset config {path}; known datasets: {known}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def _blobs(rng: np.random.Generator, h: int, w: int, classes: np.ndarray, ignore: int) -> np.ndarray:
    """A label map: a background class, then a few elliptic blobs of other classes, then ignore pixels."""
    yy, xx = np.mgrid[0:h, 0:w]
    label = np.full((h, w), classes[0], dtype=np.int64)
    for c in classes[1:]:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(h / 8, h / 2.5), rng.uniform(w / 8, w / 2.5)
        label[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0] = c
    # an ignore band (like VOC boundaries / ADE "other") plus scattered ignore pixels
    band = rng.integers(0, h - 2)
    label[band: band + 2, : w // 2] = ignore
    label[rng.random((h, w)) < 0.02] = ignore
    return label


def _image(rng: np.random.Generator, label: np.ndarray, ignore: int) -> np.ndarray:
    """An RGB image whose colour follows the label (one colour per class) plus noise."""
    ids = np.where(label == ignore, 0, label)
    palette_seed = np.array([(i * 2654435761) % 2**32 for i in range(int(ids.max()) + 1)], dtype=np.uint64)
    palette = np.stack([(palette_seed >> s) & 255 for s in (0, 8, 16)], axis=1).astype(np.float64)
    img = palette[ids] + rng.normal(0, 12, size=label.shape + (3,))
    return np.clip(img, 0, 255).astype(np.uint8)


def _pick_classes(rng: np.random.Generator, spec: DatasetSpec) -> np.ndarray:
    k = spec.num_classes
    n = min(k, 4)
    chosen = rng.choice(k, size=n, replace=False)
    if k > 256 and not (chosen > 255).any():
        chosen[-1] = rng.integers(256, k)    # exercise ids that need 16 bits
    return chosen


def _write_layout(spec: DatasetSpec, layout: Layout, root: Path, n_images: int, seed: int,
                  size: tuple[int, int] | None = None) -> None:
    """`size` (H, W): every image that size (e.g. a throughput split); else the small mixed SIZES."""
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    img_dir, lbl_dir = root / layout.image_dir, root / layout.label_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        h, w = tuple(size) if size else SIZES[i % len(SIZES)]
        stem = f"{spec.name}_{i:06d}" if not layout.extra_images else f"2008_{i:06d}"
        label = _blobs(rng, h, w, _pick_classes(rng, spec), spec.ignore_label)
        image = _image(rng, label, spec.ignore_label)
        img_path = img_dir / f"{stem}{layout.image_ext}"
        if not img_path.exists():  # VOC-20 and VOC-20b share JPEGImages: same stems, same sizes
            Image.fromarray(image).save(img_path, quality=90)
        if layout.label_bits == 16:
            Image.fromarray(label.astype(np.uint16)).save(lbl_dir / f"{stem}{layout.label_ext}")
        else:
            Image.fromarray(label.astype(np.uint8)).save(lbl_dir / f"{stem}{layout.label_ext}")
    if layout.extra_images:  # the shared pool holds images of other splits too
        extra = img_dir / f"2007_999999{layout.image_ext}"
        if not extra.exists():
            Image.fromarray(np.full((32, 48, 3), 127, np.uint8)).save(extra)


def synthesize_spec(spec: DatasetSpec, root: str | os.PathLike, n_images: int | None = None, seed: int | None = None,
                    atomic: bool = False) -> Path:
    """Write `spec`'s primary layout under `root`; returns the label folder.

    `atomic=True` (first-use generation, possibly from parallel cells) writes into a temporary folder and moves the
    dataset's top-level folder into place in one rename; a concurrent writer that wins the race is kept.
    """
    n_images = int(n_images if n_images is not None else spec.synth.get("n_images", 4))
    seed = int(seed if seed is not None else spec.synth.get("seed", 0))
    root = Path(root)
    layout = spec.layout
    size = spec.synth.get("size")
    if not atomic:
        _write_layout(spec, layout, root, n_images, seed, size)
        return root / layout.label_dir
    top = Path(layout.label_dir).parts[0]
    if Path(layout.image_dir).parts[0] != top:
        raise BenchError(f"conf/dataset/{spec.name}.yaml: generated datasets need image_dir and label_dir under one "
                         f"top-level folder")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{top}.", dir=root))
    try:
        _write_layout(spec, layout, tmp, n_images, seed, size)
        try:
            os.rename(tmp / top, root / top)
        except OSError:
            if not (root / layout.label_dir).is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote synthetic %s (%d images) under %s", spec.display_name, n_images, root)
    return root / layout.label_dir


def synthesize(root: str | os.PathLike, datasets: list[str] | tuple[str, ...] = DATASETS, n_images: int = 4,
               seed: int = 0) -> dict[str, Path]:
    """Write each named dataset (`conf/dataset/<name>.yaml`) in its primary layout under `root`."""
    out = {}
    for name in datasets:
        spec = spec_from_cfg(load_dataset_cfg(name))
        out[name] = synthesize_spec(spec, root, n_images=n_images, seed=seed)
    return out


# --------------------------------------------------------------------------------------------------------------
# raw downloads: the official file formats, tiny, for bench.data.prepare (tests and smoke checks)

RAW_DATASETS = ("ade150", "ade847", "pc59", "pc459", "voc20", "voc20b")


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved index -> RGB), 256 entries flattened, as in SegmentationClass."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def rle_encode(mask: np.ndarray) -> dict:
    """Binary HxW mask -> COCO compressed RLE {'size': [h, w], 'counts': str} (column-major runs from 0)."""
    h, w = mask.shape
    flat = (np.asarray(mask).T.reshape(-1) != 0).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    out = []
    for i, x in enumerate(counts):
        x = int(x) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return {"size": [int(h), int(w)], "counts": "".join(out)}


def write_mat_v5(path: str | os.PathLike, variables: dict, compress: bool = True) -> None:
    """A MATLAB v5 MAT-file of numeric 2-D arrays; data stored in the smallest unsigned type that holds it (as
    MATLAB does), one miCOMPRESSED element per variable when `compress`."""
    import struct

    mx = {np.dtype("uint8"): 9, np.dtype("uint16"): 11, np.dtype("int32"): 12, np.dtype("float64"): 6}
    header = b"MATLAB 5.0 MAT-file, written by bench.data.synth (synthetic)".ljust(116) + b"\0" * 8
    header += struct.pack("<H", 0x0100) + b"IM"

    def element(typ: int, payload: bytes) -> bytes:
        pad = (-len(payload)) % 8
        return struct.pack("<II", typ, len(payload)) + payload + b"\0" * pad

    body = b""
    for name, arr in variables.items():
        arr = np.asarray(arr)
        store = arr
        if arr.dtype.kind in "ui" and arr.size and arr.min() >= 0 and arr.max() < 256:
            store = arr.astype(np.uint8)
        mi = {np.dtype("uint8"): 2, np.dtype("uint16"): 4, np.dtype("int32"): 5, np.dtype("float64"): 9}[store.dtype]
        sub = element(6, struct.pack("<II", mx[arr.dtype], 0))
        sub += element(5, struct.pack("<" + "i" * arr.ndim, *arr.shape))
        sub += element(1, name.encode("ascii"))
        sub += element(mi, store.astype(store.dtype.newbyteorder("<")).tobytes(order="F"))
        matrix = struct.pack("<II", 14, len(sub)) + sub
        if compress:
            packed = zlib.compress(matrix)
            body += struct.pack("<II", 15, len(packed)) + packed
        else:
            body += matrix
    Path(path).write_bytes(header + body)


def _raw_rng(dataset: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"raw-{dataset}".encode())])


def _raw_ade150(root: Path, n: int, seed: int) -> Path:
    rng = _raw_rng("ade150", seed)
    base = root / "ADEChallengeData2016"
    for split, prefix, count in (("validation", "ADE_val", n), ("training", "ADE_train", 1)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            h, w = SIZES[i % len(SIZES)]
            label = _blobs(rng, h, w, rng.choice(np.arange(1, 151), size=4, replace=False), ignore=0)  # 0 = other
            image = _image(rng, label, 0)
            Image.fromarray(image).save(base / "images" / split / f"{prefix}_{i + 1:08d}.jpg", quality=90)
            Image.fromarray(label.astype(np.uint8)).save(base / "annotations" / split / f"{prefix}_{i + 1:08d}.png")
    return base


def _raw_ade847(root: Path, n: int, seed: int) -> Path:
    import pickle

    from bench.data.labelmaps import ade847_id_table

    rng = _raw_rng("ade847", seed)
    base = root / "ADE20K_2021_17_01"
    table = ade847_id_table()
    in_table = np.array(sorted(table))
    high = np.array([a for a, t in table.items() if t > 255])        # trainIds that need 16 bits
    index: dict = {"folder": [], "filename": [], "objectnames": ["-"] * 8,
                   "description": {"folder": "folder of each image", "filename": "file name of each image"}}
    entries = [("validation", "ADE_val", i) for i in range(n)] + [("training", "ADE_train", 0)]
    for k, (split, prefix, i) in enumerate(entries):
        h, w = (520, 560) if (split, i) == ("validation", 0) else SIZES[i % len(SIZES)]   # first one gets resized
        classes = np.concatenate([rng.choice(in_table, size=2, replace=False), rng.choice(high, size=1), [5]])
        cls = _blobs(rng, h, w, classes, ignore=0)                    # 0: unlabeled; 5: not in the 847 table
        seg = np.zeros((h, w, 3), np.uint8)
        seg[..., 0] = (cls // 256) * 10 + rng.integers(0, 10, size=(h, w))   # the units digit of R is not class
        seg[..., 1] = cls % 256
        seg[..., 2] = rng.integers(0, 256, size=(h, w))                # instance channel
        folder = f"ADE20K_2021_17_01/images/ADE/{split}/{'urban/street' if k % 2 else 'home_or_hotel/bedroom'}"
        (root / folder).mkdir(parents=True, exist_ok=True)
        stem = f"{prefix}_{i + 1:08d}"
        Image.fromarray(_image(rng, cls % 997, -1)).save(root / folder / f"{stem}.jpg", quality=90)
        Image.fromarray(seg).save(root / folder / f"{stem}_seg.png")
        index["folder"].append(folder)
        index["filename"].append(f"{stem}.jpg")
    index["objectPresence"] = np.zeros((8, len(entries)), dtype=np.uint8)   # numpy array, as in the real index
    with open(base / "index_ade20k.pkl", "wb") as f:
        pickle.dump(index, f, protocol=4)
    return base


def _raw_pascal_context(root: Path, n: int, seed: int) -> Path:
    import json

    from bench.data.labelmaps import pc59_ids

    rng = _raw_rng("pascal_context", seed)
    base = root / "VOCdevkit" / "VOC2010"
    (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (base / "trainval").mkdir(parents=True, exist_ok=True)
    ids59 = np.array(pc59_ids())
    others = np.array(sorted(set(range(1, 460)) - set(ids59.tolist())))
    images, anns = [], []
    for i in range(n + 1):                                             # the last one is a train image
        h, w = SIZES[i % len(SIZES)]
        stem = f"2008_{i + 1:06d}"
        classes = np.concatenate([[0], rng.choice(ids59, size=2, replace=False), rng.choice(others[others > 255], 1)])
        label_map = _blobs(rng, h, w, classes, ignore=0)               # 0 = unlabeled
        Image.fromarray(_image(rng, label_map, -1)).save(base / "JPEGImages" / f"{stem}.jpg", quality=90)
        write_mat_v5(base / "trainval" / f"{stem}.mat", {"LabelMap": label_map.astype(np.uint16)},
                     compress=bool(i % 2 == 0))
        image_id = 2008000000 + i + 1
        images.append({"image_id": image_id, "file_name": f"{stem}.jpg", "height": h, "width": w,
                       "phase": "train" if i == n else "val"})
        present = [int(c) for c in np.unique(label_map) if c in set(ids59.tolist())]
        for c in rng.permutation(present):
            m = label_map == c
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(c), "area": int(m.sum()),
                         "iscrowd": 0, "segmentation": rle_encode(m)})
    cats = [{"category_id": int(c), "name": f"class{c}", "supercategory": "object", "onlysemantic": 0} for c in ids59]
    doc = {"info": {"description": "synthetic PASCAL in Detail subset (bench.data.synth)"}, "images": images,
           "categories": cats, "annos_segmentation": anns, "parts": [], "annos_occlusion": [], "annos_boundary": []}
    (base / "trainval_merged.json").write_text(json.dumps(doc))
    return base


def _raw_voc(root: Path, n: int, seed: int) -> Path:
    rng = _raw_rng("voc2012", seed)
    base = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True, exist_ok=True)
    val, train = [], []
    for i in range(n + 1):                                             # the last one is a train image
        h, w = SIZES[i % len(SIZES)]
        stem = f"2007_{i + 1:06d}"
        if i == n - 1 and n > 1:                                       # background + boundary only
            label = _blobs(rng, h, w, np.array([0]), ignore=255)
        else:
            label = _blobs(rng, h, w, np.concatenate([[0], rng.choice(np.arange(1, 21), 3, replace=False)]), 255)
        Image.fromarray(_image(rng, label, 255)).save(base / "JPEGImages" / f"{stem}.jpg", quality=90)
        im = Image.frombytes("P", (w, h), label.astype(np.uint8).tobytes())
        im.putpalette(voc_palette())
        im.save(base / "SegmentationClass" / f"{stem}.png")
        (train if i == n else val).append(stem)
    (base / "ImageSets/Segmentation/val.txt").write_text("".join(f"{s}\n" for s in val))
    (base / "ImageSets/Segmentation/train.txt").write_text("".join(f"{s}\n" for s in train))
    return base


_RAW_WRITERS = {"ade150": _raw_ade150, "ade847": _raw_ade847, "pc59": _raw_pascal_context,
                "pc459": _raw_pascal_context, "voc20": _raw_voc, "voc20b": _raw_voc}


def synthesize_raw(root: str | os.PathLike, dataset: str, n_images: int = 3, seed: int = 0) -> Path:
    """Write a tiny raw download of `dataset` in the official file formats under `root`; returns the folder to pass
    as `src=` to bench.data.prepare.

    ade150: ADEChallengeData2016/{images,annotations}/{validation,training} (jpg + uint8 png, 0 = other);
    ade847: ADE20K_2021_17_01/index_ade20k.pkl + images/ADE/<split>/<scene>/ADE_*.jpg + _seg.png (class in R/10, G;
    the first val image is 520x560 so it gets resized); pc59/pc459: VOCdevkit/VOC2010/{JPEGImages, trainval/*.mat
    (v5, LabelMap), trainval_merged.json (Detail, RLE)}; voc20/voc20b: VOCdevkit/VOC2012/{JPEGImages,
    SegmentationClass (palette PNG), ImageSets/Segmentation/{val,train}.txt}, the last val label background and
    boundary only. Each tree also has one train image that must not be converted. Deterministic in `seed`.
    """
    if dataset not in _RAW_WRITERS:
        raise BenchError(f"no raw format for dataset {dataset!r}; allowed: {list(RAW_DATASETS)}")
    return _RAW_WRITERS[dataset](Path(root), int(n_images), int(seed))


_USAGE = "root=DIR [datasets=[ade150,voc20]] [n_images=4] [seed=0]"


def _parse_args(argv: list[str]) -> dict:
    args, _ = parse_overrides(argv, {"root": str, "datasets": list, "n_images": int, "seed": int}, _USAGE)
    if not args.get("root"):
        raise BenchError(f"missing root=DIR (the folder to write the datasets under); usage: {_USAGE}")
    ds = args.get("datasets", list(DATASETS))
    unknown_ds = [d for d in ds if d not in DATASETS]
    if unknown_ds:
        raise BenchError(f"unknown dataset(s) {unknown_ds}; allowed: {list(DATASETS)}")
    return {"root": args["root"], "datasets": ds, "n_images": args.get("n_images", 4), "seed": args.get("seed", 0)}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = _parse_args(sys.argv[1:] if argv is None else argv)
        written = synthesize(args["root"], args["datasets"], args["n_images"], args["seed"])
    except BenchError as e:
        return error(e)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
