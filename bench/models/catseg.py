"""CAT-Seg: Cost Aggregation for Open-Vocabulary Semantic Segmentation (Cho et al., CVPR 2024, arXiv 2303.11797).

CAT-Seg scores every (pixel, class) pair from a cost volume instead of from mask proposals:

1. **CLIP, fine-tuned** (`sem_seg_head.predictor.clip_model`, OpenAI layout with q/k/v projections kept apart;
   the published model fine-tuned the query/value projections of both towers). The image tower runs densely:
   its last block keeps only the value path (out_proj(v_proj(ln_1 x)) + the CLS token's input, then the MLP),
   and `ln_post`/`proj` apply to every token, giving an embedding per patch on a 24x24 grid (384² at patch 16,
   336² at patch 14). The outputs of two earlier blocks (4 and 8 of ViT-B/16, 8 and 16 of ViT-L/14) are lifted
   to 48² and 96² by the transposed convolutions `upsample1` / `upsample2` as decoder guidance.
   The text tower encodes one template, "A photo of a {} in the scene", filled with the class name's *first*
   synonym (the part before the first ", ").
2. **Cost volume**: cosine similarity of every patch embedding with every class embedding, [B, K, 24, 24].
   When K > 256 (`pad_len`) only the 256 classes with the highest maximum cost in the view are aggregated; the
   others get the logit -100. When K < 256, the class-attention layers append learned padding tokens up to 256.
3. **Aggregator** (`sem_seg_head.predictor.transformer`): a 7x7 conv embeds the cost of each class (1 -> 128
   channels), then 2 layers of [spatial aggregation: two Swin blocks (window 12, the second shifted by 6) per
   class, whose queries/keys also see the projected CLIP features; class aggregation: linear attention across the
   classes at each pixel, queries/keys also seeing the projected text embeddings].
4. **Upsampling decoder**: two (transposed conv x2, concat projected guidance, 2x [conv3x3, GroupNorm, ReLU])
   stages and a 3x3 head: one logit per class on a 96x96 grid.

Inference protocol (`inference_sliding_window`, TEST.SLIDING_WINDOW True in eval.sh): the image is resized
(bilinear) to 640x640 whatever its aspect ratio, cut into 4 overlapping 384² windows (stride 256) and joined by
a global view (the original image resized to 384²). Each view's logits are upsampled to 384², passed through a
sigmoid, folded back (overlaps averaged) and averaged with the global view's scores upsampled to 640²; the result
is resized to the original size. `forward` returns the five views' logits, `postprocess` does the merge.

The averaged-synonym text embeddings that the official predictor also computes at build time
(`class_embeddings`, `text_features_test`) are never read at inference; only the first-synonym path matters.

Module names and the state_dict are those of the official code (cvlab-kaist/CAT-Seg @ 6d3a188, configs
`vitb_384.yaml` / `vitl_336.yaml`, evaluated with MODEL.SEM_SEG_HEAD.POOLING_SIZES [1,1]), so the published
`model_base.pth` / `model_large.pth` load strictly. Builders: `catseg_vit_b_16`, `catseg_vit_l_14`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from bench import BenchError
from bench.models.attention import attention
from bench.models.base import OVSegModel, Protocol, attribute_set
from bench.models.clip import MLP, LayerNormFp32, QuickGELU, encode_with_templates, resize_pos_embed
from bench.models.common import Mlp
from bench.models.registry import register_config
from bench.models.swin import swin_shift_mask, window_partition, window_reverse

TEMPLATE = "A photo of a {} in the scene"     # PROMPT_ENSEMBLE_TYPE "single" (cat_seg_predictor.py)


@dataclass(frozen=True)
class CATSegConfig:
    """One CAT-Seg variant (configs/vitb_384.yaml + the eval.sh options)."""

    # CLIP (OpenAI weights: QuickGELU, LayerNorm eps 1e-5)
    clip_width: int = 768
    clip_layers: int = 12
    clip_heads: int = 12
    clip_patch: int = 16
    clip_image_size: int = 224          # native size of the positional table
    clip_input: int = 384               # each view is resized to this before CLIP (clip_resolution)
    embed_dim: int = 512
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    guidance_layers: tuple[int, int] = (3, 7)   # CLIP blocks whose outputs feed upsample1 / upsample2
    # aggregator (SEM_SEG_HEAD.*)
    hidden_dim: int = 128
    text_guidance_proj_dim: int = 128
    appearance_guidance_proj_dim: int = 128
    decoder_dims: tuple[int, int] = (64, 32)
    decoder_guidance_dims: tuple[int, int] = (256, 128)
    decoder_guidance_proj_dims: tuple[int, int] = (32, 16)
    num_layers: int = 2
    num_heads: int = 4
    pooling_size: tuple[int, int] = (1, 1)      # eval.sh: POOLING_SIZES [1,1] (the training config says [2,2])
    window_size: int = 12
    pad_len: int = 256
    prompt_channel: int = 1                     # one template
    # sliding-window protocol (inference_sliding_window defaults)
    kernel: int = 384
    overlap: float = 0.333
    out_res: int = 640

    @property
    def grid(self) -> int:
        return self.clip_input // self.clip_patch


CATSEG_VIT_B_16 = CATSegConfig()
CATSEG_VIT_L_14 = CATSegConfig(clip_width=1024, clip_layers=24, clip_heads=16, clip_patch=14, clip_image_size=336,
                               clip_input=336, embed_dim=768, text_width=768, text_heads=12, guidance_layers=(7, 15))


# ---------------------------------------------------------------------------------------------------------------
# CLIP in the OpenAI layout with split q/k/v projections (cat_seg/third_party/model_vpt.py)
# ---------------------------------------------------------------------------------------------------------------
class SplitAttention(nn.Module):
    """nn.MultiheadAttention with separate q/k/v weights (`q_proj_weight`, ..., `in_proj_bias`, `out_proj`)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj_weight = nn.Parameter(torch.empty(width, width))
        self.k_proj_weight = nn.Parameter(torch.empty(width, width))
        self.v_proj_weight = nn.Parameter(torch.empty(width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            nn.init.xavier_uniform_(w)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, C] -> [B, L, C]; attn_bias additive, broadcastable to [B, heads, L, L]."""
        b, n, c = x.shape
        weight = torch.cat([self.q_proj_weight, self.k_proj_weight, self.v_proj_weight])
        qkv = F.linear(x, weight, self.in_proj_bias).view(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, attn_bias)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))

    def value_path(self, x: torch.Tensor) -> torch.Tensor:
        """out_proj(v_proj(x)): what the dense last block keeps of the attention."""
        width = self.v_proj_weight.shape[0]
        return self.out_proj(F.linear(x, self.v_proj_weight, self.in_proj_bias[2 * width:]))


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP block, registered in the official order (attn, ln_1, mlp, ln_2)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = SplitAttention(width, heads)
        self.ln_1 = LayerNormFp32(width)
        self.mlp = MLP(width, 4 * width, QuickGELU)
        self.ln_2 = LayerNormFp32(width)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_bias)
        return x + self.mlp(self.ln_2(x))

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The dense last block: value path of every token + the CLS token's input (not each token's own), MLP."""
        v = self.attn.value_path(self.ln_1(x)) + x[:, :1]
        return v + self.mlp(self.ln_2(v))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))


