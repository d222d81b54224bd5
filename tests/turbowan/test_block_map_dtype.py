"""SLA block choice in bf16 follows upstream's arithmetic (pool and score in the compute dtype).

The reference is upstream SLA's ``get_block_map`` written out step by step: smoothed keys
``k - mean(k)`` in the dtype, block means summed in fp32 and stored in the dtype, a matmul in the
dtype, then top-kk. fp32 keeps its own (already matching) arithmetic.
"""

from __future__ import annotations

import pytest
import torch

from turbowan.ops.block_map import kept_key_blocks, select_blocks


def upstream_map(q, k, topk, block_q, block_k):
    def pool(x, block):
        length = x.shape[2]
        means = []
        for start in range(0, length, block):
            part = x[:, :, start : start + block]
            means.append((part.sum(dim=2, dtype=torch.float32) / part.shape[2]).to(x.dtype))
        return torch.stack(means, dim=2)

    smoothed = k - torch.mean(k, dim=-2, keepdim=True)
    scores = pool(q, block_q) @ pool(smoothed, block_k).transpose(-1, -2)
    kk = kept_key_blocks(topk, scores.shape[-1])
    lut = torch.topk(scores, kk, dim=-1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.int8).scatter_(-1, lut, 1)


def test_bf16_block_choice_matches_upstream():
    g = torch.Generator().manual_seed(0)
    differing_from_fp32 = 0
    for _ in range(6):
        q = (torch.randn(2, 4, 1000, 64, generator=g) * 0.3 + 0.2).to(torch.bfloat16)
        k = (torch.randn(2, 4, 1000, 64, generator=g) * 0.3 + 1.0).to(torch.bfloat16)
        expected = upstream_map(q, k, 0.25, 64, 64)
        got = select_blocks(q, k, topk=0.25, block_q=64, block_k=64).sparse_map
        assert torch.equal(got, expected)
        fp32 = select_blocks(q.float(), k.float(), topk=0.25, block_q=64, block_k=64).sparse_map
        differing_from_fp32 += int((fp32 != expected).sum())
    assert differing_from_fp32 > 0  # the data tell bf16 and fp32 scoring apart


@pytest.mark.parametrize("length", [100, 64 * 64 + 37])  # a partial block; several slices
def test_bf16_smoothing_by_slices_equals_whole_length(length):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(1, 2, length, 32, generator=g).to(torch.bfloat16)
    k = (torch.randn(1, 2, length, 32, generator=g) + 0.5).to(torch.bfloat16)
    got = select_blocks(q, k, topk=0.3, block_q=128, block_k=64).sparse_map
    assert torch.equal(got, upstream_map(q, k, 0.3, 128, 64))
