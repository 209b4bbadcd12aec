"""bench.data.prepare / bench.data.check: raw synthetic downloads -> prepare -> check -> evaluate, the exact id
mapping of each converter on hand-built inputs, layout detection (SAN, ov-seg/SCAN, ambiguous, partial) and
failures that leave nothing half-written."""
from __future__ import annotations

import pickle
import shutil
import struct
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from bench import BenchError
from bench.data import build_dataset, load_class_names, spec_from_cfg
from bench.data.check import main as check_main
from bench.data.layouts import detect_layout
from bench.data.labelmaps import (_nn_index, ade150_label, ade847_id_table, ade847_label, ade847_target_size,
                                  ade_full_class_mask, pc59_ids, pc59_label, pc59_label_from_labelmap, pc459_label,
                                  resize_linear_u8, resize_nearest, voc_label)
from bench.data.prepare import main as prepare_main, prepare
from bench.data.rawformats import (decode_rle, detail_class_mask, load_index_pickle, read_mat, rle_counts_from_string,
                                   rle_decode)
from bench.data.synth import load_dataset_cfg, rle_encode, synthesize_raw, write_mat_v5
from bench.metrics import SemSegEvaluator

SIX = ("ade847", "pc459", "ade150", "pc59", "voc20", "voc20b")
N_RAW = 3
# images each prepared split holds: the last synthetic VOC val label is background + boundary only, which SAN's
# script does not write for PAS-20 (all 255) but CAT-Seg's writes for PAS-20b (background = 20)
N_PREPARED = {"ade847": 3, "pc459": 3, "ade150": 3, "pc59": 3, "voc20": 2, "voc20b": 3}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("raw")
    return {name: synthesize_raw(root, name, n_images=N_RAW, seed=0) for name in SIX}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, raw) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    for name in SIX:
        prepare(name, raw[name], root, progress=False)
    return root


def no_leftovers(root: Path) -> bool:
    return not [p for p in root.rglob(".prepare-*")]


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


# -- end to end ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SIX)
def test_prepare_check_evaluate(prepared, name, capsys):
    n = N_PREPARED[name]
    assert check_main([f"dataset={name}", f"data_root={prepared}", f"expect_images={n}", "top=3"]) == 0
    out = capsys.readouterr().out
    assert "found the" in out and f"pairs: {n} image/label pairs" in out and "per-class pixels" in out
    assert out.strip().endswith("ok")
    # the official count is the default expectation: a 3-image copy is reported, one problem per line
    assert check_main([f"dataset={name}", f"data_root={prepared}"]) == 1
    assert "problem: " in capsys.readouterr().out
    cfg = load_dataset_cfg(name)
    ds = build_dataset(cfg, prepared)
    assert len(ds) == n and not any("train" in f for f in ds.file_names)
    ev = SemSegEvaluator(ds.num_classes, ds.ignore_label, ds.class_names)
    for i in range(len(ds)):
        gt = ds[i]["label"]
        ev.process(np.where(gt == ds.ignore_label, 0, gt), gt)
    res = ev.evaluate()
    assert res["mIoU"] == pytest.approx(100.0) and res["images"] == n


def test_prepared_labels_follow_raw(raw, prepared):
    """Spot-check each prepared file against its raw source through the pure converters."""
    a = np.array(Image.open(raw["ade150"] / "annotations/validation/ADE_val_00000002.png"))
    b = np.array(Image.open(prepared / "ADEChallengeData2016/annotations_detectron2/validation/ADE_val_00000002.png"))
    assert (b == ade150_label(a)).all() and 255 in b
    lm = read_mat(raw["pc459"] / "trainval/2008_000001.mat")["LabelMap"]
    tif = Image.open(prepared / "pcontext_full/val/label/2008_000001.tif")
    assert tif.mode == "I;16" and (np.array(tif) == pc459_label(lm)).all()
    # SAN's PC-59 route (Detail json) and the .mat route agree where annotations do not overlap
    assert (np.array(Image.open(prepared / "pcontext/val/label/2008_000001.png")) == pc59_label_from_labelmap(lm)).all()
    voc = np.array(Image.open(raw["voc20"] / "SegmentationClass/2007_000001.png"))
    assert (np.array(Image.open(prepared / "VOC2012/annotations_detectron2_bg/val/2007_000001.png"))
            == voc_label(voc, background=True)).all()
    # the 520x560 raw image is resized to short side 512, labels with nearest neighbour
    big = Image.open(prepared / "ADE20K_2021_17_01/annotations_detectron2/validation/ADE_val_00000001.tif")
    img = Image.open(prepared / "ADE20K_2021_17_01/images_detectron2/validation/ADE_val_00000001.jpg")
    assert big.size == img.size == (551, 512)
    folder = next(raw["ade847"].rglob("ADE_val_00000001_seg.png"))
    cls = resize_nearest(ade_full_class_mask(np.array(Image.open(folder))), 512, 551)
    assert (np.array(big) == ade847_label(cls)).all()