class VisualTransformer(nn.Module):
    """CLIP image tower run densely: every token through ln_post and proj."""

    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        width, scale = cfg.clip_width, cfg.clip_width ** -0.5
        grid = cfg.clip_image_size // cfg.clip_patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.clip_patch, stride=cfg.clip_patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNormFp32(width)
        self.transformer = Transformer(width, cfg.clip_layers, cfg.clip_heads)
        self.ln_post = LayerNormFp32(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))

    def forward(self, x: torch.Tensor, keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Image [B,3,S,S] (CLIP-normalised) -> (tokens [B, 1+g*g, E] after ln_post @ proj,
        {block index: that block's output [B, 1+g*g, C]} for the blocks in `keep`)."""
        x = self.conv1(x)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + resize_pos_embed(self.positional_embedding, grid).to(x.dtype)
        x = self.ln_pre(x)
        kept = {}
        blocks = self.transformer.resblocks
        for i, block in enumerate(blocks):
            x = block.forward_dense(x) if i == len(blocks) - 1 else block(x)
            if i in keep:
                kept[i] = x
        return self.ln_post(x) @ self.proj.to(x.dtype), kept


class CLIP(nn.Module):
    """The whole CLIP under the official names: text tower at the top level, image tower under `visual`."""

    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        self.visual = VisualTransformer(cfg)
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.ln_final = LayerNormFp32(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))
        mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)   # a plain attribute in the official code
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.text_width ** -0.5)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [N, 77] -> [N, E] (not normalised). Under the causal mask the tokens after the batch's last
        end-of-text never reach an output read, so the sequence is cut there (same result, less work)."""
        eot = tokens.argmax(dim=-1)
        n = int(eot.max()) + 1
        x = self.token_embedding(tokens[:, :n]) + self.positional_embedding[:n].to(self.token_embedding.weight.dtype)
        mask = self.attn_mask[:n, :n]
        for block in self.transformer.resblocks:
            x = block(x, mask)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), eot] @ self.text_projection


class TextTower(nn.Module):
    """A view of the text half of `CLIP` (shares its tensors) for `encode_with_templates` and its disk cache,
    whose key then covers the text weights only. Built on demand, never registered in the model."""

    def __init__(self, clip: CLIP):
        super().__init__()
        self.clip = [clip]          # not a submodule: the view has its own state_dict below
        self.transformer, self.token_embedding, self.ln_final = clip.transformer, clip.token_embedding, clip.ln_final
        self.positional_embedding, self.text_projection = clip.positional_embedding, clip.text_projection

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip[0].encode_text(tokens)


def first_synonym(name: str) -> str:
    """The official get_text_embeds: 'a, b, c' -> 'a' (split on ', ' exactly; other spacing kept verbatim)."""
    return name.split(", ")[0] if ", " in name else name


# ---------------------------------------------------------------------------------------------------------------
# Aggregator (cat_seg/modeling/transformer/model.py)
# ---------------------------------------------------------------------------------------------------------------
class WindowAttention(nn.Module):
    """Window self-attention whose queries and keys see [features; guidance], values the features only."""

    def __init__(self, dim: int, guidance_dim: int, heads: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Official order: x [N, nW, T, dim+guidance] (each class's windows) -> [N, nW, T, dim]; mask [nW, T, T]
        (0 / -100) or None."""
        return self.attend(self.q(x), self.k(x), self.v(x[..., :self.dim]), mask)

    def forward_split(self, x: torch.Tensor, guidance: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The same on x [B*T, nW, T', dim] (T classes per view) with the guidance once per view [B, nW, T', G]:
        q and k are split into a feature part and a guidance part added per view (`split_linear`)."""
        return self.attend(split_linear(self.q, x, guidance), split_linear(self.k, x, guidance), self.v(x), mask)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q, k, v [N, nW, T, dim] -> proj(attention) [N, nW, T, dim]. The windows ride in the head dimension, so
        the shift mask broadcasts over N instead of being copied per class."""
        n, nw, t, c = q.shape
        heads = lambda a: a.view(n, nw, t, self.heads, -1).permute(0, 1, 3, 2, 4).reshape(  # noqa: E731
            n, nw * self.heads, t, -1)
        if mask is not None:
            mask = mask.to(q.dtype)[:, None].expand(-1, self.heads, -1, -1).reshape(1, nw * self.heads, t, t)
        out = attention(heads(q), heads(k), heads(v), mask)
        out = out.view(n, nw, self.heads, t, -1).permute(0, 1, 3, 2, 4).reshape(n, nw, t, c)
        return self.proj(out)


def split_linear(linear: nn.Linear, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """linear(cat([x, guidance], -1)) without building the concatenation: x [B*T, ..., C] (T classes per view),
    guidance [B, ..., G] the same for every class of a view. The guidance part (G columns of the weight) is
    computed once per view and added; the same result up to float rounding."""
    c = x.shape[-1]
    out = F.linear(x, linear.weight[:, :c], linear.bias)
    b = guidance.shape[0]
    out.view(b, -1, *out.shape[1:]).add_(F.linear(guidance, linear.weight[:, c:])[:, None])
    return out


class SwinTransformerBlock(nn.Module):
    """Pre-norm Swin block on one class's [H*W, C] cost embedding, guidance concatenated after norm1."""

    def __init__(self, cfg: CATSegConfig, shift: int):
        super().__init__()
        dim, size = cfg.hidden_dim, cfg.grid
        self.size = size
        self.window = min(cfg.window_size, size)
        self.shift = shift if size > cfg.window_size else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, cfg.appearance_guidance_proj_dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        # persistent (in the published state_dict) for the shifted block only, as the official module
        self.register_buffer("attn_mask", swin_shift_mask(size, size, self.window, self.shift, torch.device("cpu"))
                             if self.shift else None)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor, split: bool = True) -> torch.Tensor:
        """x [B, T, H*W, C] (T classes per view), guidance [B, H*W, G] (per view) -> [B, T, H*W, C].

        Official order (`split=False`): the guidance copied to every class and concatenated after norm1, q/k on
        the concatenation. Split (the default): the same block with the guidance's share of q/k computed once per
        view (`WindowAttention.forward_split`); the same result up to float rounding, no per-class guidance copy."""
        b, t, hw, c = x.shape
        s, w = self.size, self.window
        y = self.norm1(x).view(b * t, s, s, c)
        g = guidance.view(b, s, s, -1)
        if not split:
            y = torch.cat([y, g[:, None].expand(-1, t, -1, -1, -1).reshape(b * t, s, s, -1)], dim=-1)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
            g = torch.roll(g, shifts=(-self.shift, -self.shift), dims=(1, 2))
        if split:
            y = self.attn.forward_split(window_partition(y, w), window_partition(g, w), self.attn_mask)
        else:
            y = self.attn(window_partition(y, w), self.attn_mask)
        y = window_reverse(y, w, s, s)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.view(b, t, hw, c)
        if not split:
            return x + self.mlp(self.norm2(x))
        return x + mlp_in_row_blocks(self.mlp.fc1, self.mlp.act, self.mlp.fc2, self.norm2(x))


def mlp_in_row_blocks(fc1: nn.Linear, act: nn.Module, fc2: nn.Linear, x: torch.Tensor,
                      rows: int = 32768) -> torch.Tensor:
    """fc2(act(fc1(x))) a block of rows at a time: the 4x wider hidden activations stay in cache instead of
    going to memory and back (CAT-Seg's aggregator MLPs see 0.4-0.7 M rows); every row's arithmetic is the same."""
    flat = x.reshape(-1, x.shape[-1])
    out = flat.new_empty(flat.shape[0], fc2.out_features)
    for s in range(0, flat.shape[0], rows):
        out[s:s + rows] = fc2(act(fc1(flat[s:s + rows])))
    return out.view(*x.shape[:-1], -1)


class SwinTransformerBlockWrapper(nn.Module):
    """Spatial aggregation: a plain and a shifted Swin block per class, sharing the normalised guidance."""

    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        self.block_1 = SwinTransformerBlock(cfg, shift=0)
        self.block_2 = SwinTransformerBlock(cfg, shift=cfg.window_size // 2)
        self.guidance_norm = nn.LayerNorm(cfg.appearance_guidance_proj_dim)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor, split: bool = True) -> torch.Tensor:
        """x [B, T, H*W, C]; guidance [B, G, H, W] -> [B, T, H*W, C]."""
        g = self.guidance_norm(guidance.flatten(2).transpose(1, 2))            # [B, H*W, G], same for every class
        return self.block_2(self.block_1(x, g, split), g, split)


class LinearAttention(nn.Module):
    """'Transformers are RNNs' attention with the elu+1 feature map (eps 1e-6), values scaled by 1/S and back."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                repeated: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        """q [N, L, H, D], k, v [N, S, H, D] -> [N, L, H, D]. `repeated` = (k_r [H, D], v_r [H, D], count): `count`
        more key/value rows, all equal to (k_r, v_r), summed in once instead of stored per row."""
        q, k = F.elu(q).add_(1), F.elu(k).add_(1)
        s = v.shape[1] + (repeated[2] if repeated else 0)
        kv = torch.einsum("nshd,nshv->nhdv", k, v / s)
        k_sum = k.sum(dim=1)
        if repeated:
            k_r, v_r, count = repeated
            k_r = F.elu(k_r).add_(1)
            kv = kv + count * torch.einsum("hd,hv->hdv", k_r, v_r / s)
            k_sum = k_sum + count * k_r
        z = 1 / (torch.einsum("nlhd,nhd->nlh", q, k_sum) + eps)
        return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z) * s


class AttentionLayer(nn.Module):
    def __init__(self, dim: int, guidance_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.attention = LinearAttention()

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """x [N, T, C], guidance [N, T, G] -> [N, T, C]."""
        xg = torch.cat([x, guidance], dim=-1)
        split = lambda t: t.view(*t.shape[:2], self.heads, -1)   # noqa: E731
        out = self.attention(split(self.q(xg)), split(self.k(xg)), split(self.v(x)))
        return out.flatten(2)


class ClassTransformerLayer(nn.Module):
    """Class aggregation: at each (pooled) pixel, linear attention across the classes, padded to `pad_len` with a
    learned token (and a learned text guidance); queries and keys see the projected text embeddings."""

    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        dim, gdim = cfg.hidden_dim, cfg.text_guidance_proj_dim
        self.pooling = tuple(cfg.pooling_size)
        self.attention = AttentionLayer(dim, gdim, cfg.num_heads)
        self.MLP = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.pad_len = cfg.pad_len
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, dim))
        self.padding_guidance = nn.Parameter(torch.zeros(1, 1, gdim))

    def forward(self, x: torch.Tensor, guidance: torch.Tensor, size: tuple[int, int],
                split: bool = True) -> torch.Tensor:
        """x [B, T, H*W, C], guidance [B, T, G] -> [B, T, H*W, C]. Official order (`split=False`): padding rows
        appended up to pad_len and carried through the whole layer, the text guidance copied to every pixel.
        Split (the default): the text guidance's share of q/k once per view, the padding rows (all equal) summed
        into the linear attention once and never carried (their outputs are dropped); same result up to rounding."""
        b, t, hw, c = x.shape
        h, w = size
        pooled = self.pooling != (1, 1)
        y = x
        if pooled:
            y = F.avg_pool2d(x.transpose(2, 3).reshape(b * t, c, h, w), self.pooling)
            ph, pw = y.shape[-2:]
            y = y.flatten(2).transpose(1, 2).reshape(b, t, ph * pw, c)
        p = y.shape[2]
        y = y.transpose(1, 2).reshape(b, p, t, c)                           # [B, P, T, C]
        y = self._layer_split(y, guidance) if split else self._layer_padded(y, guidance)
        y = y.transpose(1, 2)                                               # [B, T, P, C]
        if pooled:
            y = y.reshape(b * t, ph, pw, c).permute(0, 3, 1, 2)
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=True)
            y = y.flatten(2).transpose(1, 2).reshape(b, t, hw, c)
        return x + y

    def _layer_padded(self, y: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """Official: y [B, P, T, C], the classes padded to pad_len through attention and MLP, the padding cut."""
        b, p, t, c = y.shape
        pad = max(self.pad_len - t, 0)
        if pad:
            y = torch.cat([y, self.padding_tokens.to(y.dtype)[:, None].expand(b, p, pad, c)], dim=2)
            guidance = torch.cat([guidance, self.padding_guidance.to(guidance.dtype).expand(b, pad, -1)], dim=1)
        n = t + pad
        y = y.reshape(b * p, n, c)
        g = guidance[:, None].expand(-1, p, -1, -1).reshape(b * p, n, -1)
        y = y + self.attention(self.norm1(y), g)
        y = y + self.MLP(self.norm2(y))
        return y.view(b, p, n, c)[:, :, :t]

    def _layer_split(self, y: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """The same on the class rows alone: q/k split (`split_linear`, guidance [B, T, G] per view), the padding
        rows' key and value computed once and counted pad times."""
        b, p, t, c = y.shape
        att = self.attention
        heads = lambda a: a.reshape(b * p, t, att.heads, -1)   # noqa: E731
        yn = self.norm1(y).reshape(b * p, t, c)
        q, k = split_linear(att.q, yn, guidance), split_linear(att.k, yn, guidance)
        pad = max(self.pad_len - t, 0)
        repeated = None
        if pad:
            token = self.norm1(self.padding_tokens.to(y.dtype))[0]           # [1, C]
            token_guidance = torch.cat([token, self.padding_guidance.to(y.dtype)[0]], dim=-1)
            k_r, v_r = att.k(token_guidance).view(att.heads, -1), att.v(token).view(att.heads, -1)
            repeated = (k_r, v_r, pad)
        out = att.attention(heads(q), heads(k), heads(att.v(yn)), repeated=repeated)
        y = y + out.reshape(b, p, t, c)
        return y + mlp_in_row_blocks(self.MLP[0], self.MLP[1], self.MLP[2], self.norm2(y))


class AggregatorLayer(nn.Module):
    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        self.swin_block = SwinTransformerBlockWrapper(cfg)
        self.attention = ClassTransformerLayer(cfg)

    def forward(self, x: torch.Tensor, appearance: torch.Tensor, text: torch.Tensor,
                split: bool = True) -> torch.Tensor:
        x = self.swin_block(x, appearance, split)
        return self.attention(x, text, appearance.shape[-2:], split)


class DoubleConv(nn.Module):
    """(conv3x3 -> GroupNorm(C/16) -> ReLU) x 2, no conv biases."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False), nn.GroupNorm(cout // 16, cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, kernel_size=3, padding=1, bias=False), nn.GroupNorm(cout // 16, cout),
            nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Up(nn.Module):
    """x2 transposed conv to (in - guidance) channels, concat the guidance, DoubleConv."""

    def __init__(self, cin: int, cout: int, guidance: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin - guidance, kernel_size=2, stride=2)
        self.conv = DoubleConv(cin, cout)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """x [N, C, h, w]; guidance [N, G, 2h, 2w] (each map's own view's guidance)."""
        return self.conv(torch.cat([self.up(x), guidance], dim=1))


class Aggregator(nn.Module):
    """Cost volume -> embedding -> aggregation layers -> upsampling decoder -> one logit map per class."""

    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        self.cfg = cfg
        hid = cfg.hidden_dim
        self.layers = nn.ModuleList(AggregatorLayer(cfg) for _ in range(cfg.num_layers))
        self.conv1 = nn.Conv2d(cfg.prompt_channel, hid, kernel_size=7, stride=1, padding=3)
        self.guidance_projection = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.appearance_guidance_proj_dim, kernel_size=3, padding=1), nn.ReLU())
        self.text_guidance_projection = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.text_guidance_proj_dim), nn.ReLU())
        self.decoder_guidance_projection = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d, p, kernel_size=3, padding=1), nn.ReLU())
            for d, p in zip(cfg.decoder_guidance_dims, cfg.decoder_guidance_proj_dims))
        (d1, d2), (g1, g2) = cfg.decoder_dims, cfg.decoder_guidance_proj_dims
        self.decoder1 = Up(hid, d1, g1)
        self.decoder2 = Up(d1, d2, g2)
        self.head = nn.Conv2d(d2, 1, kernel_size=3, padding=1)
        self.official_order = False     # True under CATSeg.published_computation()

    def select_classes(self, cost: torch.Tensor, text: torch.Tensor):
        """K > pad_len: per view, the pad_len classes with the highest maximum cost (ascending class order; the
        official topk(sorted=False) order does not change the result, the class attention is order-free)."""
        idx = cost.flatten(2).amax(dim=-1).topk(self.cfg.pad_len, dim=-1).indices.sort(dim=-1).values   # [B, 256]
        cost = torch.gather(cost, 1, idx[:, :, None, None].expand(-1, -1, *cost.shape[-2:]))
        return cost, text[idx], idx

    def forward(self, img_feats: torch.Tensor, text: torch.Tensor, guidance: list[torch.Tensor],
                decoder_chunk: int = 256, capture: dict | None = None) -> torch.Tensor:
        """img_feats [B, E, h, w] (CLIP patch embeddings), text [K, E] (normalised class embeddings),
        guidance [res3 [B,E,h,w], res4 [B,256,2h,2w], res5 [B,128,4h,4w]] -> logits [B, K, 4h, 4w].

        The decoder runs `decoder_chunk` (view, class) maps at a time: the same result, bounded memory."""
        b, _, h, w = img_feats.shape
        k = text.shape[0]
        cost = torch.einsum("bchw,tc->bthw", F.normalize(img_feats, dim=1), F.normalize(text, dim=-1))
        idx = None
        text = F.normalize(text, dim=-1)[None].expand(b, -1, -1)            # [B, K, E]
        if k > self.cfg.pad_len:
            cost, text, idx = self.select_classes(cost, text[0])
        t = cost.shape[1]
        x = self.conv1(cost.reshape(b * t, 1, h, w))                        # [(B T), C, h, w]
        if capture is not None:
            capture.update(cost_volume=cost, cost_embed=x, selected=idx)
        x = x.flatten(2).transpose(1, 2).reshape(b, t, h * w, -1)           # [B, T, h*w, C]
        appearance = self.guidance_projection(guidance[0])
        decoder_guidance = [proj(g) for proj, g in zip(self.decoder_guidance_projection, guidance[1:])]
        text_guidance = self.text_guidance_projection(F.normalize(text, dim=-1))
        for layer in self.layers:
            x = layer(x, appearance, text_guidance, split=not self.official_order)
        if capture is not None:
            capture["aggregated"] = x
        x = x.transpose(2, 3).reshape(b * t, -1, h, w)
        logits = torch.cat([self.decode(x[s:s + decoder_chunk], decoder_guidance, s, t)
                            for s in range(0, b * t, decoder_chunk)]).view(b, t, 4 * h, 4 * w)
        if idx is None:
            return logits
        out = logits.new_full((b, k, 4 * h, 4 * w), -100.0)
        return out.scatter_(1, idx[:, :, None, None].expand(-1, -1, 4 * h, 4 * w), logits)

    def decode(self, x: torch.Tensor, guidance: list[torch.Tensor], start: int, t: int) -> torch.Tensor:
        """Maps `start`.. of the (view, class) stack [chunk, C, h, w] -> logits [chunk, 4h, 4w]."""
        view = torch.div(torch.arange(start, start + x.shape[0], device=x.device), t, rounding_mode="floor")
        x = self.decoder1(x, guidance[0][view])
        x = self.decoder2(x, guidance[1][view])
        return self.head(x)[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class Predictor(nn.Module):
    """`sem_seg_head.predictor`: the CLIP towers and the aggregator."""

    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        self.clip_model = CLIP(cfg)
        self.transformer = Aggregator(cfg)


class SemSegHead(nn.Module):
    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        self.predictor = Predictor(cfg)


def _drop_text(model: "CATSeg", incompatible_keys=None) -> None:
    model.text_embed = None
    model._text_cache.clear()


class CATSeg(OVSegModel):
    # CLIP's mean/std (cfg.MODEL.CLIP_PIXEL_MEAN/STD); the ImageNet PIXEL_MEAN/STD normalisation is unused at test
    PROTOCOL = Protocol(short_side=640, max_size=2560, size_divisibility=1,
                        pixel_mean=(122.7709383, 116.7460125, 104.09373615),
                        pixel_std=(68.5005327, 66.6321579, 70.3231630))

    def __init__(self, cfg: CATSegConfig = CATSEG_VIT_B_16, protocol: Protocol | None = None):
        super().__init__(protocol or replace(self.PROTOCOL))
        self.cfg = cfg
        self.sem_seg_head = SemSegHead(cfg)
        self.upsample1 = nn.ConvTranspose2d(cfg.clip_width, cfg.decoder_guidance_dims[0], kernel_size=2, stride=2)
        self.upsample2 = nn.ConvTranspose2d(cfg.clip_width, cfg.decoder_guidance_dims[1], kernel_size=4, stride=4)
        self.text_embed: torch.Tensor | None = None      # [K, E] normalised, for `self.vocabulary`
        self._text_cache: dict[str, torch.Tensor] = {}   # first synonym -> [E]
        self.register_load_state_dict_post_hook(_drop_text)

    @property
    def clip(self) -> CLIP:
        return self.sem_seg_head.predictor.clip_model

    @property
    def aggregator(self) -> Aggregator:
        return self.sem_seg_head.predictor.transformer

    # -- vocabulary -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_vocabulary(self, class_names: list[str]) -> torch.Tensor:
        """[K, E]: each name's first synonym in the one template, through the text tower, L2-normalised."""
        words = [first_synonym(n) for n in class_names]
        new = list(dict.fromkeys(w for w in words if w not in self._text_cache))
        if new:
            feats = encode_with_templates(TextTower(self.clip), new, [TEMPLATE])
            self._text_cache.update(zip(new, feats))
        device = self.clip.text_projection.device
        self.vocabulary = list(class_names)
        self.text_embed = torch.stack([self._text_cache[w].to(device) for w in words])
        return self.text_embed

    def _text(self, like: torch.Tensor) -> torch.Tensor:
        if self.text_embed is None:
            if self.vocabulary is None:
                raise BenchError("CAT-Seg: no vocabulary; call model.encode_vocabulary(class_names) before the "
                                 "forward")
            self.encode_vocabulary(self.vocabulary)
        if self.text_embed.device != like.device or self.text_embed.dtype != like.dtype:
            self.text_embed = self.text_embed.to(like)
        return self.text_embed

    def published_computation(self):
        """The aggregator in the official order (the guidance concatenated to every class before the q/k
        projections, the class attention padded to pad_len end to end): the papers' FLOP count. The default split
        path gives the same result up to float rounding with less work (fewer FLOPs at K < 256)."""
        return attribute_set(self.aggregator, "official_order", True)

    # -- sliding window ---------------------------------------------------------------------------------------
    def window_starts(self) -> list[int]:
        """Top/left corners of the kernel windows along one side of the out_res canvas (nn.Unfold's)."""
        cfg = self.cfg
        stride = int(cfg.kernel * (1 - cfg.overlap))
        return list(range(0, cfg.out_res - cfg.kernel + 1, stride))

    def views(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised image [3, h, w] -> [n_windows + 1, 3, kernel, kernel]: the windows of the image resized to
        out_res x out_res (row-major), then the whole image resized to kernel x kernel."""
        cfg = self.cfg
        canvas = F.interpolate(image[None], size=(cfg.out_res, cfg.out_res), mode="bilinear", align_corners=False)
        starts = self.window_starts()
        windows = [canvas[0, :, y:y + cfg.kernel, x:x + cfg.kernel] for y in starts for x in starts]
        whole = F.interpolate(image[None], size=(cfg.kernel, cfg.kernel), mode="bilinear", align_corners=False)
        return torch.cat([torch.stack(windows), whole])

    # -- forward ----------------------------------------------------------------------------------------------
    def forward_views(self, views: torch.Tensor, capture: dict | None = None) -> torch.Tensor:
        """Views [N, 3, kernel, kernel] (CLIP-normalised) -> logits [N, K, 4g, 4g]."""
        cfg = self.cfg
        if views.shape[-1] != cfg.clip_input:
            views = F.interpolate(views, size=(cfg.clip_input, cfg.clip_input), mode="bilinear", align_corners=False)
        tokens, kept = self.clip.visual(views, keep=cfg.guidance_layers)
        g = cfg.grid
        grid = lambda t: t[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, g, g)   # noqa: E731
        res3 = grid(tokens)
        res4 = self.upsample1(grid(kept[cfg.guidance_layers[0]]))
        res5 = self.upsample2(grid(kept[cfg.guidance_layers[1]]))
        if capture is not None:
            capture.update(clip_dense=tokens, clip_layers=kept, res4=res4, res5=res5)
        return self.aggregator(res3, self._text(res3), [res3, res4, res5], capture=capture)

    def forward(self, x: torch.Tensor, image_sizes: list[tuple[int, int]] | None = None,
                return_intermediates: bool = False) -> dict:
        """x: normalised padded batch [B,3,Hp,Wp] -> {'window_logits' [B, n_views, K, 4g, 4g]} (the 4 windows
        row-major, then the global view). Each image is cropped to its size first (padding never enters).
        With `return_intermediates`: 'intermediates', one dict per image (clip_dense, clip_layers, res4, res5,
        cost_volume, cost_embed, selected, aggregated)."""
        sizes = image_sizes or [tuple(x.shape[-2:])] * x.shape[0]
        logits, inter = [], []
        for image, (h, w) in zip(x, sizes):
            capture = {} if return_intermediates else None
            logits.append(self.forward_views(self.views(image[:, :h, :w]), capture))
            inter.append(capture)
        out = {"window_logits": torch.stack(logits), "image_sizes": [tuple(s) for s in sizes]}
        if return_intermediates:
            out["intermediates"] = inter
        return out

    def postprocess(self, outputs: dict, image_sizes: list[tuple[int, int]],
                    output_sizes: list[tuple[int, int]], class_chunk: int = 64) -> list[torch.Tensor]:
        """Per image: each view's logits -> bilinear to kernel² -> sigmoid; windows folded onto the out_res canvas
        (overlaps averaged), averaged with the global view's scores resized to out_res; then bilinear to the output
        size -> [K, H0, W0]. Classes go `class_chunk` at a time (memory).

        The canvas covers the image at the size the forward cut (`outputs['image_sizes']`); an image size claimed
        smaller than that is its top-left part (the canvas at the forward's size, cropped, then resized)."""
        results = []
        seen = outputs.get("image_sizes") or image_sizes
        for logits, size, fwd, (h0, w0) in zip(outputs["window_logits"], image_sizes, seen, output_sizes):
            k = logits.shape[1]
            out = logits.new_empty((k, h0, w0), dtype=torch.float32)
            for s in range(0, k, class_chunk):
                out[s:s + class_chunk] = self._merge(logits[:, s:s + class_chunk].float(), (h0, w0),
                                                     tuple(size), tuple(fwd))
            results.append(out)
        return results

    def _merge(self, logits: torch.Tensor, out_size: tuple[int, int], size: tuple[int, int] | None = None,
               seen: tuple[int, int] | None = None) -> torch.Tensor:
        """[n_views, k, 4g, 4g] logits -> [k, H0, W0] scores (the official fold / average / resize)."""
        cfg = self.cfg
        r, ker = cfg.out_res, cfg.kernel
        scores = F.interpolate(logits, size=(ker, ker), mode="bilinear", align_corners=False).sigmoid_()
        starts = self.window_starts()
        total = scores.new_zeros(scores.shape[1], r, r)
        count = scores.new_zeros(1, r, r)
        for i, (y, x) in enumerate((y, x) for y in starts for x in starts):
            total[:, y:y + ker, x:x + ker] += scores[i]
            count[:, y:y + ker, x:x + ker] += 1
        whole = F.interpolate(scores[-1:], size=(r, r), mode="bilinear", align_corners=False)[0]
        merged = (total / count + whole) / 2
        if size is not None and seen is not None and size != seen:     # a claimed image smaller than the forward's
            merged = F.interpolate(merged[None], size=seen, mode="bilinear", align_corners=False)[0]
            merged = merged[:, :size[0], :size[1]]
        if tuple(out_size) != tuple(merged.shape[-2:]):
            merged = F.interpolate(merged[None], size=out_size, mode="bilinear", align_corners=False)[0]
        return merged


# Builders: model configs as data (bench.models.registry.register_config)
catseg_vit_b_16 = register_config("catseg_vit_b_16", CATSeg, CATSEG_VIT_B_16,
                                  "CAT-Seg with CLIP ViT-B/16 at 384² (`model_base.pth`).")
catseg_vit_l_14 = register_config("catseg_vit_l_14", CATSeg, CATSEG_VIT_L_14,
                                  "CAT-Seg with CLIP ViT-L/14@336px (`model_large.pth`).")
