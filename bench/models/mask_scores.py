"""Per-class scores and label maps of mask-classification outputs (SAN's semantic inference):
S[c] = Σ_q p(c | q) · sigmoid(mask_q), the mask logits resized bilinearly to the padded input size, cropped to the
image, resized bilinearly to the output size (`SEM_SEG_POSTPROCESS_BEFORE_INFERENCE=True`).

`soft_mask_scores` holds [K, H0, W0]; `soft_mask_labels` computes S.argmax(0) band by band in cache, never holding
the full-size masks or scores (the `end_to_end` label path), with the class GEMM in fp32 or in bf16 with an fp32
re-check of near ties (same labels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_masks(mask: torch.Tensor, padded: tuple[int, int], size: tuple[int, int],
                 out_size: tuple[int, int]) -> torch.Tensor:
    """[Q, h', w'] mask logits -> bilinear to the padded size -> crop to `size` -> bilinear to `out_size`
    -> [Q, H0, W0]."""
    m = F.interpolate(mask[None], size=padded, mode="bilinear", align_corners=False)
    m = m[:, :, :size[0], :size[1]]
    if tuple(size) != tuple(out_size):
        m = F.interpolate(m, size=out_size, mode="bilinear", align_corners=False)
    return m[0]


def soft_mask_scores(mask: torch.Tensor, prob: torch.Tensor, padded: tuple[int, int], size: tuple[int, int],
                     out_size: tuple[int, int], max_elements: int = 1 << 26) -> torch.Tensor:
    """Mask logits [Q, h', w'] and class probabilities [Q, K] -> scores [K, H0, W0].

    Queries go in chunks so that at most `max_elements` mask pixels are held at once (large images). The sum
    is an out-of-place `addmm` (FlopCounterMode does not count the in-place `addmm_`)."""
    h0, w0 = out_size
    mask = mask.float()
    scores = prob.new_zeros(prob.shape[1], h0 * w0)
    chunk = max(1, max_elements // (padded[0] * padded[1] + h0 * w0))
    for s in range(0, mask.shape[0], chunk):
        m = resize_masks(mask[s:s + chunk], padded, size, out_size)
        scores = torch.addmm(scores, prob[s:s + chunk].T, m.flatten(1).sigmoid_())
    return scores.view(-1, h0, w0)


def soft_mask_labels(mask: torch.Tensor, prob: torch.Tensor, padded: tuple[int, int], size: tuple[int, int],
                     out_size: tuple[int, int], rows_per_band: int = 8,
                     checked_bf16: bool = False) -> torch.Tensor:
    """`soft_mask_scores(...).argmax(0)` [H0, W0] (int64) without the full-size tensors.

    The two bilinear resizes are separable: along x they run once on the small [Q, h', w'] logits (F.interpolate,
    so the same weights), along y they are a few-tap linear map (`_row_weights`) applied per band of output rows
    (two taps: one `lerp` pass); then sigmoid -> class GEMM -> argmax, all in cache.

    The class GEMM is fp32 (`_fp32_band_labels`) or, with `checked_bf16`, bf16 with the fp32 decision kept
    (`_checked_bf16_band_labels`: pixels whose top two classes are too close for bf16 rounding to separate are
    recomputed in fp32, so the labels are the fp32 path's)."""
    h0, w0 = out_size
    tx = _resize_x(mask.float(), padded[1], size[1], w0)                   # [h', W0, Q] pixel-major
    ry = _row_weights(mask.shape[-2], padded[0], size[0], h0).to(tx)       # [H0, h']
    convex = bool(((ry.sum(1) - 1).abs() < 1e-6).all())                     # every output row a weighted mean
    labels = torch.empty(h0, w0, dtype=torch.int64, device=mask.device)
    band_labels = (_checked_bf16_band_labels if checked_bf16 else _fp32_band_labels)(prob, rows_per_band * w0)
    for r, lo, hi in _bands(ry, rows_per_band):
        m = _blend_rows(ry[r:r + rows_per_band, lo:hi], tx[lo:hi], convex)
        band_labels(m.reshape(-1, m.shape[-1]), labels[r:r + rows_per_band].view(-1))
    return labels


def _bands(ry: torch.Tensor, rows: int) -> list[tuple[int, int, int]]:
    """(first output row, first source row, end source row) of each band of `rows` output rows: the source rows
    with a non-zero weight in the band."""
    used = ry != 0
    bands = []
    for r in range(0, ry.shape[0], rows):
        taps = used[r:r + rows].any(0).nonzero().flatten().tolist()
        bands.append((r, taps[0], taps[-1] + 1))
    return bands


def _fp32_band_labels(prob: torch.Tensor, max_pixels: int):
    """The fp32 class GEMM and argmax of one band: (logits [P, Q], sigmoid in place; out [P]). The GEMM writes
    into a buffer whose rows are padded to a multiple of 16 (MKL is about twice as fast at that leading dimension
    than at K = 150); only the K real columns are computed and compared."""
    k = prob.shape[1]
    buf = prob.new_empty(max_pixels, -(-k // 16) * 16)

    def band_labels(logits: torch.Tensor, out: torch.Tensor) -> None:
        scores = buf[:logits.shape[0], :k]
        torch.mm(logits.sigmoid_(), prob, out=scores)
        # under autocast the product is bf16, whose argmax has no vectorised kernel: compare in fp32
        torch.argmax(scores.float(), dim=1, out=out)
    return band_labels


# Pixels whose runner-up class scores at least this fraction of the top one (in bf16) are recomputed in fp32.
# Every score is a sum of non-negative products p(c|q) * sigmoid(m); rounding both factors and the result to bf16
# (unit roundoff 2^-8; the GEMM accumulates in fp32) moves it by at most about 3 * 2^-8 = 1.2 % relative, so the
# fp32 order of two classes can flip only if their bf16 scores are within about 2.4 %: 1/32 = 3.1 % leaves margin.
BF16_TIE_WINDOW = 31 / 32
BF16_TINY = 1e-30     # top scores below this (underflow, flushed subnormals) or NaN: recomputed in fp32 as well


def _checked_bf16_band_labels(prob: torch.Tensor, max_pixels: int):
    """The class GEMM of one band in bf16, with the fp32 decision: (logits [P, Q] fp32, sigmoid in place; out [P]).

    Scores come out class-major [K, P] (a max over classes is then a vectorised column reduction). The argmax is
    read off the max itself: the bf16 scores converted to fp32 have 16 zero low bits, into which the class index
    is written (as `2^b - 1 - c`, so equal scores pick the lowest class, as argmax does) before one `amax`;
    the top class is then zeroed and a second `amax` gives the runner-up. Pixels within `BF16_TIE_WINDOW`, or
    with a tiny or NaN top score, are recomputed from their fp32 logits with the fp32 GEMM and argmax."""
    k = prob.shape[1]
    bits = max(1, k.bit_length())
    if bits > 16:
        raise ValueError(f"checked bf16 class GEMM: {k} classes do not fit the 16 free bits of a bf16 score")
    top_code = (1 << bits) - 1
    codes = (top_code - torch.arange(k, dtype=torch.int32, device=prob.device))[:, None]
    prob_t = prob.T.to(torch.bfloat16).contiguous()                        # [K, Q]
    sig = prob.new_empty(max_pixels, prob.shape[0], dtype=torch.bfloat16)
    flat_bf16 = prob.new_empty(k * max_pixels, dtype=torch.bfloat16)      # buffers reused by every band
    flat = prob.new_empty(k * max_pixels)
    pixels = torch.arange(max_pixels, device=prob.device)

    def band_labels(logits: torch.Tensor, out: torch.Tensor) -> None:
        p = logits.shape[0]
        product = torch.mm(prob_t, sig[:p].copy_(logits.sigmoid_()).T, out=flat_bf16[:k * p].view(k, p))
        scores = flat[:k * p].view(k, p).copy_(product)                   # [K, P] fp32 holding bf16 values
        scores.view(torch.int32).add_(codes)
        top = scores.amax(0)
        out.copy_(top_code - (top.view(torch.int32) & top_code)).clamp_(max=k - 1)   # a NaN's bits: re-checked
        scores[out, pixels[:p]] = 0
        unsure = (scores.amax(0) >= top * BF16_TIE_WINDOW).logical_or_(~(top >= BF16_TINY))
        redo = unsure.nonzero().flatten()
        if redo.numel():
            out[redo] = torch.mm(logits[redo], prob).argmax(1)           # logits hold fp32 sigmoids now
    return band_labels


def _blend_rows(weights: torch.Tensor, rows: torch.Tensor, convex: bool) -> torch.Tensor:
    """[R, T] tap weights x [T, W0, Q] source rows (same dtype) -> [R, W0, Q]. Two taps of `convex` weights (each
    row sums to 1, as bilinear rows do) are one `lerp` pass, a + w (b - a); more taps an einsum; one tap a scaling."""
    if rows.shape[0] == 2 and convex:
        return torch.lerp(rows[0], rows[1], weights[:, 1, None, None])
    if rows.shape[0] == 1:
        return weights[:, 0, None, None] * rows[0]
    return torch.einsum("rt,twq->rwq", weights, rows)


def _resize_x(mask: torch.Tensor, padded_w: int, w: int, w0: int) -> torch.Tensor:
    """[Q, h', w'] -> along x only: bilinear to the padded width, crop to `w`, bilinear to `w0` -> [h', W0, Q]."""
    m = F.interpolate(mask[None], size=(mask.shape[-2], padded_w), mode="bilinear", align_corners=False)
    m = m[..., :w]
    if w != w0:
        m = F.interpolate(m, size=(mask.shape[-2], w0), mode="bilinear", align_corners=False)
    return m[0].permute(1, 2, 0).contiguous()


def _row_weights(n: int, padded_h: int, h: int, h0: int) -> torch.Tensor:
    """The y part of the resizes as a matrix [H0, n]: row y holds the weights of source rows 0..n-1 for output
    row y. Built by resizing the identity with the same F.interpolate calls, so the weights are the same."""
    eye = torch.eye(n)[None, :, :, None]                                     # channel c = source row c
    e = F.interpolate(eye, size=(padded_h, 1), mode="bilinear", align_corners=False)[:, :, :h]
    if h != h0:
        e = F.interpolate(e, size=(h0, 1), mode="bilinear", align_corners=False)
    return e[0, :, :, 0].T.contiguous()