def test_pc59_mat_route_and_cli(raw, tmp_path, capsys):
    assert prepare_main(["dataset=pc59", f"src={raw['pc59'].parent.parent}", f"data_root={tmp_path}",
                         "pc59_source=mat", "progress=false"]) == 0
    out = capsys.readouterr().out
    assert "note: pc59_source=mat" in out and "PC-59: prepared 3 images (official val split: 5104)" in out
    assert "note: val ids from trainval_merged.json (phase val)" in out
    assert "next: python -m bench.data.check dataset=pc59" in out


def test_in_place_and_symlinked_images(raw, tmp_path):
    # raw tree under data_root (the official scripts' way): images stay where they are
    shutil.copytree(raw["ade150"], tmp_path / "d" / "ADEChallengeData2016")
    s = prepare("ade150", tmp_path / "d", tmp_path / "d", progress=False)
    assert s.images == "in place" and len(list((tmp_path / "d/ADEChallengeData2016/images/validation").iterdir())) == 3
    s = prepare("pc459", raw["pc459"], tmp_path / "e", images="symlink", progress=False)
    imgs = sorted((tmp_path / "e/pcontext_full/val/image").iterdir())
    assert len(imgs) == 3 and all(p.is_symlink() for p in imgs)
    assert len(build_dataset(load_dataset_cfg("pc459"), tmp_path / "e")) == 3


# -- exact id mappings on hand-built inputs -----------------------------------------------------------------------


def test_ade150_mapping():
    raw = np.array([[0, 1, 2], [149, 150, 255]], np.uint8)
    assert ade150_label(raw).tolist() == [[255, 0, 1], [148, 149, 254]]   # uint8 `- 1`, 0 "other" -> 255
    names = load_class_names("ade150.txt")
    assert names[ade150_label(np.array([[1, 150]], np.uint8))[0, 1]] == "flag"


