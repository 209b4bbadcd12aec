"""CLIP building blocks shared by every model family, with open_clip's state_dict names.

The blocks reproduce the parameter names and shapes of open_clip's `ResidualAttentionBlock`,
`VisionTransformer` and text tower (`attn.in_proj_weight`, `mlp.c_fc`, `ln_1`, `conv1`, `class_embedding`, ...),
so the published SAN / SimSeg / SCAN checkpoints load strictly, but they run batch-first and route attention
through `bench.models.attention.attention` (scaled_dot_product_attention, or bf16 GEMMs on the CPU) with an
optional additive bias (SAN's attention bias, causal text mask).
The tokenizer comes from open_clip (its BPE vocabulary ships inside the wheel; nothing is downloaded).

Also here, once for every family: OpenAI CLIP's pixel statistics, the 14 "vild" prompt templates, the two-tower
`CLIPModel` (text keys at the top level, image tower under `visual`) and the prompt-ensemble text classifier.

FLOP counting: on CPU `torch.utils.flop_counter` sees SDPA as 0 FLOPs; `bench.flops` gives the CPU flash kernel
a formula (and tests that attention is counted).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from bench import BenchError
from bench.models.attention import attention

# OpenAI CLIP pixel statistics (0..1 scale): open_clip constants OPENAI_DATASET_MEAN / STD; the same values in
# zsseg.baseline @ d77c3af mask_former/modeling/clip_adapter/utils.py L9-10 and SCAN's clip_adapter.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# 255 * mean in double precision (the official `[255.0 * c for c in PIXEL_MEAN]`): the fill outside a masked crop
CLIP_MEAN_FILL = tuple(255.0 * c for c in CLIP_MEAN)

# The "vild" prompt set, byte-exact (templates 2-5 have no trailing period, all others do). The three families'
# official copies are the same strings: MendelXu/SAN @ e19262d san/model/clip_utils/utils.py, zsseg.baseline
# @ d77c3af mask_former/modeling/clip_adapter/utils.py L93-108 (CLIP.VILD_PROMPT), yongliu20/SCAN @ 097fbbd
# scan/modeling/clip_adapter/text_template.py L95-110 ("vild", TEXT_TEMPLATES in both yamls).
VILD_TEMPLATES = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


def clip_pixel_buffers(module: nn.Module) -> None:
    """Register CLIP's pixel statistics x255 as the persistent [1, 3, 1, 1] buffers `pixel_mean` / `pixel_std`
    (the `clip_adapter.pixel_mean/pixel_std` keys of the SimSeg and SCAN checkpoints)."""
    module.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1) * 255.0)
    module.register_buffer("pixel_std", torch.tensor(CLIP_STD).reshape(1, 3, 1, 1) * 255.0)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI's CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        # no autograd graph: one buffer instead of three (fresh large buffers are page faults on CPU); same values
        return x.mul(1.702).sigmoid_().mul_(x)


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (as open_clip does), so bf16 runs stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float() if self.weight is not None else None,
                            self.bias.float() if self.bias is not None else None, self.eps).to(dtype)


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention's parameter layout (in_proj_weight [3C,C], out_proj) over batch-first SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, L, C]; attn_bias: additive, broadcastable to [B, heads, L, L]."""
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = attention(q, k, v, attn_bias)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act_layer: type[nn.Module]):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = act_layer()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x += attn(ln_1 x); x += mlp(ln_2 x). Keys as open_clip's."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act_layer: type[nn.Module] = QuickGELU):
        super().__init__()
        self.ln_1 = LayerNormFp32(width)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = LayerNormFp32(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act_layer)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_bias)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of blocks under the name `resblocks` (open_clip's `transformer.resblocks.N`)."""

    def __init__(self, width: int, layers: int, heads: int, act_layer: type[nn.Module] = QuickGELU):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, act_layer=act_layer) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_bias)
        return x


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Bicubic resize (align_corners=False) of a [prefix + g*g, C] positional table to `grid`; prefix kept."""
    prefix, table = pos[:num_prefix], pos[num_prefix:]
    g = int(round(table.shape[0] ** 0.5))
    if (g, g) == tuple(grid):
        return pos
    table = table.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table.float(), size=grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([prefix, table.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)], dim=0)


class VisionTransformer(nn.Module):
    """open_clip's ViT image tower: conv1, class_embedding, positional_embedding, ln_pre, transformer, ln_post, proj."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
                 act_layer: type[nn.Module] = QuickGELU):
        super().__init__()
        self.patch_size = patch_size
        self.heads = heads
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNormFp32(width)
        self.transformer = Transformer(width, layers, heads, act_layer)
        self.ln_post = LayerNormFp32(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image [B,3,H,W] (CLIP-normalised) -> tokens [B, 1+h*w, C] after ln_pre, and the grid (h, w)."""
        x = self.conv1(x)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + resize_pos_embed(self.positional_embedding, grid).to(x.dtype)
        return self.ln_pre(x), grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image [B,3,H,W] -> projected CLS embedding [B, output_dim] (not normalised)."""
        x, _ = self.embed(x)
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj


class TextTransformer(nn.Module):
    """open_clip's text tower: token_embedding, positional_embedding, transformer, ln_final, text_projection.

    `attn_mask` (the causal mask, -inf above the diagonal) is registered persistent or not to match the
    checkpoint that the owning model loads (SAN keeps it in its state_dict; plain open_clip does not).
    """

    def __init__(self, context_length: int, vocab_size: int, width: int, layers: int, heads: int, output_dim: int,
                 act_layer: type[nn.Module] = QuickGELU, persistent_attn_mask: bool = False):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, act_layer)
        self.ln_final = LayerNormFp32(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=persistent_attn_mask)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [N, 77] -> projected text embeddings [N, output_dim] (not normalised).

        Under the causal mask a token never sees later positions, so the padding after the last end-of-text token
        cannot change the output read at it: the sequence is cut there (same result, 4-6x less work for prompts).
        """
        eot = tokens.argmax(dim=-1)
        n = int(eot.max()) + 1
        tokens = tokens[:, :n]
        x = self.token_embedding(tokens) + self.positional_embedding[:n].to(self.token_embedding.weight.dtype)
        x = self.transformer(x, self.attn_mask[:n, :n])
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0]), eot]
        return x @ self.text_projection


class CLIPModel(TextTransformer):
    """A two-tower CLIP: the text tower's keys at the top level, the image tower under `visual`, `logit_scale`
    (the layout of open_clip's `CLIP` and of OpenAI's checkpoints). `forward(tokens)` is the text tower."""

    def __init__(self, embed_dim: int, image_size: int, patch_size: int, vision_width: int, vision_layers: int,
                 vision_heads: int, text_width: int, text_layers: int, text_heads: int, context_length: int = 77,
                 vocab_size: int = 49408, act_layer: type[nn.Module] = QuickGELU):
        super().__init__(context_length, vocab_size, text_width, text_layers, text_heads, embed_dim,
                         act_layer=act_layer)
        self.visual = VisionTransformer(image_size, patch_size, vision_width, vision_layers, vision_heads, embed_dim,
                                        act_layer=act_layer)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    """open_clip's SimpleTokenizer (the OpenAI BPE, shipped in the wheel): [N, context_length] int64."""
    return _open_clip_tokenizer().tokenize(texts, context_length=context_length)


