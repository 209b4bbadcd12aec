"""PAS-20b under both protocols (issue 16 item 3): the seed protocol (background is one class named "background")
and CAT-Seg's (a 59-name vocabulary whose 39 background proxies are scored as background), as a dataset variant
any model runs. One synthetic image is scored under both through the harness's own evaluation and checked against
IoUs worked out by hand; the vocabulary, settings and board follow the variant."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import bench.config  # noqa: F401  (registers the typed schema)
from bench import BenchError
from bench import leaderboard as lb
from bench.cell import dataset_settings, evaluate, settings_not_published, vocabulary
from bench.data import build_dataset, load_class_names, spec_from_cfg, vocabulary_names
from bench.models.base import OVSegModel, Protocol

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
GREYS = (0, 80, 160, 240)                    # one flat grey per 8-row band (JPEG keeps flat 8x8 blocks)
# What the model below "sees" in each band: the first of these names that its vocabulary has wins.
PREFERENCES = {0: ["person"], 80: ["wall", "background"], 160: ["tree", "cat"], 240: ["cat"]}
PERSON, CAT, BACKGROUND = 14, 7, 20


def make_cfg(tmp: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return bench.config.plain(compose("config", overrides=[f"data_root={tmp}", "progress=false", *overrides]))


class GreyLookup(OVSegModel):
    """A model whose answer per pixel is fixed by the pixel's grey level (PREFERENCES): one-hot scores over the
    vocabulary it was given, through the harness's surface (normalise, pad, forward, postprocess)."""

    def __init__(self):
        super().__init__(Protocol(short_side=32, max_size=128, size_divisibility=1))

    def encode_vocabulary(self, class_names):
        self.vocabulary = list(class_names)

    def forward(self, x, image_sizes):
        grey = (x[:, 0] * self.pixel_std[0] + self.pixel_mean[0]).round()
        levels = torch.tensor(GREYS, dtype=grey.dtype)
        band = (grey[..., None] - levels).abs().argmin(-1)             # nearest of the four greys
        scores = torch.zeros(x.shape[0], len(self.vocabulary), *x.shape[-2:])
        for b, level in enumerate(GREYS):
            k = next(self.vocabulary.index(n) for n in PREFERENCES[level] if n in self.vocabulary)
            scores[:, k][band == b] = 1.0
        return {"scores": scores}

    def postprocess(self, outputs, image_sizes, output_sizes):
        return [s[:, :h, :w] for s, (h, w) in zip(outputs["scores"], output_sizes)]


def write_voc_b(root: Path) -> None:
    """One 32x32 image in PAS-20b's layout: bands person | background | background | cat (top half) + ignore."""
    image = np.repeat(np.repeat(np.array(GREYS, dtype=np.uint8), 8)[:, None], 32, axis=1)
    label = np.repeat(np.array([PERSON, BACKGROUND, BACKGROUND, CAT], dtype=np.uint8), 8)[:, None].repeat(32, 1)
    label[28:] = 255
    (root / "VOC2012/JPEGImages").mkdir(parents=True)
    (root / "VOC2012/annotations_detectron2_bg/val").mkdir(parents=True)
    Image.fromarray(np.stack([image] * 3, -1)).save(root / "VOC2012/JPEGImages/2007_000001.jpg", quality=95)
    Image.fromarray(label).save(root / "VOC2012/annotations_detectron2_bg/val/2007_000001.png")


def score(tmp_path: Path, dataset: str) -> dict:
    cfg = make_cfg(tmp_path, "model=san_b", f"dataset={dataset}")
    model = GreyLookup()
    model.encode_vocabulary(vocabulary(cfg))
    ds = build_dataset(cfg.dataset, cfg.data_root)
    metrics, _ = evaluate(cfg, model, ds, torch.device("cpu"), "current")
    return metrics


def test_one_image_under_both_protocols_by_hand(tmp_path):
    write_voc_b(tmp_path)
    seed, proxies = score(tmp_path, "voc20b"), score(tmp_path, "voc20b_proxies")
    # Seed protocol (21 names): band 2 prefers "tree", absent, so "cat": 256 background pixels predicted as cat.
    # person 256/256 = 1; background TP 256 of gt 512, no FP -> 1/2; cat TP 128, FP 256 -> 128/384 = 1/3.
    assert seed["IoU-person"] == pytest.approx(100.0)
    assert seed["IoU-background"] == pytest.approx(50.0)
    assert seed["IoU-cat"] == pytest.approx(100.0 / 3)
    assert seed["mIoU"] == pytest.approx((100.0 + 50.0 + 100.0 / 3) / 3)
    assert seed["pACC"] == pytest.approx(100.0 * (256 + 256 + 128) / 896)
    # CAT-Seg's protocol (59 names): "wall" and "tree" are proxies (ids >= 20), so both count as background.
    for name in ("person", "background", "cat"):
        assert proxies[f"IoU-{name}"] == pytest.approx(100.0)
    assert proxies["mIoU"] == pytest.approx(100.0) and proxies["pACC"] == pytest.approx(100.0)


