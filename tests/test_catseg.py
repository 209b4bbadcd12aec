"""CAT-Seg (bench/models/catseg.py): the official state_dict layout, the official code's golden outputs, the
sliding-window merge, the K > 256 class selection, strict loads.

Fixtures: tests/fixtures/golden/catseg_b/ (README.md: made by make_golden_catseg.py from the official code; the
fill rule in fill_reference_catseg.py) and tests/fixtures/catseg_*_state_dict_keys.tsv (the official key list).
Each full-size model is built once per module (ViT-L/14 marked slow).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import BenchError
from bench.models import create_model
from bench.models.catseg import first_synonym
from bench.models.swin import swin_shift_mask
from bench.models.checkpoint import load_checkpoint, load_state_dict_strict
from bench.testing.fills import golden_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"
# builder -> (fixture folder, keys TSV, state_dict keys, state elements, parameter elements)
EXPECTED = {"catseg_vit_b_16": ("catseg_b", "catseg_b_state_dict_keys.tsv", 484, 154_455_266, 154_289_378),
            "catseg_vit_l_14": ("catseg_l", "catseg_l_state_dict_keys.tsv", 652, 433_892_834, 433_726_946)}
VARIANTS = [pytest.param("catseg_vit_b_16", id="b16"), pytest.param("catseg_vit_l_14", id="l14")]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fill_reference = _load("catseg_fill_reference", GOLDEN / "catseg_b" / "fill_reference_catseg.py")


def rel_err(ref, got) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    assert ref.shape == got.shape, (ref.shape, got.shape)
    return float(np.abs(ref - got).max() / np.abs(ref).max())


def read_keys(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (FIXTURES / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _, _ = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split("x")) if shape else ()))
    return rows


@pytest.fixture(scope="module", params=VARIANTS)
def catseg(request):
    model = create_model(request.param)
    yield request.param, model
    del model


def stored_arrays(model, out: dict, text: torch.Tensor, sem: torch.Tensor) -> dict[str, np.ndarray]:
    """Our tensors cut exactly as make_golden_catseg.slim() cuts the official ones."""
    c, logits = out["intermediates"][0], out["window_logits"][0]
    k = logits.shape[1]
    sel = slice(None) if k <= 256 else slice(None, None, 8)
    a, b = model.cfg.guidance_layers
    g = model.cfg.grid
    aggregated = c["aggregated"].unflatten(2, (g, g)).permute(0, 4, 1, 2, 3)      # [5, T, h, w, C] -> [5, C, T, h, w]
    got = {
        "sem_seg_s16": sem[sel, ::16, ::16], "sem_seg_crop16": sem[sel, :16, :16],
        "text_embed": text if k <= 256 else text[:, :64],
        "clip_dense_c32": c["clip_dense"][:, :, :32],
        "clip_layer_a_c32": c["clip_layers"][a][:, :, :32], "clip_layer_b_c32": c["clip_layers"][b][:, :, :32],
        "res4_c4": c["res4"][:, :4], "res5_c4s2": c["res5"][:, :4, ::2, ::2],
        "window_logits_s8": logits[:, sel, ::8, ::8], "window_logits_crop8": logits[:, sel, :8, :8],
        "cost_embed_c2s4": c["cost_embed"][:, :2, ::4, ::4], "aggregated_c2s4": aggregated[:, :2, :, ::4, ::4],
    }
    if k <= 256:
        got["cost_volume_s2"] = c["cost_volume"].flatten(0, 1)[:, ::2, ::2]
    else:
        got["selected"] = torch.zeros(logits.shape[0], k).scatter_(1, c["selected"], 1.0)
    return {key: v.float().numpy() for key, v in got.items()}


@pytest.fixture(scope="module")
def golden_runs(catseg, tmp_path_factory):
    """Each fixture of the variant: the filled state dict saved as {'model': sd} and loaded through load_checkpoint
    (ViT-B/16; ViT-L/14's from memory through the same strict load), the 640x640 input with the fixture's
    vocabulary (CAT-Seg's own JSON strings)."""
    name, model = catseg
    folder = GOLDEN / EXPECTED[name][0]
    state_dict = golden_state_dict("catseg", folder / "manifest.json")
    assert all(torch.equal(v, ref) for v, ref in zip(state_dict.values(), fill_reference.golden_state_dict(
        folder / "manifest.json").values())), "bench.testing.fills differs from the fixture's own fill rule"
    if name == "catseg_vit_b_16":   # through a file; ViT-L's 1.7 GB from memory (the same strict load)
        path = tmp_path_factory.mktemp("catseg") / f"{name}.pth"
        torch.save({"model": state_dict}, path)
        del state_dict
        try:
            report = load_checkpoint(model, str(path))
        finally:
            path.unlink()
    else:
        report = load_state_dict_strict(model, state_dict, f"{name} fill")
        del state_dict
    image = np.load(GOLDEN / "input_image_640x640x3_uint8.npy")
    runs = {}
    for npz in sorted(folder.glob("golden*.npz")):
        info = json.loads(npz.with_suffix(".run.json").read_text())
        with torch.inference_mode():
            text = model.encode_vocabulary(info["vocabulary"])
            x, sizes = model.preprocess([image])
            out = model(x, sizes, return_intermediates=True)
            sem = model.postprocess(out, sizes, [image.shape[:2]])[0]
        runs[npz.stem] = (stored_arrays(model, out, text, sem), dict(np.load(npz)), sem.shape, info)
    return report, runs


# -- 1. state_dict layout -----------------------------------------------------------------------------------------
def test_state_dict_matches_published_layout(catseg):
    name, model = catseg
    folder, tsv, n_keys, n_state, n_params = EXPECTED[name]
    manifest = json.loads((GOLDEN / folder / "manifest.json").read_text())
    state = model.state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == [(e["key"], e["shape"]) for e in manifest["keys"]]
    assert [(k, tuple(v.shape)) for k, v in state.items()] == read_keys(tsv)
    assert len(state) == n_keys == manifest["num_keys"]
    assert sum(v.numel() for v in state.values()) == n_state == manifest["num_state_elements"]
    assert sum(p.numel() for p in model.parameters()) == n_params == manifest["num_param_elements"]
    buffers = sorted(k for k, _ in model.named_buffers() if k in state)
    assert buffers == sorted(e["key"] for e in manifest["keys"] if e["kind"] == "buffer")
    for key in buffers:   # the Swin shifted-window masks keep the official values
        assert torch.equal(state[key], fill_reference.shifted_window_mask()), key
    assert torch.equal(swin_shift_mask(24, 24, 12, 6, torch.device("cpu")), fill_reference.shifted_window_mask())
    assert not model.training and not any(p.requires_grad for p in model.parameters())


# -- 2. golden outputs of the official code ----------------------------------------------------------------------
def test_golden_arrays(catseg, golden_runs):
    name, _ = catseg
    report, runs = golden_runs
    assert report.note() == "" and bool(report.sha256) == (catseg[0] == "catseg_vit_b_16") and runs
    for stem, (got, ref, sem_shape, info) in runs.items():
        assert sem_shape == (info["num_classes"], 640, 640)
        assert set(got) == set(ref), stem
        if "selected" in ref:     # K > 256: the same 256 classes per view, then the same rows in our class order
            np.testing.assert_array_equal(got.pop("selected"), ref.pop("selected"))
            in_our_class_order(ref, got)
        errors = {k: rel_err(ref[k], got[k]) for k in ref}
        bad = {k: f"{e:.2e}" for k, e in errors.items() if not e <= 1e-4}
        assert not bad, f"{name} {stem}: max|ref-ours|/max|ref| over 1e-4: {bad}"


def in_our_class_order(ref: dict, got: dict) -> None:
    """K > 256: the official code keeps the top-256 classes of a view in `topk(sorted=False)` order, ours in
    ascending class id (the class attention is order-free: the final scores agree either way). Reorder the
    official per-class rows of each view (cost embedding, aggregator output) to ours: each official row takes our
    nearest row not yet taken (classes whose names coincide have identical rows, so either is right); the arrays
    are then compared as every other array is."""
    views, t = ref["aggregated_c2s4"].shape[0], ref["aggregated_c2s4"].shape[2]
    embed = ref["cost_embed_c2s4"].reshape(views, t, -1)
    ours = got["cost_embed_c2s4"].reshape(views, t, -1)
    back = np.zeros((views, t), dtype=int)            # our row j <- official row back[v, j]
    for v in range(views):
        dist = np.abs(embed[v][:, None] - ours[v][None]).sum(-1)
        for i in range(t):
            j = int(np.argmin(dist[i]))
            back[v, j] = i
            dist[:, j] = np.inf
    ref["cost_embed_c2s4"] = np.stack([embed[v][back[v]] for v in range(views)]).reshape(
        ref["cost_embed_c2s4"].shape)
    ref["aggregated_c2s4"] = np.stack([ref["aggregated_c2s4"][v][:, back[v]] for v in range(views)])


def test_vocabulary_overrides_give_catseg_strings(catseg, golden_runs):
    """conf/model/catseg_*.yaml class_name_overrides turn our ADE-150 list into CAT-Seg's datasets/ade150.json."""
    from omegaconf import OmegaConf

    from bench.data import apply_class_name_overrides, load_class_names

    _, runs = golden_runs
    conf = OmegaConf.load(Path(__file__).parent.parent / "conf" / "model" / "catseg_b.yaml")
    names = apply_class_name_overrides(load_class_names("ade150.txt"), conf.class_name_overrides.ade150)
    assert names == runs["golden"][3]["vocabulary"]


# -- 3. protocol and text invariants (filled weights loaded) -------------------------------------------------------
def test_sliding_window_merge_by_hand(catseg, golden_runs):
    """4 windows of 384 at stride 256 on the 640 canvas, averaged where they overlap, then with the global view."""
    import torch.nn.functional as F

    _, model = catseg
    assert model.window_starts() == [0, 256]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 96, 96, generator=g)
    got = model.postprocess({"window_logits": logits[None]}, [(640, 640)], [(480, 600)])[0]
    up = F.interpolate(logits, size=(384, 384), mode="bilinear", align_corners=False).sigmoid()
    fold = F.fold(up[:4].flatten(1).T, (640, 640), kernel_size=384, stride=256)
    count = F.fold(F.unfold(torch.ones(1, 640, 640), kernel_size=384, stride=256), (640, 640), kernel_size=384,
                   stride=256)
    whole = F.interpolate(up[4:], size=(640, 640), mode="bilinear", align_corners=False)
    ref = F.interpolate((fold / count + whole), size=(480, 600), mode="bilinear", align_corners=False)[0] / 2
    assert rel_err(ref, got) <= 1e-6


def test_first_synonym_and_top256(catseg, golden_runs):
    _, model = catseg
    assert first_synonym("building, edifice") == "building" and first_synonym("bed ") == "bed "
    assert first_synonym("a,b") == "a,b"
    with torch.inference_mode():
        assert torch.equal(model.encode_vocabulary(["road, route"]), model.encode_vocabulary(["road"]))
    # K > 256: 256 classes per view aggregated, the rest at logit -100
    agg = model.aggregator
    feats = torch.randn(2, model.cfg.embed_dim, 24, 24)
    text = torch.randn(300, model.cfg.embed_dim)
    cost = torch.einsum("bchw,tc->bthw", F_normalize(feats, 1), F_normalize(text, -1))
    _, _, idx = agg.select_classes(cost, F_normalize(text, -1))
    best = cost.flatten(2).amax(-1).topk(256, dim=-1).indices.sort(-1).values
    assert torch.equal(idx, best) and idx.shape == (2, 256)


def F_normalize(t, dim):
    return torch.nn.functional.normalize(t, dim=dim)


# -- 4. strict loads ---------------------------------------------------------------------------------------------
def test_other_models_checkpoint_fails_with_the_key_diff(catseg):
    name, model = catseg
    san = json.loads((GOLDEN / "san_vit_b_16" / "manifest.json").read_text())
    foreign = {e["key"]: torch.zeros(1) for e in san["keys"]}
    with pytest.raises(BenchError) as err:
        load_state_dict_strict(model, foreign, "san_vit_b_16.pth")
    msg = str(err.value)
    assert f"{EXPECTED[name][2]} missing" in msg and "442 unexpected" in msg and "sem_seg_head.predictor" in msg, msg
    state = dict(model.state_dict())
    state.pop("upsample1.bias")
    with pytest.raises(BenchError, match=r"1 missing \[upsample1.bias\]"):
        load_state_dict_strict(model, state, "x.pth")


# -- a tiny CAT-Seg: same code, small widths -----------------------------------------------------------------------
TINY = dict(clip_width=64, clip_layers=4, clip_heads=4, clip_image_size=64, clip_input=96, embed_dim=32,
            text_width=32, text_layers=2, text_heads=2, guidance_layers=(1, 2), hidden_dim=32,
            text_guidance_proj_dim=16, appearance_guidance_proj_dim=16, decoder_guidance_dims=(32, 16),
            decoder_guidance_proj_dims=(16, 16), num_heads=2, window_size=3, pad_len=8)


@pytest.mark.parametrize("k", [5, 11])
def test_tiny_variant_end_to_end_and_bf16(k):
    """Any image size -> [K, H0, W0] scores; K above pad_len scores the unselected classes at sigmoid(-100).
    Seeded: with K above pad_len a near-tie in the top-pad_len selection can fall the other way in bf16, so the
    weights must not depend on which tests ran before (they did, and the bf16 bound then failed now and then)."""
    torch.manual_seed(0)
    model = create_model("catseg_vit_b_16", **TINY)
    image = np.random.default_rng(2).integers(0, 256, (50, 70, 3)).astype(np.uint8)
    with pytest.raises(BenchError, match="encode_vocabulary"):
        with torch.inference_mode():
            model(torch.zeros(1, 3, 64, 64))
    names = [f"class {i}" for i in range(k)]
    with torch.inference_mode():
        model.encode_vocabulary(names)
        out = model(*model.preprocess([image]))
        scores = model.predict([image])[0]
        bf = model.to(torch.bfloat16)
        bf.encode_vocabulary(names)
        scores_bf = bf.predict([image])[0]
    assert out["window_logits"].shape == (1, 5, k, 24, 24)
    assert scores.shape == (k, 50, 70) and torch.isfinite(scores).all()
    assert (out["window_logits"] == -100).any() == (k > 8)
    assert scores_bf.dtype == torch.float32 and torch.isfinite(scores_bf).all()
    assert (scores_bf - scores).abs().max() < 0.05


@pytest.mark.parametrize("k", [5, 8, 11])
@pytest.mark.parametrize("pooling", [(1, 1), (2, 2)])
def test_split_aggregator_equals_the_official_order(k, pooling):
    """The default aggregator (guidance share of q/k once per view, padding rows summed in once) gives the official
    order's logits (`published_computation()`: concatenated guidance, classes padded to pad_len throughout) up to
    float rounding, below, at and above pad_len, pooled or not; its FLOP count is the smaller one below pad_len."""
    from bench.flops import count_flops

    torch.manual_seed(0)
    model = create_model("catseg_vit_b_16", **TINY, pooling_size=pooling)
    for layer in model.aggregator.layers:      # non-zero padding rows (zeros would hide a wrong padding path)
        torch.nn.init.normal_(layer.attention.padding_tokens)
        torch.nn.init.normal_(layer.attention.padding_guidance)
    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    with torch.inference_mode():
        model.encode_vocabulary([f"class {i}" for i in range(k)])
        x, sizes = model.preprocess([image])
        split = model(x, sizes)["window_logits"]
        split_flops = count_flops(lambda: model(x, sizes))
        with model.published_computation():
            official = model(x, sizes)["window_logits"]
            official_flops = count_flops(lambda: model(x, sizes))
    assert not model.aggregator.official_order
    assert rel_err(official, split) <= 1e-5, rel_err(official, split)
    assert (split_flops < official_flops) if k < 8 else (split_flops <= official_flops), (split_flops, official_flops)
