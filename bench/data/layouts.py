"""Where each dataset lives on disk, and the checks that say what is wrong when it does not.

The facts (folders, extensions, label bit depth, ignore value) are data in `conf/dataset/*.yaml`; this module turns
one such config into a `DatasetSpec`, finds which of its layouts is on disk under the data root, and pairs image and
label files the way detectron2's `load_sem_seg` does (sorted by file stem), except that an unpaired file is an error
naming the file instead of a silent intersection — unless the image folder is a shared pool (VOC `JPEGImages`), where
the label files decide which images belong to the split.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bench import BenchError

log = logging.getLogger(__name__)

CLASSNAMES_DIR = Path(__file__).with_name("classnames")
SG_IOU_DIR = Path(__file__).with_name("sg_iou")


@dataclass(frozen=True)
class Layout:
    """One prepared layout of a split: image and label folders relative to the data root."""

    image_dir: str
    label_dir: str
    image_ext: str = ".jpg"
    label_ext: str = ".png"
    label_bits: int = 8                  # 8: 8-bit PNG; 16: 16-bit TIFF
    extra_images: bool = False           # image folder is a shared pool; labels decide the split
    label_order_ambiguous: bool = False  # the same folder is written in two id orders by different repos
    source: str = ""

    def describe(self, root: str | os.PathLike) -> str:
        """`<root>/<image_dir>/*.jpg + <root>/<label_dir>/*.png (8-bit)` — the expected layout in one line."""
        kind = {16: "16-bit TIFF", 8: "8-bit PNG"}[self.label_bits]
        return (f"{Path(root) / self.image_dir}/*{self.image_ext} + {Path(root) / self.label_dir}/*{self.label_ext} "
                f"({kind} labels)")


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset config as typed data (see `conf/dataset/*.yaml` for the meaning of each key)."""

    name: str
    display_name: str
    classes_file: str
    num_classes: int
    ignore_label: int
    layout: Layout
    alt_layouts: tuple[Layout, ...] = ()
    official_val_images: int | None = None
    registered_name: str | None = None
    label_order: str | None = None
    label_orders: Mapping[str, Any] = field(default_factory=dict)
    sg_iou_table: Mapping[str, Any] | None = None
    void_reweight: bool = False
    generate: bool = False
    synth: Mapping[str, Any] = field(default_factory=dict)
    vocabulary_file: str | None = None   # the names a model is asked for when they are not the classes (proxies)
    proxy_label: int | None = None       # predicted vocabulary ids >= proxy_label count as label proxy_label
    variant_of: str | None = None        # the dataset this one is a scoring variant of (same files, same labels)
    protocol: str | None = None          # how the dataset is scored, in words; no effect on a result
    order: int | None = None          # place in the leaderboard's tables (bench.board); no effect on a result

    @property
    def layouts(self) -> tuple[Layout, ...]:
        return (self.layout, *self.alt_layouts)


