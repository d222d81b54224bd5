"""A small transformer for offloadkit tests: embedding, attention+MLP blocks in a
ModuleList, buffers of several dtypes (int8 weights with fp32 scales, a rotary table),
keyword arguments in forward, and a head."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Int8Linear(nn.Module):
    """Weights stored as an int8 *buffer* plus per-row fp32 scales, like turbowan's layers."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        w = torch.randn(d_out, d_in) / d_in**0.5
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("weight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale.float())
        self.bias = nn.Parameter(torch.randn(d_out).to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() * self.scale
        return torch.nn.functional.linear(x, w, self.bias.float())


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = Int8Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.register_buffer("gate", torch.linspace(0.5, 1.0, dim))

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None,
                scale: float = 1.0) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        attn = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        x = x + scale * self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.gate * self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 97, dim: int = 64, hidden: int = 128, heads: int = 4,
                 num_blocks: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, hidden, heads) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("position", torch.randn(256, dim) * 0.02)

    def forward(self, tokens: torch.Tensor, *, mask: torch.Tensor | None = None,
                scale: float = 1.0) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, mask=mask, scale=scale)
        return self.head(self.norm(x))


def make_model(seed: int = 0, **sizes: int) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(**sizes).eval()


def make_inputs(seed: int = 1, batch: int = 2, length: int = 12, vocab: int = 97
                ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    return tokens, mask


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.device, torch.dtype, bool]]:
    """Every parameter and buffer: a cloned value, its device, dtype and requires_grad."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        out[name] = (t.detach().clone(), t.device, t.dtype, t.requires_grad)
    return out


def run_on_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on a fresh thread (as a background stager runs it); its
    result, or its exception re-raised here."""
    box: dict = {}

    def work() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            box["error"] = exc

    thread = threading.Thread(target=work, name="test-stager")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
