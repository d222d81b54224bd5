"""SLA block selection: which key blocks each query block attends to exactly.

Selection follows upstream SLA: keys are smoothed (the mean over tokens is subtracted, so a
shared offset does not dominate every score), q and the smoothed k are mean-pooled per block
(a partial last block is averaged over its real token count), the pooled scores are ranked and
the top ``kk`` key blocks are kept per query block. Pooling and scoring run in the compute dtype,
as upstream's do (bf16 rounding decides near-ties). The one deliberate difference: ``kk`` is
never 0. Upstream keeps ``int(topk * Nb)`` blocks, which is 0 on short inputs and turns the
sparse softmax into 0/0 (NaN); here at least one key block is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def num_blocks(length: int, block: int) -> int:
    """Blocks needed to cover ``length`` tokens; the last one may be partial."""
    return -(-length // block)


def kept_key_blocks(topk: float, n_key_blocks: int) -> int:
    """kk = max(1, min(Nb, floor(topk * Nb))): upstream's count, but never zero."""
    # int() of the float product, exactly as upstream rounds (0.1 * 30 -> 3).
    return max(1, min(n_key_blocks, int(topk * n_key_blocks)))


def mean_pool_blocks(x: Tensor, block: int) -> Tensor:
    """Mean over consecutive ``block`` tokens of (B, H, L, D) -> (B, H, nb, D), in float32.

    The last block is averaged over the tokens it really holds, not over ``block``.
    """
    length = x.shape[2]
    full = length // block
    # Views, not a padded copy: x may be a transposed (B, L, H, D) activation of many GB.
    means = [x[:, :, : full * block].unflatten(2, (full, block)).mean(dim=3, dtype=torch.float32)]
    if length > full * block:
        means.append(x[:, :, full * block :].mean(dim=2, keepdim=True, dtype=torch.float32))
    return torch.cat(means, dim=2)


@dataclass(frozen=True)
class BlockSelection:
    """The selected key blocks per query block.

    ``lut`` (B, H, Mb, kk) int64 holds key-block indices sorted ascending (upstream leaves the
    order unspecified; sorted order makes gathers walk memory forwards).
    """

    lut: Tensor
    n_key_blocks: int
    block_q: int
    block_k: int

    @property
    def kk(self) -> int:
        return self.lut.shape[-1]

    @property
    def sparse_map(self) -> Tensor:
        """(B, H, Mb, Nb) int8, 1 where a key block is selected (upstream's ``sparse_map``)."""
        *lead, _ = self.lut.shape
        dense = torch.zeros(*lead, self.n_key_blocks, dtype=torch.int8, device=self.lut.device)
        return dense.scatter_(-1, self.lut, 1)


def select_blocks(
    q: Tensor,
    k: Tensor,
    *,
    topk: float,
    block_q: int = 128,
    block_k: int = 64,
    pool: Callable[[Tensor, int], Tensor] = mean_pool_blocks,
) -> BlockSelection:
    """Rank key blocks for every query block of (B, H, L, D) q and k and keep the top kk.

    Scores are pooled(q) . pooled(k - mean_tokens(k)), unscaled. In float32 they are computed
    in float32; in bf16/fp16 every step rounds to that dtype as upstream's does (see
    ``_low_precision_scores``), since the rounding decides near-ties between key blocks.
    The input length is not limited: pooling and scoring are O(L * D) and O(Mb * Nb * D).
    ``pool`` computes the float32 block means (the Triton path passes its kernel).
    """
    if not (isinstance(topk, (int, float)) and math.isfinite(topk) and 0.0 < topk <= 1.0):
        raise ValueError(
            f"topk must be a ratio in (0, 1] (fraction of key blocks kept), got {topk!r}; "
            "use e.g. topk=0.1 (upstream default) or 0.15"
        )
    length = k.shape[2]
    n_key_blocks = num_blocks(length, block_k)
    if q.dtype == torch.float32:
        # pool(k - mean(k)) == pool(k) - mean(k) (every block is an average), so no smoothed
        # copy of k is made: at 720p that copy would be gigabytes.
        pooled_q = pool(q, block_q)
        pooled_k = pool(k, block_k) - k.mean(dim=2, keepdim=True, dtype=torch.float32)
        scores = pooled_q @ pooled_k.transpose(-1, -2)
    else:
        scores = _low_precision_scores(q, k, block_q, block_k, pool)
    kk = kept_key_blocks(topk, n_key_blocks)
    lut = torch.topk(scores, kk, dim=-1, sorted=False).indices
    lut = lut.sort(dim=-1).values.contiguous()
    return BlockSelection(lut=lut, n_key_blocks=n_key_blocks, block_q=block_q, block_k=block_k)


# key blocks smoothed and pooled per slice, so the smoothed copy is never whole-length
_SMOOTH_SLICE_BLOCKS = 64


def _low_precision_scores(
    q: Tensor, k: Tensor, block_q: int, block_k: int, pool: Callable[[Tensor, int], Tensor]
) -> Tensor:
    """Upstream's block scores in q's dtype: the token mean of k in that dtype, ``k - mean``
    rounded per element, block means summed in fp32 and stored in the dtype, and a matmul whose
    result is rounded to the dtype (fp32 accumulation, as cuBLAS does)."""
    dtype = q.dtype
    mean_k = k.mean(dim=2, keepdim=True)  # in k's dtype, like torch.mean upstream
    pooled_q = pool(q, block_q).to(dtype)
    step = _SMOOTH_SLICE_BLOCKS * block_k
    pooled_k = torch.cat(
        [
            pool((k[:, :, start : start + step] - mean_k).to(dtype), block_k).to(dtype)
            for start in range(0, k.shape[2], step)
        ],
        dim=2,
    )
    return pooled_q @ pooled_k.transpose(-1, -2)


def tileable(*sizes: int) -> bool:
    """The kernels tile head_dim and both block sizes with powers of two >= 16."""
    return all(n >= 16 and n & (n - 1) == 0 for n in sizes)
