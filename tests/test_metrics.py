"""bench.metrics: detectron2-compatible metrics (both mIoU formulas), SCAN's SG-IoU, sharding, relation tables."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import BenchError
from bench.metrics import (SemSegEvaluator, evaluate_from_confusion, load_sg_iou_table, load_sg_iou_table_raw,
                           merge_confusions, sg_iou_table_checksum)

IGN = 255
NAMES = ["cat", "road, route", "sky"]


def pixels_from_confusion(block: np.ndarray, ignored_preds: list[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """1×N pred/gt rows realising a K×K confusion block (rows = prediction, cols = GT) plus ignored-GT pixels."""
    pred, gt = [], []
    for p in range(block.shape[0]):
        for g in range(block.shape[1]):
            pred += [p] * int(block[p, g])
            gt += [g] * int(block[p, g])
    pred += list(ignored_preds)
    gt += [IGN] * len(ignored_preds)
    return np.array([pred]), np.array([gt])


# pred\gt   0  1  2        class 2 is predicted once but absent from the GT: the two mIoU formulas differ
BLOCK = np.array([[3, 0, 0],
                  [1, 2, 0],
                  [0, 1, 0]])


def hand_evaluator(**kw) -> SemSegEvaluator:
    ev = SemSegEvaluator(3, IGN, NAMES, **kw)
    pred, gt = pixels_from_confusion(BLOCK, ignored_preds=[0, 2])   # ignored pixels count nowhere
    ev.process(torch.from_numpy(pred), torch.from_numpy(gt))
    return ev


def test_confusion_layout_matches_detectron2():
    ev = hand_evaluator()
    conf = ev.confusion.numpy()
    assert conf.shape == (4, 4) and conf.dtype == np.int64
    np.testing.assert_array_equal(conf[:3, :3], BLOCK)          # rows = prediction, columns = GT
    np.testing.assert_array_equal(conf[:, 3], [1, 0, 1, 0])    # ignored GT -> column K
    assert conf[3].sum() == 0


def test_hand_built_metrics_pinned():
    r = hand_evaluator().evaluate()
    # tp = [3,2,0], pos_gt = [4,3,0], pos_pred = [3,3,1], union = [4,4,1]
    assert r["IoU-cat"] == pytest.approx(75.0)
    assert r["IoU-road, route"] == pytest.approx(50.0)
    assert math.isnan(r["IoU-sky"]) and math.isnan(r["ACC-sky"])   # absent from GT -> NaN, as detectron2
    assert r["ACC-cat"] == pytest.approx(75.0)
    assert r["ACC-road, route"] == pytest.approx(200 / 3)
    assert r["mIoU_current"] == pytest.approx(62.5)               # (0.75 + 0.5) / 2
    assert r["mIoU_v06"] == pytest.approx(125 / 3)                # (0.75 + 0.5) / 3: sky predicted, counts as 0
    assert r["mIoU"] == r["mIoU_current"] and r["mIoU_formula"] == "current"
    assert r["fwIoU"] == pytest.approx(100 * (0.75 * 4 + 0.5 * 3) / 7)
    assert r["mACC"] == pytest.approx(100 * (0.75 + 2 / 3) / 2)
    assert r["pACC"] == pytest.approx(100 * 5 / 7)
    assert (r["classes_in_gt"], r["classes_in_gt_or_pred"], r["pixels"], r["images"]) == (2, 3, 7, 1)
    assert not any(k.startswith("SG-") for k in r)                # no table -> no SG-IoU keys


def test_formula_argument_selects_headline():
    r = hand_evaluator(formula="v06").evaluate()
    assert r["mIoU"] == pytest.approx(125 / 3) and r["mIoU_formula"] == "v06"
    with pytest.raises(BenchError, match="miou_formula"):
        SemSegEvaluator(3, IGN, NAMES, formula="v05")


def test_formulas_agree_when_no_absent_class_is_predicted():
    ev = SemSegEvaluator(3, IGN, NAMES)
    pred, gt = pixels_from_confusion(np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
    ev.process(pred, gt)                                            # numpy inputs work too
    r = ev.evaluate()
    assert r["mIoU_current"] == pytest.approx(r["mIoU_v06"])


def test_perfect_prediction_is_100():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 3, size=(17, 23))
    gt[0, :5] = IGN
    pred = np.where(gt == IGN, 1, gt)
    ev = SemSegEvaluator(3, IGN, NAMES, sg_iou_table={0: 1, 2: [0, 1]})
    ev.process(pred, gt)
    r = ev.evaluate()
    for key in ("mIoU", "mIoU_current", "mIoU_v06", "fwIoU", "mACC", "pACC", "SG-mIoU", "SG-mIoU_current",
                "SG-mIoU_v06", "SG-fwIoU", "SG-mACC", "SG-pACC", "IoU-cat", "ACC-sky"):
        assert r[key] == pytest.approx(100.0), key


@pytest.mark.parametrize("formula", ["current", "v06"])
def test_sg_iou_with_empty_table_equals_miou(formula):
    for ev in (hand_evaluator(sg_iou_table={}, formula=formula), _random_evaluator(sg_iou_table={}, formula=formula)):
        r = ev.evaluate()
        assert r["SG-mIoU"] == pytest.approx(r["mIoU"])
        assert r["SG-mIoU_current"] == pytest.approx(r["mIoU_current"])
        assert r["SG-mIoU_v06"] == pytest.approx(r["mIoU_v06"])
        for k in ("fwIoU", "mACC", "pACC"):
            assert r[f"SG-{k}"] == pytest.approx(r[k])


def _random_evaluator(**kw) -> SemSegEvaluator:
    rng = np.random.default_rng(1)
    ev = SemSegEvaluator(5, 65535, None, **kw)
    for _ in range(3):
        gt = rng.integers(0, 4, size=(8, 9))                        # class 4 never in the GT ...
        gt[rng.random(gt.shape) < 0.1] = 65535
        ev.process(rng.integers(0, 5, size=(8, 9)), gt)             # ... but predicted: formulas differ
    return ev


def test_sg_iou_beta_hand_built():
    # pred\gt  0  1  2     table {0: 1}: predicting "1" on GT-0 pixels earns β = (conf[1,0] + conf[1,1]) / pos_pred[1]
    block = np.array([[2, 0, 0],
                      [2, 3, 1],
                      [0, 0, 2]])
    conf = np.zeros((4, 4), np.int64)
    conf[:3, :3] = block
    r = evaluate_from_confusion(conf, NAMES, sg_iou_table={0: 1})
    beta = (2 + 3) / 6
    tp_sg0 = 2 + 2 * beta
    iou_sg = [tp_sg0 / (4 + 2 - 2), 3 / 6, 2 / 3]                   # union keeps the ORIGINAL tp
    assert r["SG-IoU-cat"] == pytest.approx(100 * iou_sg[0])
    assert r["SG-IoU-road, route"] == pytest.approx(50.0) and r["IoU-cat"] == pytest.approx(50.0)
    assert r["SG-mIoU"] == pytest.approx(100 * sum(iou_sg) / 3)
    assert r["SG-mACC"] == pytest.approx(100 * (tp_sg0 / 4 + 3 / 3 + 2 / 3) / 3)
    assert r["SG-pACC"] == pytest.approx(100 * (tp_sg0 + 3 + 2) / 10)
    assert r["SG-fwIoU"] == pytest.approx(100 * (iou_sg[0] * 4 + iou_sg[1] * 3 + iou_sg[2] * 3) / 10)


def test_sg_iou_list_valued_relation_and_v06_denominator():
    # GT class 1 absent; class 1 predicted. table {0: [1, 2]}: both related classes add credit.
    conf = np.zeros((4, 4), np.int64)
    conf[:3, :3] = [[1, 0, 0],
                    [1, 0, 0],
                    [2, 0, 4]]
    r = evaluate_from_confusion(conf, NAMES, sg_iou_table={0: [1, 2]}, formula="v06")
    b1 = (1 + 0) / 1
    b2 = (2 + 4) / 6
    iou0 = (1 + 1 * b1 + 2 * b2) / (4 + 1 - 1)
    iou2 = 4 / (4 + 6 - 4)
    assert r["SG-mIoU_v06"] == pytest.approx(100 * (iou0 + iou2) / 3)
    assert r["SG-mIoU_current"] == pytest.approx(100 * (iou0 + iou2) / 2)
    assert r["SG-mIoU"] == r["SG-mIoU_v06"]


def test_table_ids_outside_vocabulary_fail():
    with pytest.raises(BenchError, match="outside"):
        SemSegEvaluator(3, IGN, NAMES, sg_iou_table={0: 5})


# checksums and counts from specs/scan.md §5.1 (computed there from yongliu20/SCAN@097fbbd)
TABLES = {
    "ade847": ("6ccc0051063848a2fb04fb84c53fa657bfd59cb5ed048537cbee8484054706c7", 317, 306, 46, 356, True),
    "pc459": ("5493ccb79e0ca40c7bf067762ff628e287154e574e2246a8808f3d4436a74bf3", 122, 122, 20, 142, False),
    "ade150": ("8b3ffb1446e52546e8738a252ab0029d2fd24e3ac98c80853e9b5885ae80ed31", 33, 33, 0, 33, False),
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_relation_table_checksums(name):
    sha, n_entries, n_keys, n_lists, n_pairs, official = TABLES[name]
    raw, meta = load_sg_iou_table_raw(name)
    assert sg_iou_table_checksum(raw) == sha == meta["sha256_effective"]
    assert meta["n_entries"] == n_entries and len(raw) == n_keys
    assert sum(isinstance(v, list) for v in raw.values()) == n_lists
    table = load_sg_iou_table(name)
    assert sum(len(v) for v in table.values()) == n_pairs
    assert all(c not in fs for c, fs in table.items())              # no self-references
    assert meta["official"] is official
    assert meta["source"].startswith("yongliu20/SCAN@097fbbdaf7789ac6d2da44533e95521e73fd7c4f:")


def test_duplicate_keys_last_one_wins():
    raw, _ = load_sg_iou_table_raw("ade847")
    assert raw[63] == 16        # literal has 63: 3 first, then 63: 16 (duplicate)
    table = load_sg_iou_table("ade847")
    assert max(max(table), *(f for fs in table.values() for f in fs)) == 843   # spec: max id 843


def test_sharded_runs_merge_to_the_whole():
    rng = np.random.default_rng(2)
    items = [(rng.integers(0, 4, (6, 7)), np.where(rng.random((6, 7)) < 0.1, IGN, rng.integers(0, 4, (6, 7))))
             for _ in range(4)]
    whole = SemSegEvaluator(4, IGN, None)
    shards = [SemSegEvaluator(4, IGN, None) for _ in range(2)]
    for i, (p, g) in enumerate(items):
        whole.process(p, g)
        shards[i % 2].process(p, g)
    merged = SemSegEvaluator(4, IGN, None).merge(shards[0]).merge(shards[1])
    assert torch.equal(merged.confusion, whole.confusion) and merged.images == 4
    summed = merge_confusions([s.state_dict()["confusion"] for s in shards])
    assert torch.equal(summed, whole.confusion)
    restored = SemSegEvaluator(4, IGN, None)
    restored.load_state_dict(whole.state_dict())
    a, b = whole.evaluate(), evaluate_from_confusion(summed, whole.class_names)
    assert a["mIoU"] == pytest.approx(b["mIoU"]) and restored.evaluate()["pACC"] == pytest.approx(a["pACC"])
    whole.reset()
    assert int(whole.confusion.sum()) == 0 and whole.images == 0


def test_bad_inputs_raise():
    ev = SemSegEvaluator(3, IGN, NAMES)
    with pytest.raises(ValueError, match="differ in size"):
        ev.process(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        ev.process(np.zeros((1, 2), int), np.array([[0, 7]]))
    with pytest.raises(ValueError, match="prediction values"):
        ev.process(np.array([[3, 0]]), np.zeros((1, 2), int))
    r = SemSegEvaluator(3, IGN, NAMES).evaluate()                   # nothing processed: NaN, no warnings
    assert math.isnan(r["mIoU"]) and math.isnan(r["pACC"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_confusion_matches_cpu():
    cpu, gpu = hand_evaluator(), hand_evaluator(device="cuda")
    assert gpu.confusion.is_cuda
    assert torch.equal(gpu.confusion.cpu(), cpu.confusion)


# --------------------------------------------------------------------------------------------------------------
# BoundaryIoU (detectron2 SemSegEvaluator._mask_to_boundary / _b_conf_matrix)

# 4×6 maps: diagonal √52 ≈ 7.2, 0.02 · 7.2 rounds to 0, so one 3×3 erosion with zeros beyond the edge.
GT_LR = np.array([[1, 1, 1, 2, 2, 2]] * 4)
PRED_LR = np.array([[1, 1, 2, 2, 2, 2]] * 4)
# map − eroded map, by hand: the edge rows/columns keep their label (eroded to 0); inside, a pixel keeps
# label − min(3×3 neighbourhood), so the column left of a 1|2 edge is 1 − 1 = 0 and the one right of it 2 − 1 = 1.
GT_LR_BOUNDARY = np.array([[1, 1, 1, 2, 2, 2],
                           [1, 0, 0, 1, 0, 2],
                           [1, 0, 0, 1, 0, 2],
                           [1, 1, 1, 2, 2, 2]])
PRED_LR_BOUNDARY = np.array([[1, 1, 2, 2, 2, 2],
                             [1, 0, 1, 0, 0, 2],
                             [1, 0, 1, 0, 0, 2],
                             [1, 1, 2, 2, 2, 2]])


def test_boundary_dilation_follows_the_diagonal():
    from bench.metrics import boundary_dilation
    assert boundary_dilation(4, 6) == 1 and boundary_dilation(1, 1) == 1          # max(1, round(0.14))
    assert boundary_dilation(53, 53) == 1 and boundary_dilation(54, 54) == 2      # 1.499 vs 1.527
    assert boundary_dilation(640, 854) == 21                                       # 0.02 · 1067.2


@pytest.mark.parametrize("backend", ["torch", "cv2"])
def test_label_boundary_hand_drawn(backend):
    from bench.metrics import label_boundary
    if backend == "cv2":
        pytest.importorskip("cv2", reason="OpenCV not installed: the cv2 path is optional")
    maps = torch.from_numpy(np.stack([GT_LR, PRED_LR]).astype(np.uint8))
    b_gt, b_pred = label_boundary(maps, backend=backend)
    np.testing.assert_array_equal(b_gt.numpy(), GT_LR_BOUNDARY)
    np.testing.assert_array_equal(b_pred.numpy(), PRED_LR_BOUNDARY)
    one = label_boundary(torch.ones(4, 4, dtype=torch.uint8), backend=backend)   # a ring of 1s, a 2×2 hole
    np.testing.assert_array_equal(one.numpy(), [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]])


def test_boundary_iou_hand_scored():
    ev = SemSegEvaluator(3, IGN, ["void", "cat", "sky"], boundary_iou="torch")
    ev.process(PRED_LR, GT_LR)
    # boundary confusion (rows = pred boundary value, cols = GT boundary value), counted from the maps above:
    #   [[4, 2, 0], [2, 6, 0], [0, 2, 8]]  -> tp 4, 6, 8; union 6+6-4, 10+8-6, 8+10-8 = 8, 12, 10
    np.testing.assert_array_equal(ev.boundary_confusion.numpy()[:3, :3], [[4, 2, 0], [2, 6, 0], [0, 2, 8]])
    r = ev.evaluate()
    assert r["BoundaryIoU-void"] == pytest.approx(50.0)     # class 0 collects the interior (0, 0) pairs
    assert r["BoundaryIoU-cat"] == pytest.approx(50.0)
    assert r["BoundaryIoU-sky"] == pytest.approx(80.0)
    assert r["BoundaryIoU"] == pytest.approx(60.0)
    # IoU: cat 8/12, sky 12/16, void absent -> NaN; min(IoU, B-Iou) as Python's min: NaN IoU stays NaN
    assert math.isnan(r["min(IoU, B-Iou)-void"])
    assert r["min(IoU, B-Iou)-cat"] == pytest.approx(50.0)
    assert r["min(IoU, B-Iou)-sky"] == pytest.approx(75.0)
    assert r["min(IoU, B-Iou)"] == pytest.approx(62.5)
    assert r["boundary_iou"].startswith("torch erosion")


def test_boundary_iou_nan_where_no_boundary_and_min_falls_back_to_iou():
    ev = SemSegEvaluator(3, IGN, NAMES, boundary_iou="torch")
    ev.process(np.ones((4, 4), int), np.ones((4, 4), int))   # both: ring of 1s, interior 0s; class 2 nowhere
    r = ev.evaluate()
    assert r["BoundaryIoU-cat"] == 100 and r["BoundaryIoU-road, route"] == 100
    assert math.isnan(r["BoundaryIoU-sky"]) and math.isnan(r["IoU-sky"]) and math.isnan(r["min(IoU, B-Iou)-sky"])
    assert r["BoundaryIoU"] == 100 and r["min(IoU, B-Iou)"] == 100
    # a class with an IoU but an empty boundary union: min(IoU, NaN) is the IoU (Python's min keeps the first)
    from bench.metrics import evaluate_from_confusion as efc
    conf = np.array([[0, 0, 0, 0], [0, 3, 1, 0], [0, 0, 4, 0], [0, 0, 0, 0]])
    b = np.array([[5, 0, 0, 0], [0, 0, 0, 0], [0, 0, 3, 0], [0, 0, 0, 0]])
    r = efc(conf, NAMES, boundary_conf=b)
    assert math.isnan(r["BoundaryIoU-road, route"]) and r["min(IoU, B-Iou)-road, route"] == pytest.approx(75.0)


def test_boundary_iou_ignore_pixels_take_the_ignore_index():
    gt = np.full((4, 4), IGN)
    ev = SemSegEvaluator(3, IGN, NAMES, boundary_iou="torch")
    ev.process(np.ones((4, 4), int), gt)       # GT map is all K=3: a ring of 3s (ignored column), interior 0s
    b = ev.boundary_confusion.numpy()
    assert b[1, 3] == 12 and b[0, 0] == 4 and b.sum() == 16


def test_boundary_iou_skipped_like_detectron2_for_255_classes():
    ev = SemSegEvaluator(255, 255 + 1, None)
    ev.process(np.zeros((3, 3), int), np.zeros((3, 3), int))
    r = ev.evaluate()
    assert ev.boundary_confusion is None and r["boundary_iou"].startswith("skipped: 255 classes")
    assert not any(k.startswith(("BoundaryIoU", "min(IoU")) for k in r)
    assert SemSegEvaluator(254, 255, None).boundary_backend is not None
    off = SemSegEvaluator(3, IGN, NAMES, boundary_iou="off").evaluate()
    assert off["boundary_iou"] == "skipped: boundary_iou=off" and "BoundaryIoU" not in off
    with pytest.raises(BenchError, match="boundary_iou='cv3'"):
        SemSegEvaluator(3, IGN, NAMES, boundary_iou="cv3")


def test_boundary_iou_without_opencv_uses_torch(monkeypatch):
    import bench.metrics as m
    monkeypatch.setattr(m, "_cv2", lambda: None)
    assert SemSegEvaluator(3, IGN, NAMES).boundary_backend == "torch"
    with pytest.raises(BenchError, match="OpenCV is not installed"):
        SemSegEvaluator(3, IGN, NAMES, boundary_iou="cv2")


def _random_label_maps(rng, h, w, k, ignore_frac=0.0):
    """Blocky label maps (rectangles over noise), the kind where erosion matters."""
    m = rng.integers(0, k, (h, w))
    for _ in range(6):
        y, x = rng.integers(0, h), rng.integers(0, w)
        m[y:y + rng.integers(1, h + 1), x:x + rng.integers(1, w + 1)] = rng.integers(0, k)
    if ignore_frac:
        m = np.where(rng.random((h, w)) < ignore_frac, IGN, m)
    return m


def test_torch_erosion_equals_opencv():
    cv2 = pytest.importorskip("cv2", reason="OpenCV not installed: nothing to compare the torch erosion with")
    from bench.metrics import _erode_torch
    rng = np.random.default_rng(5)
    for _ in range(60):
        h, w, d = int(rng.integers(1, 50)), int(rng.integers(1, 50)), int(rng.integers(1, 30))
        m = _random_label_maps(rng, h, w, 250).astype(np.uint8)
        ref = cv2.erode(cv2.copyMakeBorder(m, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0), np.ones((3, 3), np.uint8),
                        iterations=d)[1:-1, 1:-1]
        np.testing.assert_array_equal(_erode_torch(torch.from_numpy(m), d).numpy(), ref, err_msg=f"{h}x{w} d={d}")
    ev = {b: SemSegEvaluator(7, IGN, None, boundary_iou=b) for b in ("cv2", "torch")}
    for _ in range(3):
        p, g = _random_label_maps(rng, 120, 90, 7), _random_label_maps(rng, 120, 90, 7, ignore_frac=0.05)
        for e in ev.values():
            e.process(p, g)
    assert torch.equal(ev["cv2"].boundary_confusion, ev["torch"].boundary_confusion)
    assert SemSegEvaluator(3, IGN, NAMES).boundary_backend == "cv2"        # auto: OpenCV on the CPU, as detectron2


def test_boundary_confusion_merges_and_round_trips():
    rng = np.random.default_rng(8)
    whole, shards = SemSegEvaluator(4, IGN, None), [SemSegEvaluator(4, IGN, None) for _ in range(2)]
    for i in range(4):
        p, g = _random_label_maps(rng, 9, 11, 4), _random_label_maps(rng, 9, 11, 4, 0.1)
        whole.process(p, g)
        shards[i % 2].process(p, g)
    merged = shards[0].merge(shards[1])
    assert torch.equal(merged.boundary_confusion, whole.boundary_confusion)
    restored = SemSegEvaluator(4, IGN, None)
    restored.load_state_dict(whole.state_dict())
    assert restored.evaluate()["BoundaryIoU"] == pytest.approx(whole.evaluate()["BoundaryIoU"])


def test_boundary_iou_lands_in_the_cells_per_class_rows():
    from bench.cell import per_class_rows
    ev = SemSegEvaluator(3, IGN, ["void", "cat", "sky"], boundary_iou="torch")
    ev.process(PRED_LR, GT_LR)
    metrics = ev.evaluate()
    rows = per_class_rows(metrics, ev.class_names)
    assert [r["BoundaryIoU"] for r in rows] == pytest.approx([50.0, 50.0, 80.0])
    assert rows[2]["min(IoU, B-Iou)"] == pytest.approx(75.0)
    assert not any(k.startswith(("BoundaryIoU-", "min(IoU, B-Iou)-")) for k in metrics)  # popped
    assert metrics["BoundaryIoU"] == pytest.approx(60.0) and "boundary_iou" in metrics    # means stay: runs.csv


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_boundary_confusion_matches_cpu():
    rng = np.random.default_rng(3)
    cpu = SemSegEvaluator(150, IGN, None, boundary_iou="torch")
    gpu = SemSegEvaluator(150, IGN, None, device="cuda")
    assert gpu.boundary_backend == "torch"                       # auto on CUDA: no host copy for OpenCV
    for _ in range(2):
        p, g = _random_label_maps(rng, 640, 854, 150), _random_label_maps(rng, 640, 854, 150, 0.05)
        cpu.process(p, g)
        gpu.process(p, g)
    assert torch.equal(gpu.boundary_confusion.cpu(), cpu.boundary_confusion)
