"""Multi-head attention as the models call it: `attention(q, k, v, attn_mask)` = softmax(q·kᵀ/√d + mask)·v.

fp32 (and any device but the CPU) goes through `F.scaled_dot_product_attention`. bf16 / fp16 on the CPU runs as
plain GEMMs, a mask added to the scores: PyTorch's CPU flash kernel computes in fp32 whatever the input dtype
(SAN-B's side adapter, 6 heads of dimension 40 over 1700 tokens: about 130 GFLOP/s in bf16, as in fp32), while the
bf16 GEMMs of q·kᵀ and p·v, with the softmax between them, ran 1.4-1.6x faster on the same host (AVX-512 BF16,
2 threads). Scores are computed in blocks that stay in cache (rows of one head, or several short heads at once);
small problems (all heads' scores under `FULL_ELEMENTS`) take one batched product. Same FLOPs either way (the
counter sees the two products).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCED = (torch.bfloat16, torch.float16)
FULL_ELEMENTS = 1 << 21        # scores of every head at once up to this many elements (4 MB in bf16)
BLOCK_ELEMENTS = 3 << 18       # else per head, row blocks of about this many scores (1.5 MB in bf16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
              ) -> torch.Tensor:
    """q [..., Lq, d], k [..., Lk, d], v [..., Lk, dv] -> [..., Lq, dv] (scale 1/√d, optional additive mask
    broadcastable to [..., Lq, Lk], or boolean as SDPA reads it). A float mask is cast to q's dtype here."""
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)
    if q.device.type != "cpu" or q.dtype not in REDUCED:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return gemm_attention(q, k, v, attn_mask)


def gemm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """softmax(q·kᵀ/√d + mask)·v through two GEMMs per block, in the inputs' dtype (GEMMs accumulate in fp32; the
    scores and probabilities are rounded to it, as under autocast). Blocks hold about `BLOCK_ELEMENTS` scores:
    rows of one head for long sequences, several whole heads (batched products) for short ones."""
    *batch, lq, d = q.shape
    lk = k.shape[-2]
    q = q * d ** -0.5
    kt = k.transpose(-1, -2)
    mask = None if attn_mask is None else _additive(attn_mask, q.dtype)
    heads = q.numel() // (lq * d)
    if heads * lq * lk <= FULL_ELEMENTS:
        scores = torch.matmul(q, kt)
        if mask is not None:
            scores = scores + mask
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    q, kt, v = q.reshape(heads, lq, d), kt.reshape(heads, d, lk), v.reshape(heads, lk, -1)
    mask = _per_head(mask, batch, lq, lk)
    out = q.new_empty(heads, lq, v.shape[-1])
    if lq * lk >= BLOCK_ELEMENTS:
        rows = max(1, BLOCK_ELEMENTS // lk)
        for h in range(heads):
            for i in range(0, lq, rows):
                scores = torch.mm(q[h, i:i + rows], kt[h])
                if mask is not None:
                    scores += _rows(mask[h if len(mask) > 1 else 0], i, rows)
                torch.mm(torch.softmax(scores, dim=-1), v[h], out=out[h, i:i + rows])
    else:
        group = max(1, BLOCK_ELEMENTS // (lq * lk))
        for h in range(0, heads, group):
            scores = torch.bmm(q[h:h + group], kt[h:h + group])
            if mask is not None:
                scores += mask[h:h + group] if len(mask) > 1 else mask
            torch.bmm(torch.softmax(scores, dim=-1), v[h:h + group], out=out[h:h + group])
    return out.view(*batch, lq, -1)


def _per_head(mask: torch.Tensor | None, batch: list[int], lq: int, lk: int) -> torch.Tensor | None:
    """A mask broadcastable to [*batch, lq, lk] as [heads or 1, lq or 1, lk or 1]: shared by every head when its
    leading dimensions are all 1 (no copy), else one per head (a view where the layout allows)."""
    if mask is None:
        return None
    if all(n == 1 for n in mask.shape[:-2]):
        return mask.reshape(1, *mask.shape[-2:]) if mask.dim() >= 2 else mask.reshape(1, 1, -1)
    return mask.expand(*batch, lq, lk).reshape(-1, lq, lk)


def _rows(mask: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Rows start..start+rows of a [lq or 1, lk or 1] mask."""
    return mask[start:start + rows] if mask.shape[0] > 1 else mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SDPA's mask conventions as an additive mask: a boolean mask keeps the True positions (-inf elsewhere)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)
