"""Dense CLIP: CLIP's zero-shot classifier applied to every patch token (no training, no masks).

The image tower runs on the padded image at its own resolution (positional table resized to the patch grid); the
last layer's patch tokens go through `ln_post` and the projection, their cosine with the class text embeddings
(templates averaged) times CLIP's logit scale gives per-patch class logits; their softmax over the classes is
upsampled to the padded size, cropped to the image and resized to the requested size.

Built from ovseg-bench's CLIP blocks, with open_clip's state_dict names under `clip.`: OpenAI's ViT-B/16 weights
(open_clip `ViT-B-16`, pretrained `openai`) load after prefixing their keys with `clip.`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.base import OVSegModel, Protocol
from bench.models.clip import TextTransformer, VisionTransformer, encode_with_templates

TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "there is a {} in the scene.")


class CLIP(TextTransformer):
    """open_clip's layout: the text tower at the top level, the image tower under `visual`, `logit_scale`."""

    def __init__(self, width: int, layers: int, heads: int, patch_size: int, text_width: int, text_layers: int,
                 text_heads: int, embed_dim: int):
        super().__init__(context_length=77, vocab_size=49408, width=text_width, layers=text_layers,
                         heads=text_heads, output_dim=embed_dim)
        self.visual = VisionTransformer(image_size=224, patch_size=patch_size, width=width, layers=layers,
                                        heads=heads, output_dim=embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


class DenseCLIP(OVSegModel):
    def __init__(self, clip: CLIP, protocol: Protocol, templates: tuple[str, ...] = TEMPLATES):
        super().__init__(protocol)
        self.clip = clip
        self.templates = tuple(templates)
        self.text_features: torch.Tensor | None = None

    @torch.no_grad()
    def encode_vocabulary(self, class_names: list[str]) -> torch.Tensor:
        """[K, E] normalised text embeddings (templates averaged); a name such as "road, route" is one class."""
        self.vocabulary = list(class_names)
        self.text_features = encode_with_templates(self.clip, self.vocabulary, list(self.templates))
        return self.text_features

    def forward(self, x: torch.Tensor, image_sizes: list[tuple[int, int]] | None = None) -> dict:
        """Padded CLIP-normalised batch [B, 3, Hp, Wp] -> per-patch class probabilities [B, K, Hp/p, Wp/p]."""
        if self.text_features is None:
            raise RuntimeError("DenseCLIP: call encode_vocabulary(class_names) first")
        visual = self.clip.visual
        tokens, grid = visual.embed(x.to(visual.proj.dtype))
        tokens = visual.transformer(tokens)[:, 1:]                              # patch tokens, CLS dropped
        patches = F.normalize((visual.ln_post(tokens) @ visual.proj).float(), dim=-1)
        logits = self.clip.logit_scale.exp().float() * patches @ self.text_features.to(patches).T
        probs = logits.softmax(dim=-1).transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return {"probs": probs, "padded_size": (x.shape[-2], x.shape[-1])}

    def postprocess(self, outputs: dict, image_sizes: list[tuple[int, int]],
                    output_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per image: bilinear to the padded size, crop to the image, bilinear to the output size -> [K, H0, W0]."""
        scores = []
        for probs, (h, w), size in zip(outputs["probs"], image_sizes, output_sizes):
            up = F.interpolate(probs[None], size=outputs["padded_size"], mode="bilinear", align_corners=False)
            up = up[..., :h, :w]
            if (h, w) != tuple(size):
                up = F.interpolate(up, size=tuple(size), mode="bilinear", align_corners=False)
            scores.append(up[0])
        return scores


def build(width: int = 768, layers: int = 12, heads: int = 12, patch_size: int = 16, text_width: int = 512,
          text_layers: int = 12, text_heads: int = 8, embed_dim: int = 512, templates: list[str] | None = None,
          protocol: Protocol | None = None) -> DenseCLIP:
    """Dense CLIP ViT-B/16 by default (the config's `builder_kwargs` override any of these)."""
    clip = CLIP(width, layers, heads, patch_size, text_width, text_layers, text_heads, embed_dim)
    protocol = protocol or Protocol(short_side=448, max_size=1792, size_divisibility=patch_size)
    return DenseCLIP(clip, protocol, tuple(templates or TEMPLATES)).eval()
