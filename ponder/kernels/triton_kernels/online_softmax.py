"""The online-softmax update shared by the attention kernels (flash attention's inner step).

Scores arrive masked (-inf where a key is not visible) and in base 2 (scaled by log2 e), so the
exponentials are exp2. Each tile rescales what came before to the new running max.

Dimension legend: M query rows (heads or tokens), N keys in the tile, D value width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def online_softmax_step(
    m_i,  # [M] running max
    l_i,  # [M] running sum of exp2(score - max)
    acc,  # [M, D] fp32 running sum of p @ v
    scores,  # [M, N] this tile's masked base-2 scores
    v,  # [N, D]
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for exact fp32)
):
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # [M]
    alpha = tl.exp2(m_i - m_new)  # [M] the old terms' rescale
    p = tl.exp2(scores - m_new[:, None])  # [M, N]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 attention stays exact ("ieee"); 16-bit inputs take the tensor cores' native path."""
    return "ieee" if dtype == torch.float32 else "tf32"
