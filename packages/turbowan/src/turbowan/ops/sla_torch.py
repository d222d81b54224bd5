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
# on the 2-core AVX-512 test machine 4 MB was fastest in quiet runs, 2-8 MB close behind,
# 32-64 MB 20-40% slower.
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
    q_scaled = q_blocks * scale
    k_blocks = _pad_tokens(k, n_key_blocks * block_k).view(bh * n_key_blocks, block_k, dim)
    v_blocks = _pad_tokens(v, n_key_blocks * block_k).view(bh * n_key_blocks, block_k, dim)
    # Key-block indices into the flattened (B*H*Nb) block axis, one row per query block.
    head_offset = torch.arange(bh, device=lut.device).view(batch, heads, 1, 1) * n_key_blocks
    global_lut = (lut + head_offset).view(bh * n_query_blocks, kk)

    tail = length - (n_key_blocks - 1) * block_k  # real tokens in the last key block
    padded_cols = block_k - tail
    n_rows = bh * n_query_blocks
    chunk = min(n_rows, max(1, _CHUNK_BYTES // (2 * kk * block_k * dim * 4)))
    cols = kk * block_k
    # Inference reuses three buffers across chunks (out= ops) instead of allocating megabytes
    # per chunk. out= ops have no autograd, so when gradients are wanted the same steps run
    # out-of-place.
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if not needs_grad:
        out = torch.empty_like(q_blocks)
        keys_buf = q_blocks.new_empty(chunk * kk, block_k, dim)
        values_buf = torch.empty_like(keys_buf)
        scores_buf = q_blocks.new_empty(chunk, block_q, cols)
    pieces = []
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        rows = stop - start
        index = global_lut[start:stop].reshape(-1)
        if needs_grad:
            keys = k_blocks.index_select(0, index).view(rows, cols, dim)
            values = v_blocks.index_select(0, index).view(rows, cols, dim)
            scores = torch.bmm(q_scaled[start:stop], keys.transpose(1, 2))
        else:
            keys = torch.index_select(k_blocks, 0, index, out=keys_buf[: rows * kk])
            values = torch.index_select(v_blocks, 0, index, out=values_buf[: rows * kk])
            keys, values = keys.view(rows, cols, dim), values.view(rows, cols, dim)
            scores = torch.bmm(q_scaled[start:stop], keys.transpose(1, 2), out=scores_buf[:rows])
        if padded_cols:
            # The LUT is sorted, so a selected tail block is always the last gathered block.
            has_tail = global_lut[start:stop, -1] % n_key_blocks == n_key_blocks - 1
            scores = _mask_padded_tail(scores, has_tail, padded_cols, inplace=not needs_grad)
        probs, denom = _probabilities(scores, round_to, inplace=not needs_grad)
        if needs_grad:
            piece = torch.bmm(probs, values)
            pieces.append(piece if denom is None else piece / denom)
        else:
            chunk_out = torch.bmm(probs, values, out=out[start:stop])
            if denom is not None:
                chunk_out.div_(denom)
    if needs_grad:
        out = torch.cat(pieces)
    return out.view(batch, heads, n_query_blocks * block_q, dim)[:, :, :length]


def _mask_padded_tail(
    scores: Tensor, has_tail: Tensor, padded_cols: int, *, inplace: bool
) -> Tensor:
    """-inf on the zero-padded key columns of rows whose last gathered block is the tail."""
    cols = scores.shape[-1]
    is_pad = torch.arange(cols, device=scores.device) >= cols - padded_cols
    mask = has_tail.view(-1, 1, 1) & is_pad.view(1, 1, cols)
    if inplace:
        return scores.masked_fill_(mask, float("-inf"))
    return scores.masked_fill(mask, float("-inf"))


def _probabilities(
    scores: Tensor, round_to: torch.dtype | None, *, inplace: bool
) -> tuple[Tensor, Tensor | None]:
    """Softmax numerators and, when they still need it, the row sums to divide by.

    float32: one fused softmax (measured 40% faster than separate max/sub/exp/sum passes).
    Rounded: exp(s - max) is rounded before normalising, like the kernel's P in bf16; rounding
    the normalised P instead doubled the deviation from the upstream bf16 golden output.
    """
    if round_to is None:
        return torch.softmax(scores, dim=-1), None
    row_max = scores.amax(dim=-1, keepdim=True)
    numer = scores.sub_(row_max).exp_() if inplace else (scores - row_max).exp()
    denom = numer.sum(dim=-1, keepdim=True)
    return numer.to(round_to).to(torch.float32), denom