@functools.cache
def _open_clip_tokenizer():
    """open_clip's tokenizer module alone (open_clip/tokenizer.py: its imports are ftfy, regex, numpy and torch),
    loaded from the installed package by path. `import open_clip` would also import its model zoo, timm and
    torchvision: about 1.8 s of every process that encodes a vocabulary here, for a function that needs none of
    them. The same file, the same tokens (tests/test_clip.py compares it with open_clip.tokenize)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise BenchError("open_clip_torch is not installed (its tokenizer encodes the class names): pip install -e .")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "tokenizer.py")
    module_spec = importlib.util.spec_from_file_location("ovseg_bench_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def encode_with_templates(text_tower: nn.Module, names: list[str], templates: list[str],
                          batch_size: int = 256) -> torch.Tensor:
    """Per class: normalise each template's embedding, average over templates, normalise again -> [K, E].

    Served from the on-disk text cache when the entry point has enabled it (bench.models.text_cache)."""
    from bench.models import text_cache

    device = next(text_tower.parameters()).device
    prompts = [t.format(name) for name in names for t in templates]

    def compute() -> torch.Tensor:
        tokens = tokenize(prompts).to(device)
        feats = torch.cat([text_tower(tokens[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])
        feats = F.normalize(feats.float(), dim=-1).view(len(names), len(templates), -1).mean(dim=1)
        return F.normalize(feats, dim=-1)

    return text_cache.cached(text_tower, prompts, compute).to(device)
