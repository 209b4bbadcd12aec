"""SAN: Side Adapter Network for open-vocabulary semantic segmentation (Xu et al., CVPR 2023, arXiv 2302.12242).

A frozen CLIP ViT recognises, a small side ViT proposes. The image takes three routes:

1. **CLIP feature extractor** (`clip_visual_extractor`): the image, bilinearly rescaled by `clip_resolution`
   (0.5 for ViT-B/16, 0.7 for ViT-L/14), runs through the CLIP stem and the first `feature_last_layer` blocks.
   The patch maps after `ln_pre` and after some blocks are handed to the side network.
2. **Side adapter** (`side_adapter_network`): a plain ViT (width 240, depth 8, patch 16) on the full-resolution
   image, with 100 learned query tokens in front of the patch tokens. CLIP maps are added to the patch tokens
   (LayerNorm + 1x1 conv + bilinear resize). Its MLP decoder turns the last queries into 100 mask logits and,
   per CLIP head, an attention bias over the image.
3. **Recognition head** (`clip_rec_head`): the remaining CLIP blocks, run on [100 SOS copies of CLS ; CLS ;
   patches] under an additive mask that lets each SOS token look only at itself and at the patches, weighted by
   its (max-pooled) bias. The SOS outputs, projected and normalised, are matched against the text classifier
   (`ov_classifier`: the CLIP text tower, the 14 "vild" templates, and a learned background embedding).

Semantic scores: Σ_q softmax(class logits_q)[:-1] · sigmoid(mask_q), masks resized to the output size first
(`SEM_SEG_POSTPROCESS_BEFORE_INFERENCE=True`).

Module names and the state_dict are those of the official code (MendelXu/SAN @ e19262d, `san/model/`), so the
published `san_vit_b_16.pth` / `san_vit_large_14.pth` load strictly: 442 / 586 keys, including the persistent
buffers `criterion.empty_weight` (a training leftover) and `ov_classifier.attn_mask`. The two builders at the
bottom are registered as `san_vit_b_16` and `san_vit_large_14`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench import BenchError
from bench.models.attention import attention
from bench.models.base import OVSegModel, Protocol, attribute_set
from bench.models.clip import (VILD_TEMPLATES, LayerNormFp32, ResidualAttentionBlock, TextTransformer,
                               encode_with_templates, resize_pos_embed)
from bench.models.common import MLP, Block, EmptyWeightCriterion, LayerNorm2d
from bench.models.mask_scores import soft_mask_labels, soft_mask_scores
from bench.models.registry import register_config


@dataclass(frozen=True)
class SANConfig:
    """Architecture of one SAN variant (the values of `configs/san_clip_vit*_res4_coco.yaml` + `san/config.py`)."""

    # CLIP (OpenAI weights: QuickGELU, LayerNorm eps 1e-5)
    clip_width: int = 768
    clip_layers: int = 12
    clip_heads: int = 12
    clip_patch: int = 16
    clip_image_size: int = 224            # native size: the positional table is (224/16)^2 + 1 long
    embed_dim: int = 512                  # joint image-text space
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    feature_last_layer: int = 9           # CLIP blocks in the extractor; the rest form the recognition head
    clip_resolution: float = 0.5          # CLIP sees the padded image rescaled by this factor
    fusion_map: tuple[tuple[int, int], ...] = ((0, 0), (3, 1), (6, 2), (9, 3))   # (CLIP output, side block)
    # side adapter (timm "vit_w240n6d8_patch16": LayerNorm eps 1e-6, exact GELU)
    side_width: int = 240
    side_depth: int = 8
    side_heads: int = 6
    side_patch: int = 16
    side_image_size: int = 640            # native size of the side positional table (40x40)
    num_queries: int = 100
    decoder_channels: int = 256           # mask decoder: embed and hidden channels
    decoder_layers: int = 3
    # training leftover kept for the state_dict: Hungarian criterion's class weights (171 COCO-Stuff classes)
    num_train_classes: int = 171
    no_object_weight: float = 0.1


SAN_VIT_B_16 = SANConfig()
SAN_VIT_L_14 = SANConfig(clip_width=1024, clip_layers=24, clip_heads=16, clip_patch=14, clip_image_size=336,
                         embed_dim=768, text_width=768, text_heads=12, feature_last_layer=18, clip_resolution=0.7,
                         fusion_map=((0, 0), (6, 1), (12, 2), (18, 3)))


# ---------------------------------------------------------------------------------------------------------------
# Side adapter: a small ViT with query tokens, CLIP fusion, and the MLP mask decoder
# ---------------------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class SideViT(nn.Module):
    """What is left of the timm ViT in SAN: pos_embed without a cls slot, patch_embed, blocks (no cls, no norm)."""

    def __init__(self, cfg: SANConfig):
        super().__init__()
        grid = cfg.side_image_size // cfg.side_patch
        self.grid = (grid, grid)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, cfg.side_width) * 0.02)
        self.patch_embed = PatchEmbed(cfg.side_patch, cfg.side_width)
        self.blocks = nn.ModuleList(Block(cfg.side_width, cfg.side_heads) for _ in range(cfg.side_depth))

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """[1, h*w, C]. As the official code: resized (bicubic) only when the *token count* differs from 40*40,
        so a grid with 1600 tokens in another shape (e.g. 32x50) uses the table as it is."""
        pos = self.pos_embed
        if pos.shape[1] != grid[0] * grid[1]:
            pos = resize_pos_embed(pos[0], grid, num_prefix=0)[None]
        return pos


class AddFusion(nn.Module):
    """tokens += resize(conv1x1(LN(clip_map))): CLIP features added to the side network's patch tokens."""

    def __init__(self, clip_width: int, side_width: int):
        super().__init__()
        self.input_proj = nn.Sequential(LayerNorm2d(clip_width), nn.Conv2d(clip_width, side_width, kernel_size=1))

    def forward(self, tokens: torch.Tensor, clip_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        y = F.interpolate(self.input_proj(clip_map), size=grid, mode="bilinear", align_corners=False)
        return tokens + y.flatten(2).transpose(1, 2)


class MaskDecoder(nn.Module):
    """Queries x pixels -> mask logits [B,Q,h,w]; queries x per-head pixel embeddings -> attention bias
    [B,heads,Q,h,w], rescaled by a learned scalar affine (`bias_scaling`). One bias for all rec-head blocks."""

    def __init__(self, cfg: SANConfig):
        super().__init__()
        c, n = cfg.decoder_channels, cfg.decoder_layers
        self.heads = cfg.clip_heads
        self.query_mlp = MLP(cfg.side_width, c, c, n)
        self.pix_mlp = MLP(cfg.side_width, c, c, n, conv=True)
        self.attn_mlp = MLP(cfg.side_width, c, c * cfg.clip_heads, n, conv=True)
        self.bias_scaling = nn.Linear(1, 1)

    def forward(self, query: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        query = self.query_mlp(query)
        pix = self.pix_mlp(x)
        b, c, h, w = pix.shape
        mask_pred = torch.einsum("bqc,bchw->bqhw", query, pix)
        attn_bias = self.attention_bias(query, x)
        scale = self.bias_scaling
        return mask_pred, attn_bias * scale.weight.view(()) + scale.bias.view(())

    def attention_bias(self, query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """einsum("bqc,bnchw->bnqhw", query, attn_mlp(x) viewed head-major) [B,heads,Q,h,w], before scaling.

        The last 1x1 conv of `attn_mlp` runs as one GEMM whose output rows are ordered (channel, head), so that
        the query product is a second plain GEMM over [C, heads x hw]: the same multiply-adds as conv + einsum,
        without the strided copy the einsum needs (about 1.6x faster on CPU)."""
        *hidden, last = self.attn_mlp.layers
        for layer in hidden:
            x = F.relu(layer(x))
        b, cin, h, w = x.shape
        n = self.heads
        c = last.out_channels // n
        weight = last.weight.view(n, c, cin).transpose(0, 1).reshape(c * n, cin)
        bias = last.bias.view(n, c).T.reshape(c * n, 1)
        emb = torch.matmul(weight, x.flatten(2)) + bias                  # [B, (c, head), hw]
        out = torch.matmul(query, emb.view(b, c, n * h * w))             # [B, Q, (head, hw)]
        return out.view(b, -1, n, h, w).transpose(1, 2)


class SideAdapterNetwork(nn.Module):
    """SAN's RegionwiseSideAdapterNetwork at inference: only the last block is decoded (no deep supervision)."""

    def __init__(self, cfg: SANConfig):
        super().__init__()
        self.query_embed = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.side_width) * 0.02)
        self.query_pos_embed = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.side_width) * 0.02)
        self.vit_model = SideViT(cfg)
        self.fusion_map = {side: clip for clip, side in cfg.fusion_map}   # side block index -> CLIP output index
        self.fusion_layers = nn.ModuleDict(
            {f"layer_{side}": AddFusion(cfg.clip_width, cfg.side_width) for _, side in cfg.fusion_map})
        self.mask_decoder = MaskDecoder(cfg)

    def fuse(self, idx: int, x: torch.Tensor, clip_maps: dict[int, torch.Tensor], grid: tuple[int, int]):
        if idx not in self.fusion_map:
            return x
        q = self.query_embed.shape[1]
        patches = self.fusion_layers[f"layer_{idx}"](x[:, q:], clip_maps[self.fusion_map[idx]], grid)
        return torch.cat([x[:, :q], patches], dim=1)

    def forward(self, image: torch.Tensor, clip_maps: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B,3,H,W] (normalised, padded); clip_maps {CLIP output index: [B,Cv,h',w']}
        -> mask logits [B,Q,H/16,W/16], attention bias [B,heads,Q,H/16,W/16]."""
        vit = self.vit_model
        x, grid = vit.patch_embed(image)
        b, q = x.shape[0], self.query_embed.shape[1]
        pos = torch.cat([self.query_pos_embed, vit.position_embedding(grid)], dim=1)
        x = torch.cat([self.query_embed.expand(b, -1, -1), x], dim=1) + pos
        x = self.fuse(0, x, clip_maps, grid)
        for i, block in enumerate(vit.blocks, start=1):
            x = self.fuse(i, block(x), clip_maps, grid)
            if i < len(vit.blocks):
                x = x + pos                                            # positions re-added before every block
        query, patches = x[:, :q], x[:, q:].transpose(1, 2).reshape(b, -1, *grid)
        return self.mask_decoder(query, patches)


# ---------------------------------------------------------------------------------------------------------------
# CLIP split in two: feature extractor (first K blocks) and recognition head with attention bias (the rest)
# ---------------------------------------------------------------------------------------------------------------
class ClipVisualExtractor(nn.Module):
    """open_clip's ViT stem and its first K blocks (`resblocks.0..K-1`); returns the tokens after chosen blocks."""

    def __init__(self, cfg: SANConfig):
        super().__init__()
        width, scale = cfg.clip_width, cfg.clip_width ** -0.5
        grid = cfg.clip_image_size // cfg.clip_patch
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.clip_patch, stride=cfg.clip_patch, bias=False)
        self.ln_pre = LayerNormFp32(width)
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, cfg.clip_heads) for _ in range(cfg.feature_last_layer))

    def forward(self, x: torch.Tensor, keep: set[int]) -> tuple[dict[int, torch.Tensor], tuple[int, int]]:
        """Image [B,3,h,w] -> ({i: tokens [B,1+h'w',C] after block i (0 = after ln_pre), i in keep}, (h', w'))."""
        x = self.conv1(x)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + resize_pos_embed(self.positional_embedding, grid).to(x.dtype)
        x = self.ln_pre(x)
        feats = {0: x} if 0 in keep else {}
        for i, block in enumerate(self.resblocks[:max(keep)], start=1):
            x = block(x)
            if i in keep:
                feats[i] = x
        return feats, grid


