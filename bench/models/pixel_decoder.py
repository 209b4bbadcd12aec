"""Multi-scale deformable attention and Mask2Former's `MSDeformAttnPixelDecoder`, with their state_dict names.

    input_proj.{0,1,2}       1x1 conv + GroupNorm(32) on res5, res4, res3
    transformer              level_embed + `encoder.layers.{i}`: post-norm MSDeformAttn encoder layers (ReLU FFN)
    adapter_1, layer_1       one FPN level on res2 (1x1 / 3x3 ConvNorm with GroupNorm(32))
    mask_features            1x1 conv -> the per-pixel mask embedding at /4

The deformable attention samples with bilinear `grid_sample` (the official CUDA kernel's pure-PyTorch reference,
`ms_deform_attn_core_pytorch`), so it runs on any device. Used by SCAN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.common import ConvNorm, sine_position_embedding


def ms_deform_attn_core(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention by bilinear `grid_sample` (zeros padding, align_corners=False).

    value [N, S, M, D]; locations [N, Lq, M, L, P, 2] in [0, 1] (x, y); weights [N, Lq, M, L, P] -> [N, Lq, M*D].
    Runs in fp32 whatever the model's dtype (the official pixel decoder runs outside autocast, see
    MSDeformAttnPixelDecoder.forward): bf16 sampling locations are off by up to a third of a pixel on the finest
    level, and CPU `grid_sample` in bf16 returned NaN and garbage on the transposed value view below (torch 2.14.1).
    """
    dtype = value.dtype
    value, locations, weights = value.float(), locations.float(), weights.float()
    n, _, m, d = value.shape
    _, lq, _, nl, p, _ = locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)                 # N*M, Lq, P, 2
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = weights.transpose(1, 2).reshape(n * m, 1, lq, nl * p)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).to(dtype)


class MSDeformAttn(nn.Module):
    def __init__(self, dim: int, levels: int, heads: int, points: int):
        super().__init__()
        self.levels, self.heads, self.points = levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, source: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        n, lq, c = query.shape
        m, nl, p = self.heads, self.levels, self.points
        value = self.value_proj(source).view(n, source.shape[1], m, c // m)
        offsets = self.sampling_offsets(query).view(n, lq, m, nl, p, 2)
        weights = F.softmax(self.attention_weights(query).view(n, lq, m, nl * p), -1).view(n, lq, m, nl, p)
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        locations = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn_core(value, shapes, locations, weights))


class DeformEncoderLayer(nn.Module):
    """Post-norm: x = norm1(x + deform_attn(x + pos)); x = norm2(x + ffn(x)), ReLU."""

    def __init__(self, dim: int, ffn: int, levels: int, heads: int, points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x, pos, reference, shapes):
        x = self.norm1(x + self.self_attn(x + pos, reference, x, shapes))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class DeformEncoder(nn.Module):
    """`transformer` of the pixel decoder: level embeddings + `encoder.layers`."""

    def __init__(self, dim: int, ffn: int, layers: int, levels: int, heads: int, points: int):
        super().__init__()
        self.level_embed = nn.Parameter(torch.zeros(levels, dim))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(DeformEncoderLayer(dim, ffn, levels, heads, points) for _ in range(layers))

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], batch: int, device: torch.device) -> torch.Tensor:
        """Pixel centres in [0, 1] of every level, repeated for every level: [B, sum HW, L, 2] (x, y)."""
        refs = []
        for h, w in shapes:
            ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                    torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                                    indexing="ij")
            refs.append(torch.stack((rx.reshape(-1) / float(w), ry.reshape(-1) / float(h)), -1))
        ref = torch.cat(refs, 0)[None, :, None].expand(batch, -1, len(shapes), -1)
        return ref

    def forward(self, srcs: list[torch.Tensor], pos: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
        shapes = [(s.shape[2], s.shape[3]) for s in srcs]
        x = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        p = torch.cat([q.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1) for i, q in enumerate(pos)], 1)
        ref = self.reference_points(shapes, x.shape[0], x.device).to(x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, p, ref, shapes)
        return x, shapes


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable encoder on res5/res4/res3, one FPN level on res2, 1x1 mask features (Mask2Former's defaults:
    conv_dim 256, mask_dim 256, 6 encoder layers, FFN 1024, 8 heads, 4 points)."""

    def __init__(self, in_dims: list[int], conv_dim: int = 256, mask_dim: int = 256, enc_layers: int = 6,
                 enc_ffn: int = 1024, heads: int = 8, points: int = 4):
        super().__init__()
        c = conv_dim
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(d, c, 1), nn.GroupNorm(32, c))
                                        for d in in_dims[1:][::-1])   # res5, res4, res3
        self.transformer = DeformEncoder(c, enc_ffn, enc_layers, len(in_dims) - 1, heads, points)
        self.mask_features = nn.Conv2d(c, mask_dim, 1)
        self.adapter_1 = ConvNorm(in_dims[0], c, 1, norm=nn.GroupNorm(32, c))
        self.layer_1 = ConvNorm(c, c, 3, padding=1, norm=nn.GroupNorm(32, c), relu=True)

    def forward(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Outside autocast, in the weights' dtype: Mask2Former's `forward_features` is `@autocast(enabled=False)`
        and casts its inputs with `.float()` (msdeformattn.py), so under autocast this stage runs in fp32."""
        device_type = next(iter(feats.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            dtype = self.mask_features.weight.dtype
            return self._forward({k: v.to(dtype) for k, v in feats.items()})

    def _forward(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        names = ["res5", "res4", "res3"]
        srcs = [proj(feats[n]) for proj, n in zip(self.input_proj, names)]
        pos = [sine_position_embedding(feats[n], self.transformer.level_embed.shape[1] // 2) for n in names]
        y, shapes = self.transformer(srcs, pos)
        b = y.shape[0]
        out = [z.transpose(1, 2).reshape(b, -1, h, w) for z, (h, w) in zip(y.split([h * w for h, w in shapes], 1),
                                                                          shapes)]
        lateral = self.adapter_1(feats["res2"])
        top = F.interpolate(out[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        out.append(self.layer_1(lateral + top))
        return self.mask_features(out[-1]), out[:3]

