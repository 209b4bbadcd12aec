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
use) when those are installed (`pip install -e .[prepare]`), else with our own MATLAB v5 reader and RLE decoder,
which give the same labels (tests/test_prepare.py checks both routes on the synthetic raw files); those readers and
the restricted pickle loader are in `bench.data.rawformats`, the pure label converters and id tables in
`bench.data.labelmaps`. The one thing that can differ from the official output is ADE-847's *image*
pixels when cv2 is not installed (see `resize_linear_u8`); labels are exact.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from bench import BenchError
from bench.cli import error, parse_overrides
from bench.data.labelmaps import (TABLES_DIR, ade150_label, ade847_label, ade847_target_size, ade_full_class_mask,
                                  pc59_label, pc59_label_from_labelmap, pc459_label, resize_linear_u8, resize_nearest,
                                  voc_label)
from bench.data.layouts import DatasetSpec, Layout, layout_family, layout_status, resolve_data_root, spec_from_cfg
from bench.data.rawformats import detail_class_mask, load_index_pickle, load_mat

log = logging.getLogger(__name__)
DATASETS = ("ade150", "ade847", "pc59", "pc459", "voc20", "voc20b")


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
    except ValueError as e:
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

    if dataset not in PLANNERS and dataset in _variants():   # a scoring variant reads its base dataset's files
        dataset = _variants()[dataset]
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


def _variants() -> dict[str, str]:
    """Scoring variants (`variant_of` in conf/dataset/*.yaml, e.g. voc20b_proxies -> voc20b) -> their base."""
    from bench.data.synth import CONF_DIR, load_dataset_cfg

    out = {}
    for path in sorted(CONF_DIR.glob("*.yaml")):
        base = load_dataset_cfg(path.stem).get("variant_of")
        if base:
            out[path.stem] = base
    return out


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