def rec_attention_mask(attn_bias: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Additive mask [B, heads, Q+1+L, Q+1+L] over [SOS x Q ; CLS ; L patches] (SAN `_build_attn_biases`).

    Every row puts -100 on the SOS columns (nobody attends to an SOS token) except each SOS token on itself;
    SOS rows put -100 on CLS and the side network's bias, max-pooled to the CLIP grid, on the patches. CLS and
    patch rows are otherwise 0, so they evolve as in plain CLIP. (The official 3-D mask is [B*heads, ...],
    batch-major, which is this tensor flattened.)
    """
    b, heads, q = attn_bias.shape[:3]
    bias = F.adaptive_max_pool2d(attn_bias.flatten(1, 2), grid).view(b, heads, q, -1)
    n = q + 1 + bias.shape[-1]
    mask = attn_bias.new_zeros(n, n)
    mask[:, :q] = -100.0
    mask[:q, q] = -100.0
    diag = torch.arange(q, device=mask.device)
    mask[diag, diag] = 0.0
    mask = mask.expand(b, heads, n, n).clone()
    mask[:, :, :q, q + 1:] = bias
    return mask


class RecWithAttnBiasHead(nn.Module):
    """The remaining CLIP blocks (`resblocks.0..` renumbered), `ln_post`, `proj`: one embedding per mask query.

    The official head runs [SOS x Q ; CLS ; patches] through each block under the mask of `rec_attention_mask`.
    That mask splits the sequence in two attention problems, which are run apart here (same result):

    - CLS and patch rows put -100 on every SOS column (weight e^-100 ~ 4e-44, below fp32 resolution next to the
      unmasked ones) and 0 elsewhere: they attend to CLS + patches only, without a mask, exactly as in plain CLIP.
    - SOS rows see their own column (0) and the patches (the pooled bias); the other SOS columns and CLS are -100,
      i.e. nothing: each SOS row attends to [itself ; patches] under a [Q, Q + L] mask.

    Nothing reads the CLS / patch tokens after the last block, so it runs for the SOS rows alone (the patches'
    keys and values are still projected). Tokens are kept in the order [SOS ; patches ; CLS] so that both key sets
    are contiguous slices of one fused QKV projection.
    """

    def __init__(self, cfg: SANConfig):
        super().__init__()
        width = cfg.clip_width
        self.proj = nn.Parameter(width ** -0.5 * torch.randn(width, cfg.embed_dim))
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, cfg.clip_heads) for _ in range(cfg.clip_layers - cfg.feature_last_layer))
        self.ln_post = LayerNormFp32(width)

    official_order = False   # True: the official sequence and mask through every block (FLOP counting only)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], attn_bias: torch.Tensor) -> torch.Tensor:
        """tokens [B,1+L,C] after the extractor's last block; attn_bias [B,heads,Q,H,W] -> [B,Q,E], L2-normalised."""
        if self.official_order:
            return self.forward_official(tokens, grid, attn_bias)
        b, q, heads = attn_bias.shape[0], attn_bias.shape[2], attn_bias.shape[1]
        sos = tokens[:, :1].expand(-1, q, -1)           # SOS_TOKEN_FORMAT="cls_token": Q copies of CLS
        x = torch.cat([sos, tokens[:, 1:], tokens[:, :1]], dim=1)              # [SOS ; patches ; CLS]
        pooled = F.adaptive_max_pool2d(attn_bias.flatten(1, 2), grid).view(b, heads, q, -1)
        own = torch.full((q, q), float("-inf"), dtype=pooled.dtype, device=pooled.device).fill_diagonal_(0.0)
        sos_mask = torch.cat([own.expand(b, heads, q, q), pooled], dim=-1).to(x.dtype)     # [B,heads,Q,Q+L]
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            x = _rec_block(block, x, q, sos_mask, sos_only=i == last)
        return F.normalize(self.ln_post(x[:, :q]) @ self.proj, dim=-1)


    def forward_official(self, tokens: torch.Tensor, grid: tuple[int, int], attn_bias: torch.Tensor) -> torch.Tensor:
        """The official order: [SOS x Q ; CLS ; patches] through every block under `rec_attention_mask`."""
        q = attn_bias.shape[2]
        x = torch.cat([tokens[:, :1].expand(-1, q, -1), tokens], dim=1)
        mask = rec_attention_mask(attn_bias, grid).to(x.dtype)
        for block in self.resblocks:
            x = block(x, mask)
        return F.normalize(self.ln_post(x[:, :q]) @ self.proj, dim=-1)


def _rec_block(block: ResidualAttentionBlock, x: torch.Tensor, q: int, sos_mask: torch.Tensor,
               sos_only: bool) -> torch.Tensor:
    """One recognition block on [SOS x q ; patches ; CLS] (see RecWithAttnBiasHead); with `sos_only` the
    result holds the q SOS rows only."""
    attn = block.attn
    b, n, c = x.shape
    heads = attn.heads
    y = block.ln_1(x if not sos_only else x[:, :n - 1])       # the last block needs no CLS (SOS rows mask it)
    m = y.shape[1]
    qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).view(b, m, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    qh, kh, vh = qkv.unbind(0)                                 # [B, heads, m, d]
    out = attention(qh[:, :, :q], kh[:, :, :n - 1], vh[:, :, :n - 1], sos_mask)
    if sos_only:
        x = x[:, :q] + attn.out_proj(out.transpose(1, 2).reshape(b, q, c))
    else:
        rest = attention(qh[:, :, q:], kh[:, :, q:], vh[:, :, q:])
        x = x + attn.out_proj(torch.cat([out, rest], dim=2).transpose(1, 2).reshape(b, n, c))
    return x + block.mlp(block.ln_2(x))


class OvClassifier(TextTransformer):
    """The CLIP text tower under SAN's names (`ov_classifier.*`), plus `logit_scale` and the learned `bg_embed`.

    `attn_mask` is persistent (SAN re-registers CLIP's buffers with the default persistent=True).
    """

    def __init__(self, cfg: SANConfig):
        super().__init__(cfg.context_length, cfg.vocab_size, cfg.text_width, cfg.text_layers, cfg.text_heads,
                         cfg.embed_dim, persistent_attn_mask=True)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))   # open_clip's init
        self.bg_embed = nn.Parameter(torch.randn(1, cfg.embed_dim) * cfg.embed_dim ** -0.5)
        # state_dict in the published order: transformer, token_embedding, ln_final
        for name in ("token_embedding", "ln_final"):
            module = self._modules.pop(name)
            self.add_module(name, module)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
