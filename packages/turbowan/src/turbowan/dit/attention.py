"""Self-attention operators of the DiT, keyed like the TurboWan checkpoints.

``WanSelfAttention.attn_op.local_attn`` is either ``DenseAttention`` (no parameters: the
`original` backend) or ``SparseLinearAttention`` (`sla` / `sagesla`), which owns ``proj_l``
(Linear 128->128, shared across heads) at ``...attn_op.local_attn.proj_l.{weight,bias}``.
The maths lives in ``turbowan.ops``; these modules only hold weights and choose the op.
"""

from __future__ import annotations

import torch
from torch import nn

from turbowan.ops.dense import dense_attention
from turbowan.ops.sagesla import sagesla_attention
from turbowan.ops.sla import sla_forward


class DenseAttention(nn.Module):
    """`original` backend: PyTorch SDPA, no parameters."""

    kind = "original"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dense_attention(q, k, v)


class SparseLinearAttention(nn.Module):
    """`sla` / `sagesla` backend: block-sparse softmax + linear branch through ``proj_l``.

    ``kind`` and ``topk`` are checked where the model is built (``WanDiT``); the forward runs
    the op without checking them again (it runs once per block per step)."""

    def __init__(
        self,
        head_dim: int = 128,
        *,
        topk: float = 0.1,
        kind: str = "sla",
        block_q: int = 128,
        block_k: int = 64,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.topk = topk
        self.block_q = block_q
        self.block_k = block_k
        self.proj_l = nn.Linear(head_dim, head_dim, dtype=dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.kind == "sagesla":
            return sagesla_attention(
                q, k, v, topk=self.topk, proj_weight=self.proj_l.weight, proj_bias=self.proj_l.bias
            )
        return sla_forward(
            q,
            k,
            v,
            topk=self.topk,
            block_q=self.block_q,
            block_k=self.block_k,
            proj_weight=self.proj_l.weight,
            proj_bias=self.proj_l.bias,
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind}, topk={self.topk}, block_q={self.block_q}, block_k={self.block_k}"


class AttentionOp(nn.Module):
    """Holder that gives ``local_attn`` the checkpoint's key path (``attn_op.local_attn``)."""

    def __init__(self, local_attn: nn.Module) -> None:
        super().__init__()
        self.local_attn = local_attn

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.local_attn(q, k, v)


def make_attention_op(
    attention: str, *, head_dim: int, topk: float, dtype: torch.dtype | None
) -> AttentionOp:
    """The op of ``attention`` ("original", "sla" or "sagesla"; checked by the caller)."""
    if attention == "original":
        return AttentionOp(DenseAttention())
    return AttentionOp(SparseLinearAttention(head_dim, topk=topk, kind=attention, dtype=dtype))
