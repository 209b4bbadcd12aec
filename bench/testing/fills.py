"""The golden fixtures' fill rules: rebuild, from a fixture's `manifest.json` alone, the exact state dict the
official model was loaded with (strict) when its golden outputs were recorded.

    from bench.testing.fills import golden_state_dict
    sd = golden_state_dict("san", "tests/fixtures/golden/san_vit_b_16/manifest.json", scaled=True)

One function per family (`san_state_dict`, `simseg_state_dict`, `scan_state_dict`, `catseg_state_dict`; `FILLS` maps the family names
to them). Every parameter is a crc32(key)-seeded `torch.randn` draw r, then (plain fill) r * 0.02, or 1 + r * 0.02
for norm weights; the scaled fills override some keys, per family, as each fixture's README says:

    san     side_adapter_network.mask_decoder.*.weight -> r / sqrt(fan_in); ov_classifier.logit_scale += log(100)
            (+ SAN_LABEL_CHECK_RULES: the label-check variant, no fixture)
    simseg  the rule is named per key in the manifest (`fill` / `scaled_fill`)
    scan    SCAN_SCALED_RULES below, first match wins, never on norm weights
    catseg  no scaled variant (the plain fill is used for both)

Buffers keep the official initial values (stored in the manifest, or rebuilt: SAN's causal text mask, Swin's
relative position index, detectron2's FrozenBatchNorm statistics). The generators that made the fixtures, with
these rules as written when the fixtures were made, stay beside them in tests/fixtures/golden/ (their record);
code imports this module.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from typing import Callable

import torch

StateDict = dict[str, torch.Tensor]


def _draw(key: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def _fan_in(r: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    return r * (gain / math.sqrt(math.prod(r.shape[1:])))


def _plain(r: torch.Tensor, norm_weight: bool) -> torch.Tensor:
    t = r * 0.02
    return 1.0 + t if norm_weight else t


def _fill(manifest_path: str | os.PathLike, param: Callable[[str, list, dict], torch.Tensor],
          buffer: Callable[[str, list, dict], torch.Tensor]) -> StateDict:
    """{key: param(key, shape, entry) or buffer(key, shape, manifest)} over the manifest's keys, in its order."""
    with open(manifest_path) as f:
        man = json.load(f)
    return {e["key"]: (param(e["key"], e["shape"], e) if e["kind"] == "param" else buffer(e["key"], e["shape"], man))
            for e in man["keys"]}


def _norm_weight(entry: dict) -> bool:
    return entry["fill"] == "1+randn*0.02"


def causal_mask(n: int = 77) -> torch.Tensor:
    """[n, n]: -inf above the diagonal, 0 elsewhere (CLIP's text attention mask)."""
    return torch.full((n, n), float("-inf")).triu_(1)


