"""The CPU speed benchmark as ordinary cells (`+sweep=cpu_speed`): a sweep on the tiny SAN (same code path, small
widths) writes ordinary records with the speed figures, gap tables beside them and the targets; the dataset
settings of SCAN reach the model; the FLOP split, the label-agreement rule, the op categories, SAN's CPU fast paths
and the crop-model arithmetic on hand-made numbers. Fast."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import bench.config  # noqa: F401  (registers the typed schema)
from bench import gaptable
from bench import profile as prof
from bench.models.clip import Transformer
from bench.flops import count_flops, count_flops_split
from bench.records import load_records

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")
SEARCHPATH = f"hydra.searchpath=[file://{ROOT / 'tests' / 'fixtures' / 'conf'}]"
VOCAB = ["cat", "dog", "tree", "sky", "road"]
TINY = dict(clip_width=64, clip_layers=4, clip_heads=4, clip_image_size=64, embed_dim=32, text_width=32,
            text_layers=2, text_heads=2, feature_last_layer=3, fusion_map=((0, 0), (1, 1), (2, 2), (3, 3)),
            side_width=48, side_depth=4, side_heads=2, decoder_channels=16)


@pytest.fixture(scope="module")
def speed_sweep(tmp_path_factory):
    """`python -m bench -m +sweep=cpu_speed` on the tiny SAN, fp32 and bf16, with targets no tiny model meets."""
    tmp = tmp_path_factory.mktemp("cpu_speed")
    (tmp / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    cmd = [sys.executable, "-m", "bench", "-m", "+sweep=cpu_speed", SEARCHPATH, "model=san_tiny", "precision=fp32,bf16",
           "resolution=64", "profile.warmup=0", "profile.iters=2", "profile.peak_size=256", "profile.weights=init",
           "model.golden_fill=san",   # the agreement check takes SAN's label-check fill (timing: builder init)
           "profile.allocator=default", f"profile.vocabulary={tmp / 'vocab.txt'}",
           "+profile.targets.san_tiny={fp32_model: 1e-6, fp32_end_to_end: 1e-6, bf16_end_to_end: 1e-6, "
           "bf16_agreement: 0.99}", f"results_dir={tmp / 'results'}", f"data_root={tmp / 'data'}",
           f"hydra.sweep.dir={tmp / 'sweep'}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return tmp, {r["precision"]: r for r in load_records(str(tmp / "results"))}, out.stdout


def test_speed_cells_are_ordinary_records(speed_sweep):
    tmp, recs, _ = speed_sweep
    assert set(recs) == {"fp32", "bf16"}
    for precision, r in recs.items():
        assert r["status"] == "ok" and r["evaluated"] is False and "mIoU" not in r
        assert r["threads"] == 2 and r["device_type"] == "cpu" and r["input_hw"] == "64x64"
        assert r["peak_kind"] == ("fp32" if precision == "fp32" else "bf16") and r["load1"] >= 0
        assert r["profile_vocabulary_size"] == len(VOCAB)
        for scope in prof.SCOPES:
            assert r[f"latency_ms_{scope}_median"] > 0 and r[f"latency_ms_{scope}_min"] <= r[
                f"latency_ms_{scope}_median"]
            # floor = timed GFLOPs / the cell's own peak; the ratios follow from it
            assert math.isclose(r[f"floor_ms_{scope}"], r[f"gflops_timed_{scope}"] / r["peak_gflops"] * 1e3,
                                rel_tol=1e-9)
            assert math.isclose(r[f"latency_over_floor_{scope}"],
                                r[f"latency_ms_{scope}_median"] / r[f"floor_ms_{scope}"], rel_tol=1e-9)
            assert r[f"latency_over_floor_interleaved_{scope}"] > 0 and r[f"latency_over_floor_best_{scope}"] > 0
            assert r[f"gflops_{scope}"] > 0 and r[f"gflops_timed_{scope}"] > 0
        assert r["peak_drift"] >= 0 and r["peak_gflops_interleaved"] > 0
        # end_to_end adds the per-class scores at the image size: 2 * Q * K * H * W FLOPs more than the model scope
        assert r["gflops_end_to_end"] - r["gflops_model"] == pytest.approx(2 * 100 * len(VOCAB) * 64 * 64 / 1e9,
                                                                             rel=1e-6)
        table = (tmp / "results" / "runs" / r["gap_table"]).read_text()
        assert all(cat in table for cat in gaptable.CATEGORIES) and "phases of end_to_end" in table
        timings = json.loads((tmp / "results" / "runs" / f"{r['key']}.timings.json").read_text())
        assert len(timings["model"]) == 2
    bf16 = recs["bf16"]
    assert 0 <= bf16["label_agreement"] <= 1 and bf16["fp32_labels_distinct"] >= 1
    assert bf16["agreement_weights"].startswith("label_check fill (san")
    assert bf16["profile_weights"] == "builder init (seeded random)"
    assert 0 <= bf16["mask_agreement"] <= 1 and bf16["max_abs_score_diff"] >= 0
    assert "label_agreement" not in recs["fp32"]
    assert recs["fp32"]["speed_target_model"] == 1e-6 and recs["bf16"]["speed_target_agreement"] == 0.99
    assert "speed_target_model" not in bf16


def test_speed_cells_print_progress_and_are_skipped_when_done(speed_sweep):
    tmp, recs, stdout = speed_sweep
    assert "[profile] san_tiny fp32: counting FLOPs" in stdout
    assert "efficiency only" in stdout


def test_cpu_benchmark_applies_scan_dataset_settings(tmp_path):
    """SCAN's void re-weighting (a dataset flag, A-847) and the contextual-shift seed (a run setting) reach the model
    in a speed cell, as in an evaluation cell (they were dropped by the old separate benchmark)."""
    from bench.cell import run_cell

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=cpu_speed", "model=scan_b", "dataset=ade847", "shift_seed=7",
                                           "profile.enabled=false", "isolate=false", "progress=false",
                                           f"results_dir={tmp_path}"])
    rec = run_cell(cfg)
    assert rec["status"] == "ok", rec.get("reason")
    applied = json.loads(rec["applied_settings"])
    assert applied["void_reweight"] is True and applied["shift_seed"] == 7
    assert applied["mask_thr"] == 0.25 and applied["ensemble_weight"] == 0.75   # conf/model/scan_b.yaml, ade847


def test_flop_split_matches_math_backend():
    """The CPU flash kernel gets a formula: the total equals what the math backend counts, attention kept apart."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = Transformer(64, 2, 4).eval()
    x = torch.randn(1, 50, 64)
    split = count_flops_split(lambda: model(x))
    with sdpa_kernel(SDPBackend.MATH):
        math_total = count_flops_split(lambda: model(x))["total"]
    assert split["total"] == math_total
    assert split["attention"] == 2 * 2 * 2 * 50 * 50 * 64