def _plain(cfg: Any) -> dict:
    """DictConfig or mapping -> plain dict (interpolations resolved)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg)


_LAYOUT_KEYS = {f for f in Layout.__dataclass_fields__}
_SPEC_KEYS = {f for f in DatasetSpec.__dataclass_fields__}


def _layout(d: Mapping[str, Any], where: str) -> Layout:
    unknown = set(d) - _LAYOUT_KEYS
    if unknown:
        raise BenchError(f"{where}: unknown layout keys {sorted(unknown)}; allowed: {sorted(_LAYOUT_KEYS)}")
    for key in ("image_dir", "label_dir"):
        if not d.get(key):
            raise BenchError(f"{where}: layout needs `{key}` (a folder relative to data_root)")
    out = Layout(**d)
    if out.label_bits not in (8, 16):
        raise BenchError(f"{where}: label_bits={out.label_bits}; allowed 8 (PNG) or 16 (TIFF)")
    return out


def spec_from_cfg(cfg_dataset: Any) -> DatasetSpec:
    """`conf/dataset/<name>.yaml` (DictConfig or dict) -> `DatasetSpec`; unknown or missing keys fail in one line."""
    d = _plain(cfg_dataset)
    name = d.get("name", "?")
    where = f"conf/dataset/{name}.yaml"
    unknown = set(d) - _SPEC_KEYS
    if unknown:
        raise BenchError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    missing = [k for k in ("name", "classes_file", "num_classes", "ignore_label", "layout") if d.get(k) is None]
    if missing:
        raise BenchError(f"{where}: missing keys {missing}")
    d["display_name"] = d.get("display_name") or d["name"]
    d["layout"] = _layout(d["layout"], where)
    d["alt_layouts"] = tuple(_layout(a, f"{where} alt_layouts[{i}]") for i, a in enumerate(d.get("alt_layouts") or ()))
    d["label_orders"] = dict(d.get("label_orders") or {})
    d["synth"] = dict(d.get("synth") or {})
    for key in ("void_reweight", "generate"):
        d[key] = bool(d.get(key) or False)
    spec = DatasetSpec(**d)
    if spec.label_order is not None and spec.label_order not in spec.label_orders:
        allowed = sorted(spec.label_orders) or ["null"]
        raise BenchError(f"{where}: label_order={spec.label_order!r} is not known for {spec.display_name}; "
                         f"allowed: {allowed} (dataset.label_order=...)")
    return spec


def resolve_data_root(cfg: Any = None) -> str:
    """The folder the dataset layouts are relative to: `cfg.data_root`, else $DETECTRON2_DATASETS, else `datasets`."""
    value = None
    if cfg is not None:
        value = cfg.get("data_root") if hasattr(cfg, "get") else getattr(cfg, "data_root", None)
    return str(value or os.environ.get("DETECTRON2_DATASETS") or "datasets")


# --------------------------------------------------------------------------------------------------------------
# finding the layout on disk


def _ls(folder: Path, ext: str) -> dict[str, Path]:
    """stem -> path of the files in `folder` ending with `ext` (non-recursive, like detectron2's load_sem_seg)."""
    return {p.name[: -len(ext)]: p for p in folder.iterdir() if p.name.endswith(ext) and p.is_file()}


def _ext_summary(folder: Path) -> str:
    counts: dict[str, int] = {}
    for p in folder.iterdir():
        key = p.suffix.lower() or ("<dir>" if p.is_dir() else "<none>")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n}×{k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])[:4]) or "nothing"


def _nearest_existing(root: Path, rel: str) -> tuple[Path, str]:
    """Deepest existing ancestor of root/rel and the first missing component below it."""
    cur = root
    for part in Path(rel).parts:
        if not (cur / part).is_dir():
            return cur, part
        cur = cur / part
    return cur, ""


def find_layout(spec: DatasetSpec, data_root: str | os.PathLike) -> Layout:
    """The first layout of `spec` whose label folder exists under `data_root`; a one-line BenchError otherwise."""
    root = Path(data_root)
    for lay in spec.layouts:
        if (root / lay.label_dir).is_dir():
            if lay.label_order_ambiguous and spec.label_order is None:
                orders = "|".join(sorted(spec.label_orders)) or "?"
                raise BenchError(
                    f"{spec.display_name}: labels found only at {root / lay.label_dir}, a folder that different "
                    f"repos write in different class-id orders ({lay.source}); set dataset.label_order={orders} "
                    f"to say which, or prepare {spec.layout.describe(root)} with SAN's script")
            return lay
    if not root.is_dir():
        raise BenchError(f"data root {root} does not exist; expected {spec.display_name} at "
                         f"{spec.layout.describe(root)}; set data_root=DIR or $DETECTRON2_DATASETS")
    lay = spec.layout
    parent, missing = _nearest_existing(root, lay.label_dir)
    if parent == root:
        hint = "prepare it (bench.data.prepare) or point data_root at the folder that holds it"
    else:
        found = sorted(p.name for p in parent.iterdir() if p.is_dir())[:6]
        hint = (f"{parent} exists but has no {missing!r} (subfolders: {found or 'none'}); wrong layout or labels "
                f"not converted yet")
    raise BenchError(f"{spec.display_name} not found: expected {lay.describe(root)}; {hint}")


