"""The small surface every model shows the harness, and the pre-processing they share.

A model is an `nn.Module` subclass of `OVSegModel`. The harness only ever does this (never branching on a name):

    model.encode_vocabulary(class_names)              # once per vocabulary; caches the text classifier
    x, image_sizes = model.preprocess(images_uint8)  # resize (PIL bilinear, detectron2 rule), normalise, pad
    outputs = model(x, image_sizes)                   # the `model` scope: padded normalised batch -> raw outputs
    scores = model.postprocess(outputs, image_sizes, output_sizes)   # list of [K, H0, W0] per-class scores

`model.predict(images_uint8)` chains the three for the `end_to_end` scope. Protocol knobs (short side, max
long side, size divisibility, mean/std) live on the instance and come from the model's config.

Models with a crop branch (SimSeg, SCAN) also take `forward(..., skip_crops=True)` (everything but the CLIP crop
forward) and expose `crop_cost_fn(x, image_sizes, n_crops)`, so `bench.profile` counts them as fixed + per-crop.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from bench.models.clip import CLIP_MEAN, CLIP_STD


@dataclass
class Protocol:
    """Test-time input protocol: shortest edge, cap on the long edge, padding multiple, pixel statistics (0..255)."""

    short_side: int = 640
    max_size: int = 2560
    size_divisibility: int = 32
    pixel_mean: tuple[float, float, float] = tuple(255.0 * c for c in CLIP_MEAN)   # CLIP's (SAN's input)
    pixel_std: tuple[float, float, float] = tuple(255.0 * c for c in CLIP_STD)


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge: scale the short side to `short`, cap the long side, round half up."""
    scale = short / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        rescale = max_size / max(newh, neww)
        newh, neww = newh * rescale, neww * rescale
    return int(newh + 0.5), int(neww + 0.5)


def resize_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL bilinear resize of an HWC uint8 RGB image to (h, w), as detectron2's ResizeTransform does for uint8."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


class OVSegModel(nn.Module):
    """Base class: protocol, pre-processing, and the vocabulary cache. Subclasses implement the rest."""

    # Submodules kept in fp32 whatever the cell's precision (`to_precision`): parts outside the per-image path,
    # such as a text tower that encodes each vocabulary once, whose output every pixel's class decision rests on.
    fp32_modules: tuple[str, ...] = ()

    def __init__(self, protocol: Protocol | None = None):
        super().__init__()
        self.protocol = protocol or Protocol()
        self.register_buffer("pixel_mean", torch.tensor(self.protocol.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.protocol.pixel_std).view(3, 1, 1), persistent=False)
        self.vocabulary: list[str] | None = None

    def to_precision(self, device: torch.device, dtype: torch.dtype) -> "OVSegModel":
        """`self.to(device, dtype)`, except that the submodules named in `fp32_modules` stay fp32 (never rounded
        through `dtype`, so weights loaded into them later keep every bit)."""
        self.to(device=device)
        _cast_except(self, dtype, set(self.fp32_modules))
        return self

    # -- vocabulary -------------------------------------------------------------------------------------------
    def encode_vocabulary(self, class_names: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def configure(self, **settings) -> None:
        """Per-dataset inference settings from the configs (e.g. mask_thr, ensemble_weight); unknown names fail."""
        from bench import BenchError

        for key, value in settings.items():
            if not hasattr(self, key):
                raise BenchError(f"{type(self).__name__} has no setting {key!r}; check the model config")
            setattr(self, key, value)

    def published_computation(self):
        """Context in which the forward runs the official computation order, for FLOP counts comparable with the
        papers (the leaderboard's GFLOPs). A model whose fast path skips work whose result is never read
        overrides it; the CPU speed benchmark counts what the timed path executes and does not use it."""
        return contextlib.nullcontext()

    # -- pre / post ---------------------------------------------------------------------------------------------
    def resize(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        return resize_uint8(image, shortest_edge_size(h, w, self.protocol.short_side, self.protocol.max_size))

    def normalize_and_pad(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Float CHW 0..255 images -> normalised batch padded with 0 (bottom/right) to the size divisibility."""
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        d = self.protocol.size_divisibility
        hp = -(-max(h for h, _ in sizes) // d) * d
        wp = -(-max(w for _, w in sizes) // d) * d
        mean, std = self.pixel_mean, self.pixel_std
        batch = [F.pad((im.to(mean) - mean) / std, (0, wp - im.shape[-1], 0, hp - im.shape[-2])) for im in images]
        return torch.stack(batch), sizes

    def preprocess(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """HWC uint8 RGB images -> (padded normalised batch on the model's device, resized sizes)."""
        resized = [torch.from_numpy(np.ascontiguousarray(self.resize(im))).permute(2, 0, 1) for im in images]
        return self.normalize_and_pad([im.to(self.pixel_mean.device).float() for im in resized])

    def postprocess(self, outputs: dict, image_sizes: list[tuple[int, int]],
                    output_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """The end_to_end path: decoded HWC uint8 images -> per-class score maps [K, H0, W0]."""
        x, sizes = self.preprocess(images)
        outputs = self(x, sizes)
        return self.postprocess(outputs, sizes, [im.shape[:2] for im in images])


def _cast_except(module: nn.Module, dtype: torch.dtype, keep: set[str], prefix: str = "") -> None:
    """Floating-point parameters and buffers of `module` to `dtype`, those under the dotted names in `keep` to
    fp32; the module tree and its state_dict order stay as they are."""
    if prefix in keep:
        module.float()
        return
    for name, child in module.named_children():
        _cast_except(child, dtype, keep, f"{prefix}.{name}" if prefix else name)
    module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)


@contextlib.contextmanager
def attribute_set(obj, name: str, value):
    """`obj.<name>` = value inside the block, its old value back afterwards (a model's published_computation()
    switching a module to the official order)."""
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)