# ------------------------------------------------------------------------------------------------------- SAN
# The label-check variant of the scaled SAN fill (no fixture: the weights of the bf16 label-agreement check,
# `profile.agreement_fill=label_check`). Under golden_scaled every query's embedding is nearly the CLS token (the
# recognition head's 0.02 weights add little to it), the text features of all names nearly one vector, the
# attention bias nearly flat and the masks soft, so one class wins every pixel and a label check cannot fail.
# These overrides (first match wins; the same crc32-seeded draws r) give SAN-B's benchmark image (640², seeded
# noise, ADE-150) 11 distinct fp32 labels: the recognition head's values, output projections and MLPs at
# 4/sqrt(fan_in) (queries that differ) with its query / key rows left at 0.02 (attention set by the bias, not by
# the head's own logits), the text transformer at 4/sqrt(fan_in) (names that differ), the attention-bias scale 8
# (bias within about +-90, under the -100 the official code uses for "masked") and the last pixel-MLP layer at
# 100/sqrt(fan_in) (sharp masks). An earlier variant (the whole head at 3/sqrt(fan_in), bias scale 50, a bias
# range of +-450) was chaotic: its fp32 query embeddings moved by 12-20 % under any bf16 rounding upstream, so a
# bf16 run agreed on 56 % of the pixels whatever the bf16 path did.
def _values_and_rest(gain: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fused [3C, C] in_proj_weight: query and key rows at the plain 0.02, value rows at gain/sqrt(fan_in)."""
    def rule(r: torch.Tensor) -> torch.Tensor:
        out = r * 0.02
        n = r.shape[0] // 3
        out[2 * n:] = _fan_in(r[2 * n:], gain)
        return out
    return rule


SAN_LABEL_CHECK_RULES: list[tuple[Callable[[str, list], bool], Callable[[torch.Tensor], torch.Tensor]]] = [
    (lambda k, s: k.startswith("clip_rec_head.resblocks.") and k.endswith(".attn.in_proj_weight"),
     _values_and_rest(4.0)),
    (lambda k, s: k.startswith(("clip_rec_head.resblocks.", "ov_classifier.transformer.")) and len(s) >= 2,
     lambda r: _fan_in(r, 4.0)),
    (lambda k, s: k == "side_adapter_network.mask_decoder.bias_scaling.weight", lambda r: torch.full_like(r, 8.0)),
    (lambda k, s: k == "side_adapter_network.mask_decoder.pix_mlp.layers.2.weight", lambda r: _fan_in(r, 100.0)),
]


def san_state_dict(manifest_path: str | os.PathLike, scaled: bool = False, label_check: bool = False) -> StateDict:
    """SAN (san_vit_b_16 / san_vit_large_14 fixtures): golden.npz, or golden_scaled.npz with `scaled`; with
    `label_check` the scaled fill with SAN_LABEL_CHECK_RULES on top (no fixture)."""

    def param(key: str, shape: list, entry: dict) -> torch.Tensor:
        r = _draw(key, shape)
        rule = next((f for match, f in SAN_LABEL_CHECK_RULES if match(key, shape)), None) if label_check else None
        if rule is not None:
            return rule(r)
        if scaled and key.startswith("side_adapter_network.mask_decoder.") and key.endswith(".weight"):
            return _fan_in(r)
        t = _plain(r, _norm_weight(entry))
        return math.log(100.0) + t if scaled and key == "ov_classifier.logit_scale" else t

    def buffer(key: str, shape: list, man: dict) -> torch.Tensor:
        if key == "criterion.empty_weight":
            return torch.tensor(man["kept_buffers"][key], dtype=torch.float32)
        if key == "ov_classifier.attn_mask":
            return causal_mask(shape[0])
        raise KeyError(f"unexpected buffer {key}")

    return _fill(manifest_path, param, buffer)


# ------------------------------------------------------------------------------------------------------- SimSeg
_SIMSEG_RULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "randn*0.02": lambda r: r * 0.02,
    "1+randn*0.02": lambda r: 1.0 + r * 0.02,
    "randn": lambda r: r,
    "randn/sqrt(fan_in)": _fan_in,
    "2*randn/sqrt(fan_in)": lambda r: _fan_in(r, 2.0),
}


def _simseg_buffer(key: str, shape, man: dict) -> torch.Tensor:
    if key in man["kept_buffers"]:
        return torch.tensor(man["kept_buffers"][key], dtype=torch.float32).reshape(shape)
    n = shape[0]
    if key.endswith(".norm.weight"):
        return torch.ones(n)
    if key.endswith(".norm.bias") or key.endswith(".running_mean"):
        return torch.zeros(n)
    if key.endswith(".running_var"):
        return torch.ones(n) - 1e-5  # detectron2 FrozenBatchNorm2d init (float32)
    raise KeyError(key)


def simseg_state_dict(manifest_path: str | os.PathLike, scaled: bool = False) -> StateDict:
    """SimSeg (simseg fixture): golden.npz, or golden_scaled.npz with `scaled`."""

    def param(key: str, shape: list, entry: dict) -> torch.Tensor:
        return _SIMSEG_RULES[entry["scaled_fill"] if scaled else entry["fill"]](_draw(key, shape))

    return _fill(manifest_path, param, _simseg_buffer)


# ------------------------------------------------------------------------------------------------------- SCAN
# ("fanin", prefix, gain): params under prefix with ndim >= 2 -> r * gain / sqrt(fan_in) (no 0.02 factor);
# ("unit", key, gain): that key -> r * gain. Source: tests/fixtures/golden/scan_vit_l/README.md (scaled fill).
SCAN_SCALED_RULES: tuple[tuple[str, str, float], ...] = (
    ("unit", "sem_seg_head.predictor.query_feat.weight", 1.0),
    ("unit", "sem_seg_head.predictor.query_embed.weight", 1.0),
    ("unit", "sem_seg_head.pixel_decoder.mask_features.bias", -0.5),
    ("fanin", "sem_seg_head.predictor.mask_embed.", 1.0),
    ("fanin", "sem_seg_head.predictor.class_embed.", 1.0),
    ("fanin", "sem_seg_head.predictor.transformer_", 0.5),
    ("fanin", "fusion_decoder.", 1.0),
    ("fanin", "lightweight_transformer.", 1.0),
    ("fanin", "oriclip_mlp.", 1.0),
    ("fanin", "LFM.", 1.0),
    ("fanin", "clip_adapter.clip_model.transformer.", 1.0),
    ("fanin", "clip_adapter.clip_model.visual.transformer.", 0.5),
    ("fanin", "clip_adapter.original_clip.transformer.", 0.5),
    ("unit", "learnable_weight", 10.0),
)


def _scan_param(key: str, shape, norm_weight: bool, scaled: bool) -> torch.Tensor:
    r = _draw(key, shape)
    if scaled and not norm_weight:
        for kind, pattern, gain in SCAN_SCALED_RULES:
            if kind == "unit" and key == pattern:
                return r * gain
            if kind == "fanin" and key.startswith(pattern) and len(shape) >= 2:
                return _fan_in(r, gain)
    return _plain(r, norm_weight)


def _scan_buffer(key: str, shape: list, man: dict) -> torch.Tensor:
    from bench.models.swin import swin_relative_position_index

    if key.endswith("relative_position_index"):
        return swin_relative_position_index(math.isqrt(shape[0]))
    kept = man["kept_buffers"].get(key)
    if isinstance(kept, dict):
        return torch.tensor(kept["values"], dtype=getattr(torch, kept["dtype"])).reshape(kept["shape"])
    raise KeyError(f"unexpected buffer {key}")


def scan_state_dict(manifest_path: str | os.PathLike, scaled: bool = False) -> StateDict:
    """SCAN ViT-L (scan_vit_l fixture): golden.npz, or golden_scaled*.npz with `scaled`."""
    return _fill(manifest_path, lambda key, shape, entry: _scan_param(key, shape, _norm_weight(entry), scaled),
                 _scan_buffer)


# ---------------------------------------------------------------------------------------------------- CAT-Seg
def _catseg_buffer(key: str, shape: list, man: dict) -> torch.Tensor:
    """The only persistent buffers: the Swin blocks' shifted-window masks ([nW, w*w, w*w], 0 / -100)."""
    from bench.models.swin import swin_shift_mask

    if not key.endswith("swin_block.block_2.attn_mask"):
        raise KeyError(f"unexpected CAT-Seg buffer {key}")
    window = math.isqrt(shape[1])
    size = math.isqrt(shape[0]) * window
    return swin_shift_mask(size, size, window, window // 2, torch.device("cpu"))


def catseg_state_dict(manifest_path: str | os.PathLike, scaled: bool = False) -> StateDict:
    """CAT-Seg (catseg_b / catseg_l fixtures): golden*.npz. One fill only (no scaled variant): the plain fill
    already gives non-flat scores, so `scaled` is accepted and changes nothing."""
    return _fill(manifest_path, lambda key, shape, entry: _plain(_draw(key, shape), _norm_weight(entry)),
                 _catseg_buffer)


FILLS: dict[str, Callable[..., StateDict]] = {"san": san_state_dict, "simseg": simseg_state_dict,
                                              "scan": scan_state_dict, "catseg": catseg_state_dict}


def golden_state_dict(family: str, manifest_path: str | os.PathLike, scaled: bool = False) -> StateDict:
    """The filled state dict of `family`'s fixture at `manifest_path` (plain, or the scaled variant)."""
    if family not in FILLS:
        from bench import BenchError

        raise BenchError(f"no golden fill for family {family!r}; known: {', '.join(FILLS)}")
    return FILLS[family](manifest_path, scaled=scaled)


LABEL_CHECK_FILLS = {"san"}   # families with a label-check variant (the others use their scaled fill for it)


def fill_model(model: torch.nn.Module, family: str | None, scaled: bool = True, label_check: bool = False) -> str:
    """Overwrite `model`'s parameters with `family`'s fill (the benchmark weights of `profile.weights=golden`:
    non-flat scores, so label agreement and crop counts mean something) and keep its buffers, as the fixtures
    do. Without a fixture manifest, a weight counts as a norm weight (filled 1 + randn*0.02) when its module's
    class name contains "Norm". `label_check`: the family's label-check variant where it has one (SAN), else
    its scaled fill. Returns what the record says about the weights."""
    import tempfile

    from bench import BenchError

    if family not in FILLS:
        raise BenchError(f"profile.weights=golden: model config golden_fill={family!r}; known fills: "
                         f"{', '.join(FILLS)} (or use profile.weights=init)")
    norm = {f"{name}.weight" for name, m in model.named_modules() if "Norm" in type(m).__name__}
    keys = [{"key": k, "shape": list(p.shape), "kind": "param", "fill": "1+randn*0.02" if k in norm else "randn*0.02",
             # SimSeg's scaled rules are per key in its manifest; without it: fan-in scaling for matrices
             "scaled_fill": "1+randn*0.02" if k in norm else "randn/sqrt(fan_in)" if p.dim() >= 2 else "randn*0.02"}
            for k, p in model.named_parameters()]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump({"keys": keys, "kept_buffers": {}}, f)
        f.flush()
        variant = label_check and family in LABEL_CHECK_FILLS
        state = san_state_dict(f.name, True, label_check=True) if variant else \
            golden_state_dict(family, f.name, scaled=scaled or label_check)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) & set(state):
        raise BenchError(f"golden fill {family!r} does not fit {type(model).__name__}")
    exact = "" if family == "san" else ", approximate: its fixture fills some keys by fan-in"
    name = "label_check" if variant else "golden_scaled" if scaled or label_check else "golden"
    return f"{name} fill ({family}; norm weights by module type{exact})"