def _names(paths: list[str], n: int = 3) -> str:
    shown = ", ".join(paths[:n])
    return shown + (f" (+{len(paths) - n} more)" if len(paths) > n else "")


def pair_files(spec: DatasetSpec, layout: Layout, data_root: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, label) pairs sorted by file stem; unpaired files raise BenchError naming them."""
    root = Path(data_root)
    img_dir, lbl_dir = root / layout.image_dir, root / layout.label_dir
    expected = layout.describe(root)
    if not img_dir.is_dir():
        raise BenchError(f"{spec.display_name}: labels found but image folder {img_dir} is missing; "
                         f"expected {expected}")
    labels = _ls(lbl_dir, layout.label_ext)
    if not labels:
        raise BenchError(f"{spec.display_name}: no *{layout.label_ext} label files in {lbl_dir} "
                         f"(found {_ext_summary(lbl_dir)}); expected {expected}")
    images = _ls(img_dir, layout.image_ext)
    if not images:
        raise BenchError(f"{spec.display_name}: no *{layout.image_ext} images in {img_dir} "
                         f"(found {_ext_summary(img_dir)}); expected {expected}")
    no_image = sorted(str(labels[s]) for s in labels.keys() - images.keys())
    if no_image:
        raise BenchError(f"{spec.display_name}: {len(no_image)} label file(s) without an image in {img_dir}: "
                         f"{_names(no_image)}; add the images or remove the labels (expected {expected})")
    if not layout.extra_images:
        no_label = sorted(str(images[s]) for s in images.keys() - labels.keys())
        if no_label:
            raise BenchError(f"{spec.display_name}: {len(no_label)} image(s) without a label in {lbl_dir}: "
                             f"{_names(no_label)}; add the labels or remove the images (expected {expected})")
    stems = sorted(labels)
    if spec.official_val_images and len(stems) != spec.official_val_images:
        log.warning("%s: %d image/label pairs under %s, the official val split has %d", spec.display_name,
                    len(stems), root, spec.official_val_images)
    return [(images[s], labels[s]) for s in stems]


# --------------------------------------------------------------------------------------------------------------
# class names


def load_class_names(file: str | os.PathLike) -> list[str]:
    """One class per line, line order = id; `#` lines and blank lines are skipped; names may contain commas."""
    path = Path(file)
    if not path.is_absolute() and not path.exists():
        path = CLASSNAMES_DIR / path
    if not path.is_file():
        raise BenchError(f"class-name file {path} not found; put it in {CLASSNAMES_DIR} or give an absolute path")
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            names.append(s)
    if dups := sorted({n for n in names if names.count(n) > 1}):
        raise BenchError(f"class-name file {path} has duplicate names {dups[:5]}; list each class once, in id order")
    return names


def vocabulary_names(spec: DatasetSpec) -> list[str]:
    """The names a model is asked for, in vocabulary-id order: the classes themselves, or (`vocabulary_file`) a
    longer list whose ids from `proxy_label` on are proxies scored as that label (`proxy_predictions`)."""
    where = f"conf/dataset/{spec.name}.yaml"
    if spec.vocabulary_file is None:
        if spec.proxy_label is not None:
            raise BenchError(f"{where}: proxy_label={spec.proxy_label} needs a vocabulary_file that lists the proxies")
        return load_class_names(spec.classes_file)
    names = load_class_names(spec.vocabulary_file)
    if spec.proxy_label is None and len(names) != spec.num_classes:
        raise BenchError(f"{where}: vocabulary_file {spec.vocabulary_file} lists {len(names)} names for "
                         f"{spec.num_classes} classes; set proxy_label or list one name per class")
    if spec.proxy_label is not None and not 0 <= spec.proxy_label < min(spec.num_classes, len(names)):
        raise BenchError(f"{where}: proxy_label={spec.proxy_label} must be a class id below {spec.num_classes} "
                         f"and below the {len(names)} names of {spec.vocabulary_file}")
    return names


def proxy_predictions(labels, proxy_label: int | None):
    """Predicted vocabulary ids -> label ids: every id >= proxy_label counts as proxy_label (in place); a dataset
    without proxies is returned as it is. CAT-Seg's PAS-20b evaluator does the same (`pred[pred >= 20] = 20`)."""
    return labels if proxy_label is None else labels.clamp_(max=proxy_label)


