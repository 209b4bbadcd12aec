"""SimSeg (bench/models/simseg.py): the published state_dict layout, the official code's golden outputs, and the
invariants no fixture covers (vocabulary permutation, synonym strings, non-square round trip, batching, crop-free
images, cost split).

Fixtures (tests/fixtures/golden/simseg/, copies of the shared golden set): `fill_reference_simseg.py` (the fill
rule that rebuilds the filled state dicts from `manifest.json`, as `bench.testing.fills.simseg_state_dict`), the 512×512 input image, `golden.npz` (plain fill:
degenerate region path, every crop the same) and `golden_scaled.npz` (ScaledVariant: 100 distinct crops), with their
`*.run.json` (mask_thr 0.4, ensemble weight 0.5). `tests/fixtures/simseg_state_dict_keys.tsv` lists the 982 keys.

Golden contract (clarifications §4, golden README "Recommended checks"): every array within 1e-4·max|ref| when the
region path is fed the fixture's own binary masks; end to end, the valid-query set and the boxes equal, the
crop-branch arrays (clip_logits, clip_image_embed_raw) within 2e-3·max (the official run itself flips a few mask
pixels at the threshold between thread counts), the MaskFormer arrays, ensembled_probs and sem_seg within 1e-4·max.

The model is built once for the module; the filled weights go through `load_checkpoint` from a temporary .pth
(plain wrapped as {'model': sd}, scaled bare) and are swapped only when a test needs the other variant.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, load_filled, rel_err, unpack_masks

from bench import BenchError
from bench.models import create_model, list_models
from bench.models.base import resize_uint8, shortest_edge_size
from bench.models.checkpoint import load_checkpoint, load_state_dict_strict
from bench.models.clip import VILD_TEMPLATES, tokenize
from bench.models.common import mask_boxes
from bench.models.simseg import SimSeg

GOLDEN = FIXTURES / "golden" / "simseg"
VOCAB = ["cat", "dog", "tree", "sky", "road"]
N_KEYS, N_STATE, N_PARAMS = 982, 210_900_068, 210_688_449
MASKFORMER_ARRAYS = ("mask_pred", "class_embed", "mask_cls_logits", "text_features", "res5_c64", "mask_features_c16")


def region_masks(npz) -> torch.Tensor:
    """The official region classifier's binary masks (sigmoid > mask_thr), bool [100, 512, 512]."""
    return torch.from_numpy(unpack_masks(npz, "region_bin_mask_packed"))