def _seg(ade_ids: list[int], r_units: int = 7) -> np.ndarray:
    ids = np.array([ade_ids])
    return np.stack([(ids // 256) * 10 + r_units, ids % 256, np.full_like(ids, 3)], axis=-1).astype(np.uint8)


def test_ade847_mapping():
    # ADE object id = int(R / 10) * 256 + G; the units digit of R and B do not matter
    ade_ids = [2978, 312, 3124, 3148, 0, 5, 1]
    cls = ade_full_class_mask(_seg(ade_ids))
    assert cls.tolist() == [ade_ids] and (ade_full_class_mask(_seg(ade_ids, r_units=0)) == cls).all()
    lab = ade847_label(cls)
    assert lab.dtype == np.uint16 and lab.tolist() == [[0, 1, 782, 846, 65535, 65535, 65535]]
    names = load_class_names("ade847.txt")
    assert [names[v] for v in lab[0, :4]] == ["wall", "building, edifice", names[782], names[846]]
    assert names[782].startswith("central processing unit") and names[846].startswith("adding machine")
    # MaskFormer's size rule: short side 512 when > 512, Python round for the long side
    assert ade847_target_size(683, 1024) == (512, 768) and ade847_target_size(1024, 683) == (768, 512)
    assert ade847_target_size(512, 900) is None and ade847_target_size(513, 513) == (512, 512)
    assert ade847_target_size(600, 601) == (512, 513)


def test_pascal_context_val_list():
    ids = [s for s in (Path(__file__).resolve().parents[1] / "bench/data/prepare_tables/pascal_context_val.txt")
           .read_text().splitlines() if not s.startswith("#")]
    assert len(ids) == len(set(ids)) == 5104 == load_dataset_cfg("pc59")["official_val_images"]


def test_ade847_table_is_the_class_list():
    table = ade847_id_table()
    assert len(table) == 847 and sorted(table.values()) == list(range(847)) and min(table) == 6
    rows = [line.split("\t") for line in (Path(__file__).resolve().parents[1] / "bench/data/prepare_tables/"
                                         "ade847_ade_ids.tsv").read_text().splitlines() if not line.startswith("#")]
    assert [r[2] for r in rows] == load_class_names("ade847.txt")


def test_cv2_resize_rules():
    assert _nn_index(5, 3).tolist() == [0, 1, 3] and _nn_index(3, 5).tolist() == [0, 0, 1, 1, 2]
    a = np.arange(15).reshape(3, 5)
    assert resize_nearest(a, 2, 3).tolist() == [[0, 1, 3], [5, 6, 8]]
    # 2:1 down-scale = mean of each pair, rounded by OpenCV's fixed point: (0+100)/2 -> 50, (200+255)/2 -> 228
    assert resize_linear_u8(np.array([[0, 100, 200, 255]], np.uint8), 1, 2).tolist() == [[50, 228]]
    img = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    out = resize_linear_u8(img, 4, 5)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert resize_linear_u8(np.full((6, 6), 77, np.uint8), 4, 4).tolist() == [[77] * 4] * 4


def test_cv2_resize_matches_opencv_when_installed():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (683, 1024, 3), dtype=np.uint8)
    lab = rng.integers(0, 3000, (683, 1024)).astype(np.int32)
    assert (resize_nearest(lab, 512, 768) == cv2.resize(lab, (768, 512), interpolation=cv2.INTER_NEAREST)).all()
    assert (resize_linear_u8(img, 512, 768) == cv2.resize(img, (768, 512), interpolation=cv2.INTER_LINEAR)).all()


def test_pc59_mapping():
    # Detail category id -> rank among {0} + the 59 sorted ids, minus 1 on uint8
    mask = np.array([[0, 2, 9, 397, 458, 259]])
    lab = pc59_label(mask)
    assert lab.dtype == np.uint8 and lab.tolist() == [[255, 0, 1, 49, 58, 34]]
    names = load_class_names("pc59.txt")
    pc459 = load_class_names("pc459.txt")
    assert [names[v] for v in lab[0, 1:]] == ["aeroplane", "bag", "diningtable", "wood", pc459[259 - 1]]
    with pytest.raises(ValueError, match=r"\[3\]"):
        pc59_label(np.array([[0, 3]]))                     # the official script asserts every id is known
    # the .mat route: labels.txt ids outside the 59 -> 255
    assert pc59_label_from_labelmap(np.array([[0, 2, 397, 1, 459]], np.uint16)).tolist() == [[255, 0, 49, 255, 255]]


def test_pc59_ids_match_pc459_names():
    ids, n59, n459 = pc59_ids(), load_class_names("pc59.txt"), load_class_names("pc459.txt")
    assert len(ids) == 59 and list(ids) == sorted(ids)
    assert [k for k, d in enumerate(ids) if n459[d - 1] != n59[k]] == [49]          # table vs diningtable
    assert n459[ids[49] - 1] == "table" and n59[49] == "diningtable"


def test_detail_mask_paints_in_file_order():
    full = {"size": [2, 3], "counts": [0, 6]}                                    # all ones
    left = {"size": [2, 3], "counts": [0, 2, 4]}                                 # first column
    mask = detail_class_mask([{"segmentation": full, "category_id": 2}, {"segmentation": left, "category_id": 9}], 2, 3)
    assert mask.tolist() == [[9, 2, 2], [9, 2, 2]]
    mask = detail_class_mask([{"segmentation": left, "category_id": 9}, {"segmentation": full, "category_id": 2}], 2, 3)
    assert mask.tolist() == [[2, 2, 2], [2, 2, 2]]


def test_coco_rle():
    assert rle_counts_from_string("1:1H") == [1, 10, 1, 2]          # 'H' = -8 relative to the count two back
    assert rle_decode({"size": [2, 3], "counts": [1, 2, 1, 2]}).tolist() == [[0, 1, 1], [1, 0, 1]]  # column-major
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = (rng.random((rng.integers(1, 9), rng.integers(1, 9))) < 0.5).astype(np.uint8)
        assert (rle_decode(rle_encode(m)) == m).all()
    with pytest.raises(ValueError, match="sum to"):
        rle_decode({"size": [2, 2], "counts": [1, 2]})


def test_pycocotools_agrees_when_installed():
    mask_api = pytest.importorskip("pycocotools.mask")
    m = (np.random.default_rng(3).random((17, 23)) < 0.4).astype(np.uint8)
    assert rle_encode(m)["counts"] == mask_api.encode(np.asfortranarray(m))["counts"].decode()


def test_pc459_mapping():
    lab = pc459_label(np.array([[0, 1, 459, 300]], np.uint16))
    assert lab.dtype == np.uint16 and lab.tolist() == [[65535, 0, 458, 299]]
    assert load_class_names("pc459.txt")[0] == "accordion"
    assert pc459_label(np.array([[0, 2]], np.float64)).tolist() == [[65535, 1]]   # integral doubles are accepted
    with pytest.raises(ValueError):
        pc459_label(np.array([[0.5]]))


def test_voc_mapping():
    raw = np.array([[0, 1, 15, 20, 21, 254, 255]], np.uint8)
    assert voc_label(raw, background=False).tolist() == [[255, 0, 14, 19, 255, 255, 255]]
    assert voc_label(raw, background=True).tolist() == [[20, 0, 14, 19, 255, 255, 255]]
    assert load_class_names("voc20b.txt")[20] == "background" and load_class_names("voc20.txt")[14] == "person"
    with pytest.raises(ValueError, match="colour"):
        voc_label(np.zeros((2, 2, 3), np.uint8), background=False)


def test_palette_voc_png_read_as_indices(raw):
    im = Image.open(raw["voc20"] / "SegmentationClass/2007_000001.png")
    assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]              # VOC colour of class 1


def _mat_bytes(compress: bool) -> bytes:
    """A MATLAB v5 file built by hand from the format spec: LabelMap (uint16 class stored as uint8, 2x3, column-major
    data 1..6) and `ab` (int32, name in the small-element format)."""
    def el(typ, payload):
        return struct.pack("<II", typ, len(payload)) + payload + b"\0" * ((-len(payload)) % 8)

    def matrix(cls, dims, name, mi, data):
        name_el = (struct.pack("<HH", 1, len(name)) + name.ljust(4, b"\0")) if len(name) <= 4 else el(1, name)
        sub = el(6, struct.pack("<II", cls, 0)) + el(5, struct.pack("<ii", *dims)) + name_el + el(mi, data)
        return struct.pack("<II", 14, len(sub)) + sub

    head = b"MATLAB 5.0 MAT-file, hand-built".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    body = matrix(11, (2, 3), b"LabelMap", 2, bytes([1, 2, 3, 4, 5, 6])) + matrix(12, (1, 2), b"ab", 5,
                                                                                    struct.pack("<ii", 7, -8))
    if compress:
        z = zlib.compress(body)
        body = struct.pack("<II", 15, len(z)) + z
    return head + body


@pytest.mark.parametrize("compress", [False, True])
def test_mat_v5_reader(tmp_path, compress):
    f = tmp_path / "x.mat"
    f.write_bytes(_mat_bytes(compress))
    got = read_mat(f)
    assert got["LabelMap"].dtype == np.uint16 and got["LabelMap"].tolist() == [[1, 3, 5], [2, 4, 6]]
    assert got["ab"].dtype == np.int32 and got["ab"].tolist() == [[7, -8]]
    write_mat_v5(tmp_path / "y.mat", {"LabelMap": np.array([[0, 459], [300, 2]], np.uint16)}, compress=compress)
    assert read_mat(tmp_path / "y.mat")["LabelMap"].tolist() == [[0, 459], [300, 2]]
    (tmp_path / "h5.mat").write_bytes(b"MATLAB 7.3 MAT-file".ljust(128))
    with pytest.raises(ValueError, match="v7.3"):
        read_mat(tmp_path / "h5.mat")


def test_scipy_agrees_when_installed(raw):
    sio = pytest.importorskip("scipy.io")
    for f in sorted((raw["pc459"] / "trainval").glob("*.mat")):
        assert (sio.loadmat(f)["LabelMap"] == read_mat(f)["LabelMap"]).all()


def test_index_pickle_is_restricted(tmp_path):
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps({"folder": ["a"], "filename": ["b"], "x": np.zeros((2, 2), np.uint8)}))
    assert load_index_pickle(ok)["x"].shape == (2, 2)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"folder": [PurePosixPath("a")], "filename": ["b"]}))
    with pytest.raises(BenchError) as e:
        load_index_pickle(bad)
    assert "PurePosixPath" in one_line(e) and "allow_unsafe_pickle=true" in str(e.value)
    assert load_index_pickle(bad, allow_unsafe=True)["folder"] == [PurePosixPath("a")]


