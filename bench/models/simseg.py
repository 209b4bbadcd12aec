"""SimSeg / ZSSeg ("A Simple Baseline for Open-Vocabulary Semantic Segmentation with Pre-trained
Vision-language Model", Xu et al., ECCV 2022, arXiv 2112.14757; code: MendelXu/zsseg.baseline).

The published cross-dataset model (trained on COCO-Stuff-156) is a two-stage segmenter:

1. a MaskFormer proposal generator: ResNet-101c backbone (DeepLab 3-conv stem with 128 output channels,
   frozen BN, multi-grid [1, 2, 4] in res5), the plain FPN `BasePixelDecoder` (GroupNorm, 256 ch) and a 6-layer
   post-norm DETR decoder with 100 queries on res5. Each query gives a 512-d CLIP-space class embedding (MLP
   256→1024→512) and a mask; class logits are 100·cos(embedding, text features of the K classes + a learned
   "no-object" embedding);
2. a frozen CLIP ViT-B/16 region classifier: every proposal is binarised at `mask_thr`; each non-empty one is cut
   out as its tight bounding box from the resized (unpadded, un-normalised) image, the pixels outside the mask are
   filled with CLIP's mean colour, the crop is CLIP-normalised and bicubic-resized to 224×224 (aspect ratio not
   kept), and CLIP scores it against the same text features (the no-object column dropped before the softmax).

The two class distributions are ensembled per query as p_maskformer^(1−w) · p_clip^w (queries with an empty mask
keep p_clip = 1), and the per-pixel score is Σ_q P[q, c] · sigmoid(mask_q) (soft masks, no argmax over queries).
The text classifier is the ViLD prompt ensemble (14 templates; per-template L2-normalise, mean, L2-normalise).

The module tree reproduces the published state_dict exactly: 982 keys, 210,900,068 elements, including the CLIP
weights (`clip_adapter.clip_model.*`), CLIP's pixel mean/std (`clip_adapter.pixel_mean/pixel_std`) and the
training-only `criterion.empty_weight` (157 = 156 COCO classes + no-object), registered here as a buffer so a
strict load is clean. The checkpoint is the detectron2 v2 layout (`sem_seg_head.pixel_decoder.*`); the official
head's hook that renames pre-v2 keys (`pixel_decoder.pixel_decoder.*`) does not apply to it.

Protocol (detectron2 test mapper of the official configs): short side 512, long side ≤ 2048, PIL bilinear; the
MaskFormer input is normalised with ImageNet mean/std (0..255 scale) and zero-padded to a multiple of 32. The
CLIP crops are cut from the un-normalised uint8 image: `forward` recovers it exactly from the normalised padded
batch (x·std + mean, rounded to the uint8 grid, unpadded).

Per-dataset settings (plain attributes; `model.configure(mask_thr=..., ensemble_weight=...)`):

    mask_thr          MODEL.CLIP_ADAPTER.MASK_THR (strict `sigmoid > mask_thr` binarisation for the crops)
    ensemble_weight   MODEL.CLIP_ADAPTER.CLIP_ENSEMBLE_WEIGHT, w above (w ≤ 0: CLIP alone on non-empty
                      queries, as the official code does; no shipped config uses it)
    clip_ensemble     MODEL.CLIP_ADAPTER.CLIP_ENSEMBLE (True in every test config; False = MaskFormer alone)
    crop_batch_size   crops per CLIP forward (memory knob only; 100 = all crops of an image in one forward)

Official values (MendelXu/zsseg.baseline @ d77c3af72cc706125698d2538f3b14ba3d9b58aa, MASK_THR at line 19 and
CLIP_ENSEMBLE_WEIGHT at line 23 of each yaml; peer configs from better-chao/perceptual_abilities_evaluation
configs/Simple-baseline/zero-shot-config/*.yaml, same lines, commits ab2b183e / fcc326fa):

    dataset   mask_thr  ensemble_weight  source
    A-150     0.4       0.5    configs/ade20k-150/cross_dataset_test_only.yaml (0.5 before commit aa327d4)
    A-847     0.3       0.7    configs/ade20k-847/cross_dataset_test_only.yaml
    PC-59     0.5       0.4    configs/pcontext-59/cross_dataset_test_only.yaml
    PC-459    0.5       0.4    peer pcontect-459-config.yaml
    PAS-20    0.5       0.8    peer pas-20-config.yaml
    PAS-20b   0.5       0.8    peer pas-20g-config.yaml
    (Cityscapes-19: 0.3 / 0.4, short side 1024, configs/cityscapes-19/...; not in this benchmark)

The builder's defaults are the A-150 values (the golden fixtures were made with them).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench import BenchError
from bench.models.base import OVSegModel, Protocol
from bench.models.clip import CLIP_MEAN_FILL, VILD_TEMPLATES, CLIPModel, clip_pixel_buffers, encode_with_templates
from bench.models.common import (IMAGENET_MEAN, IMAGENET_STD, MLP, ConvNorm, EmptyWeightCriterion, mask_boxes,
                                 sine_position_embedding)
from bench.models.registry import register_model

TEMPERATURE = 100.0  # hard-coded in ClipAdapter.get_sim_logits (not CLIP's logit_scale)
CROP_SIZE = 224


# ---------------------------------------------------------------------------------------------------------------
# ResNet-101c (detectron2 names: stem.conv1..3, res2..res5.<block>.{conv1,conv2,conv3,shortcut}[.norm])
# ---------------------------------------------------------------------------------------------------------------
class FrozenBatchNorm2d(nn.Module):
    """detectron2's FrozenBatchNorm2d: four buffers, `F.batch_norm(training=False, eps=1e-5)`."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class DeepLabStem(nn.Module):
    """Three 3×3 convs (3→64 stride 2, 64→64, 64→128), each FrozenBN + ReLU, then 3×3/2 max-pool: stride 4."""

    def __init__(self, out_channels: int = 128):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = ConvNorm(3, mid, 3, stride=2, padding=1, norm=FrozenBatchNorm2d(mid), relu=True)
        self.conv2 = ConvNorm(mid, mid, 3, padding=1, norm=FrozenBatchNorm2d(mid), relu=True)
        self.conv3 = ConvNorm(mid, out_channels, 3, padding=1, norm=FrozenBatchNorm2d(out_channels), relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.conv1(x)))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride and dilation here: STRIDE_IN_1X1 False) → 1×1, projection shortcut when in ≠ out."""

    def __init__(self, in_ch: int, out_ch: int, width: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.shortcut = (ConvNorm(in_ch, out_ch, 1, stride=stride, norm=FrozenBatchNorm2d(out_ch))
                         if in_ch != out_ch else None)
        self.conv1 = ConvNorm(in_ch, width, 1, norm=FrozenBatchNorm2d(width), relu=True)
        self.conv2 = ConvNorm(width, width, 3, stride=stride, padding=dilation, dilation=dilation,
                              norm=FrozenBatchNorm2d(width), relu=True)
        self.conv3 = ConvNorm(width, out_ch, 1, norm=FrozenBatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(self.conv1(x)))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNetDeepLab(nn.Module):
    """`build_resnet_deeplab_backbone` with DEPTH 101, STEM_TYPE deeplab, STEM_OUT_CHANNELS 128,
    RES5_DILATION 1 and RES5_MULTI_GRID [1, 2, 4]: res5 keeps its stride 2 (output stride 32) and its three
    blocks use dilation 1, 2, 4 in their 3×3 conv. Returns {'res2': /4, 'res3': /8, 'res4': /16, 'res5': /32}."""

    def __init__(self, blocks: tuple[int, ...] = (3, 4, 23, 3), stem_out: int = 128, width: int = 64,
                 res5_multi_grid: tuple[int, ...] = (1, 2, 4)):
        super().__init__()
        self.stem = DeepLabStem(stem_out)
        in_ch, out_ch = stem_out, width * 4
        self.stage_names = []
        for i, n in enumerate(blocks):
            name = f"res{i + 2}"
            dilations = list(res5_multi_grid) if i == 3 else [1] * n
            stage = nn.Sequential(*[
                Bottleneck(in_ch if b == 0 else out_ch, out_ch, width,
                           stride=2 if (b == 0 and i > 0) else 1, dilation=dilations[b])
                for b in range(n)])
            self.add_module(name, stage)
            self.stage_names.append(name)
            in_ch, out_ch, width = out_ch, out_ch * 2, width * 2

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        out = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            out[name] = x
        return out


# ---------------------------------------------------------------------------------------------------------------
# MaskFormer head: BasePixelDecoder + DETR decoder predictor (names as in the checkpoint)
# ---------------------------------------------------------------------------------------------------------------
class BasePixelDecoder(nn.Module):
    """Plain FPN: layer_4 (3×3, GN, ReLU) on res5; top-down adapter_i (1×1, GN) + nearest upsample, layer_i
    (3×3, GN, ReLU) for res4/res3/res2 (i = 3/2/1); mask_features = 3×3 conv with bias on the stride-4 map."""

    def __init__(self, in_channels: tuple[int, ...] = (256, 512, 1024, 2048), dim: int = 256, mask_dim: int = 256):
        super().__init__()
        last = len(in_channels)
        for i, c in enumerate(in_channels, start=1):
            if i < last:
                self.add_module(f"adapter_{i}", ConvNorm(c, dim, 1, norm=nn.GroupNorm(32, dim)))
            self.add_module(f"layer_{i}", ConvNorm(c if i == last else dim, dim, 3, padding=1,
                                                   norm=nn.GroupNorm(32, dim), relu=True))
        self.mask_features = nn.Conv2d(dim, mask_dim, 3, padding=1)
        self.num_levels = last

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        n = self.num_levels
        y = getattr(self, f"layer_{n}")(feats[f"res{n + 1}"])
        for i in range(n - 1, 0, -1):
            lateral = getattr(self, f"adapter_{i}")(feats[f"res{i + 1}"])
            y = getattr(self, f"layer_{i}")(lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest"))
        return self.mask_features(y)


class DecoderLayer(nn.Module):
    """DETR post-norm decoder layer: self-attn (q=k=tgt+query_pos) → norm1 → cross-attn (q=tgt+query_pos,
    k=memory+pos, v=memory) → norm2 → FFN (ReLU) → norm3. Sequence-first tensors [L, B, C]."""

    def __init__(self, d_model: int = 256, nhead: int = 8, dim_ff: int = 2048):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, dim_ff)
        self.linear2 = nn.Linear(dim_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, k, value=tgt, need_weights=False)[0])
        tgt2 = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory, need_weights=False)[0]
        tgt = self.norm2(tgt + tgt2)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class TransformerDecoder(nn.Module):
    def __init__(self, num_layers: int = 6, d_model: int = 256, nhead: int = 8, dim_ff: int = 2048):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, nhead, dim_ff) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, pos, query_pos):
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
        return self.norm(tgt)


class DETRTransformer(nn.Module):
    """ENC_LAYERS 0: the memory is the projected res5 tokens themselves, so only `decoder` holds weights."""

    def __init__(self, **kwargs):
        super().__init__()
        self.decoder = TransformerDecoder(**kwargs)


class ZeroShotPredictor(nn.Module):
    """`ZeroShotTransformerPredictor` on res5: input_proj 1×1 2048→256, 100 learned queries, 6 decoder layers;
    heads on the last (normed) decoder output: class_embed MLP 256→1024→512, mask_embed MLP 256→256→256→256."""

    def __init__(self, in_channels: int = 2048, hidden: int = 256, num_queries: int = 100, nheads: int = 8,
                 dim_ff: int = 2048, dec_layers: int = 6, mask_dim: int = 256, embed_dim: int = 512,
                 embed_hidden: int = 1024):
        super().__init__()
        self.transformer = DETRTransformer(num_layers=dec_layers, d_model=hidden, nhead=nheads, dim_ff=dim_ff)
        self.query_embed = nn.Embedding(num_queries, hidden)
        self.input_proj = nn.Conv2d(in_channels, hidden, 1)
        self.mask_embed = MLP(hidden, hidden, mask_dim, 3)
        self.class_embed = MLP(hidden, embed_hidden, embed_dim, 2)

    def forward(self, res5: torch.Tensor, mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> class embeddings [B, Q, 512] (not normalised), mask logits [B, Q, H/4, W/4]."""
        b, _, h, w = res5.shape
        pos = sine_position_embedding(res5, self.query_embed.embedding_dim // 2).flatten(2).permute(2, 0, 1)
        memory = self.input_proj(res5).flatten(2).permute(2, 0, 1)
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, b, 1)
        hs = self.transformer.decoder(torch.zeros_like(query_pos), memory, pos, query_pos).transpose(0, 1)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(hs), mask_features)
        return self.class_embed(hs), masks


class MaskFormerHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.pixel_decoder = BasePixelDecoder()
        self.predictor = ZeroShotPredictor()


# ---------------------------------------------------------------------------------------------------------------
def class_logits(embed: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """100·cos(embedding, text rows) with both sides cast to fp32: the cached text features are fp32 (what
    encode_with_templates returns, from a tower in the model's dtype) and the embeddings are in the model's dtype,
    so a bf16 model's two inputs meet (under autocast the product itself is autocast's); Q x 512 x (K+1) MACs."""
    return TEMPERATURE * normalize(embed.float()) @ text.float().T


# CLIP ViT-B/16 (OpenAI layout: text tower at the top level, image tower under `visual`) and the adapter
# ---------------------------------------------------------------------------------------------------------------
def make_clip() -> CLIPModel:
    """OpenAI CLIP ViT-B/16 with QuickGELU: `forward(tokens)` is the text tower, `visual(images)` the image tower."""
    return CLIPModel(embed_dim=512, image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                     vision_heads=12, text_width=512, text_layers=12, text_heads=8)


class ClipAdapter(nn.Module):
    """`MaskFormerClipAdapter`: the frozen CLIP, the learned no-object embedding, CLIP's pixel statistics (×255)."""

    def __init__(self):
        super().__init__()
        self.clip_model = make_clip()
        self.non_object_embedding = nn.Parameter(torch.randn(1, 512) * 512 ** -0.5)
        clip_pixel_buffers(self)
        # MASK_FILL "mean": 255·mean computed in double precision, as the official list comprehension does
        self.register_buffer("mask_fill", torch.tensor(CLIP_MEAN_FILL).reshape(3, 1, 1), persistent=False)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dim (the official `normalize_feature`; no epsilon)."""
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class SimSeg(OVSegModel):
    """ZeroShotMaskFormer (R101c + CLIP ViT-B/16, vild prompts, CLIP ensemble), inference only."""

    def __init__(self, protocol: Protocol | None = None, mask_thr: float = 0.4, ensemble_weight: float = 0.5,
                 clip_ensemble: bool = True, crop_batch_size: int = 100, num_train_classes: int = 156):
        super().__init__(protocol or Protocol(short_side=512, max_size=2048, size_divisibility=32,
                                              pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD))
        self.backbone = ResNetDeepLab()
        self.sem_seg_head = MaskFormerHead()
        self.criterion = EmptyWeightCriterion(num_train_classes)  # 156 ones, then the no-object weight 0.1
        self.clip_adapter = ClipAdapter()
        self.mask_thr = mask_thr
        self.ensemble_weight = ensemble_weight
        self.clip_ensemble = clip_ensemble
        self.crop_batch_size = crop_batch_size
        self.register_buffer("class_text_features", torch.empty(0, 512), persistent=False)

    # -- vocabulary -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_vocabulary(self, class_names: list[str]) -> torch.Tensor:
        """ViLD-template text classifier of the (stripped) class names, cached: [K, 512], L2-normalised.
        A synonym string such as "road, route" is one class, formatted into the templates whole."""
        names = [c.strip() for c in class_names]
        self.class_text_features = encode_with_templates(self.clip_adapter.clip_model, names, list(VILD_TEMPLATES))
        self.vocabulary = names
        return self.class_text_features

    def text_features(self) -> torch.Tensor:
        """[K+1, 512]: the cached class rows and the normalised no-object embedding as the last row."""
        if self.vocabulary is None:
            raise BenchError("SimSeg: call encode_vocabulary(class_names) before running the model")
        return torch.cat([self.class_text_features, normalize(self.clip_adapter.non_object_embedding)], dim=0)

    # -- parts ------------------------------------------------------------------------------------------------
    def proposals(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """MaskFormer on the normalised padded batch: res5, mask_features, class_embed [B,Q,512], mask_pred."""
        feats = self.backbone(x)
        mask_features = self.sem_seg_head.pixel_decoder(feats)
        class_embed, mask_pred = self.sem_seg_head.predictor(feats["res5"], mask_features)
        return {"res5": feats["res5"], "mask_features": mask_features, "class_embed": class_embed,
                "mask_pred": mask_pred}

    @staticmethod
    def mask_logits_at(mask_pred: torch.Tensor, padded_size: tuple[int, int],
                       image_size: tuple[int, int]) -> torch.Tensor:
        """[Q, h/4, w/4] mask logits -> [Q, h, w]: bilinear to the padded size, then the padding cropped away."""
        up = F.interpolate(mask_pred[None], size=tuple(padded_size), mode="bilinear", align_corners=False)[0]
        return up[:, :image_size[0], :image_size[1]]

    def recover_image(self, x: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Normalised padded [3, Hp, Wp] -> the resized float image [3, h, w] on the 0..255 uint8 grid, which is
        what the official region classifier crops from."""
        h, w = image_size
        return (x[:, :h, :w] * self.pixel_std + self.pixel_mean).round_().clamp_(0, 255)

    def region_crops(self, image: torch.Tensor, bin_masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Masked bbox crops [N, 3, 224, 224]: inside the mask the image, outside 255·CLIP mean; CLIP-normalised;
        each crop bicubic-resized to 224×224 (align_corners False, no antialias), aspect ratio not kept."""
        mean, std, fill = self.clip_adapter.pixel_mean, self.clip_adapter.pixel_std, self.clip_adapter.mask_fill
        crops = []
        for (x0, y0, x1, y1), m in zip(boxes.tolist(), bin_masks):
            region = torch.where(m[None, y0:y1, x0:x1], image[:, y0:y1, x0:x1], fill)[None]
            crops.append(F.interpolate((region - mean) / std, size=(CROP_SIZE, CROP_SIZE), mode="bicubic"))
        return torch.cat(crops) if crops else image.new_zeros(0, 3, CROP_SIZE, CROP_SIZE)

    def encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """CLIP image tower on all crops of an image (chunks of `crop_batch_size`): raw embeddings [N, 512]."""
        visual = self.clip_adapter.clip_model.visual
        if crops.shape[0] == 0:
            return crops.new_zeros(0, visual.proj.shape[1])
        return torch.cat([visual(chunk) for chunk in crops.split(max(1, int(self.crop_batch_size)))])

    def classify_regions(self, image: torch.Tensor, bin_masks: torch.Tensor,
                         text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Region path on given binary masks [Q, h, w] (non-empty rows are classified): boxes, crops, raw CLIP
        embeddings and 100·cos logits over K+1 text rows."""
        valid = bin_masks.flatten(1).any(dim=1)
        boxes = mask_boxes(bin_masks[valid])
        crops = self.region_crops(image, bin_masks[valid], boxes)
        embed = self.encode_crops(crops)
        return {"valid": valid, "region_boxes": boxes.float(), "crops": crops, "clip_image_embed_raw": embed,
                "clip_logits": class_logits(embed, text)}

    def ensemble(self, mask_cls_logits: torch.Tensor, valid: torch.Tensor | None,
                 clip_logits: torch.Tensor | None) -> torch.Tensor:
        """`semantic_inference` class part for one image: [Q, K+1] MaskFormer logits (+ CLIP logits of the valid
        queries) -> per-query class weights [Q, K] (cross-dataset branch: no `trainable_flag`)."""
        p_mf = F.softmax(mask_cls_logits, dim=-1)[:, :-1]
        if not self.clip_ensemble or clip_logits is None:
            return p_mf
        p_clip = F.softmax(clip_logits[:, :-1], dim=-1).to(p_mf.dtype)
        w = float(self.ensemble_weight)
        if w <= 0:  # official: CLIP alone, invalid queries dropped (zero weight is the same sum)
            out = p_mf.new_zeros(p_mf.shape)
            out[valid] = p_clip
            return out
        p_hat = p_mf.new_ones(p_mf.shape)
        p_hat[valid] = p_clip
        return torch.pow(p_mf, 1 - w) * torch.pow(p_hat, w)

    # -- forward / postprocess ----------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor, image_sizes: list[tuple[int, int]], skip_crops: bool = False) -> dict:
        """Normalised padded batch [B,3,Hp,Wp] -> raw outputs (per-image lists for the crop branch).

        `skip_crops=True` runs everything except building the crops and the CLIP image tower (cost accounting:
        the per-crop part is `crop_cost_fn`); `num_crops` is reported either way, the CLIP fields are None and
        `ensembled_probs` is then the MaskFormer probabilities alone.
        """
        text = self.text_features()
        out = self.proposals(x)
        out["text_features"] = text
        out["mask_cls_logits"] = class_logits(out["class_embed"], text)
        out["padded_size"] = tuple(x.shape[-2:])
        fields = ("valid", "region_boxes", "clip_image_embed_raw", "clip_logits")
        for f in fields:
            out[f] = []
        out["num_crops"], probs = [], []
        for i, size in enumerate(image_sizes):
            region = dict.fromkeys(fields)
            if self.clip_ensemble:
                masks = self.mask_logits_at(out["mask_pred"][i], out["padded_size"], size).sigmoid()
                bin_masks = masks > self.mask_thr
                if skip_crops:
                    valid = bin_masks.flatten(1).any(dim=1)
                    region.update(valid=valid, region_boxes=mask_boxes(bin_masks[valid]).float())
                else:
                    region = self.classify_regions(self.recover_image(x[i], size), bin_masks, text)
                del masks, bin_masks
            for f in fields:
                out[f].append(region[f])
            out["num_crops"].append(0 if region["valid"] is None else int(region["valid"].sum()))
            probs.append(self.ensemble(out["mask_cls_logits"][i], region["valid"], region["clip_logits"]))
        out["ensembled_probs"] = torch.stack(probs)
        return out

    @torch.no_grad()
    def postprocess(self, outputs: dict, image_sizes: list[tuple[int, int]],
                    output_sizes: list[tuple[int, int]], class_chunk: int = 64) -> list[torch.Tensor]:
        """S[c] = Σ_q P[q, c] · sigmoid(mask_q) at the resized size, then bilinear to the output size
        (`sem_seg_postprocess`); classes in chunks so a large vocabulary never holds two full-size copies."""
        results = []
        for i, (size, out_size) in enumerate(zip(image_sizes, output_sizes)):
            masks = self.mask_logits_at(outputs["mask_pred"][i].float(), outputs["padded_size"], size).sigmoid()
            probs = outputs["ensembled_probs"][i].float()     # fp32 scores in every precision, as SAN's
            chunks = []
            for c in range(0, probs.shape[1], class_chunk):
                s = torch.einsum("qc,qhw->chw", probs[:, c:c + class_chunk], masks)
                chunks.append(F.interpolate(s[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0])
            results.append(torch.cat(chunks))
        return results

    # -- cost accounting -----------------------------------------------------------------------------------------
    def crop_cost_fn(self, x: torch.Tensor, image_sizes: list[tuple[int, int]], n_crops: int,
                     image_index: int = 0) -> Callable[[], torch.Tensor]:
        """A zero-arg callable running the per-crop part for `n_crops` crops of one image of the batch: crop
        building (mask fill, CLIP normalisation, bicubic to 224), the CLIP image tower and the text logits.
        The crops are full-image boxes (the largest crop; the cost of the CLIP forward does not depend on the box).
        `forward(..., skip_crops=True)` + this = the full forward."""
        text = self.text_features()
        size = image_sizes[image_index]
        image = self.recover_image(x[image_index], size)
        bin_masks = torch.ones(1, *size, dtype=torch.bool, device=x.device).expand(n_crops, -1, -1)
        boxes = torch.tensor([[0, 0, size[1], size[0]]] * n_crops, dtype=torch.int64)

        @torch.no_grad()
        def run() -> torch.Tensor:
            embed = self.encode_crops(self.region_crops(image, bin_masks, boxes))
            return class_logits(embed, text)

        return run


@register_model("simseg_vit_b_16")
def simseg_vit_b_16(**kwargs) -> SimSeg:
    """The published cross-dataset SimSeg (R101c + CLIP ViT-B/16), un-loaded, in eval mode.

    kwargs: protocol (a `Protocol`; default short 512 / max 2048 / pad 32 / ImageNet mean-std), mask_thr,
    ensemble_weight, clip_ensemble, crop_batch_size, num_train_classes (156: sizes `criterion.empty_weight`).
    """
    allowed = {"protocol", "mask_thr", "ensemble_weight", "clip_ensemble", "crop_batch_size", "num_train_classes"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise BenchError(f"simseg_vit_b_16: unknown argument(s) {unknown}; allowed: {sorted(allowed)}")
    return SimSeg(**kwargs).eval()