def test_label_agreement_on_hand_made_scores():
    ref = torch.zeros(3, 2, 4)
    ref[0] = 1.0                      # class 0 wins everywhere with margin 1 ...
    ref[1, 0, 0] = 0.9995             # ... except a near tie at (0, 0): margin 5e-4 < 1e-3 * max
    other = ref.clone()
    other[1, 0, 0] = 1.5              # flips the near tie (excluded from the margin mask)
    other[2, 1, 3] = 2.0              # flips a clear pixel
    a = prof.label_agreement(ref, other)
    assert a["margin_pixel_fraction"] == pytest.approx(7 / 8)
    assert a["label_agreement"] == pytest.approx(6 / 7)
    assert a["label_agreement_all"] == pytest.approx(6 / 8)
    assert a["max_abs_score_diff"] == pytest.approx(2.0)
    assert a["max_abs_score_diff_rel"] == pytest.approx(2.0)
    same = prof.label_agreement(ref, ref.to(torch.bfloat16))
    assert same["label_agreement"] == 1.0


def test_op_categories():
    assert gaptable.op_category("aten::addmm") == "GEMM"
    assert gaptable.op_category("aten::mkldnn_convolution") == "GEMM"
    assert gaptable.op_category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert gaptable.op_category("aten::native_layer_norm") == "norm/activation/elementwise"
    assert gaptable.op_category("aten::upsample_bilinear2d") == "resize/pad/post-processing"
    assert gaptable.op_category("aten::argmax") == "resize/pad/post-processing"
    assert gaptable.op_category("aten::mul") == "norm/activation/elementwise"
    assert gaptable.op_category("aten::max_pool2d") == "resize/pad/post-processing"


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