def golden_view(out: dict, scores: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's outputs for image 0 under the fixture's array names."""
    return {"mask_pred": out["mask_pred"][0], "class_embed": out["class_embed"][0],
            "mask_cls_logits": out["mask_cls_logits"][0], "text_features": out["text_features"],
            "res5_c64": out["res5"][0, :64], "mask_features_c16": out["mask_features"][0, :16],
            "ensembled_probs": out["ensembled_probs"][0], "sem_seg_s8": scores[0][:, ::8, ::8],
            "sem_seg_crop64": scores[0][:, :64, :64]}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model() -> SimSeg:
    return create_model("simseg_vit_b_16")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.load(GOLDEN / "input_image_objects3_512x512x3_uint8.npy")


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory):
    """use(variant) -> the model holding the filled weights of 'golden' or 'golden_scaled', the golden settings
    and VOCAB encoded; loads only when the variant changes (plain: through load_checkpoint from a file; scaled: the
    same strict load from memory)."""
    current = {}

    def use(variant: str) -> SimSeg:
        if current.get("variant") != variant:
            scaled = variant == "golden_scaled"
            path = None if scaled else tmp_path_factory.mktemp("simseg") / f"{variant}.pth"   # scaled: from memory
            report = load_filled(model, "simseg", GOLDEN / "manifest.json", scaled, path)
            assert report.ignored_keys == [] and report.absent_optional == []
            assert len(report.sha256) == (0 if scaled else 64)
            current["variant"] = variant
        run = json.loads((GOLDEN / f"{variant}.run.json").read_text())
        model.configure(mask_thr=run["mask_thr"], ensemble_weight=run["clip_ensemble_weight"])
        if model.vocabulary != run["vocabulary"]:
            model.encode_vocabulary(run["vocabulary"])
        return model

    return use


def _run(model: SimSeg, image: np.ndarray, skip_crops: bool = False):
    with torch.inference_mode():
        x, sizes = model.preprocess([image])
        out = model(x, sizes, skip_crops=skip_crops)
        scores = model.postprocess(out, sizes, [image.shape[:2]])
    return x, sizes, out, scores


@pytest.fixture(scope="module")
def plain_run(weights, image):
    """Plain fill: the MaskFormer part (the crop forward is checked on the fixture's own masks)."""
    return _run(weights("golden"), image, skip_crops=True)


@pytest.fixture(scope="module")
def scaled_run(weights, image):
    """ScaledVariant, end to end: 100 valid queries, 100 CLIP crops in one forward."""
    return _run(weights("golden_scaled"), image)


@pytest.fixture()
def small(weights):
    """The scaled weights with the mask logits tempered ×0.1 (no sigmoid saturation, so a threshold can select a
    few queries) and a small protocol (short 64, long ≤ 256); weights, protocol and settings restored after."""
    model = weights("golden_scaled")
    saved = (model.protocol, model.mask_thr, model.ensemble_weight, list(model.vocabulary))
    last = model.sem_seg_head.predictor.mask_embed.layers[-1]
    original = (last.weight.detach().clone(), last.bias.detach().clone())
    with torch.no_grad():
        last.weight.mul_(0.1)
        last.bias.mul_(0.1)
    model.protocol = dataclasses.replace(model.protocol, short_side=64, max_size=256)
    try:
        yield model
    finally:
        with torch.no_grad():
            last.weight.copy_(original[0])
            last.bias.copy_(original[1])
        model.protocol, model.mask_thr, model.ensemble_weight = saved[:3]
        if model.vocabulary != saved[3]:
            model.encode_vocabulary(saved[3])


def rectangles(h: int, w: int, seed: int) -> np.ndarray:
    """A piecewise-flat test image (grey, three coloured rectangles): masks with distinct boxes."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 128, np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y0:y0 + rng.integers(4, h // 2), x0:x0 + rng.integers(4, w // 2)] = rng.integers(0, 256, 3)
    return img


def few_crops(model: SimSeg, images: list[np.ndarray], n: int = 3) -> None:
    """Set mask_thr so that at most n queries per image are valid (exactly n in one of them): keeps CLIP cheap."""
    with torch.inference_mode():
        x, sizes = model.preprocess(images)
        out = model(x, sizes, skip_crops=True)
        peaks = [model.mask_logits_at(out["mask_pred"][i], out["padded_size"], s).flatten(1).amax(1).sigmoid()
                 for i, s in enumerate(sizes)]
    model.configure(mask_thr=max(float(p.sort(descending=True).values[n]) for p in peaks))


# ------------------------------------------------------------------------------------------------ layout
def test_state_dict_matches_published_layout(model):
    rows = [line.rstrip("\n").split("\t") for line in (FIXTURES / "simseg_state_dict_keys.tsv").open()
            if not line.startswith("#")]
    expected = {k: tuple(int(d) for d in s.strip("()").split(",") if d.strip()) for k, s in rows}
    state = model.state_dict()
    assert len(expected) == N_KEYS
    assert sorted(state) == sorted(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(v.numel() for v in state.values()) == N_STATE
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    # persistent buffers beyond FrozenBN: CLIP pixel statistics and the training-only empty_weight
    buffers = {k for k, _ in model.named_buffers() if k in state and not k.startswith("backbone.")}
    assert buffers == {"clip_adapter.pixel_mean", "clip_adapter.pixel_std", "criterion.empty_weight"}


def test_builder_and_settings(model):
    assert "simseg_vit_b_16" in list_models() and isinstance(model, SimSeg) and not model.training
    p = model.protocol
    assert (p.short_side, p.max_size, p.size_divisibility) == (512, 2048, 32)
    assert p.pixel_mean == (123.675, 116.280, 103.530) and p.pixel_std == (58.395, 57.120, 57.375)
    assert (model.mask_thr, model.ensemble_weight, model.clip_ensemble) == (0.4, 0.5, True)  # A-150 config
    with pytest.raises(BenchError, match="no setting 'mask_threshold'"):
        model.configure(mask_threshold=0.3)
    with pytest.raises(BenchError, match="unknown argument"):
        create_model("simseg_vit_b_16", prompt="learnable")
    saved = (model.mask_thr, model.ensemble_weight)
    model.configure(mask_thr=0.3, ensemble_weight=0.7)
    assert (model.mask_thr, model.ensemble_weight) == (0.3, 0.7)
    model.configure(mask_thr=saved[0], ensemble_weight=saved[1])


def test_wrong_checkpoints_fail_with_key_diff(model, tmp_path):
    own = model.state_dict()
    partial = tmp_path / "partial.pth"
    torch.save({"model": {k: own[k].clone() for k in list(own)[:3]}}, partial)
    with pytest.raises(BenchError, match=f"{N_KEYS - 3} missing"):
        load_checkpoint(model, str(partial))
    learned_prompt = dict(own, **{"clip_adapter.prompt_learner.prefix_prompt": torch.zeros(16, 512)})
    with pytest.raises(BenchError, match=r"1 unexpected \[clip_adapter\.prompt_learner\.prefix_prompt\]"):
        load_state_dict_strict(model, learned_prompt)
    closed_set = dict(own, **{"criterion.empty_weight": torch.ones(172)})
    with pytest.raises(BenchError, match=r"criterion\.empty_weight: file \[172\] vs model \[157\]"):
        load_state_dict_strict(model, closed_set)
    old_layout = {k.replace("pixel_decoder.", "pixel_decoder.pixel_decoder."): v for k, v in own.items()}
    with pytest.raises(BenchError, match="23 missing.*23 unexpected"):
        load_state_dict_strict(model, old_layout)


def test_synonym_string_is_one_class_and_text_truncation_is_exact(model):
    """'road, route' goes into every template whole (one row); the EOT-truncated text forward equals the
    77-token one (causal mask)."""
    clip_model = model.clip_adapter.clip_model
    saved = model.vocabulary
    try:
        with torch.inference_mode():
            feats = model.encode_vocabulary(["road, route "])
            tokens = tokenize([t.format("road, route") for t in VILD_TEMPLATES])
            x = clip_model.token_embedding(tokens) + clip_model.positional_embedding
            x = clip_model.ln_final(clip_model.transformer(x, clip_model.attn_mask))
            full = x[torch.arange(len(tokens)), tokens.argmax(-1)] @ clip_model.text_projection
            ref = F.normalize(F.normalize(full, dim=-1).mean(0), dim=-1)
    finally:
        if saved is not None:
            model.encode_vocabulary(saved)
    assert feats.shape == (1, 512)
    assert rel_err(ref[None].numpy(), feats) < 1e-5


# ------------------------------------------------------------------------------------------------ golden
@pytest.mark.slow
def test_golden_plain_maskformer(model, plain_run):
    x, sizes, out, scores = plain_run
    ref = np.load(GOLDEN / "golden.npz")
    got = golden_view(out, scores)
    for name in MASKFORMER_ARRAYS:
        assert rel_err(ref[name], got[name]) <= 1e-4, name
    assert np.array_equal(out["valid"][0].float().numpy(), ref["valid"].astype(np.float32))
    assert np.array_equal(out["region_boxes"][0].numpy(), ref["region_boxes"])
    assert out["num_crops"] == [100] and out["clip_logits"] == [None]
    ours = model.mask_logits_at(out["mask_pred"][0], out["padded_size"], sizes[0]).sigmoid() > model.mask_thr
    assert torch.equal(ours, region_masks(ref))


@pytest.mark.slow
def test_golden_plain_region_path_and_ensemble(weights, plain_run):
    """Plain fill: all 100 official binary masks are identical, so two crops stand for all of them."""
    model = weights("golden")
    x, sizes, out, _ = plain_run
    ref = np.load(GOLDEN / "golden.npz")
    masks = region_masks(ref)
    assert bool((masks == masks[0]).all())
    with torch.inference_mode():
        region = model.classify_regions(model.recover_image(x[0], sizes[0]), masks[:2], out["text_features"])
        probs = model.ensemble(out["mask_cls_logits"][0], masks.flatten(1).any(1),
                               region["clip_logits"][:1].expand(100, -1))
        scores = model.postprocess(dict(out, ensembled_probs=probs[None]), sizes, [(512, 512)])
    assert rel_err(ref["clip_crops_first2"], region["crops"]) <= 1e-4
    assert rel_err(ref["clip_image_embed_raw"][:2], region["clip_image_embed_raw"]) <= 1e-4
    assert rel_err(ref["clip_logits"][:2], region["clip_logits"]) <= 1e-4
    got = golden_view(dict(out, ensembled_probs=probs[None]), scores)
    for name in ("ensembled_probs", "sem_seg_s8", "sem_seg_crop64"):
        assert rel_err(ref[name], got[name]) <= 1e-4, name


@pytest.mark.slow
def test_golden_scaled_end_to_end(scaled_run):
    x, sizes, out, scores = scaled_run
    ref = np.load(GOLDEN / "golden_scaled.npz")
    got = golden_view(out, scores)
    for name in MASKFORMER_ARRAYS + ("ensembled_probs", "sem_seg_s8", "sem_seg_crop64"):
        assert rel_err(ref[name], got[name]) <= 1e-4, name
    assert np.array_equal(out["valid"][0].float().numpy(), ref["valid"])
    assert np.array_equal(out["region_boxes"][0].numpy(), ref["region_boxes"])
    assert out["num_crops"] == [100] and len({tuple(b) for b in ref["region_boxes"].tolist()}) == 4
    assert rel_err(ref["clip_logits"], out["clip_logits"][0]) <= 2e-3
    assert rel_err(ref["clip_image_embed_raw"], out["clip_image_embed_raw"][0]) <= 2e-3


@pytest.mark.slow
def test_golden_scaled_region_path_on_official_masks(weights, scaled_run):
    """All 100 crops built from the official binary masks; CLIP is re-run only on the crops that differ from the
    end-to-end run's (threshold flips), the others are bitwise the same input, so their embeddings are reused."""
    model = weights("golden_scaled")
    x, sizes, out, _ = scaled_run
    ref = np.load(GOLDEN / "golden_scaled.npz")
    masks = region_masks(ref)
    text = out["text_features"]
    with torch.inference_mode():
        image = model.recover_image(x[0], sizes[0])
        own = model.mask_logits_at(out["mask_pred"][0], out["padded_size"], sizes[0]).sigmoid() > model.mask_thr
        crops = model.region_crops(image, masks, mask_boxes(masks))
        same = (crops == model.region_crops(image, own, mask_boxes(own))).flatten(1).all(1)
        rerun = model.classify_regions(image, masks[~same], text)
        embed, logits = out["clip_image_embed_raw"][0].clone(), out["clip_logits"][0].clone()
        embed[~same], logits[~same] = rerun["clip_image_embed_raw"], rerun["clip_logits"]
        probs = model.ensemble(out["mask_cls_logits"][0], masks.flatten(1).any(1), logits)
        scores = model.postprocess(dict(out, ensembled_probs=probs[None]), sizes, [(512, 512)])
    assert torch.equal(mask_boxes(masks), mask_boxes(own))
    assert 0 < int((~same).sum()) < 100  # the fixture's threshold flips are exercised, not all crops re-run
    assert rel_err(ref["clip_crops_first2"], crops[:2]) <= 1e-4
    assert rel_err(ref["clip_image_embed_raw"], embed) <= 1e-4
    assert rel_err(ref["clip_logits"], logits) <= 1e-4
    got = golden_view(dict(out, ensembled_probs=probs[None]), scores)
    for name in ("ensembled_probs", "sem_seg_s8", "sem_seg_crop64"):
        assert rel_err(ref[name], got[name]) <= 1e-4, name


# ------------------------------------------------------------------------------------------------ invariants
@pytest.mark.slow
def test_vocabulary_permutation_permutes_scores_deterministically(small):
    model = small
    img = rectangles(40, 72, seed=1)
    few_crops(model, [img])
    perm = [3, 0, 4, 1, 2]
    first = model.predict([img])[0]
    assert torch.equal(first, model.predict([img])[0])  # no randomness left at inference
    model.encode_vocabulary([VOCAB[i] for i in perm])
    permuted = model.predict([img])[0]
    assert permuted.shape == (5, 40, 72)
    assert rel_err(first[perm].numpy(), permuted) < 1e-5


@pytest.mark.slow
def test_non_square_round_trip_and_batching(small):
    model = small
    wide, tall = rectangles(40, 72, seed=2), rectangles(75, 45, seed=3)
    few_crops(model, [wide, tall])
    with torch.inference_mode():
        x, sizes = model.preprocess([wide, tall])
        out = model(x, sizes)
        scores = model.postprocess(out, sizes, [wide.shape[:2], tall.shape[:2]])
        at_input = model.postprocess(out, sizes, sizes)
    assert sizes == [shortest_edge_size(40, 72, 64, 256), shortest_edge_size(75, 45, 64, 256)] == [(64, 115), (107, 64)]
    assert tuple(x.shape) == (2, 3, 128, 128)
    assert [tuple(s.shape) for s in scores] == [(5, 40, 72), (5, 75, 45)]
    assert len(out["num_crops"]) == 2 and max(out["num_crops"]) == 3 and min(out["num_crops"]) >= 0
    for i, (img, size) in enumerate(zip((wide, tall), sizes)):
        # the crop branch sees exactly the resized uint8 image, padding removed
        recovered = model.recover_image(x[i], size).permute(1, 2, 0).to(torch.uint8).numpy()
        assert np.array_equal(recovered, resize_uint8(img, size))
        # scores at the input size = Σ_q P·sigmoid(mask) on the unpadded area; the output size is a resize of it
        masks = model.mask_logits_at(out["mask_pred"][i], out["padded_size"], size).sigmoid()
        direct = torch.einsum("qc,qhw->chw", out["ensembled_probs"][i], masks)
        assert rel_err(direct.numpy(), at_input[i]) < 1e-6
        resized = F.interpolate(direct[None], size=img.shape[:2], mode="bilinear", align_corners=False)[0]
        assert rel_err(resized.numpy(), scores[i]) < 1e-6


@pytest.mark.slow
def test_skip_crops_and_crop_cost_split(small):
    model = small
    img = rectangles(48, 64, seed=4)
    few_crops(model, [img])
    with torch.inference_mode():
        x, sizes = model.preprocess([img])
        full, fixed = model(x, sizes), model(x, sizes, skip_crops=True)
        logits = model.crop_cost_fn(x, sizes, 2)()
        ones = torch.ones(2, *sizes[0], dtype=torch.bool)
        ref = model.classify_regions(model.recover_image(x[0], sizes[0]), ones, full["text_features"])
    assert full["num_crops"] == fixed["num_crops"] == [3]
    assert torch.equal(full["valid"][0], fixed["valid"][0])
    assert torch.equal(full["region_boxes"][0], fixed["region_boxes"][0])
    assert torch.equal(full["mask_cls_logits"], fixed["mask_cls_logits"])
    assert fixed["clip_logits"] == [None] and fixed["clip_image_embed_raw"] == [None]
    assert tuple(full["clip_logits"][0].shape) == (full["num_crops"][0], 6)
    assert tuple(logits.shape) == (2, 6)
    assert rel_err(ref["clip_logits"].numpy(), logits) < 1e-5


@pytest.mark.slow
def test_image_without_proposals(small):
    """No mask above the threshold: no crop, p_clip ≡ 1, so P = p_maskformer^(1−w) (official behaviour)."""
    model = small
    model.configure(mask_thr=1.0)  # sigmoid > 1 never holds
    img = rectangles(40, 40, seed=5)
    with torch.inference_mode():
        x, sizes = model.preprocess([img])
        out = model(x, sizes)
        scores = model.postprocess(out, sizes, [img.shape[:2]])
    assert out["num_crops"] == [0] and tuple(out["clip_logits"][0].shape) == (0, 6)
    p_mf = F.softmax(out["mask_cls_logits"][0], dim=-1)[:, :-1]
    assert torch.allclose(out["ensembled_probs"][0], p_mf ** (1 - model.ensemble_weight))
    assert tuple(scores[0].shape) == (5, 40, 40) and bool(torch.isfinite(scores[0]).all())


def test_pure_bf16_runs_and_agrees_with_fp32(small):
    """bf16 weights end to end (the decoder's sine position embedding follows the model's dtype)."""
    import copy

    img = rectangles(64, 64, seed=1)
    few_crops(small, [img])
    _, _, _, ref = _run(small, img)
    bf = copy.deepcopy(small).to(torch.bfloat16)
    _, _, _, got = _run(bf, img)
    assert torch.isfinite(got[0].float()).all()
    assert (got[0].float().argmax(0) == ref[0].argmax(0)).float().mean() > 0.9
