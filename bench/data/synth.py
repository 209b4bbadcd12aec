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


def _write_layout(spec: DatasetSpec, layout: Layout, root: Path, n_images: int, seed: int) -> None:
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    img_dir, lbl_dir = root / layout.image_dir, root / layout.label_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        h, w = SIZES[i % len(SIZES)]
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
    if not atomic:
        _write_layout(spec, layout, root, n_images, seed)
        return root / layout.label_dir
    top = Path(layout.label_dir).parts[0]
    if Path(layout.image_dir).parts[0] != top:
        raise BenchError(f"conf/dataset/{spec.name}.yaml: generated datasets need image_dir and label_dir under one "
                         f"top-level folder")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{top}.", dir=root))
    try:
        _write_layout(spec, layout, tmp, n_images, seed)
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


def _parse_args(argv: list[str]) -> dict:
    from omegaconf import OmegaConf

    for a in argv:
        if "=" not in a or a.startswith("-"):
            raise BenchError(f"argument {a!r}: use key=value (root=DIR datasets=[ade150,voc20] n_images=4 seed=0)")
    try:
        args = OmegaConf.to_container(OmegaConf.from_dotlist(argv))
    except Exception as e:  # noqa: BLE001 - grammar errors from OmegaConf
        raise BenchError(f"cannot parse arguments {argv}: {e}".splitlines()[0]) from None
    allowed = {"root", "datasets", "n_images", "seed"}
    unknown = set(args) - allowed
    if unknown:
        raise BenchError(f"unknown argument(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    if not args.get("root"):
        raise BenchError("missing root=DIR (the folder to write the datasets under)")
    ds = args.get("datasets", list(DATASETS))
    if isinstance(ds, str):
        ds = [d for d in ds.split(",") if d]
    unknown_ds = [d for d in ds if d not in DATASETS]
    if unknown_ds:
        raise BenchError(f"unknown dataset(s) {unknown_ds}; allowed: {list(DATASETS)}")
    return {"root": str(args["root"]), "datasets": ds, "n_images": int(args.get("n_images", 4)),
            "seed": int(args.get("seed", 0))}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = _parse_args(sys.argv[1:] if argv is None else argv)
        written = synthesize(args["root"], args["datasets"], args["n_images"], args["seed"])
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
