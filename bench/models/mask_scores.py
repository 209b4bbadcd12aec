"""Per-class scores and label maps of mask-classification outputs (SAN's semantic inference):
S[c] = Σ_q p(c | q) · sigmoid(mask_q), the mask logits resized bilinearly to the padded input size, cropped to the
image, resized bilinearly to the output size (`SEM_SEG_POSTPROCESS_BEFORE_INFERENCE=True`).

`soft_mask_scores` holds [K, H0, W0]; `soft_mask_labels` computes S.argmax(0) band by band in cache, never holding
the full-size masks or scores (the `end_to_end` label path).
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
                     out_size: tuple[int, int], rows_per_band: int = 8) -> torch.Tensor:
    """`soft_mask_scores(...).argmax(0)` [H0, W0] (int64) without the full-size tensors.

    The two bilinear resizes are separable: along x they run once on the small [Q, h', w'] logits (F.interpolate,
    so the same weights), along y they are a few-tap linear map (`_row_weights`) applied per band of output rows
    (two taps: one `lerp` pass);
    then sigmoid -> [P, Q] @ [Q, K] -> argmax, all in cache. The class GEMM writes into a buffer whose rows are
    padded to a multiple of 16 (MKL is about twice as fast at that leading dimension than at K = 150); only the K
    real columns are computed and compared."""
    h0, w0 = out_size
    k = prob.shape[1]
    tx = _resize_x(mask.float(), padded[1], size[1], w0)                   # [h', W0, Q] pixel-major
    ry = _row_weights(mask.shape[-2], padded[0], size[0], h0).to(tx)       # [H0, h']
    convex = bool(((ry.sum(1) - 1).abs() < 1e-6).all())                     # every output row a weighted mean
    labels = torch.empty(h0, w0, dtype=torch.int64, device=mask.device)
    buf = prob.new_empty(rows_per_band * w0, -(-k // 16) * 16)
    for r in range(0, h0, rows_per_band):
        band = ry[r:r + rows_per_band]                                      # [R, h']
        taps = band.abs().sum(0).nonzero().flatten()
        lo, hi = int(taps[0]), int(taps[-1]) + 1
        m = _blend_rows(band[:, lo:hi], tx[lo:hi], convex)
        p = m.shape[0] * w0
        scores = buf[:p, :k]
        torch.mm(m.reshape(p, -1).sigmoid_(), prob, out=scores)
        # under autocast the product is bf16, whose argmax has no vectorised kernel: compare in fp32
        torch.argmax(scores.float(), dim=1, out=labels[r:r + rows_per_band].view(-1))
    return labels


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
