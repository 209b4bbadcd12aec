"""CPU speed benchmark (bench/speed.py): a smoke run on a tiny SAN (same code path, small widths), the CSV it
writes, the floor arithmetic, the FLOP split, and the label-agreement rule on hand-made score maps. Fast."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import bench.config  # noqa: F401  (registers the typed schema)

from bench import speed
from bench.models.clip import Transformer
from bench.profile import count_flops

VOCAB = ["cat", "dog", "tree", "sky", "road"]
CONF = str(Path(__file__).resolve().parent.parent / "conf")
TINY = dict(clip_width=64, clip_layers=4, clip_heads=4, clip_image_size=64, embed_dim=32, text_width=32,
            text_layers=2, text_heads=2, feature_last_layer=3, fusion_map=((0, 0), (1, 1), (2, 2), (3, 3)),
            side_width=48, side_depth=4, side_heads=2, decoder_channels=16)


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="bench_cpu", overrides=[
            f"results_dir={tmp_path}", "cpu_speed.resolution=64", "cpu_speed.warmup=0", "cpu_speed.iters=2",
            "cpu_speed.peak.size=256", "cpu_speed.peak.warmup=1", "cpu_speed.peak.iters=3",
            "cpu_speed.profile_tables=missed", "cpu_speed.allocator=default",
            "cpu_speed.compile=[false]", *overrides])   # the compile axis takes minutes: never in the smoke test


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_speed")
    (tmp / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tiny = {"name": "san_b", "display": "SAN tiny", "builder": "san_vit_b_16", "builder_kwargs": TINY}
    cfg = _cfg(tmp, "+cpu_speed.models=[]", "cpu_speed.precisions=[fp32,bf16,amp_bf16]",
               f"cpu_speed.vocabulary={tmp / 'vocab.txt'}", "cpu_speed.image=null")
    cfg.cpu_speed.models = [tiny, {"name": "no_such_model", "builder": "no_such_builder"}]
    cfg.cpu_speed.weights = None   # the golden fill is for the full-size model
    # targets no tiny model can meet: exercises the profile table written on a miss
    cfg.cpu_speed.targets = {"san_b": {"fp32_model": 1e-6, "fp32_end_to_end": 1e-6, "bf16_end_to_end": 1e-6,
                                       "bf16_agreement": 0.99}}
    rows = speed.run_cpu_speed(cfg)
    return tmp, rows


def test_rows_and_csv(smoke):
    tmp, rows = smoke
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["precision"], r["scope"]) for r in ok} == {(p, s) for p in ("fp32", "bf16", "amp_bf16")
                                                           for s in ("model", "end_to_end")}
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(skipped) == 1 and "no_such_builder" in skipped[0]["reason"]
    with open(tmp / "cpu_speed.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == speed.CSV_COLUMNS and len(table) == len(rows)
    for r in (r for r in table if r["status"] == "ok"):
        assert r["threads"] == "2" and r["resolution"] == "64" and r["input_hw"] == "64x64"
        assert float(r["median_ms"]) > 0 and float(r["p90_ms"]) >= float(r["median_ms"]) * 0.999
        assert float(r["gflops"]) > 0 and float(r["gflops_attention"]) > 0
        assert r["cpu_model"] and r["torch_version"] == torch.__version__
        # floor = GFLOPs / peak of the row's dtype; latency / floor follows
        assert math.isclose(float(r["floor_ms"]), float(r["gflops"]) / float(r["peak_gflops"]) * 1e3, rel_tol=1e-4)
        assert math.isclose(float(r["latency_over_floor"]), float(r["median_ms"]) / float(r["floor_ms"]),
                            rel_tol=1e-4)
        assert r["peak_dtype"] == ("fp32" if r["precision"] == "fp32" else "bf16")
        assert float(r["min_ms"]) <= float(r["median_ms"]) and float(r["latency_over_floor_best"]) > 0
        assert int(r["fp32_labels_distinct"]) >= 1
        if r["precision"] != "fp32":
            assert 0 <= float(r["label_agreement"]) <= 1 and float(r["max_abs_score_diff"]) >= 0
            assert 0 <= float(r["mask_agreement"]) <= 1
    # end_to_end adds the full-resolution per-class scores: 2 * Q * K * H * W FLOPs more than the model scope
    fp32 = {r["scope"]: float(r["gflops"]) for r in ok if r["precision"] == "fp32"}
    assert fp32["end_to_end"] - fp32["model"] == pytest.approx(2 * 100 * len(VOCAB) * 64 * 64 / 1e9, rel=1e-6)
    timings = json.loads((tmp / "cpu_speed.timings.json").read_text())
    assert set(timings["peak"]) == {"fp32", "bf16"} and timings["machine"]["threads"] == 2
    assert len(timings["models"]["san_b"]["runs"]["fp32"]["model"]["ms"]) == 2
    assert "## CPU speed" in (tmp / "cpu_speed.md").read_text()


def test_targets_and_gap_table(smoke):
    tmp, rows = smoke
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["target_met"] is False for r in ok if r["target"])
    judged = [r for r in ok if r["target"] and r["precision"] != "fp32"]
    assert len(judged) == 1 and judged[0]["scope"] == "end_to_end"   # only the faster bf16 variant
    table = (tmp / "cpu_speed_profile_san_b_fp32.txt").read_text()
    for cat in speed.CATEGORIES:
        assert cat in table
    assert "MISSED" in table and "phases of end_to_end" in table


def test_flop_split_matches_math_backend():
    """The CPU flash kernel gets a formula: the total equals what the math backend counts, attention kept apart."""
    model = Transformer(64, 2, 4).eval()
    x = torch.randn(1, 50, 64)
    split = speed.count_flops_split(lambda: model(x))
    assert split["total"] == count_flops(lambda: model(x))
    assert split["attention"] == 2 * 2 * 2 * 50 * 50 * 64


def test_label_agreement_on_hand_made_scores():
    ref = torch.zeros(3, 2, 4)
    ref[0] = 1.0                      # class 0 wins everywhere with margin 1 ...
    ref[1, 0, 0] = 0.9995             # ... except a near tie at (0, 0): margin 5e-4 < 1e-3 * max
    other = ref.clone()
    other[1, 0, 0] = 1.5              # flips the near tie (excluded from the margin mask)
    other[2, 1, 3] = 2.0              # flips a clear pixel
    a = speed.label_agreement(ref, other)
    assert a["margin_pixel_fraction"] == pytest.approx(7 / 8)
    assert a["label_agreement"] == pytest.approx(6 / 7)
    assert a["label_agreement_all"] == pytest.approx(6 / 8)
    assert a["max_abs_score_diff"] == pytest.approx(2.0)
    assert a["max_abs_score_diff_rel"] == pytest.approx(2.0)
    same = speed.label_agreement(ref, ref.to(torch.bfloat16))
    assert same["label_agreement"] == 1.0


def test_op_categories():
    assert speed.op_category("aten::addmm") == "GEMM"
    assert speed.op_category("aten::mkldnn_convolution") == "GEMM"
    assert speed.op_category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert speed.op_category("aten::native_layer_norm") == "norm/activation/elementwise"
    assert speed.op_category("aten::upsample_bilinear2d") == "resize/pad/post-processing"
    assert speed.op_category("aten::argmax") == "resize/pad/post-processing"
    assert speed.op_category("aten::mul") == "norm/activation/elementwise"
    assert speed.op_category("aten::max_pool2d") == "resize/pad/post-processing"


# -- SAN's CPU fast paths, on the tiny SAN (same code, small widths) ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_san():
    from bench.models import create_model

    torch.manual_seed(0)
    model = create_model("san_vit_b_16", **TINY)
    with torch.no_grad():   # non-flat scores: spread the decoder outputs and the attention bias
        for p in model.side_adapter_network.mask_decoder.parameters():
            p.normal_(0, 0.3)
    with torch.inference_mode():
        model.encode_vocabulary(VOCAB)
    return model


def test_rec_head_matches_the_official_masked_sequence(tiny_san):
    """The split recognition head equals the official one: [SOS x Q ; CLS ; patches] through every block under
    `rec_attention_mask` (-100 on the SOS columns)."""
    from bench.models.san import rec_attention_mask

    model = tiny_san
    x = model.normalize_and_pad([torch.randint(0, 256, (3, 96, 128), generator=torch.Generator().manual_seed(1))
                                 .float()])[0]
    with torch.inference_mode():
        out = model(x, return_intermediates=True)
        head = model.clip_rec_head
        feats, grid = model.clip_visual_extractor(F.interpolate(x, scale_factor=model.cfg.clip_resolution,
                                                                mode="bilinear", align_corners=False),
                                                  model._clip_keep)
        tokens = feats[model.cfg.feature_last_layer]
        q = out["attn_bias"].shape[2]
        seq = torch.cat([tokens[:, :1].expand(-1, q, -1), tokens], dim=1)
        mask = rec_attention_mask(out["attn_bias"], grid)
        for block in head.resblocks:
            seq = block(seq, mask)
        ref = F.normalize(head.ln_post(seq[:, :q]) @ head.proj, dim=-1)
    torch.testing.assert_close(out["mask_emb"], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 64), (50, 70), (96, 64), (37, 101)])
@pytest.mark.parametrize("rows_per_band", [1, 3, 8])
def test_postprocess_labels_is_argmax_of_postprocess(tiny_san, shape, rows_per_band):
    """The banded label path (separable resizes, padded class GEMM) gives the argmax of the score maps: square,
    padded + cropped, resized back to a smaller or larger original size, any band height."""
    model = tiny_san
    image = torch.randint(0, 256, (*shape, 3), generator=torch.Generator().manual_seed(2)).to(torch.uint8).numpy()
    with torch.inference_mode():
        x, sizes = model.preprocess([image])
        out = model(x, sizes)
        scores = model.postprocess(out, sizes, [shape])[0]
        labels = model.postprocess_labels(out, sizes, [shape], rows_per_band=rows_per_band)[0]
        forced = model.postprocess_labels(out, sizes, [shape], max_elements=1)[0]   # the fallback path
    ref = scores.argmax(dim=0)
    top2 = scores.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-5 * scores.max()
    assert labels.shape == shape and labels.dtype == torch.int64
    assert torch.equal(labels[clear], ref[clear]) and torch.equal(forced, ref)
    assert clear.float().mean() > 0.9


def test_postprocess_flops_are_counted(tiny_san):
    """end_to_end counts the per-class score matmul (the in-place addmm_ is invisible to FlopCounterMode)."""
    model = tiny_san
    out = {"mask_pred": torch.randn(1, 100, 4, 4), "mask_logits": torch.randn(1, 100, len(VOCAB) + 1),
           "padded_size": (64, 64)}
    flops = count_flops(lambda: model.postprocess(out, [(64, 64)], [(64, 64)]))
    assert flops == 2 * 100 * len(VOCAB) * 64 * 64
    assert count_flops(lambda: model.postprocess_labels(out, [(64, 64)], [(64, 64)])) == flops


def test_crop_model_figures_scale_one_batch():
    """Crop models: fixed part + crops / crop_batch x one batch; floor = GFLOPs / peak; interleaved ratio uses the
    probe before each iteration; best = fastest iterations at the fastest matmul."""
    runs = {"model": {"ms": [100.0, 120.0, 110.0], "peak_probe_gflops": [100.0, 50.0, 100.0]},
            "crops": {"ms": [40.0, 40.0, 80.0], "peak_probe_gflops": [100.0, 100.0, 50.0]}}
    flops = {"model": {"total": 10e9, "attention": 2e9}, "crops": {"total": 4e9, "attention": 1e9}}
    peak = {"gflops": 100.0, "gflops_best": 125.0}
    f = speed._figures(runs, "model", flops, peak, crops=20, crop_batch=8)
    scale = 20 / 8
    assert f["gflops"] == pytest.approx(10 + scale * 4) and f["gflops_attention"] == pytest.approx(2 + scale * 1)
    assert f["median_ms"] == pytest.approx(110 + scale * 40) and f["per_crop_ms"] == pytest.approx(40 / 8)
    assert f["floor_ms"] == pytest.approx(f["gflops"] / 100 * 1e3)
    assert f["latency_over_floor"] == pytest.approx(f["median_ms"] / f["floor_ms"])
    # work at the moment's speed: median(ms x GFLOP/s) per part = 10000 (fixed) and 4000 (crops)
    assert f["latency_over_floor_interleaved"] == pytest.approx((10000 + scale * 4000) / (f["gflops"] * 1e3))
    assert f["min_ms"] == pytest.approx(100 + scale * 40)
    assert f["latency_over_floor_best"] == pytest.approx(f["min_ms"] / (f["gflops"] / 125 * 1e3))
    plain = speed._figures({"model": runs["model"]}, "model", flops, peak, crops=None, crop_batch=None)
    assert plain["gflops"] == 10 and plain["median_ms"] == 110 and "per_crop_ms" not in plain