def _near_tie_outputs(q: int = 24, k: int = 12, side: int = 10, seed: int = 0):
    """Mask logits [Q, side, side] and class probabilities [Q, K] whose classes come in pairs of almost equal
    columns (0.05 % apart, well inside bf16 rounding), plus one exact duplicate column (an exact fp32 tie)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.randn(q, side, side, generator=g) * 4
    base = torch.rand(q, k // 2, generator=g) ** 4
    prob = torch.cat([base, base * (1 + 5e-4 * torch.rand(q, k // 2, generator=g))], dim=1)
    prob[:, -1] = prob[:, 0]
    return mask, prob / prob.sum(1, keepdim=True) / 2


@pytest.mark.parametrize("out_size,rows_per_band", [((64, 64), 8), ((37, 53), 3), ((96, 80), 1)])
def test_checked_bf16_class_gemm_keeps_the_fp32_labels_at_near_ties(out_size, rows_per_band):
    """The bf16 class GEMM re-checks in fp32 the pixels whose top two classes bf16 cannot separate: the labels are
    the fp32 path's (exact duplicate columns included: the lower class wins, as argmax), while a plain bf16 GEMM
    gets many of them wrong (so the test can fail)."""
    from bench.models.mask_scores import soft_mask_labels, soft_mask_scores
    mask, prob = _near_tie_outputs()
    args = (mask, prob, (160, 160), (150, 155), out_size)
    fp32 = soft_mask_labels(*args, rows_per_band=rows_per_band)
    checked = soft_mask_labels(*args, rows_per_band=rows_per_band, checked_bf16=True)
    assert torch.equal(checked, fp32)
    assert torch.equal(fp32, soft_mask_scores(*args).argmax(0))
    plain_bf16 = torch.einsum("qk,qhw->khw", prob.bfloat16(), soft_mask_scores(mask, torch.eye(len(prob)),
                              *args[2:]).bfloat16()).argmax(0)
    assert (plain_bf16 != fp32).float().mean() > 0.05
    assert fp32.unique().numel() >= 4 and not (fp32 == prob.shape[1] - 1).any()   # the duplicate never wins


def test_checked_bf16_class_gemm_rechecks_vanishing_and_nan_scores():
    """Scores that underflow (every mask logit -200: sigmoids of 1e-87, zero in fp32) or are NaN are decided by the
    fp32 path, not by bf16 bits."""
    from bench.models.mask_scores import soft_mask_labels
    _, prob = _near_tie_outputs()
    mask = torch.full((prob.shape[0], 8, 8), -200.0)
    mask[:, :2] = torch.randn(prob.shape[0], 2, 8) * 3
    mask[0, 4, 4] = float("nan")
    args = (mask, prob, (64, 64), (64, 64), (64, 64))
    assert torch.equal(soft_mask_labels(*args, checked_bf16=True), soft_mask_labels(*args))


def test_bf16_masks_take_the_checked_class_gemm(tiny_san):
    """SAN's label path on bf16 masks (a bf16 cell) runs the class GEMM in bf16 (the FLOP counter sees a bf16 mm)
    and returns the argmax of the fp32 scores of the same masks."""
    model = tiny_san
    image = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(3)).to(torch.uint8).numpy()
    with torch.inference_mode():
        x, sizes = model.preprocess([image])
        out = model(x, sizes)
        out["mask_pred"] = out["mask_pred"].bfloat16()
        scores = model.postprocess(out, sizes, [(64, 64)])[0]
        seen = []
        with _MmDtypes(seen):
            labels = model.postprocess_labels(out, sizes, [(64, 64)])[0]
    top2 = scores.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-5 * scores.max()
    assert torch.equal(labels[clear], scores.argmax(0)[clear]) and clear.float().mean() > 0.9
    assert torch.bfloat16 in seen


class _MmDtypes(torch.overrides.TorchFunctionMode):
    """Records the dtypes of every torch.mm call."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.mm:
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_postprocess_flops_are_counted(tiny_san):
    """end_to_end counts the per-class score matmul (the in-place addmm_ is invisible to FlopCounterMode)."""
    model = tiny_san
    out = {"mask_pred": torch.randn(1, 100, 4, 4), "mask_logits": torch.randn(1, 100, len(VOCAB) + 1),
           "padded_size": (64, 64)}
    flops = count_flops(lambda: model.postprocess(out, [(64, 64)], [(64, 64)]))
    assert flops == 2 * 100 * len(VOCAB) * 64 * 64
    assert count_flops(lambda: model.postprocess_labels(out, [(64, 64)], [(64, 64)])) == flops


