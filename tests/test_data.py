"""bench.data: configs, class names, synth -> build_dataset round trips, and every bad-input case."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import BenchError
from bench.data import (apply_class_name_overrides, build_dataset, check_dataset, load_class_names,
                        read_image, read_label, resolve_data_root, spec_from_cfg)
from bench.data.synth import DATASETS, load_dataset_cfg, main as synth_main, synthesize
from bench.metrics import load_sg_iou_table

SIX = ("ade847", "pc459", "ade150", "pc59", "voc20", "voc20b")
# clarifications §12 / specs/datasets.md: classes, ignore value, label bits, official val images
FACTS = {
    "ade847": (847, 65535, 16, 2000), "pc459": (459, 65535, 16, 5104), "ade150": (150, 255, 8, 2000),
    "pc59": (59, 255, 8, 5104), "voc20": (20, 255, 8, 1449), "voc20b": (21, 255, 8, 1449),
    "synthetic": (8, 255, 8, 4),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("synth")
    synthesize(r, DATASETS, n_images=4, seed=0)
    return r


def cfg(name: str, **over) -> dict:
    d = load_dataset_cfg(name)
    d.update(over)
    return d


def fresh(tmp_path: Path, name: str) -> tuple[Path, dict]:
    """A private synthetic copy of one dataset to break."""
    synthesize(tmp_path, [name], n_images=3, seed=1)
    return tmp_path, cfg(name)


# -- configs and class names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_configs(name):
    spec = spec_from_cfg(cfg(name))
    k, ignore, bits, n = FACTS[name]
    got = (spec.num_classes, spec.ignore_label, spec.layout.label_bits, spec.official_val_images)
    assert got == (k, ignore, bits, n)
    assert len(load_class_names(spec.classes_file)) == k
    assert spec.layout.label_ext == (".tif" if bits == 16 else ".png") and spec.layout.image_ext == ".jpg"
    if spec.sg_iou_table:
        assert max(load_sg_iou_table(spec.sg_iou_table["name"])) < k
        assert spec.sg_iou_table["official"] is (name == "ade847")
    assert spec.void_reweight is (name in ("ade847", "pc459"))


def test_hydra_composes_dataset_group():
    from hydra import compose, initialize_config_dir

    import bench.config  # noqa: F401  (the typed schema conf/config.yaml starts from)

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        c = compose(config_name="config", overrides=["dataset=ade847"])
    assert c.dataset.layout.label_dir == "ADE20K_2021_17_01/annotations_detectron2/validation"
    assert spec_from_cfg(c.dataset).ignore_label == 65535


def test_class_name_files():
    ade847 = load_class_names("ade847.txt")
    assert ade847[1] == "building, edifice"                        # commas kept, header line skipped
    assert ade847[782].startswith("central processing unit, cpu, c p u , central processor")
    assert load_class_names("ade150.txt")[8] == "window"            # raw "window " stripped
    voc20b = load_class_names("voc20b.txt")
    assert voc20b[:20] == load_class_names("voc20.txt") and voc20b[20] == "background"
    assert load_class_names("voc20.txt")[19] == "tv"
    assert load_class_names("pc59.txt")[49] == "diningtable"
    for f in ("ade150.txt", "ade847.txt", "pc59.txt", "pc459.txt", "voc20.txt", "voc20b.txt"):
        first = (Path(__file__).resolve().parents[1] / "bench/data/classnames" / f).read_text().splitlines()[0]
        assert first.startswith("# source: ") and "@" in first


def _model_overrides(model: str, dataset: str) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / f"{model}.yaml")
    overrides = OmegaConf.to_container(cfg, resolve=True).get("class_name_overrides") or {}
    return overrides.get(dataset) or {}


def test_model_class_name_overrides():
    assert _model_overrides("san_b", "voc20") == {}
    scan_pc59 = apply_class_name_overrides(load_class_names("pc59.txt"), _model_overrides("scan_l", "pc59"))
    assert scan_pc59[49] == "table" and sorted(scan_pc59) == sorted(load_class_names("pc59_scan_order.txt"))
    for model in ("simseg", "scan_l", "scan_b"):
        names = apply_class_name_overrides(load_class_names("voc20.txt"), _model_overrides(model, "voc20"))
        assert names[19] == "tvmonitor"
    with pytest.raises(BenchError, match="id 30 outside"):
        apply_class_name_overrides(["a"], {30: "b"})


def test_resolve_data_root(monkeypatch):
    assert resolve_data_root({"data_root": "/x"}) == "/x"
    monkeypatch.setenv("DETECTRON2_DATASETS", "/env")
    assert resolve_data_root({"data_root": None}) == "/env"
    monkeypatch.delenv("DETECTRON2_DATASETS")
    assert resolve_data_root({}) == "datasets"


# -- round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS)
def test_synth_round_trip(root, name):
    ds = build_dataset(cfg(name), root)
    k, ignore, _, _ = FACTS[name]
    assert len(ds) == 4 and ds.num_classes == k == len(ds.class_names) and ds.ignore_label == ignore
    sizes = set()
    for i in range(len(ds)):
        item = ds[i]
        img, lab = item["image"], item["label"]
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert lab.dtype == np.int64 and lab.shape == img.shape[:2]
        vals = np.unique(lab)
        assert ((vals >= 0) & (vals < k) | (vals == ignore)).all() and ignore in vals
        assert Path(item["file_name"]).exists()
        sizes.add(lab.shape)
    assert any(h != w for h, w in sizes) and len(sizes) >= 3
    if k > 256:
        assert max(int(v) for i in range(len(ds)) for v in np.unique(ds[i]["label"]) if v != ignore) > 255
    report = check_dataset(cfg(name), root)
    assert report.ok and report.n_checked == 4 and report.classes_present > 0
    assert bool(report.notes) is (name != "synthetic")               # fewer pairs than the official split


def test_voc_shared_image_pool_pairs_by_labels(root):
    ds = build_dataset(cfg("voc20"), root)
    assert (root / "VOC2012/JPEGImages/2007_999999.jpg").exists()    # extra image, not part of the split
    assert all("2007_999999" not in f for f in ds.file_names)


def test_synth_is_deterministic(tmp_path):
    synthesize(tmp_path / "a", ["ade847", "voc20b"], seed=3)
    synthesize(tmp_path / "b", ["ade847", "voc20b"], seed=3)
    for f in sorted((tmp_path / "a").rglob("*.*")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()


def test_synthetic_generated_on_first_use(tmp_path):
    ds = build_dataset(cfg("synthetic"), tmp_path / "fresh")
    assert len(ds) == 4 and ds.class_names[6] == "road, route"
    assert not [p for p in (tmp_path / "fresh").iterdir() if p.name.startswith(".")]   # temp folder cleaned up


def test_synth_cli(tmp_path, capsys):
    assert synth_main([f"root={tmp_path}", "datasets=[pc59]", "n_images=2"]) == 0
    assert len(list((tmp_path / "pcontext/val/label").glob("*.png"))) == 2
    assert synth_main([f"root={tmp_path}", "datasets=ade150,voc20"]) == 0
    assert synth_main(["--root", str(tmp_path)]) == 2
    assert synth_main([f"root={tmp_path}", "datasets=[coco]"]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def test_pc59_scan_order_layout(tmp_path):
    # SCAN/CAT-Seg folder: ambiguous id order -> refused unless label_order says which; scan order is remapped
    lbl = tmp_path / "VOCdevkit/VOC2010/annotations_detectron2/pc59_val"
    img = tmp_path / "VOCdevkit/VOC2010/JPEGImages"
    lbl.mkdir(parents=True)
    img.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(img / "2008_000001.jpg")
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(img / "2008_000099.jpg")   # pool image without label
    Image.fromarray(np.array([[0, 10, 19, 20, 55, 255]] * 4, np.uint8)).save(lbl / "2008_000001.png")
    with pytest.raises(BenchError, match="label_order=san\\|scan"):
        build_dataset(cfg("pc59"), tmp_path)
    ours = load_class_names("pc59.txt")
    lab = build_dataset(cfg("pc59", label_order="scan"), tmp_path)[0]["label"][0]
    assert [ours[v] for v in lab[:5]] == ["aeroplane", "diningtable", "tvmonitor", "bag", "wall"] and lab[5] == 255
    assert build_dataset(cfg("pc59", label_order="san"), tmp_path)[0]["label"][0, 1] == 10
    with pytest.raises(BenchError, match="label_order='x'"):
        build_dataset(cfg("pc59", label_order="x"), tmp_path)


# -- bad inputs: each a one-line BenchError naming the file -----------------------------------------------------


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_folder(tmp_path):
    with pytest.raises(BenchError) as e:
        build_dataset(cfg("ade150"), tmp_path / "nowhere")
    assert "does not exist" in one_line(e) and "ADEChallengeData2016/images/validation/*.jpg" in str(e.value)
    with pytest.raises(BenchError) as e:
        build_dataset(cfg("ade847"), tmp_path)
    assert "A-847 not found" in one_line(e) and "annotations_detectron2/validation/*.tif" in str(e.value)


def test_wrong_layout(tmp_path):
    (tmp_path / "ADEChallengeData2016/annotations/validation").mkdir(parents=True)   # raw labels, not converted
    with pytest.raises(BenchError) as e:
        build_dataset(cfg("ade150"), tmp_path)
    assert "has no 'annotations_detectron2'" in one_line(e) and "'annotations'" in str(e.value)


def test_wrong_label_extension(tmp_path):
    root, c = fresh(tmp_path, "ade847")
    lbl = root / "ADE20K_2021_17_01/annotations_detectron2/validation"
    for f in lbl.glob("*.tif"):
        with Image.open(f) as im:
            im.save(f.with_suffix(".png"))
        f.unlink()
    with pytest.raises(BenchError) as e:
        build_dataset(c, root)
    assert "no *.tif label files" in one_line(e) and "3×.png" in str(e.value) and str(lbl) in str(e.value)


def test_missing_image_folder(tmp_path):
    root, c = fresh(tmp_path, "pc459")
    shutil.rmtree(root / "pcontext_full/val/image")
    with pytest.raises(BenchError, match="image folder .*pcontext_full/val/image is missing"):
        build_dataset(c, root)


def test_unpaired_files_are_named(tmp_path):
    root, c = fresh(tmp_path, "ade150")
    img_dir = root / "ADEChallengeData2016/images/validation"
    (img_dir / "ade150_000001.jpg").unlink()
    with pytest.raises(BenchError) as e:
        build_dataset(c, root)
    assert "without an image" in one_line(e) and "ade150_000001.png" in str(e.value)
    root2, c2 = fresh(tmp_path / "b", "ade150")
    shutil.copy(root2 / "ADEChallengeData2016/images/validation/ade150_000000.jpg",
                root2 / "ADEChallengeData2016/images/validation/extra_img.jpg")
    with pytest.raises(BenchError) as e:
        build_dataset(c2, root2)
    assert "without a label" in one_line(e) and "extra_img.jpg" in str(e.value)


def test_label_values_out_of_range(tmp_path):
    root, c = fresh(tmp_path, "pc59")
    bad = root / "pcontext/val/label/pc59_000001.png"
    with Image.open(bad) as im:
        lab = np.array(im)
    lab[0, 0] = 200
    Image.fromarray(lab).save(bad)
    ds = build_dataset(c, root)
    ds[0]                                                           # other items are fine: checked lazily
    with pytest.raises(BenchError) as e:
        ds[1]
    assert str(bad) in one_line(e) and "values 200 outside [0, 59)" in str(e.value)
    report = check_dataset(c, root)
    assert not report.ok and report.n_checked == 2 and str(bad) in report.problems[0]


def test_empty_and_unreadable_images(tmp_path):
    root, c = fresh(tmp_path, "voc20")
    empty = root / "VOC2012/JPEGImages/2008_000000.jpg"
    empty.write_bytes(b"")
    garbage = root / "VOC2012/JPEGImages/2008_000001.jpg"
    garbage.write_bytes(b"not a jpeg at all" * 10)
    ds = build_dataset(c, root)
    with pytest.raises(BenchError) as e:
        ds[0]
    assert str(empty) in one_line(e) and "0 bytes" in str(e.value)
    with pytest.raises(BenchError) as e:
        ds[1]
    assert str(garbage) in one_line(e) and "unreadable" in str(e.value)


def test_label_size_mismatch(tmp_path):
    root, c = fresh(tmp_path, "ade847")
    bad = root / "ADE20K_2021_17_01/annotations_detectron2/validation/ade847_000002.tif"
    Image.fromarray(np.zeros((10, 12), np.uint16)).save(bad)
    with pytest.raises(BenchError) as e:
        build_dataset(c, root)[2]
    assert str(bad) in one_line(e) and "12x10" in str(e.value)


def test_colour_and_8bit_labels_refused(tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    with pytest.raises(BenchError, match="rgb.png has mode RGB"):
        read_label(rgb)
    eight = tmp_path / "eight.tif"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(eight)
    with pytest.raises(BenchError, match="eight.tif is 8-bit"):
        read_label(eight, label_bits=16)


def test_palette_label_read_as_indices(tmp_path):
    idx = np.array([[0, 3], [7, 255]], np.uint8)
    im = Image.fromarray(idx, mode="L").convert("P")
    im.putpalette([255, 0, 0] * 256)                                # every index looks red
    im.putdata(idx.ravel().tolist())
    f = tmp_path / "pal.png"
    im.save(f)
    with Image.open(f) as check:
        assert check.mode == "P"
    np.testing.assert_array_equal(read_label(f), idx)
    sixteen = tmp_path / "l16.tif"
    Image.fromarray(np.array([[846, 65535]], np.uint16)).save(sixteen)
    assert read_label(sixteen, 16).tolist() == [[846, 65535]]


def test_image_modes_to_rgb(tmp_path):
    grey = np.array([[0, 128], [200, 255]], np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8 and (out == grey[..., None]).all()
    Image.fromarray(np.array([[0, 257 * 100], [65535, 257]], np.uint16)).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png")[..., 0], [[0, 100], [255, 1]])
    Image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(tmp_path / "c.jpg")   # CMYK red
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (2, 3, 3) and out[..., 0].min() > 200 and out[..., 1:].max() < 60
    Image.new("RGBA", (2, 2), (10, 20, 30, 0)).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png")[0, 0].tolist() == [10, 20, 30]
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 9, 8, 7] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png")[1, 1].tolist() == [9, 8, 7]


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[274] = 6                                                   # rotate 270 on read, as detectron2 does
    Image.fromarray(np.zeros((4, 8, 3), np.uint8)).save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").shape == (8, 4, 3)


def test_num_classes_must_match_classes_file():
    with pytest.raises(BenchError, match="num_classes=10 but ade150.txt lists 150"):
        build_dataset(cfg("ade150", num_classes=10), "/nonexistent")


def test_unknown_config_key():
    with pytest.raises(BenchError, match="unknown keys \\['colour'\\]"):
        spec_from_cfg(cfg("ade150", colour="red"))


def test_synthetic_split_of_one_image_size(tmp_path):
    """`dataset.synth.size` writes every image (and label) at that size: the harness-overhead split."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(load_dataset_cfg("synthetic"))
    cfg.synth.n_images, cfg.synth.size = 5, [40, 56]
    ds = build_dataset(cfg, str(tmp_path))
    assert len(ds) == 5
    assert {ds[i]["image"].shape for i in range(5)} == {(40, 56, 3)} and ds[0]["label"].shape == (40, 56)
