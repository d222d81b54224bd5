"""The `original` attention backend: PyTorch SDPA on the (B, L, H, D) layout Wan uses."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def dense_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention of (B, Lq, H, D) q over (B, Lk, H, D) k, v -> (B, Lq, H, D).

    Scale 1/sqrt(D), no mask (Wan attends to every token, text padding included).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"dense_attention expects (B, L, H, D) tensors, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}; split heads before calling it"
        )
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