# -- layout detection ---------------------------------------------------------------------------------------------


def _spec(name: str, **over):
    cfg = load_dataset_cfg(name)
    cfg.update(over)
    return spec_from_cfg(cfg)


def _scan_voc_tree(prepared: Path, root: Path) -> None:
    """ov-seg/SCAN/CAT-Seg layout of PAS-20: VOCdevkit/VOC2012/{JPEGImages, annotations_detectron2/val}."""
    shutil.copytree(prepared / "VOC2012/JPEGImages", root / "VOCdevkit/VOC2012/JPEGImages")
    shutil.copytree(prepared / "VOC2012/annotations_detectron2/val",
                    root / "VOCdevkit/VOC2012/annotations_detectron2/val")


def test_detect_san_tree(prepared):
    m = detect_layout(_spec("voc20"), prepared)
    assert (m.key, m.family, m.state, m.n_labels) == ("san", "SAN", "complete", 2)
    assert detect_layout(_spec("ade150"), prepared).family == "detectron2/SAN"


def test_detect_scan_tree(prepared, tmp_path, capsys):
    _scan_voc_tree(prepared, tmp_path)
    m = detect_layout(_spec("voc20"), tmp_path)
    assert (m.key, m.family) == ("ovseg", "ov-seg/SCAN/CAT-Seg")
    assert check_main(["dataset=voc20", f"data_root={tmp_path}", "expect_images=2"]) == 0
    assert "found the ov-seg/SCAN/CAT-Seg tree [layout=ovseg]" in capsys.readouterr().out