def _fp32(device: torch.device):
    """Autocast off: what runs inside computes in the dtype of its tensors (fp32 here) in every precision."""
    return torch.autocast(device_type=device.type, enabled=False)


def _drop_classifier(model: SAN, incompatible_keys=None) -> None:
    model.text_embed = model.classifier = None
    model._text_cache.clear()


class SAN(OVSegModel):
    # keys a checkpoint may lack (buffers whose module defaults are the published values); see checkpoint.py
    optional_checkpoint_keys = ("criterion.empty_weight", "ov_classifier.attn_mask")
    # The text tower encodes each vocabulary once (cached) and stays fp32 in every precision; the class logits
    # (mask embeddings x classifier, 100 x E x K+1 multiply-adds) are computed in fp32 too. Reduced precision
    # covers the per-image path; the class decision of every pixel keeps fp32 text features and logits.
    fp32_modules = ("ov_classifier",)

    def __init__(self, cfg: SANConfig = SAN_VIT_B_16, protocol: Protocol | None = None):
        super().__init__(protocol)
        self.cfg = cfg
        self.templates = VILD_TEMPLATES
        self.criterion = EmptyWeightCriterion(cfg.num_train_classes, cfg.no_object_weight)
        self.side_adapter_network = SideAdapterNetwork(cfg)
        self.clip_visual_extractor = ClipVisualExtractor(cfg)
        self.clip_rec_head = RecWithAttnBiasHead(cfg)
        self.ov_classifier = OvClassifier(cfg)
        # CLIP outputs needed: the fused ones and the last one (the rec head's input)
        self._clip_keep = {clip for clip, _ in cfg.fusion_map} | {cfg.feature_last_layer}
        self.text_embed: torch.Tensor | None = None     # [K, E] per-class embeddings of `self.vocabulary`
        self.classifier: torch.Tensor | None = None     # [K+1, E] logit_scale.exp() * normalize([text; bg])
        self._text_cache: dict[str, torch.Tensor] = {}  # class name -> [E], as the official per-word cache
        # new weights make the cached text stale: drop it (the next forward re-encodes `self.vocabulary`)
        self.register_load_state_dict_post_hook(_drop_classifier)

    # -- vocabulary -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_vocabulary(self, class_names: list[str]) -> torch.Tensor:
        """Per-class text embeddings [K, E] (templates averaged, normalised); caches the classifier [K+1, E].

        A name is used verbatim, so a synonym list such as "road, route" is one class. Names seen before (since
        the last weight load) come from a cache.
        """
        new = list(dict.fromkeys(n for n in class_names if n not in self._text_cache))
        device = self.ov_classifier.text_projection.device
        if new:
            with _fp32(device):
                feats = encode_with_templates(self.ov_classifier, new, list(self.templates))
            self._text_cache.update(zip(new, feats))
        text = torch.stack([self._text_cache[n].to(device) for n in class_names])
        weight = F.normalize(torch.cat([text, self.ov_classifier.bg_embed.to(text)], dim=0), dim=-1)
        self.vocabulary = list(class_names)
        self.text_embed = text
        self.classifier = self.ov_classifier.logit_scale.exp().to(text) * weight
        return text

    def _classifier(self, like: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            if self.vocabulary is None:
                raise BenchError("SAN: no vocabulary; call model.encode_vocabulary(class_names) before the forward")
            self.encode_vocabulary(self.vocabulary)
        if self.classifier.device != like.device:
            self.classifier = self.classifier.to(like.device)   # follow the model to its device once (stays fp32)
        return self.classifier

    def published_computation(self):
        """The recognition head in the official order (every row of every block, SOS x SOS attention included):
        the count the analytic estimate and the papers use (63.3 GMACs for ViT-B/16 at 640²), about 2.6 GMACs
        above what the timed path executes."""
        return attribute_set(self.clip_rec_head, "official_order", True)

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, image_sizes: list[tuple[int, int]] | None = None,
                return_intermediates: bool = False) -> dict:
        """x: normalised padded batch [B,3,Hp,Wp] -> {'mask_pred' [B,Q,Hp/16,Wp/16] (mask logits),
        'mask_logits' [B,Q,K+1] (class logits, last = background), 'padded_size' (Hp, Wp)}.

        With `return_intermediates`: also 'clip_features' {i: [B,Cv,h,w]} and 'clip_cls' {i: [B,Cv]} (CLIP output
        i, 0 = after ln_pre), 'attn_bias' [B,heads,Q,Hp/16,Wp/16] (before pooling), 'mask_emb' [B,Q,E].
        `image_sizes` is unused here (the masks cover the padded batch); postprocess crops.
        """
        cfg = self.cfg
        clip_input = F.interpolate(x, scale_factor=cfg.clip_resolution, mode="bilinear", align_corners=False)
        feats, grid = self.clip_visual_extractor(clip_input, self._clip_keep)
        maps = {i: t[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, *grid) for i, t in feats.items()}
        mask_pred, attn_bias = self.side_adapter_network(x, maps)
        mask_emb = self.clip_rec_head(feats[cfg.feature_last_layer], grid, attn_bias)
        with _fp32(x.device):
            mask_logits = torch.einsum("bqc,nc->bqn", mask_emb.float(), self._classifier(mask_emb))
        out = {"mask_pred": mask_pred, "mask_logits": mask_logits, "padded_size": (x.shape[-2], x.shape[-1])}
        if return_intermediates:
            out.update(clip_features=maps, clip_cls={i: t[:, 0] for i, t in feats.items()}, attn_bias=attn_bias,
                       mask_emb=mask_emb)
        return out

    def postprocess(self, outputs: dict, image_sizes: list[tuple[int, int]],
                    output_sizes: list[tuple[int, int]], max_elements: int = 1 << 26) -> list[torch.Tensor]:
        """Per image: mask logits -> bilinear to the padded size -> crop to the image size -> bilinear to the
        output size -> Σ_q softmax(class)[:, :K] · sigmoid(mask) -> [K, H0, W0] (`mask_scores.soft_mask_scores`)."""
        masks, logits = outputs["mask_pred"], outputs["mask_logits"]
        padded = tuple(outputs.get("padded_size", (masks.shape[-2] * 16, masks.shape[-1] * 16)))
        return [soft_mask_scores(mask, F.softmax(cls_logits.float(), dim=-1)[:, :-1], padded, size, tuple(out_size),
                                 max_elements)
                for mask, cls_logits, size, out_size in zip(masks, logits, image_sizes, output_sizes)]

    def postprocess_labels(self, outputs: dict, image_sizes: list[tuple[int, int]],
                           output_sizes: list[tuple[int, int]], rows_per_band: int = 8,
                           max_elements: int = 1 << 28) -> list[torch.Tensor]:
        """The label maps `[s.argmax(0) for s in postprocess(...)]` [H0, W0] (int64), band by band without holding
        the full-size masks or scores (`mask_scores.soft_mask_labels`; same GEMM FLOPs, labels equal up to float
        rounding at exact ties). bf16 masks on the CPU take the bf16 class GEMM with the fp32 re-check of near
        ties (same labels as fp32). Images whose Q x H0 x W0 masks exceed `max_elements` go through `postprocess`."""
        masks, logits = outputs["mask_pred"], outputs["mask_logits"]
        padded = tuple(outputs.get("padded_size", (masks.shape[-2] * 16, masks.shape[-1] * 16)))
        checked_bf16 = masks.dtype == torch.bfloat16 and masks.device.type == "cpu"
        results = []
        for i, (mask, cls_logits, size, (h0, w0)) in enumerate(zip(masks, logits, image_sizes, output_sizes)):
            if mask.shape[0] * max(padded[0] * padded[1], h0 * w0) > max_elements:
                one = {k: (v[i:i + 1] if k in ("mask_pred", "mask_logits") else v) for k, v in outputs.items()}
                results.append(self.postprocess(one, [size], [(h0, w0)])[0].argmax(dim=0))
                continue
            prob = F.softmax(cls_logits.float(), dim=-1)[:, :-1].contiguous()  # [Q, K]
            results.append(soft_mask_labels(mask, prob, padded, size, (h0, w0), rows_per_band, checked_bf16))
        return results


# Builders: model configs as data (bench.models.registry.register_config)
san_vit_b_16 = register_config("san_vit_b_16", SAN, SAN_VIT_B_16,
                               "SAN with CLIP ViT-B/16 (`san_vit_b_16.pth`).")
san_vit_large_14 = register_config("san_vit_large_14", SAN, SAN_VIT_L_14,
                                   "SAN with CLIP ViT-L/14-336 (`san_vit_large_14.pth`).")
