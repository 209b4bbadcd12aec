"""SCAN: Open-Vocabulary Segmentation with Semantic-Assisted Calibration (Liu et al., CVPR 2024, arXiv 2312.04089).

Reimplemented from the official code, github yongliu20/SCAN @ 097fbbd ("update config for SCAN-ViTB"), run on
CPU in pure PyTorch. Two registered builders share every line of this file:

    scan_vit_l_14   configs/scan_vitL.yaml: Swin-B Mask2Former + two open_clip ViT-L/14 towers (SCAN.pth)
    scan_vit_b_16   configs/scan_vitB.yaml: the same segmenter + two ViT-B/16 towers (SCAN-vitB.pth)

The network, top to bottom (names are the published state_dict prefixes):
  backbone                 Swin-B (embed 128, depths 2-2-18-2, window 12, relative position bias), norm0..3
  sem_seg_head.pixel_decoder   MSDeformAttn encoder (6 layers, res3-5) + one FPN level on res2 -> mask features
  sem_seg_head.predictor   10-layer masked-attention decoder, 100 queries, 768-d (512-d for B) query embedding
  clip_adapter.original_clip   un-tuned CLIP image tower: whole image, tokens after every block (global prior)
  LFM / oriclip_mlp        frequency filter + residual 1x1-conv branch on three token maps -> memory M
  fusion_decoder           5 cross-attentions of the query embeddings on M
  lightweight_transformer  5 encoder layers on (query + learnable_weight * global CLS), one token per query
  clip_adapter.clip_model  contextual-shift tuned CLIP: text classifier and the masked-crop region classifier
In-vocabulary logits are 100 * cos(query, text); every query whose sigmoid mask passes `mask_thr` anywhere is
cropped (box of the binary mask, background filled with the CLIP mean), classified by the tuned tower with the
contextual shift (a share of background patch tokens replaced by the global image's CLS token after blocks 1, 3,
5, ...), and the two are combined geometrically: c = p_in^(1-w) * p_out^w; A-847 / PC-459 add a void re-weighting.

Per-dataset settings (`model.configure(...)`; the official values are in yaml comments, not in code; the harness
reads them from conf/model/scan_l.yaml / scan_b.yaml `dataset_settings`, void_reweight from the dataset configs):

    scan_vit_l_14   mask_thr  ensemble_weight  replace_ratio  void_reweight
      A-847          0.30       0.75             0.15           True
      PC-459         0.25       0.65             0.05           True
      A-150          0.55       0.75             0.05           False
      PC-59          0.50       0.50             0.05           False
      PAS-20         0.20       0.65             0.10           False
    sources: configs/scan_vitL.yaml L70-77 (comments: [MASK_THR, CLIP_ENSEMBLE_WEIGHT] and REPLACE_RATIO per
    dataset); the README eval example (A-150: 0.05 / 0.75 / 0.55) agrees.

    scan_vit_b_16   mask_thr  ensemble_weight  replace_ratio  void_reweight
      A-847          0.25       0.75             0.05           True
      PC-459         0.25       0.70             0.05           True
      A-150          0.40       0.70             0.05           False
      PC-59          0.25       0.35             0.05           False
      PAS-20         0.20       0.45             0.10           False
    sources: configs/scan_vitB.yaml L70-77 (comments); issue yongliu20/SCAN#9 (A-847: 0.05 / 0.75 / 0.25) agrees.

    void_reweight: scan/ovseg_model.py L338 switches it on by the dataset names `ade20k_full_sem_seg_val` and
    `pascal_context_459_sem_seg_val`; here it is a flag. PAS-20b has no published settings (use PAS-20's).
    Defaults at build time are the yamls' own values (0.4 / 0.7 / 0.15, void off), which match no test set.
    shift_seed: the official contextual shift calls the unseeded global `random.sample`; here every image draws
    from its own `random.Random(shift_seed)`, in the official order (blocks outer, crops inner, k = 0 included),
    so a result does not depend on batch composition or image order.

Differences from the official code that do not change a result: batches are processed one image at a time
(the official test batch is 1: each image keeps its own /32 padding); the crops run through CLIP in chunks of
`crop_batch_size` with all random draws made first. Float rounding differs slightly (e.g. the Swin and CLIP attention
run through `scaled_dot_product_attention`); the golden fixtures bound it.
Edge case (clarifications 11): when no query passes `mask_thr`, the official code raises; here every query gets
p_in^(1-w) and the image is counted in `num_images_without_crops` / `outputs["no_valid_query"]`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.base import OVSegModel, Protocol
from bench.models.clip import (CLIP_MEAN_FILL, VILD_TEMPLATES, CLIPModel, VisionTransformer, clip_pixel_buffers,
                               encode_with_templates)
from bench.models.common import (IMAGENET_MEAN, IMAGENET_STD, MLP, EmptyWeightCriterion, mask_boxes,
                                 sine_position_embedding)
from bench.models.pixel_decoder import MSDeformAttnPixelDecoder
from bench.models.registry import register_model
from bench.models.swin import SwinBackbone

# Extra keys of the published SCAN.pth that the released code never builds (issue yongliu20/SCAN#13):
# pass these to load_checkpoint(ignore_prefixes=...). Any other difference fails with the key diff.
IGNORED_PREFIXES: tuple[str, ...] = ("clip_adapter.clip_model.visual.cxt_decoder.",
                                     "clip_adapter.clip_model.visual.learnable_weight")

CLIP_SIZE = 224   # the CLIP input (global image and crops) uses OpenAI's statistics (bench.models.clip.CLIP_MEAN)

@dataclass(frozen=True)
class SCANConfig:
    """Architecture hyper-parameters (defaults: configs/scan_vitL.yaml + scan/config.py defaults)."""

    # Swin backbone
    swin_embed_dim: int = 128
    swin_depths: tuple[int, ...] = (2, 2, 18, 2)
    swin_heads: tuple[int, ...] = (4, 8, 16, 32)
    swin_window: int = 12
    # pixel decoder (MSDeformAttn encoder on res3..res5; FFN 1024 is hard-coded in the official from_config)
    conv_dim: int = 256
    mask_dim: int = 256
    enc_layers: int = 6
    enc_ffn: int = 1024
    deform_heads: int = 8
    deform_points: int = 4
    # masked-attention decoder (DEC_LAYERS 10 passed unmodified by OpenVocabMask2FormerPredictor)
    hidden_dim: int = 256
    num_queries: int = 100
    dec_layers: int = 10
    dec_heads: int = 8
    dec_ffn: int = 2048
    embed_hidden_dim: int = 1024
    # CLIP (open_clip ViT-L-14 / ViT-B-16, nn.GELU, pool 'tok')
    clip_patch: int = 14
    clip_width: int = 1024
    clip_layers: int = 24
    clip_heads: int = 16
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    embed_dim: int = 768          # CLIP embedding = SCAN_DIM
    vocab_size: int = 49408
    context_length: int = 77
    # SCAN modules
    select_layers: tuple[int, ...] = (12, 18, 24)    # SELECT_ORI_CLIP_ID
    frequency_sigma: tuple[int, ...] = (9, 7, 3)     # FREQUENCY_SIGMA
    replace_layers: tuple[int, ...] = (1, 3, 5, 7, 9)  # REPLACE_LAYER (contextual shift)
    light_layers: int = 5
    fusion_layers: int = 5
    scan_heads: int = 8
    num_train_classes: int = 171  # only the size of criterion.empty_weight (a training buffer)

    @property
    def token_grid(self) -> int:
        return CLIP_SIZE // self.clip_patch


SCAN_L = SCANConfig()
SCAN_B = SCANConfig(clip_patch=16, clip_width=768, clip_layers=12, clip_heads=12, text_width=512, text_layers=12,
                    text_heads=8, embed_dim=512, select_layers=(6, 9, 12), replace_layers=(1, 3, 5))


# ================================================================================================== masked decoder
class SelfAttentionLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt, query_pos):
        q = tgt + query_pos
        return self.norm(tgt + self.self_attn(q, q, tgt)[0])


class CrossAttentionLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt, memory, mask, pos, query_pos):
        out = self.multihead_attn(tgt + query_pos, memory + pos, memory, attn_mask=mask)[0]
        return self.norm(tgt + out)


class FFNLayer(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt):
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MaskedDecoder(nn.Module):
    """OpenVocabMask2FormerPredictor: masked cross-attn -> self-attn -> FFN per layer, level i % 3, post-norm.

    Class head = 2-layer MLP to the CLIP embedding (a query embedding, not logits). Seq-first tensors, as the
    official nn.MultiheadAttention calls.
    """

    def __init__(self, cfg: SCANConfig):
        super().__init__()
        d, heads = cfg.hidden_dim, cfg.dec_heads
        self.heads = heads
        self.transformer_self_attention_layers = nn.ModuleList(SelfAttentionLayer(d, heads)
                                                               for _ in range(cfg.dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(d, heads)
                                                                for _ in range(cfg.dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(d, cfg.dec_ffn) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(cfg.num_queries, d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.level_embed = nn.Embedding(3, d)
        self.class_embed = MLP(d, cfg.embed_hidden_dim, cfg.embed_dim, 2)
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)

    def prediction_heads(self, output, mask_features, target_size):
        out = self.decoder_norm(output).transpose(0, 1)                            # B, Q, C
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_features)
        attn = F.interpolate(masks, size=target_size, mode="bilinear", align_corners=False)
        attn = attn.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.heads, 1, 1).flatten(0, 1) < 0.5
        return out, masks, attn

    def forward(self, feats: list[torch.Tensor], mask_features: torch.Tensor):
        sizes = [f.shape[-2:] for f in feats]
        pos = [sine_position_embedding(f, f.shape[1] // 2).flatten(2).permute(2, 0, 1) for f in feats]
        src = [(f.flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1) for i, f in enumerate(feats)]
        bs = src[0].shape[1]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        _, masks, attn = self.prediction_heads(output, mask_features, sizes[0])
        for i in range(len(self.transformer_ffn_layers)):
            lvl = i % 3
            attn[torch.where(attn.sum(-1) == attn.shape[-1])] = False   # a query that masks everything sees all
            output = self.transformer_cross_attention_layers[i](output, src[lvl], attn, pos[lvl], query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            out, masks, attn = self.prediction_heads(output, mask_features, sizes[(i + 1) % 3])
        return self.class_embed(out), masks                       # [B, Q, E] query embeddings, [B, Q, H/4, W/4]


class SemSegHead(nn.Module):
    def __init__(self, cfg: SCANConfig, in_dims: list[int]):
        super().__init__()
        self.pixel_decoder = MSDeformAttnPixelDecoder(in_dims, cfg.conv_dim, cfg.mask_dim, cfg.enc_layers,
                                                      cfg.enc_ffn, cfg.deform_heads, cfg.deform_points)
        self.predictor = MaskedDecoder(cfg)

    def forward(self, feats):
        mask_features, multi_scale = self.pixel_decoder(feats)
        return self.predictor(multi_scale, mask_features)


# ================================================================================================== CLIP + SCAN modules
def make_clip(cfg: SCANConfig) -> CLIPModel:
    """open_clip CLIP (nn.GELU): text keys at the top level, the image tower under `visual`, `logit_scale`."""
    return CLIPModel(cfg.embed_dim, CLIP_SIZE, cfg.clip_patch, cfg.clip_width, cfg.clip_layers, cfg.clip_heads,
                     cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.context_length, cfg.vocab_size,
                     act_layer=nn.GELU)


def make_visual(cfg: SCANConfig) -> VisionTransformer:
    return VisionTransformer(CLIP_SIZE, cfg.clip_patch, cfg.clip_width, cfg.clip_layers, cfg.clip_heads,
                             cfg.embed_dim, act_layer=nn.GELU)


class ClipAdapter(nn.Module):
    """MaskFormerClipAdapter: tuned CLIP (`clip_model`), an untied copy of the un-tuned image tower
    (`original_clip`), the learned void text embedding and the x255 OpenAI pixel statistics."""

    def __init__(self, cfg: SCANConfig):
        super().__init__()
        self.non_object_embedding = nn.Parameter(torch.randn(1, cfg.embed_dim) * cfg.text_width ** -0.5)
        clip_pixel_buffers(self)
        self.clip_model = make_clip(cfg)
        self.original_clip = make_visual(cfg)


class LFM(nn.Module):
    """Frequency module (scan/frequency.py): attenuate one Gaussian band of the unshifted 2D spectrum, then a
    residual 1x1-conv branch on [Re, Im] that is transformed back: x + Re(ifft2(conv2(relu(conv1(.)))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.conv2 = nn.Conv2d(2 * channels, 2 * channels, 1)

    @staticmethod
    def gaussian(h: int, w: int, sigma: float, device: torch.device) -> torch.Tensor:
        """exp(-((y - h//2)^2 + (x - w//2)^2) / (2 sigma^2)) on the integer grid of the unshifted spectrum."""
        yv, xv = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        yv, xv = yv.float(), xv.float()
        return torch.exp(-((yv - h // 2) ** 2 + (xv - w // 2) ** 2) / (2 * sigma ** 2))

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = x.float()
        y = torch.fft.fft2(x) * (1 - self.gaussian(h, w, sigma, x.device))
        z = torch.cat([y.real, y.imag], dim=1).to(self.conv1.weight.dtype)
        z = self.conv2(F.relu(self.conv1(z))).float()
        re, im = torch.chunk(z, 2, dim=1)
        return x + torch.fft.ifft2(torch.complex(re, im), s=(h, w)).real


class OriClipMLP(nn.Module):
    """Two linear layers with no activation in between (scan/frequency.py MLP)."""

    def __init__(self, din: int, dout: int):
        super().__init__()
        self.fc1 = nn.Linear(din, dout)
        self.fc2 = nn.Linear(dout, dout)

    def forward(self, x):
        return self.fc2(self.fc1(x))


class FusionDecoder(nn.Module):
    """CA: `tgt = tgt + MHA_i(tgt, M, M)`, then LayerNorm after every layer but the last."""

    def __init__(self, dim: int, n: int, heads: int):
        super().__init__()
        self.multiattn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(n))
        self.ln = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n - 1))

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for i, attn in enumerate(self.multiattn):
            tgt = tgt + attn(tgt, memory, memory)[0]
            if i < len(self.ln):
                tgt = self.ln[i](tgt)
        return tgt


# ================================================================================================== pure helpers
def draw_shift(background: list[list[int]], ratio: float, layers: list[int],
               rng: random.Random) -> dict[int, list[list[int]]]:
    """The contextual-shift draws in the official order: blocks outer, crops inner, `random.sample` called for
    every (block, crop) even when k = int(ratio * n_background) is 0. Returns {block: [token positions per crop]}."""
    draws: dict[int, list[list[int]]] = {}
    for d in layers:
        draws[d] = []
        for bg in background:
            sel = rng.sample(range(len(bg)), int(ratio * len(bg)))
            draws[d].append([bg[s] for s in sel])
    return draws


def ensemble_scores(in_vocab_logits: torch.Tensor, region_probs: torch.Tensor | None, valid_idx: torch.Tensor,
                    weight: float, void_reweight: bool) -> torch.Tensor:
    """Per-query class scores c [Q, K] from the in-vocab logits [Q, K+1] and the crop probabilities [N, K].

    c = p_in^(1-w) * p_out^w, p_out = 1 for queries without a crop (also when there are no crops at all).
    void_reweight (A-847 / PC-459): c <- softmax(log(cat[softmax(log c) * (1 - p_void), p_void] + 1e-8))[:, :K].
    w <= 0 with crops: the official code keeps only the crop probabilities of the valid queries (`semseg` is then
    summed over those queries alone); that case is returned as the [N, K] crop probabilities.
    """
    probs = F.softmax(in_vocab_logits, dim=-1)
    p_in = probs[:, :-1]
    if weight <= 0 and region_probs is not None:
        return region_probs
    p_out = torch.ones_like(p_in)
    if region_probs is not None:
        p_out[valid_idx] = region_probs.to(p_out.dtype)
    c = torch.pow(p_in, 1 - weight) * torch.pow(p_out, weight)
    if void_reweight:
        void = probs[:, -1:]
        q = torch.cat([c.log().softmax(-1) * (1.0 - void), void], dim=-1)
        c = F.softmax(torch.log(q + 1e-8), dim=-1)[:, :-1]
    return c


def semantic_scores(c: torch.Tensor, mask_probs: torch.Tensor, valid_idx: torch.Tensor) -> torch.Tensor:
    """einsum('qc,qhw->chw'): soft sum over queries (only the valid ones when c has one row per crop, w <= 0)."""
    used = mask_probs[valid_idx] if c.shape[0] != mask_probs.shape[0] else mask_probs
    return torch.einsum("qc,qhw->chw", c, used)


# ================================================================================================== the model
class SCAN(OVSegModel):
    """SCAN inference. `forward(x, image_sizes)` takes the Swin-normalised padded batch of `preprocess`."""

    IGNORED_PREFIXES = IGNORED_PREFIXES   # for load_checkpoint(ignore_prefixes=...)

    def __init__(self, cfg: SCANConfig = SCAN_L, protocol: Protocol | None = None, name: str = "scan"):
        # configs/scan_vitL.yaml PIXEL_MEAN / PIXEL_STD (the Swin segmenter's input): detectron2's ImageNet values
        super().__init__(protocol or Protocol(pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD))
        self.cfg, self.name = cfg, name
        # children under the published state_dict's prefixes
        self.learnable_weight = nn.Parameter(torch.tensor([0.1]))
        self.backbone = SwinBackbone(cfg.swin_embed_dim, cfg.swin_depths, cfg.swin_heads, cfg.swin_window)
        self.sem_seg_head = SemSegHead(cfg, self.backbone.dims)
        self.criterion = EmptyWeightCriterion(cfg.num_train_classes)
        self.clip_adapter = ClipAdapter(cfg)
        layer = nn.TransformerEncoderLayer(d_model=cfg.embed_dim, nhead=cfg.scan_heads, batch_first=True)
        self.lightweight_transformer = nn.TransformerEncoder(layer, num_layers=cfg.light_layers,
                                                             enable_nested_tensor=False)
        self.LFM = LFM(cfg.clip_width)
        self.fusion_decoder = FusionDecoder(cfg.embed_dim, cfg.fusion_layers, cfg.scan_heads)
        self.oriclip_mlp = OriClipMLP(cfg.clip_width, cfg.embed_dim)
        # per-dataset settings (configure); defaults = the yamls' values
        self.mask_thr = 0.4
        self.ensemble_weight = 0.7
        self.replace_ratio = 0.15
        self.void_reweight = False
        self.shift_seed = 0
        self.crop_batch_size = 32           # crops per CLIP forward (memory only; results do not depend on it)
        self.keep_intermediates = False     # also return binary masks, 224 crops and crop masks (tests)
        self.num_images_without_crops = 0   # images where no query passed mask_thr (clarifications 11)
        self._text_cache: dict[str, torch.Tensor] = {}
        self.text_features: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_text_cache())

    def clear_text_cache(self) -> None:
        self._text_cache.clear()
        self.text_features = None

    # -- vocabulary ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_vocabulary(self, class_names: list[str]) -> torch.Tensor:
        """14 ViLD templates per name (mean of normalised embeddings, normalised), cached per name string."""
        names = [n.strip() for n in class_names]
        new = [n for n in dict.fromkeys(names) if n not in self._text_cache]
        if new:
            feats = encode_with_templates(self.clip_adapter.clip_model, new, list(VILD_TEMPLATES))
            self._text_cache.update({n: f for n, f in zip(new, feats)})
        self.vocabulary = names
        self.text_features = torch.stack([self._text_cache[n] for n in names])
        return self.text_features

    def classifier(self) -> torch.Tensor:
        """[K+1, E]: class text embeddings + the normalised learned void embedding (last row)."""
        if self.text_features is None:
            if self.vocabulary is None:
                from bench import BenchError
                raise BenchError("SCAN: call model.encode_vocabulary(class_names) before running the model")
            self.encode_vocabulary(self.vocabulary)          # weights were (re)loaded since the last encoding
        void = F.normalize(self.clip_adapter.non_object_embedding.float(), dim=-1)
        return torch.cat([self.text_features.to(void.device), void], 0)

    # -- parts -----------------------------------------------------------------------------------------------
    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Swin-normalised [3, h, w] -> the resized image, float 0..255."""
        return x.float() * self.pixel_std.float() + self.pixel_mean.float()

    def global_clip(self, image: torch.Tensor, padded: tuple[int, int]) -> dict:
        """Un-tuned tower on the whole image: OpenAI-normalised, zero-padded to `padded`, nearest-resized to 224.

        Returns CLS tokens after every block {d: [C]}, patch tokens [g*g, C] after the SELECT layers, and the
        final embedding ln_post(CLS) @ proj.
        """
        ca = self.clip_adapter
        h, w = image.shape[-2:]
        x = (image[None] - ca.pixel_mean.float()) / ca.pixel_std.float()
        x = F.pad(x, (0, padded[1] - w, 0, padded[0] - h))
        x = F.interpolate(x, size=(CLIP_SIZE, CLIP_SIZE))                            # default mode: nearest
        vit = ca.original_clip
        t, _ = vit.embed(x.to(vit.proj.dtype))
        cls, tokens = {}, {}
        for d, blk in enumerate(vit.transformer.resblocks, start=1):
            t = blk(t)
            cls[d] = t[0, 0]
            if d in self.cfg.select_layers:
                tokens[d] = t[0, 1:]
        final = vit.ln_post(t[:, 0]) @ vit.proj
        return {"cls": cls, "tokens": tokens, "final_cls": final[0]}

    def clip_memory(self, tokens: dict[int, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Token maps of the SELECT layers -> LFM (its own sigma each) -> concatenated -> oriclip_mlp: [1, 3*g*g, E]."""
        g = self.cfg.token_grid
        levels, lfm_out = [], {}
        for d, sigma in zip(self.cfg.select_layers, self.cfg.frequency_sigma):
            t = tokens[d]
            fmap = t.transpose(0, 1).reshape(1, t.shape[1], g, g)
            out = self.LFM(fmap, sigma)
            lfm_out[d] = out[0]
            levels.append(out.flatten(2).transpose(1, 2))
        mem = torch.cat(levels, 1).to(self.oriclip_mlp.fc1.weight.dtype)
        return self.oriclip_mlp(mem), lfm_out

    def crop_regions(self, image: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked crops of the resized image for binary masks [N, h, w]: box, fill outside the mask with the CLIP
        mean, OpenAI-normalise, bicubic to 224; the crop mask goes to 224 with nearest.
        Returns boxes [N, 4], crops [N, 3, 224, 224], masks224 [N, 1, 224, 224]."""
        ca = self.clip_adapter
        boxes = mask_boxes(masks)
        fill = torch.tensor(CLIP_MEAN_FILL, device=image.device).view(3, 1, 1)
        crops, crop_masks = [], []
        for (l, t, r, b), m in zip(boxes.tolist(), masks):
            mk = m[t:b, l:r].to(image.dtype)[None]
            region = image[:, t:b, l:r] * mk + (1 - mk) * fill
            region = (region[None] - ca.pixel_mean.float()) / ca.pixel_std.float()
            crops.append(F.interpolate(region, size=(CLIP_SIZE, CLIP_SIZE), mode="bicubic", align_corners=False))
            crop_masks.append(F.interpolate(mk[None], size=(CLIP_SIZE, CLIP_SIZE), mode="nearest"))
        return boxes, torch.cat(crops), torch.cat(crop_masks)

    def region_embed(self, image: torch.Tensor, masks: torch.Tensor, cls_tokens: dict[int, torch.Tensor],
                     rng: random.Random | None = None, draws: dict[int, list[list[int]]] | None = None) -> dict:
        """The crop branch for binary masks [N, h, w] of one image: crops, contextual shift, tuned CLIP tower.

        cls_tokens: the global image's CLS token after each block (the shift's replacement). The shift's token
        positions are drawn from `rng` (see `draw_shift`) unless `draws` ({block: [positions per crop]}) is given.
        Returns boxes, crops, masks224, the draws and region_embed [N, E] (L2-normalised)."""
        cfg, vit = self.cfg, self.clip_adapter.clip_model.visual
        boxes, crops, masks224 = self.crop_regions(image, masks)
        if draws is None:
            fg = F.max_pool2d(masks224, cfg.clip_patch).flatten(1) > 0   # = ceil(AvgPool(patch)) of the binary mask
            background = [torch.nonzero(~f).flatten().tolist() for f in fg]
            layers = [d for d in range(1, cfg.clip_layers + 1) if d in cfg.replace_layers]
            draws = draw_shift(background, float(self.replace_ratio), layers, rng or random.Random(self.shift_seed))
        feats = []
        for start in range(0, len(crops), max(1, int(self.crop_batch_size))):
            x, _ = vit.embed(crops[start:start + self.crop_batch_size].to(vit.proj.dtype))
            for d, blk in enumerate(vit.transformer.resblocks, start=1):
                x = blk(x)
                if d in draws:
                    for j, sel in enumerate(draws[d][start:start + x.shape[0]]):
                        if sel:
                            x[j, 1 + torch.tensor(sel, device=x.device)] = cls_tokens[d].to(x.dtype)
            feats.append(vit.ln_post(x[:, 0]) @ vit.proj)
        return {"boxes": boxes, "crops": crops, "masks224": masks224, "draws": draws,
                "region_embed": F.normalize(torch.cat(feats).float(), dim=-1)}

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, image_sizes: list[tuple[int, int]], skip_crops: bool = False) -> dict:
        """Padded Swin-normalised batch -> per-image lists of raw outputs and intermediates (see `_forward_one`).

        skip_crops=True runs everything but the crop branch (crop, resize, tuned CLIP; cost accounting: see
        `crop_cost_fn`); the scores are then those of a crop-less image, `num_crops` still counts the crops."""
        per_image = [self._forward_one(x[i], tuple(size), skip_crops) for i, size in enumerate(image_sizes)]
        return {k: [o[k] for o in per_image] for k in per_image[0]}

    def _forward_one(self, x: torch.Tensor, size: tuple[int, int], skip_crops: bool) -> dict:
        cfg = self.cfg
        h, w = size
        d = self.protocol.size_divisibility
        hp, wp = -(-h // d) * d, -(-w // d) * d
        x = x[:, :hp, :wp]                                   # this image's own /32 padding (official batch is 1)
        image = self.unnormalize(x[:, :h, :w])
        T = self.classifier()                                # [K+1, E]

        # global prior: un-tuned CLIP on the whole image -> frequency module -> memory M
        glob = self.global_clip(image, (hp, wp))
        memory, lfm_out = self.clip_memory(glob["tokens"])
        g = F.normalize(glob["final_cls"].float(), dim=-1)

        # segmenter: class-agnostic masks + query embeddings
        feats = self.backbone(x[None])
        q_seg, pred_masks = self.sem_seg_head(feats)
        q_fused = self.fusion_decoder(q_seg, memory.to(q_seg.dtype))
        lw = self.learnable_weight.to(q_fused.dtype)
        q_light = self.lightweight_transformer((q_fused + lw * g.to(q_fused.dtype)).reshape(-1, 1, cfg.embed_dim))
        q_light = q_light.reshape(1, -1, cfg.embed_dim)
        logits = 100.0 * F.normalize(q_light[0].float(), dim=-1) @ T.T                # [Q, K+1]

        # masks at the resized size; binary masks -> crops of the valid queries
        masks = self.mask_probabilities(pred_masks[0], size)
        binary = masks > self.mask_thr
        valid_idx = torch.nonzero(binary.flatten(1).any(1)).flatten()
        n_crops = int(valid_idx.numel())
        out = {"num_crops": n_crops, "no_valid_query": n_crops == 0, "crops_skipped": bool(skip_crops),
               "valid_query_idx": valid_idx, "pred_masks": pred_masks[0], "query_embed_seg": q_seg[0],
               "query_embed_fused": q_fused[0], "query_embed_light": q_light[0], "in_vocab_logits": logits,
               "text_embed": T, "orig_clip_final_cls": glob["final_cls"], "orig_clip_cls": glob["cls"],
               "orig_clip_tokens": glob["tokens"], "lfm_out": lfm_out, "oriclip_mlp_out": memory[0],
               "region_boxes": torch.zeros(0, 4, dtype=torch.long), "region_embed": None, "clip_region_probs": None,
               "shift_draws": {}}
        region_probs = None
        if n_crops and not skip_crops:
            rng = random.Random(self.shift_seed)
            reg = self.region_embed(image, binary[valid_idx], glob["cls"], rng)
            region_probs = F.softmax(100.0 * reg["region_embed"] @ T[:-1].T, dim=-1)
            out.update(region_boxes=reg["boxes"], region_embed=reg["region_embed"], shift_draws=reg["draws"],
                       clip_region_probs=region_probs)
            if self.keep_intermediates:
                out.update(region_bin_masks=binary[valid_idx], region_masks224=reg["masks224"], clip_crops=reg["crops"])
        elif not n_crops:
            self.num_images_without_crops += 1

        c = ensemble_scores(logits, region_probs, valid_idx, float(self.ensemble_weight), bool(self.void_reweight))
        out["ensembled_c"] = c
        out["sem_seg"] = semantic_scores(c, masks, valid_idx)              # [K, h, w] at the resized size
        return out

    @staticmethod
    def mask_probabilities(pred_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Mask logits [Q, hp/4, wp/4] -> sigmoid of the bilinear upsampling to the padded size, cropped to size."""
        hp, wp = 4 * pred_masks.shape[-2], 4 * pred_masks.shape[-1]
        up = F.interpolate(pred_masks[None], size=(hp, wp), mode="bilinear", align_corners=False)[0]
        return up[:, :size[0], :size[1]].float().sigmoid()

    def postprocess(self, outputs: dict, image_sizes: list[tuple[int, int]],
                    output_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """sem_seg at the resized size -> bilinear (align_corners=False) to the original size (sem_seg_postprocess)."""
        scores = []
        for s, (h, w), size in zip(outputs["sem_seg"], image_sizes, output_sizes):
            s = s[:, :h, :w]
            if tuple(size) != (h, w):
                s = F.interpolate(s[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
            scores.append(s)
        return scores

    # -- cost accounting -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def crop_cost_fn(self, x: torch.Tensor, image_sizes: list[tuple[int, int]], n_crops: int):
        """A zero-argument callable running only the per-crop part (crop, resize, shifted tuned-CLIP forward, text
        logits) for `n_crops` fixed rectangular masks of the first image; the global CLIP pass it needs runs here,
        once. `forward(..., skip_crops=True)` + n x (this / n_crops) = the full forward with n crops."""
        h, w = image_sizes[0]
        d = self.protocol.size_divisibility
        image = self.unnormalize(x[0, :, :h, :w])
        cls = self.global_clip(image, (-(-h // d) * d, -(-w // d) * d))["cls"]
        masks = torch.zeros(n_crops, h, w, dtype=torch.bool, device=x.device)
        for j in range(n_crops):   # nested rectangles from the full image down to about a quarter of it
            t, l = int(0.5 * j / n_crops * h), int(0.5 * j / n_crops * w)
            masks[j, t:max(t + 1, h - t), l:max(l + 1, w - l)] = True

        T = self.classifier()

        def run():
            with torch.inference_mode():
                emb = self.region_embed(image, masks, cls, random.Random(self.shift_seed))["region_embed"]
                return F.softmax(100.0 * emb @ T[:-1].T, dim=-1)

        return run


def _build(name: str, base: SCANConfig, **kwargs) -> SCAN:
    """kwargs: SCANConfig fields (architecture overrides, e.g. for a tiny test configuration) and `protocol`."""
    protocol = kwargs.pop("protocol", None)
    cfg = replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    return SCAN(cfg, protocol, name=name).eval()


@register_model("scan_vit_l_14")
def scan_vit_l_14(**kwargs) -> SCAN:
    """SCAN, Swin-B + two CLIP ViT-L/14 towers (configs/scan_vitL.yaml; SCAN.pth)."""
    return _build("scan_vit_l_14", SCAN_L, **kwargs)


@register_model("scan_vit_b_16")
def scan_vit_b_16(**kwargs) -> SCAN:
    """SCAN, Swin-B + two CLIP ViT-B/16 towers (configs/scan_vitB.yaml; SCAN-vitB.pth)."""
    return _build("scan_vit_b_16", SCAN_B, **kwargs)