def test_detect_ambiguous(prepared, tmp_path, capsys):
    _scan_voc_tree(prepared, tmp_path)
    shutil.copytree(prepared / "VOC2012/JPEGImages", tmp_path / "VOC2012/JPEGImages")
    shutil.copytree(prepared / "VOC2012/annotations_detectron2/val", tmp_path / "VOC2012/annotations_detectron2/val")
    with pytest.raises(BenchError) as e:
        detect_layout(_spec("voc20"), tmp_path)
    assert "ambiguous" in one_line(e) and "SAN's" in str(e.value) and "layout=san|ovseg" in str(e.value)
    assert detect_layout(_spec("voc20"), tmp_path, prefer="ovseg").key == "ovseg"
    assert check_main(["dataset=voc20", f"data_root={tmp_path}", "expect_images=2"]) == 1
    assert "problem: PAS-20: ambiguous" in capsys.readouterr().out
    assert check_main(["dataset=voc20", f"data_root={tmp_path}", "expect_images=2", "layout=san"]) == 0
    with pytest.raises(BenchError, match="no layout 'x'"):
        detect_layout(_spec("voc20"), tmp_path, prefer="x")


def test_detect_partial(prepared, tmp_path, capsys):
    # labels without their image folder
    shutil.copytree(prepared / "pcontext_full/val/label", tmp_path / "a/pcontext_full/val/label")
    with pytest.raises(BenchError) as e:
        detect_layout(_spec("pc459"), tmp_path / "a")
    msg = one_line(e)
    assert "partial SAN tree" in msg and "image folder" in msg and "pcontext_full/val/image/*.jpg" in msg
    # some images missing
    shutil.copytree(prepared / "pcontext_full", tmp_path / "b/pcontext_full")
    (tmp_path / "b/pcontext_full/val/image/2008_000002.jpg").unlink()
    with pytest.raises(BenchError, match=r"1 of 3 labels have no image .*2008_000002\.jpg"):
        detect_layout(_spec("pc459"), tmp_path / "b")
    # an empty label folder, with a complete SCAN tree beside it: still refused (the benchmark would read the SAN one)
    (tmp_path / "c/pcontext_full/val/label").mkdir(parents=True)
    (tmp_path / "c/pcontext_full/val/image").mkdir(parents=True)
    with pytest.raises(BenchError, match="no \\*.tif label files"):
        detect_layout(_spec("pc459"), tmp_path / "c")
    assert check_main(["dataset=pc459", f"data_root={tmp_path / 'c'}"]) == 1
    out = capsys.readouterr().out
    assert out.count("problem: ") == 1 and "partial SAN tree" in out