def label_order_lut(spec: DatasetSpec) -> "list[int] | None":
    """For `label_order` other than the dataset's own: disk id -> dataset id (None = identity).

    A remap spec is `{classes_file: <file naming the on-disk id order>, aliases: {disk name: dataset name}}`; the
    two lists must be the same set of names up to the aliases.
    """
    if spec.label_order is None:
        return None
    entry = spec.label_orders.get(spec.label_order)
    if not entry:
        return None
    disk = load_class_names(entry["classes_file"])
    ours = load_class_names(spec.classes_file)
    aliases = dict(entry.get("aliases") or {})
    index = {n: i for i, n in enumerate(ours)}
    lut = []
    for n in disk:
        target = aliases.get(n, n)
        if target not in index:
            raise BenchError(f"{entry['classes_file']}: class {n!r} has no match in {spec.classes_file}; "
                             f"add it to label_orders.{spec.label_order}.aliases")
        lut.append(index[target])
    if sorted(lut) != list(range(len(ours))):
        raise BenchError(f"{entry['classes_file']}: not a permutation of {spec.classes_file}")
    return lut


def apply_class_name_overrides(names: list[str], overrides: Mapping[Any, str] | None) -> list[str]:
    """A copy of `names` with `{id: name}` replacements; ids outside the list fail in one line."""
    out = list(names)
    for key, value in (overrides or {}).items():
        i = int(key)
        if not 0 <= i < len(out):
            raise BenchError(f"class_name_overrides: id {i} outside the {len(out)}-class list; fix the model config")
        out[i] = str(value)
    return out


# --------------------------------------------------------------------------------------------------------------
# which repo's tree is on disk (bench.data.check / bench.data.prepare)


@dataclass(frozen=True)
class LayoutMatch:
    """One layout of a dataset as found under a data root: `state` is complete | partial | absent."""

    layout: Layout
    key: str                 # `san` (SAN / detectron2 / PAE trees) or `ovseg` (VOCdevkit: ov-seg, SCAN, CAT-Seg)
    family: str              # human name of the repos that read/write this tree
    state: str
    reason: str = ""
    n_labels: int = 0
    n_images: int = 0


_REPO_NAMES = {"MendelXu/SAN": "SAN", "facebookresearch/detectron2": "detectron2/SAN",
               "better-chao/perceptual_abilities_evaluation": "SAN (PAE registration)"}


def layout_family(layout: Layout) -> tuple[str, str]:
    """(key, name) of the repos whose tree `layout` is: VOCdevkit/... trees are ov-seg's, SCAN's and CAT-Seg's."""
    if layout.label_dir.startswith("VOCdevkit/"):
        return "ovseg", "ov-seg/SCAN/CAT-Seg"
    repo = layout.source.split("@")[0]
    return "san", _REPO_NAMES.get(repo, repo or "SAN")


def _stems(folder: Path, ext: str) -> set[str] | None:
    if not folder.is_dir():
        return None
    with os.scandir(folder) as it:
        return {e.name[: -len(ext)] for e in it if e.name.endswith(ext) and e.is_file()}


