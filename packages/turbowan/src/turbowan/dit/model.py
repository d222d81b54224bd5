"""The Wan2.2 I2V DiT (one expert), with the TurboWan checkpoint's key names (spec §1).

Compute runs in the dtype of the weights (fp32 for CPU tests, bf16 on GPU) with the fp32
islands of the reference: time embedding, modulation arithmetic, norms, RoPE and the head.
Blocks keep no derived tensors between calls (RoPE tables are passed in), so an offload
engine may swap their parameters for views of a device slot at any time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turbowan.dit.attention import make_attention_op
from turbowan.dit.config import DiTConfig, check_attention
from turbowan.dit.rope import apply_rope, rope_cos_sin
from turbowan.ops.dense import dense_attention
from turbowan.quant.int8_linear import Int8Linear

TIME_THETA = 10000.0


class Fp32Linear(nn.Linear):
    """A linear the reference runs in fp32 whatever its weight dtype (time embedding, head).
    The forward calls it as a module, so whatever hooks a linear (a LoRA branch) acts here too."""

    compute_dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


#: child module a block or the head may carry that adds deltas to its modulation table (a
#: LoRA's ``.diff``, attached by turbowan.lora): called on the table, which stays untouched
TABLE_DELTAS = "modulation_deltas"


def modulation_table(owner: nn.Module) -> torch.Tensor:
    """``owner.modulation`` in fp32 as the forward uses it, with any deltas attached to it."""
    table = owner.modulation.float()
    deltas = owner._modules.get(TABLE_DELTAS)
    return table if deltas is None else deltas(table)


def sinusoid(t: torch.Tensor, width: int) -> torch.Tensor:
    """[cos(t w), sin(t w)] (cos first), w_i = 10000^(-i/half); float64 in, float32 out."""
    half = width // 2
    freqs = TIME_THETA ** (-torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.double()[:, None] * freqs[None, :]
    return torch.cat([args.cos(), args.sin()], dim=1).float()


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w over the full width; fp32 inside, fp32 weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class AffineLayerNorm(nn.Module):
    """LayerNorm with weight and bias (``norm3``); fp32 inside, fp32 parameters."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(
            x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps
        )
        return out.to(x.dtype)


def _plain_layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free LayerNorm in fp32, rounded to x's dtype (as the fused norm returns)."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _make_linear(
    in_f: int, out_f: int, *, quant: str, dtype: torch.dtype
) -> nn.Linear | Int8Linear:
    if quant == "int8":
        return Int8Linear(in_f, out_f, dtype=dtype)
    return nn.Linear(in_f, out_f, dtype=dtype)


class _Attention(nn.Module):
    """q, k, v, o projections and the q/k RMSNorms that self- and cross-attention share."""

    def __init__(self, config: DiTConfig, *, quant: str, dtype: torch.dtype) -> None:
        super().__init__()
        dim = config.dim
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.q = _make_linear(dim, dim, quant=quant, dtype=dtype)
        self.k = _make_linear(dim, dim, quant=quant, dtype=dtype)
        self.v = _make_linear(dim, dim, quant=quant, dtype=dtype)
        self.o = _make_linear(dim, dim, quant=quant, dtype=dtype)
        self.norm_q = RMSNorm(dim, config.eps)
        self.norm_k = RMSNorm(dim, config.eps)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, self.num_heads, self.head_dim)