def test_detect_nothing(tmp_path):
    (tmp_path / "ADEChallengeData2016/annotations/validation").mkdir(parents=True)
    with pytest.raises(BenchError) as e:
        detect_layout(_spec("ade150"), tmp_path)
    assert "A-150 not found" in one_line(e) and "bench.data.prepare dataset=ade150" in str(e.value)
    with pytest.raises(BenchError, match="does not exist"):
        detect_layout(_spec("ade150"), tmp_path / "nowhere")


def test_pc59_scan_tree_needs_label_order(prepared, tmp_path, capsys):
    root = tmp_path / "VOCdevkit/VOC2010"
    shutil.copytree(prepared / "pcontext/val/image", root / "JPEGImages")
    shutil.copytree(prepared / "pcontext/val/label", root / "annotations_detectron2/pc59_val")
    with pytest.raises(BenchError, match="label_order=san\\|scan"):
        detect_layout(_spec("pc59"), tmp_path)
    assert detect_layout(_spec("pc59", label_order="san"), tmp_path).key == "ovseg"
    assert check_main(["dataset=pc59", f"data_root={tmp_path}", "expect_images=3"]) == 1
    assert check_main(["dataset=pc59", f"data_root={tmp_path}", "expect_images=3", "dataset.label_order=scan"]) == 0
    assert "remapped from the 'scan' id order" in capsys.readouterr().out


def test_check_reports_wrong_label_mode(prepared, tmp_path, capsys):
    shutil.copytree(prepared / "ADEChallengeData2016", tmp_path / "ADEChallengeData2016")
    f = tmp_path / "ADEChallengeData2016/annotations_detectron2/validation/ADE_val_00000001.png"
    Image.fromarray(np.array(Image.open(f)).astype(np.uint16)).save(f)          # 16-bit PNG in an 8-bit dataset
    assert check_main(["dataset=ade150", f"data_root={tmp_path}", "expect_images=3"]) == 1
    assert "problem: 1 label(s) are mode I;16, expected 8-bit PNG" in capsys.readouterr().out


# -- failures: one line, nothing half-written -------------------------------------------------------------------