def test_crop_model_figures_scale_one_batch():
    """Crop models: fixed part + crops x per crop (one batch of crop_batch measured); floor = timed GFLOPs / peak;
    the interleaved ratio uses the probe before each iteration; best = fastest iterations at the fastest matmul."""
    times = {"model": [100.0, 120.0, 110.0], "end_to_end": [100.0, 120.0, 110.0], "crops": [40.0, 40.0, 80.0]}
    peaks = {"model": [100.0, 50.0, 100.0], "end_to_end": [100.0, 50.0, 100.0], "crops": [100.0, 100.0, 50.0]}
    flops = {"model": 10.0, "end_to_end": 10.0, "crops": 4.0}
    fig = prof.scope_figures(times, peaks, flops, crop_batch=8)
    for scope in prof.SCOPES:
        fig[f"gflops_timed_{scope}"] = fig[f"gflops_{scope}"]
        for name, fixed in prof.FIXED_PART.items():
            if name.format(scope) in fig:
                fig[fixed.format(scope)] = fig[name.format(scope)]
    fig.update(has_crops=True, gflops_timed_per_crop=fig["gflops_per_crop"], peak_gflops_best=125.0)
    f = prof.add_floor(prof.with_crop_count(fig, 20), 100.0)
    assert f["gflops_model"] == pytest.approx(10 + 20 * 4 / 8)
    assert f["latency_ms_model_median"] == pytest.approx(110 + 20 * 40 / 8) and f["latency_ms_per_crop"] == 5.0
    assert f["floor_ms_model"] == pytest.approx(f["gflops_timed_model"] / 100 * 1e3)
    assert f["latency_over_floor_model"] == pytest.approx(f["latency_ms_model_median"] / f["floor_ms_model"])
    # work at the moment's speed: median(ms x GFLOP/s) per part = 10000 (fixed) and 4000 per batch of 8 crops
    assert f["latency_over_floor_interleaved_model"] == pytest.approx((10000 + 20 * 4000 / 8)
                                                                      / (f["gflops_timed_model"] * 1e3))
    assert f["latency_ms_model_min"] == pytest.approx(100 + 20 * 40 / 8)
    assert f["latency_over_floor_best_model"] == pytest.approx(f["latency_ms_model_min"]
                                                               / (f["gflops_timed_model"] / 125 * 1e3))


@pytest.mark.parametrize("builder,family,fixture,scaled", [("san_vit_b_16", "san", "san_vit_b_16", True),
                                                            ("san_vit_b_16", "san", "san_vit_b_16", False)])
def test_benchmark_fill_is_the_fixture_fill(builder, family, fixture, scaled):
    """profile.weights=golden fills a model from its own parameters (no fixture file): for SAN the same tensors as
    the golden fixture's manifest-driven fill. (SimSeg's fixture fills some matrices by fan-in per key: without its
    manifest the benchmark fill of SimSeg is close to it, not equal; the record says so.)"""
    from bench.models import create_model
    from bench.testing import fills

    model = create_model(builder)
    note = fills.fill_model(model, family, scaled=scaled)
    ref = fills.golden_state_dict(family, ROOT / "tests" / "fixtures" / "golden" / fixture / "manifest.json",
                                  scaled=scaled)
    params = dict(model.named_parameters())
    assert note.startswith("golden_scaled" if scaled else "golden fill") and set(params) <= set(ref)
    for key, p in params.items():
        assert torch.equal(p.detach(), ref[key]), key


def test_label_check_fill_changes_only_its_keys():
    """SAN's label-check variant is the scaled fill with SAN_LABEL_CHECK_RULES on top: the recognition head's and
    the text transformer's matrices at 4 / sqrt(fan_in) except the head's query / key rows (the plain 0.02), the
    attention-bias scale 8, the last pixel-MLP layer at 100 / sqrt(fan_in); every other tensor is the scaled
    fill's (tiny SAN: same key names as SAN-B)."""
    from bench.models import create_model
    from bench.testing import fills

    scaled, check = create_model("san_vit_b_16", **TINY), create_model("san_vit_b_16", **TINY)
    fills.fill_model(scaled, "san")
    assert fills.fill_model(check, "san", label_check=True).startswith("label_check fill (san")
    a, b = dict(scaled.named_parameters()), dict(check.named_parameters())
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    rec = {k for k in a if k.startswith("clip_rec_head.resblocks.") and a[k].dim() >= 2}
    text = {k for k in a if k.startswith("ov_classifier.transformer.") and a[k].dim() >= 2}
    bias, pix = ("side_adapter_network.mask_decoder.bias_scaling.weight",
                 "side_adapter_network.mask_decoder.pix_mlp.layers.2.weight")
    assert rec and text and changed == rec | text | {bias, pix}
    assert float(b[bias]) == 8.0
    in_proj = next(k for k in rec if k.endswith("attn.in_proj_weight"))
    w, r = b[in_proj].detach(), fills._draw(in_proj, b[in_proj].shape)
    n = w.shape[0] // 3
    assert torch.equal(w[:2 * n], r[:2 * n] * 0.02)
    assert torch.allclose(w[2 * n:], r[2 * n:] * 4.0 / math.sqrt(w.shape[1]))
    w = b[pix].detach()
    assert torch.allclose(w, fills._draw(pix, w.shape) * 100.0 / math.sqrt(math.prod(w.shape[1:])))


