"""Ulysses sequence parallel: the all-to-alls that turn a rank's token chunk of every head
into the whole sequence for a share of the heads, and back.

Each rank of a sequence-parallel group of size ``sp`` holds ``sizes[r]`` consecutive tokens.
Before self-attention, :func:`seq_to_head` trades them so each rank holds all ``L`` tokens
of ``heads / sp`` heads; the attention op (SLA included: it works head by head) then runs
unchanged, and :func:`head_to_seq` trades back. The sequence is never padded: pad tokens
would enter SLA's block pooling and its linear branch. Chunks may be uneven, and are
aligned to the int8 GEMM's 128-token tiles when those decide the numerics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

#: the int8 `reference`/`triton` GEMMs quantise activations per 128 tokens
INT8_TOKEN_TILE = 128


def split_sizes(length: int, parts: int, align: int = 1) -> list[int]:
    """Token counts of ``parts`` consecutive chunks of ``length`` tokens, no padding.

    Every chunk but the trailing ones holds ``ceil(ceil(length/align)/parts) * align``
    tokens, so each starts on an ``align`` boundary; the last takes the remainder (it may be
    shorter, and with few tiles a trailing chunk may be empty)."""
    if parts < 1 or align < 1 or length < 0:
        raise ValueError(f"split_sizes needs parts >= 1, align >= 1, length >= 0; got "
                         f"{parts}, {align}, {length}")
    tiles = -(-length // align)
    chunk = -(-tiles // parts) * align
    return [max(0, min(chunk, length - i * chunk)) for i in range(parts)]


@dataclass(frozen=True)
class SequenceParallel:
    """A sequence-parallel group as the DiT sees it: the process group, this rank's place in
    it and its size. ``group=None`` is the default (world) group."""

    group: dist.ProcessGroup | None
    rank: int
    size: int

    @classmethod
    def of(cls, group: dist.ProcessGroup | None = None) -> SequenceParallel:
        return cls(group, dist.get_rank(group), dist.get_world_size(group))


def seq_to_head(x: torch.Tensor, sizes: list[int], sp: SequenceParallel) -> torch.Tensor:
    """(B, sizes[rank], H, D) token chunk of all heads -> (B, L, H/sp, D): every token of
    this rank's heads [rank*H/sp, (rank+1)*H/sp)."""
    b, lr, heads, d = x.shape
    n = sp.size
    if heads % n:
        raise ValueError(f"{heads} heads cannot be shared by {n} ranks")
    hs = heads // n
    # (n, Lr, B, Hs, D): block j (the heads of rank j) goes to rank j
    send = x.reshape(b, lr, n, hs, d).permute(2, 1, 0, 3, 4).reshape(n * lr, b, hs, d)
    recv = x.new_empty((sum(sizes), b, hs, d))
    dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=list(sizes),
                           input_split_sizes=[lr] * n, group=sp.group)
    return recv.permute(1, 0, 2, 3)  # rank order is sequence order


def head_to_seq(x: torch.Tensor, sizes: list[int], sp: SequenceParallel) -> torch.Tensor:
    """Inverse of :func:`seq_to_head`: (B, L, H/sp, D) -> (B, sizes[rank], H, D)."""
    b, length, hs, d = x.shape
    n = sp.size
    lr = sizes[sp.rank]
    send = x.permute(1, 0, 2, 3).contiguous()  # (L, B, Hs, D): chunk j of the sequence to rank j
    recv = x.new_empty((n * lr, b, hs, d))
    dist.all_to_all_single(recv, send, output_split_sizes=[lr] * n,
                           input_split_sizes=list(sizes), group=sp.group)
    return recv.reshape(n, lr, b, hs, d).permute(2, 1, 0, 3, 4).reshape(b, lr, n * hs, d)


def gather_sequence(x: torch.Tensor, sizes: list[int], sp: SequenceParallel) -> torch.Tensor:
    """(B, sizes[rank], C) on every rank -> (B, L, C) on every rank. gloo's all_gather
    refuses uneven tensors, so chunks travel padded to the longest and are trimmed."""
    longest = max(sizes)
    padded = x.new_zeros((x.shape[0], longest, *x.shape[2:]))
    padded[:, : x.shape[1]] = x
    pieces = [torch.empty_like(padded) for _ in range(sp.size)]
    dist.all_gather(pieces, padded, group=sp.group)
    return torch.cat([p[:, :n] for p, n in zip(pieces, sizes, strict=True)], dim=1)
