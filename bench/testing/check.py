"""`check_model`: does a model show the harness the `OVSegModel` surface it relies on (bench/models/base.py)?

Run it on any model before benchmarking it (random weights are enough; seconds at a small short side):

    from bench.testing import check_model
    check_model(create_model("mypkg.models:build"), short_side=128)

What it checks, each failure an AssertionError saying which property broke:
1. surface: an `OVSegModel`; `encode_vocabulary(names)` returns [K, E]; `preprocess` gives a float batch [B, 3, Hp, Wp]
   padded to the size divisibility and the detectron2 resized sizes, the same tensor the evaluation builds
   (DataLoader resize + `normalize_and_pad`); `forward` returns a dict (`num_crops`, if given, one per image);
   `postprocess` returns per image float scores [K, H0, W0] at the requested size, finite, on the model's device.
   A model with a crop branch (`crop_cost_fn`) also runs `forward(..., skip_crops=True)` and its per-crop callable;
   a fused label path (`postprocess_labels`) gives the argmax of the scores.
2. pad/crop round trip: the image is non-square and its resized size is no multiple of the size divisibility; the
   scores come back at the original size, and at the resized size when asked, where they are the padded map
   cropped to the image (claiming a smaller image size gives their top-left crop: the padding does not leak in).
3. vocabulary permutation: permuting the class names permutes the score channels (and the classes do score
   differently, so the check is not vacuous).
4. batch = single: in a batch of two images of different sizes, each image's scores equal those of the same padded
   input run alone (no batch item leaks into another, each image is cropped at its own size).
5. extra padding (only with `own_padding=True`): an image padded to a larger batch gives its scores alone. A model
   that runs the whole padded batch through global attention or convolutions sees the extra padding, as
   detectron2's `ImageList` batches do for the official SAN and SimSeg code: their scores change with the batch's
   padding (measured and returned, not asserted). Models that cut each image to its own padding (SCAN, whose
   official inference runs batch 1) pass it.
6. FLOPs from shapes: the `model` scope counted on fake tensors (`bench.flops.count_flops_split(...,
   shapes_of=model)`, how the harness counts) gives the count of a real call, and the model's scores afterwards
   are unchanged (no fake tensor left in a cache). A model whose shapes depend on values is counted by a real
   call; that is reported (`flops_counted_from`), not asserted.

Tolerances are relative: max |a - b| <= rtol * max |b| (float summation order differs between batch sizes and
vocabulary orders; nothing else may differ). Returns the measured maximum differences.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from bench.models.base import OVSegModel, resize_uint8, shortest_edge_size

DEFAULT_CLASSES = ("sky", "road, route", "dog", "tree", "person")
LABEL_AGREEMENT = 0.999   # fused label path vs argmax of the scores: only exact near-ties may differ


class ModelCheckError(AssertionError):
    """A model does not show the `OVSegModel` surface the harness relies on (the message says what broke)."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ModelCheckError(f"check_model: {what}")


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def check_images(size: tuple[int, int] = (150, 203), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two random uint8 RGB images: `size` and its transpose (so a batch of them pads both)."""
    rng = np.random.default_rng(seed)
    h, w = size
    return (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 256, (w, h, 3), dtype=np.uint8))


def _scores(model: OVSegModel, x: torch.Tensor, sizes: list, out_sizes: list, **kw) -> tuple[dict, list]:
    outputs = model(x, sizes, **kw)
    _require(isinstance(outputs, Mapping), f"forward returned a {type(outputs).__name__}, not a dict of outputs")
    return outputs, model.postprocess(outputs, sizes, out_sizes)


def _check_scores(scores, k: int, out_sizes: list, device: torch.device, where: str) -> None:
    _require(isinstance(scores, (list, tuple)) and len(scores) == len(out_sizes),
             f"{where}: postprocess must return a list with one score map per image ({len(out_sizes)}), got "
             f"{type(scores).__name__} of length {len(scores) if hasattr(scores, '__len__') else '?'}")
    for i, (s, (h0, w0)) in enumerate(zip(scores, out_sizes)):
        _require(isinstance(s, torch.Tensor) and s.is_floating_point(),
                 f"{where}: image {i}: scores must be a float tensor, got {getattr(s, 'dtype', type(s).__name__)}")
        _require(tuple(s.shape) == (k, h0, w0), f"{where}: image {i}: scores have shape {tuple(s.shape)}, expected "
                 f"[K, H0, W0] = {(k, h0, w0)} (per-class scores at the requested size, padding cropped away)")
        _require(s.device == device, f"{where}: image {i}: scores on {s.device}, the model is on {device}")
        _require(bool(torch.isfinite(s).all()), f"{where}: image {i}: scores hold NaN or Inf")


def _check_preprocess(model: OVSegModel, image: np.ndarray, x, sizes) -> None:
    """Shapes of the padded batch, and equality with the evaluation's own path (cell.ResizedImages)."""
    p = model.protocol
    d = p.size_divisibility
    want = shortest_edge_size(*image.shape[:2], p.short_side, p.max_size)
    _require(isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4 and x.shape[:2] == (1, 3),
             f"preprocess must return a float batch [B, 3, Hp, Wp], got {getattr(x, 'shape', type(x).__name__)}")
    _require([tuple(s) for s in sizes] == [want], f"preprocess returned sizes {sizes}, the protocol "
             f"(short side {p.short_side}, max {p.max_size}, detectron2 ResizeShortestEdge) gives {[want]}")
    _require(x.shape[-2] % d == 0 and x.shape[-1] % d == 0 and x.shape[-2] >= want[0] and x.shape[-1] >= want[1],
             f"preprocess output {tuple(x.shape[-2:])} is not the resized size {want} padded to a multiple of {d}")
    resized = torch.from_numpy(resize_uint8(image, want).copy()).permute(2, 0, 1).to(x.device).float()
    ref, _ = model.normalize_and_pad([resized])
    _require(torch.equal(x, ref), "preprocess differs from what the evaluation feeds the model (PIL bilinear resize "
             "to the protocol size, then normalize_and_pad): the benchmark would not measure what predict() does")


def _check_vocabulary(model: OVSegModel, names: list[str]) -> torch.Tensor:
    text = model.encode_vocabulary(names)
    _require(isinstance(text, torch.Tensor) and text.dim() == 2 and text.shape[0] == len(names),
             f"encode_vocabulary must return the class embeddings [K, E] (K = {len(names)}), got "
             f"{getattr(text, 'shape', type(text).__name__)}")
    _require(bool(torch.isfinite(text).all()), "encode_vocabulary returned NaN or Inf")
    return text


def _check_crop_scopes(model: OVSegModel, x, sizes, out_sizes, k: int, device) -> None:
    """The profile's split for crop models: forward without crops, postprocess of it, one batch of crops."""
    if not hasattr(model, "crop_cost_fn"):
        return
    _, scores = _scores(model, x, sizes, out_sizes, skip_crops=True)
    _check_scores(scores, k, out_sizes, device, "forward(skip_crops=True) + postprocess")
    _require(callable(per_crop := model.crop_cost_fn(x, sizes, 1)), "crop_cost_fn must return a callable")
    per_crop()


def _check_crop(model: OVSegModel, outputs, sizes, k: int, device, rtol: float) -> None:
    """The image is the top-left `image_size` of the padded map: at the resized size, claiming a smaller image size
    gives the top-left crop of the scores (a model that resizes the padded map instead lets the padding leak in)."""
    (h, w), = sizes
    at_input = model.postprocess(outputs, sizes, sizes)
    _check_scores(at_input, k, sizes, device, "postprocess at the resized size")
    small = [(h * 3 // 4, w * 3 // 4)]
    cropped = model.postprocess(outputs, small, small)
    _check_scores(cropped, k, small, device, f"postprocess of a claimed image size {small[0]}")
    diff = _max_rel(cropped[0], at_input[0][:, :small[0][0], :small[0][1]])
    _require(diff <= rtol, f"padding leaks: the scores at the resized size are not the padded map cropped to the "
             f"image size (claiming {small[0]} instead of {(h, w)} does not crop them; max rel diff {diff:.2e})")


def _check_labels(model: OVSegModel, outputs, sizes, out_sizes, scores) -> None:
    if not hasattr(model, "postprocess_labels"):
        return
    labels = model.postprocess_labels(outputs, sizes, out_sizes)
    for i, (lab, s) in enumerate(zip(labels, scores)):
        _require(tuple(lab.shape) == tuple(s.shape[1:]) and not lab.is_floating_point(),
                 f"postprocess_labels: image {i}: labels [H0, W0] integer expected, got {lab.dtype} "
                 f"{tuple(lab.shape)}")
        agree = float((lab.to(s.device) == s.argmax(0)).float().mean())
        _require(agree >= LABEL_AGREEMENT, f"postprocess_labels: image {i}: only {100 * agree:.2f} % of pixels "
                 "equal the argmax of postprocess's scores")


def check_model(model: OVSegModel, class_names: list[str] | None = None, image_size: tuple[int, int] = (150, 203),
                short_side: int | None = None, own_padding: bool = False, rtol: float = 1e-4,
                seed: int = 0) -> dict[str, float]:
    """Check `model` (in eval mode, fp32) as the module docstring says; raises ModelCheckError on the first failure.

    short_side: run at this protocol short side (long side <= 4x, as `resolution=` does), restored afterwards.
    own_padding: also require that the extra padding of a batch does not change an image's scores (see 5.).
    Returns {'permutation', 'batch', 'extra_padding'}: the measured max relative differences."""
    _require(isinstance(model, OVSegModel), f"a {type(model).__name__} is not an OVSegModel")
    names = list(class_names or DEFAULT_CLASSES)
    _require(len(names) >= 2, "give at least two class names")
    saved = (model.protocol.short_side, model.protocol.max_size)
    if short_side is not None:
        model.protocol.short_side, model.protocol.max_size = int(short_side), 4 * int(short_side)
    model.eval()
    try:
        with torch.inference_mode():
            return _check(model, names, image_size, own_padding, rtol, seed)
    finally:
        model.protocol.short_side, model.protocol.max_size = saved


def _check(model: OVSegModel, names: list[str], image_size, own_padding: bool, rtol: float, seed: int) -> dict:
    k, device, d = len(names), model.pixel_mean.device, model.protocol.size_divisibility
    first, second = check_images(image_size, seed)
    resized = shortest_edge_size(*image_size, model.protocol.short_side, model.protocol.max_size)
    if resized[0] == resized[1] or (d > 1 and (resized[0] % d == 0 or resized[1] % d == 0)):
        raise ValueError(f"check_model: image_size {image_size} resizes to {resized}; choose one whose resized size "
                         f"is non-square and (size_divisibility {d} > 1) no multiple of it in either side, so the padding "
                         f"is exercised")
    out = {}

    # 1-2. surface, shapes, round trip
    text = _check_vocabulary(model, names)
    x, sizes = model.preprocess([first])
    _check_preprocess(model, first, x, sizes)
    orig = [first.shape[:2]]
    outputs, scores = _scores(model, x, sizes, orig)
    if "num_crops" in outputs:
        _require(len(outputs["num_crops"]) == 1, "outputs['num_crops'] must hold one count per image")
    _check_scores(scores, k, orig, device, "postprocess")
    _check_crop(model, outputs, sizes, k, device, rtol)
    _check_labels(model, outputs, sizes, orig, scores)
    _check_crop_scopes(model, x, sizes, orig, k, device)

    # 3. vocabulary permutation
    perm = list(range(1, k)) + [0]
    text_p = _check_vocabulary(model, [names[i] for i in perm])
    _require(_max_rel(text_p, text[perm]) <= rtol, "encode_vocabulary of permuted names is not the permuted embeddings")
    scores_p = _scores(model, x, sizes, orig)[1][0]
    base = scores[0]
    _require(_max_rel(base[perm], base) > rtol, "every class has the same score map: the scores ignore the vocabulary")
    out["permutation"] = _max_rel(scores_p, base[perm])
    _require(out["permutation"] <= rtol, f"permuting the class names does not permute the score channels: max rel "
             f"diff {out['permutation']:.2e} > {rtol:.0e}")
    model.encode_vocabulary(names)

    # 4. batch = single, each image at the batch's padding
    both = [first, second]
    xb, sizes_b = model.preprocess(both)
    orig_b = [im.shape[:2] for im in both]
    outputs_b, scores_b = _scores(model, xb, sizes_b, orig_b)
    _check_scores(scores_b, k, orig_b, device, "postprocess of a batch of two")
    out["batch"] = 0.0
    for i in range(2):
        alone = _scores(model, xb[i:i + 1], sizes_b[i:i + 1], orig_b[i:i + 1])[1][0]
        diff = _max_rel(scores_b[i], alone)
        _require(diff <= rtol, f"batch != single: image {i} of a batch of two (sizes {sizes_b}) scores differently "
                 f"from the same padded input alone: max rel diff {diff:.2e} > {rtol:.0e}")
        out["batch"] = max(out["batch"], diff)

    # 5. the batch's extra padding
    out["extra_padding"] = _max_rel(scores_b[0], base)
    if own_padding:
        _require(out["extra_padding"] <= rtol, f"padding leaks: an image padded to a batch of {tuple(xb.shape[-2:])} "
                 f"scores differently from alone at {tuple(x.shape[-2:])}: max rel diff {out['extra_padding']:.2e}")

    # 6. FLOPs from shapes
    out["flops_counted_from"] = _check_flops_from_shapes(model, x, sizes, orig, base, rtol)
    return out


def _check_flops_from_shapes(model, x, sizes, orig, base: torch.Tensor, rtol: float) -> str:
    from bench.flops import count_flops_split

    kw = {"skip_crops": True} if hasattr(model, "crop_cost_fn") else {}
    counted = count_flops_split(lambda: model(x, sizes, **kw), shapes_of=model)
    outputs: dict = {}
    if counted["counted_from"] == "shapes":   # the real count's call also shows the model kept its state
        real = count_flops_split(lambda: outputs.update(model(x, sizes, **kw)))
        _require(counted["total"] == real["total"] and counted["attention"] == real["attention"],
                 f"FLOPs from shapes ({counted['total']}, attention {counted['attention']}) differ from a real "
                 f"call's ({real['total']}, attention {real['attention']})")
    after = model.postprocess(outputs, sizes, orig)[0] if outputs and not kw else _scores(model, x, sizes, orig)[1][0]
    _require(_max_rel(after, base) <= rtol, "the scores changed after counting FLOPs from shapes: the forward "
             "left state behind (a cache?) that the count replaced")
    return counted["counted_from"]