def test_corrupt_raw_file_leaves_nothing(raw, tmp_path, capsys):
    src = tmp_path / "raw"
    shutil.copytree(raw["ade150"], src)
    (src / "annotations/validation/ADE_val_00000002.png").write_bytes(b"not a png")
    data = tmp_path / "data"
    assert prepare_main(["dataset=ade150", f"src={src}", f"data_root={data}", "progress=false"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ADE_val_00000002.png is unreadable" in err
    assert not data.exists()                                                   # nothing, not even the root


def test_commit_failure_rolls_back(raw, tmp_path, monkeypatch):
    import bench.data.rawformats as prep

    real_rename = prep.os.rename

    def flaky(a, b):
        if str(b).endswith("annotations_detectron2/validation"):
            raise OSError(28, "No space left on device")
        return real_rename(a, b)

    (tmp_path / "data").mkdir()
    monkeypatch.setattr(prep.os, "rename", flaky)
    with pytest.raises(OSError):
        prepare("ade847", raw["ade847"], tmp_path / "data", progress=False)
    assert list((tmp_path / "data").iterdir()) == []                        # images moved back, temp folder gone


def test_existing_target_refused_then_forced(raw, tmp_path):
    prepare("voc20", raw["voc20"], tmp_path, progress=False)
    label = tmp_path / "VOC2012/annotations_detectron2/val/2007_000001.png"
    before = label.read_bytes()
    with pytest.raises(BenchError) as e:
        prepare("voc20", raw["voc20"], tmp_path, progress=False)
    assert "already exists; nothing written" in one_line(e) and "force=true" in str(e.value)
    assert label.read_bytes() == before and no_leftovers(tmp_path)
    s = prepare("voc20", raw["voc20"], tmp_path, force=True, progress=False)
    assert s.written == 2 and s.skipped == 1 and label.read_bytes() == before and no_leftovers(tmp_path)


def test_missing_raw_inputs(raw, tmp_path):
    with pytest.raises(BenchError) as e:
        prepare("ade150", tmp_path, tmp_path / "d", progress=False)
    assert "no ADEChallengeData2016" in one_line(e) and "annotations/validation" in str(e.value)
    with pytest.raises(BenchError, match="does not exist"):
        prepare("voc20", tmp_path / "nowhere", tmp_path / "d", progress=False)
    pc = tmp_path / "VOC2010"
    shutil.copytree(raw["pc59"], pc)
    (pc / "trainval_merged.json").unlink()
    with pytest.raises(BenchError) as e:
        prepare("pc59", pc, tmp_path / "d", progress=False)
    assert "trainval_merged.json" in one_line(e) and "pc59_source=mat" in str(e.value)
    # without the json the val ids come from bench's copy of CAT-Seg's list (5104 real ids, mostly absent here)
    with pytest.raises(BenchError, match="2008_000007.mat is missing"):
        prepare("pc59", pc, tmp_path / "d", progress=False, pc59_source="mat")
    (pc / "pascalcontext_val.txt").write_text("2008_000001\n2008_000002\n")      # CAT-Seg's val list in the tree
    s = prepare("pc459", pc, tmp_path / "e", progress=False)
    assert s.written == 2 and any("pascalcontext_val.txt" in n for n in s.notes)
    (pc / "trainval/2008_000002.mat").unlink()
    with pytest.raises(BenchError, match="2008_000002.mat is missing"):
        prepare("pc59", pc, tmp_path / "d", progress=False, pc59_source="mat")
    assert not (tmp_path / "d").exists()


def test_unsafe_index_pickle_refused(raw, tmp_path):
    src = tmp_path / "ADE20K_2021_17_01"
    shutil.copytree(raw["ade847"], src)
    shutil.copytree(raw["ade847"].parent / "ADE20K_2021_17_01", src, dirs_exist_ok=True)
    index = load_index_pickle(src / "index_ade20k.pkl")
    index["scene"] = [PurePosixPath("x")]
    (src / "index_ade20k.pkl").write_bytes(pickle.dumps(index))
    with pytest.raises(BenchError, match="allow_unsafe_pickle=true"):
        prepare("ade847", src, tmp_path / "d", progress=False)
    assert prepare("ade847", src, tmp_path / "d", progress=False, allow_unsafe_pickle=True).written == 3


def test_cli_arguments(capsys):
    assert prepare_main(["--dataset", "ade150"]) == 2
    assert prepare_main(["dataset=ade150", "colour=red"]) == 2
    assert prepare_main(["src=/x"]) == 2
    assert prepare_main(["dataset=coco", "src=/x", "data_root=/nonexistent"]) == 1
    assert check_main(["dataset=ade150", "max_images=x"]) == 2
    assert check_main([]) == 2
    err = capsys.readouterr().err
    assert "use key=value" in err and "unknown argument(s) ['colour']" in err and "no converter" in err


def test_decode_rle_forms_agree():
    """decode_rle (pycocotools when installed) equals our decoder on compressed and uncompressed counts."""
    rng = np.random.default_rng(7)
    for _ in range(10):
        m = (rng.random((rng.integers(1, 12), rng.integers(1, 12))) < 0.5).astype(np.uint8)
        rle = rle_encode(m)
        runs = rle_counts_from_string(rle["counts"])
        for form in (rle, {"size": rle["size"], "counts": runs}):
            assert (decode_rle(form) == m).all() and (rle_decode(form) == m).all()
    with pytest.raises(ValueError, match="sum to"):
        decode_rle({"size": [2, 2], "counts": [1, 2]})


def test_scipy_and_pycocotools_routes_match_ours(raw, tmp_path, monkeypatch):
    """With scipy.io and pycocotools installed, prepare reads the .mat files and the Detail RLEs with them; with
    neither (our MATLAB v5 reader and RLE decoder) every prepared file is byte-identical."""
    pytest.importorskip("scipy.io", reason="scipy is not installed (pip install -e .[prepare]): only our reader runs")
    pytest.importorskip("pycocotools.mask", reason="pycocotools is not installed: only our RLE decoder runs")
    import bench.data.rawformats as prep

    used, original = [], prep.optional_module
    monkeypatch.setattr(prep, "optional_module", lambda name: used.append(name) or original(name))
    for name in ("pc59", "pc459"):
        prepare(name, raw[name], tmp_path / "libraries", progress=False)
    assert {"scipy.io", "pycocotools.mask"} <= set(used)
    monkeypatch.setattr(prep, "optional_module", lambda name: None)
    for name in ("pc59", "pc459"):
        prepare(name, raw[name], tmp_path / "ours", progress=False)

    def files(root: Path) -> dict:
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    libraries, ours = files(tmp_path / "libraries"), files(tmp_path / "ours")
    assert len(ours) == 12 and libraries == ours           # 3 images + 3 labels per dataset