def layout_status(spec: DatasetSpec, layout: Layout, data_root: str | os.PathLike) -> LayoutMatch:
    """Is `layout` complete, partial (which part is missing, in words) or absent under `data_root`?"""
    root = Path(data_root)
    key, family = layout_family(layout)
    labels = _stems(root / layout.label_dir, layout.label_ext)
    if labels is None:
        return LayoutMatch(layout, key, family, "absent")
    images = _stems(root / layout.image_dir, layout.image_ext)

    def partial(reason: str) -> LayoutMatch:
        return LayoutMatch(layout, key, family, "partial", reason, len(labels), len(images or ()))

    if not labels:
        return partial(f"no *{layout.label_ext} label files in {root / layout.label_dir} "
                       f"(found {_ext_summary(root / layout.label_dir)})")
    if images is None:
        return partial(f"image folder {root / layout.image_dir} is missing")
    if not images:
        return partial(f"no *{layout.image_ext} images in {root / layout.image_dir}")
    orphans = sorted(labels - images)
    if orphans:
        return partial(f"{len(orphans)} of {len(labels)} labels have no image in {root / layout.image_dir} "
                       f"(e.g. {orphans[0]}{layout.image_ext})")
    if not layout.extra_images:
        unlabeled = sorted(images - labels)
        if unlabeled:
            return partial(f"{len(unlabeled)} of {len(images)} images have no label in {root / layout.label_dir} "
                           f"(e.g. {unlabeled[0]}{layout.label_ext})")
    return LayoutMatch(layout, key, family, "complete", "", len(labels), len(images))


def expected_layouts(spec: DatasetSpec, data_root: str | os.PathLike) -> str:
    """`SAN: <image glob> + <label glob> (...) | ov-seg/SCAN/CAT-Seg: ...` — every layout the benchmark reads."""
    return " | ".join(f"{layout_family(lay)[1]} [layout={layout_family(lay)[0]}]: {lay.describe(data_root)}"
                      for lay in spec.layouts)


def detect_layout(spec: DatasetSpec, data_root: str | os.PathLike, prefer: str | None = None) -> LayoutMatch:
    """The one complete tree of `spec` under `data_root`, saying whose it is; one-line BenchError when there is none,
    when a tree is partial, or when two trees are present (ambiguous: choose one with `prefer`, a layout key)."""
    root = Path(data_root)
    name = spec.display_name
    candidates = list(spec.layouts)
    if prefer is not None:
        keys = sorted({layout_family(lay)[0] for lay in spec.layouts})
        candidates = [lay for lay in spec.layouts if layout_family(lay)[0] == prefer]
        if not candidates:
            raise BenchError(f"{name}: no layout {prefer!r}; this dataset has layout={'|'.join(keys)}")
    found = [layout_status(spec, lay, root) for lay in candidates]
    present = [m for m in found if m.state != "absent"]
    for m in present:
        if m.state == "partial":
            raise BenchError(f"{name}: partial {m.family} tree under {root}: {m.reason}; expected "
                             f"{m.layout.describe(root)}")
    if len(present) > 1:
        trees = " and ".join(f"{m.family}'s ({root / m.layout.label_dir}, {m.n_labels} labels)" for m in present)
        keys = "|".join(m.key for m in present)
        raise BenchError(f"{name}: ambiguous data root, found {trees}; remove one or choose with layout={keys}")
    if not present:
        if not root.is_dir():
            raise BenchError(f"data root {root} does not exist; expected {name} as {expected_layouts(spec, root)}; "
                             f"set data_root=DIR or $DETECTRON2_DATASETS")
        raise BenchError(f"{name} not found under {root}; expected {expected_layouts(spec, root)}; prepare it "
                         f"with `python -m bench.data.prepare dataset={spec.name} src=RAW_DIR`")
    match = present[0]
    if match.layout.label_order_ambiguous and spec.label_order is None:
        orders = "|".join(sorted(spec.label_orders)) or "?"
        raise BenchError(f"{name}: found the {match.family} tree ({root / match.layout.label_dir}), which different "
                         f"repos write in different class-id orders; set dataset.label_order={orders} to say which, "
                         f"or prepare {spec.layout.describe(root)} with bench.data.prepare")
    return match