def test_the_variant_reads_the_same_files_and_labels_with_a_59_name_vocabulary(tmp_path):
    write_voc_b(tmp_path)
    cfg = make_cfg(tmp_path, "model=catseg_b", "dataset=voc20b_proxies")
    ds = build_dataset(cfg.dataset, cfg.data_root)
    assert ds.num_classes == 21 and ds.class_names == load_class_names("voc20b.txt")
    names = vocabulary(cfg)
    official = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
                "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
    assert len(names) == 59 and names[:20] == official            # CAT-Seg's voc20b overrides apply to the variant
    assert names[20:23] == ["bag", "bed", "bench"] and names[-1] == "wood" and "background" not in names
    san = vocabulary(make_cfg(tmp_path, "model=san_b", "dataset=voc20b_proxies"))
    assert san[19] == "tv" and san[20:] == names[20:]


def test_model_settings_of_pas20b_apply_to_the_variant(tmp_path):
    simseg = make_cfg(tmp_path, "model=simseg", "dataset=voc20b_proxies")
    assert dataset_settings(simseg) == dataset_settings(make_cfg(tmp_path, "model=simseg", "dataset=voc20b"))
    assert dataset_settings(simseg)                               # not empty: SimSeg has PAS-20b settings
    assert settings_not_published(make_cfg(tmp_path, "model=scan_l", "dataset=voc20b_proxies"))
    assert not settings_not_published(make_cfg(tmp_path, "model=scan_l", "dataset=voc20"))


def test_a_proxy_label_without_its_vocabulary_is_refused_in_one_line(tmp_path):
    cfg = make_cfg(tmp_path, "dataset=voc20b_proxies")
    bad = dict(spec_from_cfg(cfg.dataset).__dict__)
    for change, expected in (({"vocabulary_file": None}, "needs a vocabulary_file"),
                             ({"proxy_label": 59}, "must be a class id below 21"),
                             ({"proxy_label": None}, "lists 59 names for 21 classes")):
        spec = spec_from_cfg({**{k: v for k, v in bad.items() if k not in ("layout", "alt_layouts")},
                              "layout": cfg.dataset.layout, **change})
        with pytest.raises(BenchError, match=expected) as e:
            vocabulary_names(spec)
        assert "\n" not in str(e.value) and "voc20b_proxies.yaml" in str(e.value)


def _record(model, display, dataset, label, protocol, miou) -> dict:
    return {"key": f"{model}-{dataset}", "status": "ok", "reason": "", "model": model, "model_display": display,
            "dataset": dataset, "dataset_display": label, "dataset_protocol": protocol, "resolution": 640,
            "resolution_is_protocol": True, "precision": "fp32", "batch_size": 1, "miou_formula": "current",
            "pipeline_check": False, "device_type": "cpu", "device_name": "test CPU", "timestamp": "2026-12-03T07:00:00",
            "mIoU": miou, "mIoU_current": miou, "mIoU_v06": miou, "images_evaluated": 1449,
            "dataset_images_official": 1449, "model_order": 60, "dataset_order": 60 if dataset == "voc20b" else 65,
            "published": {"source": "CAT-Seg README", "miou": {"voc20b_proxies": 77.3}}}


def test_the_board_says_which_protocol_each_pas20b_column_and_published_figure_used(tmp_path):
    (tmp_path / "runs").mkdir()
    confs = {d: make_cfg(tmp_path, f"dataset={d}").dataset for d in ("voc20b", "voc20b_proxies")}
    for d, c in confs.items():
        rec = _record("catseg_b", "CAT-Seg ViT-B/16", d, c.display_name, c.protocol, 70.0 if d == "voc20b" else 77.0)
        (tmp_path / "runs" / f"{rec['key']}.json").write_text(json.dumps(rec))
    lb.build_leaderboard(str(tmp_path))
    md = (tmp_path / "leaderboard.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model") and "PAS-20b" in line)
    row = next(line for line in md.splitlines() if line.startswith("| CAT-Seg ViT-B/16") and "77.0" in line)
    cols = [c.strip() for c in header.strip("|").split("|")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[cols.index("PAS-20b")] == "70.0"                           # no published figure under this protocol
    assert cells[cols.index("PAS-20b (proxies)")].startswith("77.0 / 77.3")
    protocols = next(line for line in md.splitlines() if line.startswith("Protocols:"))
    assert f"**PAS-20b**: {confs['voc20b'].protocol}" in protocols
    assert f"**PAS-20b (proxies)**: {confs['voc20b_proxies'].protocol}" in protocols


def test_preparing_the_variant_prepares_its_base_dataset(tmp_path):
    from bench.data.prepare import prepare
    from bench.data.synth import synthesize_raw

    raw = synthesize_raw(tmp_path / "raw", "voc20b", n_images=2, seed=0)
    prepare("voc20b_proxies", raw, tmp_path / "data", progress=False)
    cfg = make_cfg(tmp_path / "data", "dataset=voc20b_proxies")
    assert len(build_dataset(cfg.dataset, cfg.data_root)) == len(build_dataset(
        make_cfg(tmp_path / "data", "dataset=voc20b").dataset, cfg.data_root)) > 0


def test_the_variant_fields_leave_the_keys_of_earlier_records_as_they_were(tmp_path):
    from omegaconf import OmegaConf

    from bench.records import cell_key

    def resolved(dataset):
        return OmegaConf.to_container(make_cfg(tmp_path, f"dataset={dataset}"), resolve=True)

    seed = resolved("voc20b")
    written_before = dict(seed, dataset={k: v for k, v in seed["dataset"].items()
                                         if k not in ("vocabulary_file", "proxy_label", "variant_of")})
    assert cell_key(seed) == cell_key(written_before)           # fields at their default are not hashed
    assert cell_key(resolved("voc20b_proxies")) != cell_key(seed)
