"""Slow, obviously-correct SLA for tests: a dense L x L block mask and a plain softmax.

It shares only the block selection with the fast paths, so it checks their gathers, tail
masking and chunking independently. Memory is O(L^2): small inputs only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from turbowan.ops.block_map import select_blocks


def sparse_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, topk: float, block_q: int = 128, block_k: int = 64
) -> Tensor:
    """Sparse branch only, float64, on (B, L, H, D); returns (B, L, H, D) float64."""
    qh, kh, vh = (x.transpose(1, 2).double() for x in (q, k, v))
    length, dim = qh.shape[2], qh.shape[3]
    sparse_map = select_blocks(qh, kh, topk=topk, block_q=block_q, block_k=block_k).sparse_map
    token_mask = sparse_map.bool()
    token_mask = token_mask.repeat_interleave(block_q, dim=2)[:, :, :length]
    token_mask = token_mask.repeat_interleave(block_k, dim=3)[:, :, :, :length]
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(dim)
    scores = scores.masked_fill(~token_mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2)