def test_reduced_precision_keeps_the_text_tower_and_class_logits_fp32():
    """SAN in bf16 (`to_precision`, as a cell builds it): every tensor bf16 except the text tower (`fp32_modules`),
    state_dict order unchanged; weights loaded afterwards keep every fp32 bit in the tower; the vocabulary's text
    features and the class logits are fp32, also under CPU autocast."""
    from bench.models import create_model
    from bench.testing import fills

    ref = create_model("san_vit_b_16", **TINY).eval()
    fills.fill_model(ref, "san", label_check=True)
    model = create_model("san_vit_b_16", **TINY).eval().to_precision(torch.device("cpu"), torch.bfloat16)
    assert list(model.state_dict()) == list(ref.state_dict())
    for key, t in model.state_dict().items():
        if t.is_floating_point():
            assert t.dtype == (torch.float32 if key.startswith("ov_classifier.") else torch.bfloat16), key
    model.load_state_dict(ref.state_dict())
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items() if k.startswith("ov_classifier."))
    assert sd["clip_rec_head.proj"].dtype == torch.bfloat16
    image = prof.deterministic_image(64)
    with torch.inference_mode():
        ref.encode_vocabulary(VOCAB)
    for autocast in (True, False):   # the first encodes the vocabulary (under autocast), the second reads the cache
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.encode_vocabulary(VOCAB)
            x, sizes = model.preprocess([image])
            out = model(x.bfloat16(), sizes)
        assert model.text_embed.dtype == torch.float32 and torch.equal(model.text_embed, ref.text_embed)
        assert out["mask_pred"].dtype == torch.bfloat16 and out["mask_logits"].dtype == torch.float32


@pytest.mark.parametrize("shape", [(1, 6, 300, 40), (2, 3, 77, 64), (40, 3, 30, 16)])   # row blocks per head /
# one batched product / groups of short heads
def test_bf16_gemm_attention_matches_sdpa_and_counts_the_same_flops(shape, monkeypatch):
    """bf16 attention on the CPU runs as GEMMs (bench.models.attention): the same result as SDPA in fp32 within
    bf16 rounding in every code path (the 300-token problem forced through row blocks of 64 rows, the 120 heads of
    30 tokens through groups of 7 heads, the small one in one product), the same FLOPs as the SDPA formula; masks
    (additive, boolean, one per head) are added to the scores; fp32 calls stay SDPA, bit for bit."""
    from bench.models import attention as attn

    monkeypatch.setattr(attn, "FULL_ELEMENTS", 1 << 16)
    monkeypatch.setattr(attn, "BLOCK_ELEMENTS", 64 * shape[2] if shape[2] > 64 else 7 * shape[2] ** 2)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    out = attn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.float() - ref).abs().max() < 0.03 * ref.abs().max()
    assert torch.equal(attn.attention(q, k, v), ref)
    mask = torch.randn(shape[-2], shape[-2], generator=g) * 4
    mask[:, 1::3] = float("-inf")
    masked_ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(attn.attention(q, k, v, mask), masked_ref)
    per_head = torch.randn(*shape[:2], 1, shape[-2], generator=g)     # one mask row per head, broadcast over rows
    for m in (mask, mask.isfinite(), per_head):     # additive and boolean masks, as SDPA reads them
        ref_m = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        out_m = attn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), m)
        assert out_m.dtype == torch.bfloat16 and (out_m.float() - ref_m).abs().max() < 0.03 * ref_m.abs().max()
    from bench.flops import count_flops

    assert count_flops(lambda: attn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())) == \
        count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 4 * math.prod(shape) * shape[-2]
