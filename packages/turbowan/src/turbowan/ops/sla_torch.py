"""Sparse branch of SLA in plain PyTorch, shaped for CPU speed.

Why this layout: a gather per query block, or a dense L x L mask, wastes the 10x FLOP saving
on copies and tiny GEMMs. Here the keys and values are viewed as (B*H*Nb, block_k, D) blocks;
for a chunk of query blocks the selected key blocks are gathered with one ``index_select``
into (chunk, kk*block_k, D) and the chunk runs as two batched GEMMs (scores, then P.V) with one
softmax in between. Chunks are small (a few MB) so the gathered K/V and the scores stay in
cache between the GEMMs that read them. Arithmetic is float32: bf16 GEMMs are slow on CPUs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Bytes of gathered K+V per chunk. A few MB keeps each chunk's working set cache-resident;
# measured on a 2-core AVX-512 CPU, 2-8 MB chunks were fastest and within noise of each other.
_CHUNK_BYTES = 4 << 20


def _pad_tokens(x: Tensor, padded_length: int) -> Tensor:
    """(B, H, L, D) -> contiguous float32 (B, H, padded_length, D), zero-filled tail."""
    batch, heads, length, dim = x.shape
    if padded_length == length:
        return x.to(torch.float32).contiguous()
    out = x.new_zeros(batch, heads, padded_length, dim, dtype=torch.float32)
    out[:, :, :length] = x
    return out


def block_sparse_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lut: Tensor,
    *,
    block_q: int,
    block_k: int,
    round_to: torch.dtype | None = None,
) -> Tensor:
    """Softmax attention of each query block over its selected key blocks.

    q, k, v: (B, H, L, D); lut: (B, H, Mb, kk) key-block indices, sorted ascending.
    ``round_to`` (e.g. bfloat16) rounds the unnormalised probabilities before the P.V GEMM, as
    the upstream kernel does when it runs in that dtype. Returns float32 (B, H, L, D).
    """
    batch, heads, length, dim = q.shape
    n_query_blocks, kk = lut.shape[2], lut.shape[3]
    n_key_blocks = -(-length // block_k)
    bh = batch * heads
    scale = 1.0 / math.sqrt(dim)

    q_blocks = _pad_tokens(q, n_query_blocks * block_q).view(bh * n_query_blocks, block_q, dim)
    k_blocks = _pad_tokens(k, n_key_blocks * block_k).view(bh * n_key_blocks, block_k, dim)
    v_blocks = _pad_tokens(v, n_key_blocks * block_k).view(bh * n_key_blocks, block_k, dim)
    # Key-block indices into the flattened (B*H*Nb) block axis, one row per query block.
    head_offset = torch.arange(bh, device=lut.device).view(batch, heads, 1, 1) * n_key_blocks
    global_lut = (lut + head_offset).view(bh * n_query_blocks, kk)

    tail = length - (n_key_blocks - 1) * block_k  # real tokens in the last key block
    padded_cols = block_k - tail
    out = torch.empty_like(q_blocks)
    n_rows = bh * n_query_blocks
    chunk = max(1, _CHUNK_BYTES // (2 * kk * block_k * dim * 4))
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        rows = stop - start
        index = global_lut[start:stop].reshape(-1)
        keys = k_blocks.index_select(0, index).view(rows, kk * block_k, dim)
        values = v_blocks.index_select(0, index).view(rows, kk * block_k, dim)
        scores = torch.baddbmm(
            scores_buffer(rows, block_q, kk * block_k, q.device),
            q_blocks[start:stop],
            keys.transpose(1, 2),
            beta=0.0,
            alpha=scale,
        )
        if padded_cols:
            # The LUT is sorted, so a selected tail block is always the last gathered block.
            has_tail = lut.view(n_rows, kk)[start:stop, -1] == n_key_blocks - 1
            scores[:, :, kk * block_k - padded_cols :].masked_fill_(
                has_tail.view(rows, 1, 1), float("-inf")
            )
        row_max = scores.amax(dim=-1, keepdim=True)
        probs = scores.sub_(row_max).exp_()
        denom = probs.sum(dim=-1, keepdim=True)
        if round_to is not None:
            probs = probs.to(round_to).to(torch.float32)
        chunk_out = out[start:stop]
        torch.bmm(probs, values, out=chunk_out)
        chunk_out.div_(denom)
    return out.view(batch, heads, n_query_blocks * block_q, dim)[:, :, :length]


def scores_buffer(rows: int, block_q: int, cols: int, device: torch.device) -> Tensor:
    """Uninitialised score buffer (baddbmm with beta=0 ignores its contents)."""
    return torch.empty(rows, block_q, cols, dtype=torch.float32, device=device)
