"""Ulysses sequence parallel for :class:`~turbowan.dit.model.WanDiT`, switched on per model.

:func:`enable_sequence_parallel` gives the DiT and every self-attention op one shared
:class:`UlyssesShard`. Per forward, the DiT cuts the patch tokens and the RoPE rows to this
rank's chunk, runs its blocks on the chunk (everything but self-attention is token by
token), and gathers the head's output; the attention ops trade sequence for heads around
the unchanged local attention. No parameter, buffer or key changes, so checkpoints load
as before and offloadkit places the blocks as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from turbowan.distributed.ulysses import (
    INT8_TOKEN_TILE,
    SequenceParallel,
    gather_sequence,
    head_to_seq,
    seq_to_head,
    split_sizes,
)


def valid_sp_sizes(num_heads: int) -> list[int]:
    """Sequence-parallel sizes a model with ``num_heads`` heads allows (its divisors)."""
    return [n for n in range(1, num_heads + 1) if num_heads % n == 0]


def token_align(model: nn.Module) -> int:
    """128 when an int8 layer quantises activations per 128-token tile (modes `reference`
    and `triton`): a chunk starting mid-tile would change its numerics. 1 otherwise."""
    from turbowan.quant.int8_linear import Int8Linear

    tiled = any(isinstance(m, Int8Linear) and m.mode in ("reference", "triton")
                for m in model.modules())
    return INT8_TOKEN_TILE if tiled else 1


class UlyssesShard:
    """Per-model state of one forward: the group and the current chunk sizes (set by the
    DiT at the start of each forward, read by its attention ops)."""

    def __init__(self, sp: SequenceParallel) -> None:
        self.sp = sp
        self.sizes: list[int] | None = None
        #: token alignment of the chunks; None: :func:`token_align` of the model
        self.align: int | None = None

    def scatter(self, model: nn.Module, tokens: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's rows of the (B, L, C) tokens and the (L, D/2) RoPE tables."""
        align = self.align if self.align is not None else token_align(model)
        self.sizes = split_sizes(tokens.shape[1], self.sp.size, align)
        start = sum(self.sizes[: self.sp.rank])
        rows = slice(start, start + self.sizes[self.sp.rank])
        return tokens[:, rows], cos[rows], sin[rows]

    def attend(self, attn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """seq -> heads, ``attn`` over the whole sequence for this rank's heads, heads -> seq."""
        if self.sizes is None:
            raise RuntimeError("sequence-parallel attention called outside its DiT's forward")
        full = [seq_to_head(t, self.sizes, self.sp) for t in (q, k, v)]
        return head_to_seq(attn(*full), self.sizes, self.sp)

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        assert self.sizes is not None
        return gather_sequence(out, self.sizes, self.sp)


def enable_sequence_parallel(model: nn.Module, sp: SequenceParallel) -> UlyssesShard:
    """Run ``model`` (a WanDiT) Ulysses-parallel over ``sp``; every rank of the group must
    call its forward with the same inputs. Refuses a group size that does not divide the
    head count, naming the sizes that do."""
    from turbowan.dit.attention import AttentionOp

    heads = model.config.num_heads
    if heads % sp.size:
        raise ValueError(
            f"sequence parallel over {sp.size} ranks needs a head count divisible by "
            f"{sp.size}; this model has {heads} heads: use --sp one of "
            f"{', '.join(map(str, valid_sp_sizes(heads)))}")
    shard = UlyssesShard(sp)
    model.sequence_parallel = shard
    for module in model.modules():
        if isinstance(module, AttentionOp):
            module.sequence_parallel = shard
    return shard


def disable_sequence_parallel(model: nn.Module) -> None:
    """Back to the one-process forward."""
    for module in model.modules():
        if "sequence_parallel" in vars(module):
            del module.sequence_parallel
