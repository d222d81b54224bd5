"""The umT5 encoder: T5 blocks with per-layer relative position tables.

Math follows the upstream encoder exactly (spec §7.1): RMSNorm computed in fp32 without mean
subtraction, no 1/sqrt(d) attention scaling, softmax in fp32, gated-GELU (tanh) feed-forward.
The blocks sit in one ``nn.ModuleList`` and each block computes its own position bias from its
own table inside ``forward``, so offloadkit can stream the blocks one at a time.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from turbowan.text_encoder.config import UMT5Config

__all__ = ["UMT5Block", "UMT5Encoder", "RMSNorm", "relative_position_buckets", "zero_padding"]


def relative_position_buckets(
    q_len: int,
    k_len: int,
    *,
    num_buckets: int = 32,
    max_distance: int = 128,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bucket index (q_len, k_len) of (key position - query position), bidirectional T5 rule."""
    q_pos = torch.arange(q_len, device=device).unsqueeze(1)
    k_pos = torch.arange(k_len, device=device).unsqueeze(0)
    rel = k_pos - q_pos
    half = num_buckets // 2
    offset = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    # log-spaced buckets for distances >= exact, saturating at max_distance
    far = exact + (
        torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)
    ).long()
    far = far.clamp(max=half - 1)
    return offset + torch.where(dist < exact, dist, far)


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, statistics in fp32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def _embedding(num: int, dim: int, dtype: torch.dtype | None) -> nn.Embedding:
    """An ``nn.Embedding`` without its random init on the meta device: there ``normal_`` runs
    a Python decomposition that imports torch._dynamo (seconds per process, paid by every
    pre-flight meta build and every spawned rank) to fill values that do not exist."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num, dim, dtype=dtype, _weight=torch.empty(num, dim, dtype=dtype))
    return nn.Embedding(num, dim, dtype=dtype)


class RelativePositionBias(nn.Module):
    """One layer's (buckets, heads) table; looked up into a (1, heads, Lq, Lk) additive bias."""

    def __init__(self, num_buckets: int, num_heads: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.embedding = _embedding(num_buckets, num_heads, dtype)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class SelfAttention(nn.Module):
    def __init__(self, config: UMT5Config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.dim, config.dim_attn, bias=False, dtype=dtype)
        self.k = nn.Linear(config.dim, config.dim_attn, bias=False, dtype=dtype)
        self.v = nn.Linear(config.dim, config.dim_attn, bias=False, dtype=dtype)
        self.o = nn.Linear(config.dim_attn, config.dim, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = (
            proj(x).view(b, length, self.num_heads, -1).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        # T5: no 1/sqrt(d) scaling; scores and softmax in fp32 as upstream does
        scores = torch.matmul(q, k.transpose(-1, -2)).float() + bias
        weights = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, length, -1)
        return self.o(out)


class GatedGELU(nn.Module):
    """FFN(x) = fc2(GELU_tanh(gate(x)) * fc1(x)); `gate.0` keeps the checkpoint's key name."""

    def __init__(self, config: UMT5Config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.Linear(config.dim, config.ffn_dim, bias=False, dtype=dtype),
            nn.GELU(approximate="tanh"),
        )
        self.fc1 = nn.Linear(config.dim, config.ffn_dim, bias=False, dtype=dtype)
        self.fc2 = nn.Linear(config.ffn_dim, config.dim, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gate(x) * self.fc1(x))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 activations of T5 can overflow; clamp just below the maximum as upstream does."""
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class UMT5Block(nn.Module):
    def __init__(self, config: UMT5Config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.dim, config.eps, dtype=dtype)
        self.attn = SelfAttention(config, dtype=dtype)
        self.norm2 = RMSNorm(config.dim, config.eps, dtype=dtype)
        self.ffn = GatedGELU(config, dtype=dtype)
        self.pos_embedding = RelativePositionBias(config.num_buckets, config.num_heads, dtype=dtype)

    def forward(
        self, x: torch.Tensor, key_bias: torch.Tensor, buckets: torch.Tensor
    ) -> torch.Tensor:
        """``key_bias`` (B,1,1,L) fp32: 0 for real tokens, fp32 min for padding."""
        bias = self.pos_embedding(buckets).float() + key_bias
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """Token ids (B, L) and mask -> hidden states (B, L, dim). Padding rows are not zeroed here."""

    def __init__(self, config: UMT5Config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = _embedding(config.vocab_size, config.dim, dtype)
        self.blocks = nn.ModuleList(UMT5Block(config, dtype=dtype) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.eps, dtype=dtype)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(f"token ids must be (batch, length); got shape {tuple(ids.shape)}")
        b, length = ids.shape
        ids = ids.to(self.token_embedding.weight.device)
        x = self.token_embedding(ids)
        key_bias = torch.zeros(b, 1, 1, length, device=ids.device)
        if mask is not None:
            if tuple(mask.shape) != (b, length):
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} does not match token ids {(b, length)}"
                )
            key_bias = key_bias.masked_fill(
                mask.to(ids.device).view(b, 1, 1, length) == 0, torch.finfo(torch.float32).min
            )
        cfg = self.config
        buckets = relative_position_buckets(
            length, length, num_buckets=cfg.num_buckets, max_distance=cfg.max_distance,
            device=ids.device,
        )
        for block in self.blocks:
            x = block(x, key_bias, buckets)
        return self.norm(x)


def zero_padding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero every row at or after position mask.sum() of each sample, as the Wan pipeline does."""
    lengths = mask.to(hidden.device).long().sum(dim=1, keepdim=True)
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    padding = (positions >= lengths).unsqueeze(-1)
    return hidden.masked_fill(padding, 0)
