"""Small pieces that several model families share, each with the state_dict names of the official code.

    Mlp                     timm's ViT / Swin MLP: fc1, GELU, fc2 (SAN side adapter, Swin)
    Attention, Block        timm's pre-norm ViT block (SAN's side adapter)
    LayerNorm2d             LayerNorm over the channels of a [B, C, H, W] map
    MLP                     DETR's / Mask2Former's head MLP: `layers.{i}` Linear (or 1x1 conv), ReLU between
    ConvNorm                detectron2's `Conv2d`: a convolution with a child `norm` and an optional ReLU
    EmptyWeightCriterion    the one persistent buffer of the training criterion, `empty_weight`
    sine_position_embedding DETR's PositionEmbeddingSine(normalize=True) of an unmasked map
    mask_boxes              detectron2's `BitMasks.get_bounding_boxes` (through torchvision's `masks_to_boxes`)
    IMAGENET_MEAN / _STD    detectron2's default pixel statistics (0..255)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.attention import attention


class Mlp(nn.Module):
    """timm's `Mlp`: fc1 -> GELU (exact) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """timm's ViT `Attention` (qkv, proj; no q/k norm), through `bench.models.attention.attention`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """timm's pre-norm ViT `Block` (LayerNorm eps 1e-6, no layer scale), same state_dict names (norm1,
    attn.qkv, attn.proj, norm2, mlp.fc1/fc2)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a [B, C, H, W] map (detectron2 / SAN `LayerNorm`, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MLP(nn.Module):
    """`num_layers` Linear layers (or 1x1 convs) under `layers.{i}`, ReLU between them (DETR's MLP)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int, conv: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        layer = (lambda i, o: nn.Conv2d(i, o, kernel_size=1)) if conv else nn.Linear
        self.layers = nn.ModuleList(layer(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class ConvNorm(nn.Conv2d):
    """detectron2's `Conv2d`: convolution, then an optional child `norm`, then an optional ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, bias: bool = False, norm: nn.Module | None = None, relu: bool = False):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=bias)
        self.norm = norm
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.relu else x


class EmptyWeightCriterion(nn.Module):
    """Training-only criterion, kept for its persistent `empty_weight` buffer (ones, then the no-object weight),
    which the published checkpoints carry: a strict load needs it."""

    def __init__(self, num_classes: int, no_object_weight: float = 0.1):
        super().__init__()
        weight = torch.ones(num_classes + 1)
        weight[-1] = no_object_weight
        self.register_buffer("empty_weight", weight)


def sine_position_embedding(x: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's PositionEmbeddingSine(normalize=True, scale 2*pi, eps 1e-6) of an unmasked [B, C, H, W] map ->
    [B, 2*num_feats, H, W] in x's dtype (computed in fp32): channels [y-part, x-part], each interleaving sin / cos."""
    b, _, h, w = x.shape
    not_mask = torch.ones((b, h, w), device=x.device, dtype=torch.bool)
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


# detectron2's default MODEL.PIXEL_MEAN / PIXEL_STD (ImageNet, 0..255, RGB): the segmenter input of SimSeg and SCAN
# (zsseg.baseline and SCAN configs leave them at these values).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

_BOX_END = torch.tensor([0, 0, 1, 1])


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of non-empty binary masks [N, H, W] -> int64 [N, 4] (x0, y0, x1, y1), x1 / y1 exclusive:
    detectron2's `BitMasks.get_bounding_boxes`, i.e. torchvision's inclusive `masks_to_boxes` + 1 at the end.
    torchvision is imported here, not at module level: it pulls in torch._dynamo (about 2 s), which every
    `python -m bench` process would otherwise pay for."""
    from torchvision.ops import masks_to_boxes

    return masks_to_boxes(masks).long() + _BOX_END.to(masks.device)
