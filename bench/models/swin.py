"""Swin Transformer backbone as detectron2 / Mask2Former wrap it (`D2SwinTransformer`), with its state_dict names.

patch_embed (4x4 conv + LayerNorm), `layers.{i}` stages of (shifted-)window attention blocks with a relative
position bias (`relative_position_bias_table`, persistent `relative_position_index`), PatchMerging between stages,
and one LayerNorm `norm{i}` per output: {'res2': /4, 'res3': /8, 'res4': /16, 'res5': /32} feature maps.
Any input size: each block zero-pads its map to a multiple of the window (after norm1), as the official code does.
Used by SCAN (Swin-B: embed 128, depths 2-2-18-2, heads 4-8-16-32, window 12).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.common import Mlp


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, nW, ws*ws, C] (H, W multiples of ws)."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // ws) * (w // ws), ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    b, _, _, c = windows.shape
    x = windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def swin_relative_position_index(ws: int) -> torch.Tensor:
    """[ws*ws, ws*ws] index into the (2ws-1)^2 bias table for every token pair of a window."""
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.window, self.heads = window, heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", swin_relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B, nW, N, C]; shift_mask: [nW, N, N] of 0 / -100 or None."""
        b, nw, n, c = x.shape
        qkv = self.qkv(x).view(b * nw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                                 # B*nW, heads, N, d
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.heads).permute(2, 0, 1).contiguous()[None]  # 1, heads, N, N
        if shift_mask is not None:
            bias = bias + shift_mask[:, None].to(bias.dtype)                   # nW, heads, N, N
            bias = bias.repeat(b, 1, 1, 1) if b > 1 else bias
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # 4-D: the fast CPU kernel
        return self.proj(out.transpose(1, 2).reshape(b, nw, n, c))


class SwinBlock(nn.Module):
    """(Shifted-)window attention block; the map is zero-padded (after norm1) to a multiple of the window."""

    def __init__(self, dim: int, heads: int, window: int, shift: int):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor, h: int, w: int, shift_mask: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        ws = self.window
        y = self.norm1(x).view(b, h, w, c)
        y = F.pad(y, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        hp, wp = y.shape[1], y.shape[2]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, ws), shift_mask if self.shift else None)
        y = window_reverse(y, ws, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y[:, :h, :w].reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


def swin_shift_mask(h: int, w: int, ws: int, shift: int, device: torch.device) -> torch.Tensor:
    """[nW, ws*ws, ws*ws]: -100 between tokens that came from different regions of the cyclic shift, else 0."""
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    img = torch.zeros((1, hp, wp, 1), device=device)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = window_partition(img, ws)[0, :, :, 0]                       # nW, N
    diff = win[:, None, :] - win[:, :, None]
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, downsample: bool):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2)
                                    for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, h: int, w: int):
        mask = swin_shift_mask(h, w, self.window, self.window // 2, x.device)
        for blk in self.blocks:
            x = blk(x, h, w, mask)
        if self.downsample is None:
            return x, x, h, w
        return x, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int = 4):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Image [B, 3, H, W] -> normalised tokens [B, h*w, C] and the grid (h, w)."""
        p = self.patch
        x = self.proj(F.pad(x, (0, (p - x.shape[-1] % p) % p, 0, (p - x.shape[-2] % p) % p)))
        return self.norm(x.flatten(2).transpose(1, 2)), x.shape[2], x.shape[3]


class SwinBackbone(nn.Module):
    """D2SwinTransformer: res2..res5 feature maps, each through its own LayerNorm `norm{i}`."""

    def __init__(self, embed_dim: int, depths: tuple[int, ...], heads: tuple[int, ...], window: int):
        super().__init__()
        self.patch_embed = PatchEmbed(embed_dim)
        n = len(depths)
        self.dims = [embed_dim * 2 ** i for i in range(n)]
        self.layers = nn.ModuleList(SwinStage(self.dims[i], depths[i], heads[i], window, downsample=i < n - 1)
                                    for i in range(n))
        for i, d in enumerate(self.dims):
            self.add_module(f"norm{i}", nn.LayerNorm(d))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x, h, w = self.patch_embed(x)
        outs = {}
        for i, stage in enumerate(self.layers):
            out, x, nh, nw = stage(x, h, w)
            out = getattr(self, f"norm{i}")(out)
            outs[f"res{i + 2}"] = out.view(-1, h, w, self.dims[i]).permute(0, 3, 1, 2).contiguous()
            h, w = nh, nw
        return outs

