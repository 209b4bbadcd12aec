"""CLIP blocks: open_clip key layout (towers and the two-tower model), constants, text truncation equivalence,
pos-embed resize."""
import open_clip
import torch
from conftest import rel_err

from bench.models.clip import (CLIP_MEAN, CLIP_MEAN_FILL, CLIP_STD, CLIPModel, TextTransformer, Transformer,
                               VisionTransformer, clip_pixel_buffers, resize_pos_embed, tokenize)


def test_vision_tower_keys_match_open_clip():
    ours = VisionTransformer(image_size=32, patch_size=16, width=64, layers=2, heads=4, output_dim=32)
    ref = open_clip.model.VisionTransformer(image_size=32, patch_size=16, width=64, layers=2, heads=4, mlp_ratio=4.0,
                                            output_dim=32)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == ref_shapes


def test_vision_tower_matches_open_clip_numerically():
    torch.manual_seed(0)
    ref = open_clip.model.VisionTransformer(image_size=32, patch_size=16, width=64, layers=2, heads=4, mlp_ratio=4.0,
                                            output_dim=32, act_layer=open_clip.model.QuickGELU).eval()
    ours = VisionTransformer(image_size=32, patch_size=16, width=64, layers=2, heads=4, output_dim=32).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


def test_two_tower_model_keys_match_open_clip():
    ours = CLIPModel(embed_dim=32, image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=4,
                     text_width=32, text_layers=1, text_heads=2)
    ref = open_clip.model.CLIP(32, open_clip.model.CLIPVisionCfg(layers=2, width=64, patch_size=16, image_size=32,
                                                                 head_width=16),
                               open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2,
                                                           layers=1))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert float(ours.logit_scale.detach()) == float(ref.logit_scale.detach())


def test_pixel_statistics_are_openai_s():
    assert CLIP_MEAN == open_clip.constants.OPENAI_DATASET_MEAN and CLIP_STD == open_clip.constants.OPENAI_DATASET_STD
    m = torch.nn.Module()
    clip_pixel_buffers(m)
    assert set(m.state_dict()) == {"pixel_mean", "pixel_std"} and m.pixel_mean.shape == (1, 3, 1, 1)
    assert rel_err(m.pixel_std.flatten(), torch.tensor(CLIP_STD) * 255) == 0.0
    # the crop fill is 255 x mean in double precision (as the official list comprehension), not the fp32 buffer
    assert CLIP_MEAN_FILL == tuple(255.0 * c for c in CLIP_MEAN)
    assert not torch.equal(m.pixel_mean.flatten(), torch.tensor(CLIP_MEAN_FILL))


def test_text_truncation_after_eot_changes_nothing():
    torch.manual_seed(0)
    tower = TextTransformer(context_length=77, vocab_size=49408, width=64, layers=2, heads=4, output_dim=32).eval()
    tokens = tokenize(["a photo of a cat.", "there is a very large pink elephant in the scene."])
    out = tower(tokens)
    # reference: the full 77-token sequence, the causal mask doing all the work
    x = tower.token_embedding(tokens) + tower.positional_embedding
    x = tower.ln_final(tower.transformer(x, tower.attn_mask))
    ref = x[torch.arange(2), tokens.argmax(-1)] @ tower.text_projection
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_pos_embed_resize_keeps_cls_and_identity():
    pos = torch.randn(1 + 16, 8)
    assert resize_pos_embed(pos, (4, 4)) is pos
    out = resize_pos_embed(pos, (6, 3))
    assert out.shape == (1 + 18, 8) and torch.equal(out[0], pos[0])


def test_attention_bias_is_applied():
    torch.manual_seed(0)
    t = Transformer(width=16, layers=1, heads=2).eval()
    x = torch.randn(1, 5, 16)
    bias = torch.zeros(1, 2, 5, 5)
    bias[..., 1:] = -1e4  # every token attends only to token 0
    assert not torch.allclose(t(x), t(x, bias))


def test_text_feature_cache_hits_and_keys_on_weights(tmp_path):
    from bench.models import text_cache
    from bench.models.clip import encode_with_templates

    torch.manual_seed(0)
    tower = TextTransformer(context_length=77, vocab_size=49408, width=32, layers=1, heads=2, output_dim=16).eval()
    calls = []
    original = tower.forward
    tower.forward = lambda tokens: calls.append(1) or original(tokens)
    try:
        text_cache.set_cache_dir(str(tmp_path))
        with torch.inference_mode():
            first = encode_with_templates(tower, ["cat", "dog"], ["a {}.", "the {}"])
            n_calls = len(calls)
            again = encode_with_templates(tower, ["cat", "dog"], ["a {}.", "the {}"])
            assert len(calls) == n_calls and torch.equal(first, again)  # served from disk
            encode_with_templates(tower, ["cat", "bird"], ["a {}.", "the {}"])
            assert len(calls) > n_calls  # another vocabulary: computed
            n_calls = len(calls)
            tower.text_projection.add_(torch.randn_like(tower.text_projection))  # other weights: never stale
            changed = encode_with_templates(tower, ["cat", "dog"], ["a {}.", "the {}"])
            assert len(calls) > n_calls and not torch.allclose(changed, first)
    finally:
        text_cache.set_cache_dir(None)
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".pt"]) == 3


def test_tokenize_is_open_clips_tokenizer():
    """bench.models.clip.tokenize loads open_clip's tokenizer file alone (no model zoo imports): the same tokens as
    open_clip.tokenize, for synonym lists, punctuation, non-ASCII names and a name longer than the context."""
    import open_clip

    names = ["a photo of a cat.", "road, route", "chest of drawers, chest, bureau, dresser", "café", "straße",
             "an " + "extremely long " * 40 + "name", "  spaced   out  ", "CRT screen", "traffic-light"]
    for context in (77, 16):
        assert torch.equal(tokenize(names, context_length=context), open_clip.tokenize(names, context_length=context))