class WanSelfAttention(_Attention):
    def __init__(
        self, config: DiTConfig, *, quant: str, attention: str, sla_topk: float, dtype: torch.dtype
    ) -> None:
        super().__init__(config, quant=quant, dtype=dtype)
        self.attn_op = make_attention_op(
            attention, head_dim=config.head_dim, topk=sla_topk, dtype=dtype
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = apply_rope(self._split_heads(self.norm_q(self.q(x))), cos, sin)
        k = apply_rope(self._split_heads(self.norm_k(self.k(x))), cos, sin)
        v = self._split_heads(self.v(x))
        out = self.attn_op(q, k, v)
        return self.o(out.flatten(2).to(x.dtype))


class WanCrossAttention(_Attention):
    """Text-only cross-attention (Wan2.2 A14B has no CLIP image branch); no mask, no RoPE."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.norm_q(self.q(x)))
        k = self._split_heads(self.norm_k(self.k(context)))
        v = self._split_heads(self.v(context))
        return self.o(dense_attention(q, k, v).flatten(2))


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(
        self, config: DiTConfig, *, quant: str, attention: str, sla_topk: float, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.eps = config.eps
        self.modulation = nn.Parameter(torch.empty(1, 6, config.dim, dtype=dtype))
        self.self_attn = WanSelfAttention(
            config, quant=quant, attention=attention, sla_topk=sla_topk, dtype=dtype
        )
        self.norm3 = AffineLayerNorm(config.dim, config.eps)
        self.cross_attn = WanCrossAttention(config, quant=quant, dtype=dtype)
        self.ffn = nn.Sequential(
            _make_linear(config.dim, config.ffn_dim, quant=quant, dtype=dtype),
            nn.GELU(approximate="tanh"),
            _make_linear(config.ffn_dim, config.dim, quant=quant, dtype=dtype),
        )

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        dtype = x.dtype
        m = (modulation_table(self) + e0).chunk(6, dim=1)  # each (B, 1, dim), fp32
        a = (_plain_layer_norm(x, self.eps).float() * (1 + m[1]) + m[0]).to(dtype)
        x = (x.float() + self.self_attn(a, cos, sin).float() * m[2]).to(dtype)
        x = x + self.cross_attn(self.norm3(x), context)
        f = (_plain_layer_norm(x, self.eps).float() * (1 + m[4]) + m[3]).to(dtype)
        return (x.float() + self.ffn(f).float() * m[5]).to(dtype)


class WanHead(nn.Module):
    """Output head in fp32, modulated by the 5120-vector ``e`` (not ``e0``)."""

    def __init__(self, config: DiTConfig, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = config.eps
        self.modulation = nn.Parameter(torch.empty(1, 2, config.dim, dtype=dtype))
        self.head = Fp32Linear(config.dim, config.out_dim * config.patch_volume, dtype=dtype)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (modulation_table(self) + e[:, None, :].float()).chunk(2, dim=1)
        normed = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.head(normed * (1 + scale) + shift)


def patchify(xy: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T*H/2*W/2, C*4); per-token vector ordered (c, kh, kw)."""
    b, c, t, h, w = xy.shape
    tokens = xy.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6)
    return tokens.reshape(b, t * (h // 2) * (w // 2), c * 4)


def unpatchify(out: torch.Tensor, grid: tuple[int, int, int], channels: int) -> torch.Tensor:
    """(B, L, 4*C) with per-token order (kh, kw, c) -> (B, C, T, H, W)."""
    b = out.shape[0]
    t, hp, wp = grid
    x = out.reshape(b, t, hp, wp, 2, 2, channels).permute(0, 6, 1, 2, 4, 3, 5)
    return x.reshape(b, channels, t, hp * 2, wp * 2)


class WanDiT(nn.Module):
    """Wan2.2 I2V expert: ``dit(x, t, context, y) -> velocity (B, out_dim, T, H, W)`` in fp32.

    ``x`` (B,16,T,H,W) noisy latent, ``t`` (B,) or (B,1) holding 1000*t_rf, ``context``
    (B,Lc,text_dim) text states, ``y`` (B,20,T,H,W) mask + image latent.
    """

    #: a :class:`turbowan.distributed.UlyssesShard` while sequence parallel is on
    sequence_parallel = None

    def __init__(
        self,
        config: DiTConfig,
        *,
        quant: str = "none",
        attention: str = "original",
        sla_topk: float = 0.1,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_attention(attention, sla_topk)  # once here: the blocks and their forwards trust it
        self.config = config
        self.quant = quant
        self.attention = attention
        dim = config.dim
        self.patch_embedding = nn.Linear(config.in_dim * config.patch_volume, dim, dtype=dtype)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim, dtype=dtype),
            nn.GELU(approximate="tanh"),
            nn.Linear(dim, dim, dtype=dtype),
        )
        self.time_embedding = nn.Sequential(
            Fp32Linear(config.freq_dim, dim, dtype=dtype),
            nn.SiLU(),
            Fp32Linear(dim, dim, dtype=dtype),
        )
        self.time_projection = nn.Sequential(nn.SiLU(), Fp32Linear(dim, 6 * dim, dtype=dtype))
        self.blocks = nn.ModuleList(
            WanBlock(config, quant=quant, attention=attention, sla_topk=sla_topk, dtype=dtype)
            for _ in range(config.num_layers)
        )
        self.head = WanHead(config, dtype=dtype)
        # RoPE tables of the last (grid, device): every step of a generation asks for the same
        self._rope_key: tuple[tuple[int, int, int], torch.device] | None = None
        self._rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def _check_inputs(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor
    ) -> None:
        cfg = self.config
        if x.dim() != 5 or y.dim() != 5:
            raise ValueError(
                f"x and y must be (B, C, T, H, W); got x {tuple(x.shape)}, y {tuple(y.shape)}"
            )
        if x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
            raise ValueError(
                f"x {tuple(x.shape)} and y {tuple(y.shape)} must share batch and (T, H, W)"
            )
        if x.shape[1] + y.shape[1] != cfg.in_dim:
            raise ValueError(
                f"x has {x.shape[1]} and y {y.shape[1]} channels; the model takes "
                f"{cfg.in_dim} together (16 latent + 4 mask + 16 image latent)"
            )
        if x.shape[3] % 2 or x.shape[4] % 2:
            raise ValueError(
                f"latent H and W must be even (patch 2x2), got {tuple(x.shape[3:])}: "
                "use a pixel size that is a multiple of 16"
            )
        if (
            context.dim() != 3
            or context.shape[-1] != cfg.text_dim
            or context.shape[0] != x.shape[0]
        ):
            raise ValueError(
                f"context must be (B={x.shape[0]}, L, {cfg.text_dim}); got {tuple(context.shape)}"
            )
        if t.numel() != x.shape[0]:
            raise ValueError(
                f"t must hold one timestep per sample (shape (B,) or (B, 1)); got {tuple(t.shape)}"
            )

    def time_embed(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e, e0): e (B, dim) for the head, e0 (B, 6, dim) for the blocks; fp32."""
        e = self.time_embedding(sinusoid(t.reshape(-1), self.config.freq_dim))
        e0 = self.time_projection(e)
        return e, e0.unflatten(1, (6, self.config.dim))

    def rope_tables(
        self, grid: tuple[int, int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) for ``grid`` on ``device``, built (on the CPU, in float64) once per
        grid instead of once per forward, with the host-to-device copy that goes with it."""
        if self._rope_key != (grid, device) or self._rope_tables is None:
            with torch.inference_mode(False):  # plain tensors: usable under autograd later
                self._rope_tables = rope_cos_sin(grid, self.config.head_dim, device=device)
            self._rope_key = (grid, device)
        return self._rope_tables

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        self._check_inputs(x, t, context, y)
        dtype = self.compute_dtype
        _, _, frames, height, width = x.shape
        grid = (frames, height // 2, width // 2)
        tokens = patchify(torch.cat([x, y.to(x.dtype)], dim=1).to(dtype))
        cos, sin = self.rope_tables(grid, tokens.device)
        shard = self.sequence_parallel
        if shard is not None:  # this rank's tokens and RoPE rows only
            tokens, cos, sin = shard.scatter(self, tokens, cos, sin)
        h = self.patch_embedding(tokens)
        e, e0 = self.time_embed(t.to(h.device))
        ctx = self.text_embedding(context.to(device=h.device, dtype=dtype))
        for block in self.blocks:
            h = block(h, e0, ctx, cos, sin)
        out = self.head(h, e)
        if shard is not None:
            out = shard.gather(out)
        return unpatchify(out, grid, self.config.out_dim)
