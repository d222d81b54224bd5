"""The unmerged LoRA branch: ``y = base(x) + s * (alpha/rank) * up(down(x))`` beside a module.

One mechanism for every target: the DiT *calls* what a LoRA changes, and the LoRA acts on
that call. Linears (including the fp32 ones of the time embedding and the head) and norms get
a forward hook that adds the branch to their output; a modulation table, a parameter the DiT
reads, is read through a call of a child module (``TABLE_DELTAS``) that adds ``s * diff``.

The base weights (int8 or bf16) are never touched, so the checkpoint stays exact and the
int8 GEMM runs as before. Each LoRA's tensors are *non-persistent buffers* of a small child
module of the module they change (``blocks.3.self_attn.q.lora.<name>.down``): they are part of
that block for offloadkit, so they stream in the block's one contiguous copy and the planner
counts their bytes, while ``state_dict()`` still equals the checkpoint. The strength is a
plain Python float on the branch, not packed data: changing it moves and re-packs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from turbowan.dit.model import TABLE_DELTAS, AffineLayerNorm

#: name of the child module that holds a linear's or norm's LoRA branches
STACK_ATTR = "lora"


class LoraBranch(nn.Module):
    """One LoRA's change to one linear or norm module; ``strength`` 0 adds nothing at all."""

    def __init__(self, *, down: torch.Tensor | None = None, up: torch.Tensor | None = None,
                 diff: torch.Tensor | None = None, diff_b: torch.Tensor | None = None,
                 scale: float = 1.0, strength: float = 1.0) -> None:
        super().__init__()
        for name, tensor in (("down", down), ("up", up), ("diff", diff), ("diff_b", diff_b)):
            if tensor is not None:
                self.register_buffer(name, tensor, persistent=False)
            else:
                setattr(self, name, None)
        self.scale = float(scale)  # alpha / rank, fixed by the file
        self.strength = float(strength)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def linear_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """s * (alpha/rank) * up(down(x)) + s * diff(x) + s * diff_b, in the branch's dtype
        (the one its module computes in: fp32 for the time embedding and the head)."""
        out = None
        ref = self.down if self.down is not None else self.diff
        if ref is not None:
            x = x.to(ref.dtype)
        if self.down is not None:
            out = F.linear(F.linear(x, self.down), self.up) * (self.strength * self.scale)
        if self.diff is not None:
            full = F.linear(x, self.diff) * self.strength
            out = full if out is None else out + full
        if self.diff_b is not None:
            bias = self.diff_b * self.strength
            out = bias if out is None else out + bias
        return out

    def norm_delta(self, normed: torch.Tensor) -> torch.Tensor:
        """s * (normed * diff + diff_b): a norm's output is linear in its weight and bias."""
        out = normed * self.diff * self.strength if self.diff is not None else None
        if self.diff_b is not None:
            bias = self.diff_b * self.strength
            out = bias if out is None else out + bias
        return out

    def table_delta(self) -> torch.Tensor:
        """s * diff, in fp32: a LoRA's additive change to a modulation table."""
        return self.diff * self.strength

    def extra_repr(self) -> str:
        rank = "" if self.down is None else f"rank={self.down.shape[0]}, "
        return f"{rank}scale={self.scale:g}, strength={self.strength:g}"


class LoraStack(nn.ModuleDict):
    """The LoRA branches of one target, by LoRA name. For a linear or norm they are applied
    in order by a forward hook on it (the hook handle lives outside ``_modules``); for a
    modulation table the DiT calls the stack on the table."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind  # "linear" | "norm" | "param"

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        active = [b for b in self.values() if b.strength != 0.0]
        if not active:
            return table  # strength 0 everywhere: the table itself, bit for bit
        return table + sum(b.table_delta() for b in active)


def _normed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The weight-free part of one of the DiT's norms, in fp32, as its forward computes it."""
    xf = x.float()
    if isinstance(module, AffineLayerNorm):
        return F.layer_norm(xf, (xf.shape[-1],), eps=module.eps)
    return xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + module.eps)


def _apply_stack(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    stack: LoraStack = module._modules[STACK_ATTR]  # type: ignore[assignment]
    active = [b for b in stack.values() if b.strength != 0.0]
    if not active:
        return output  # strength 0 everywhere: the base output itself, bit for bit
    x = args[0]
    if stack.kind == "norm":
        normed = _normed(module, x)
        delta = sum(b.norm_delta(normed) for b in active)
        return (output.float() + delta).to(output.dtype)
    for branch in active:
        delta = branch.linear_delta(x)
        if delta is not None:
            output = output + delta.to(output.dtype)
    return output


def stack_attr(kind: str) -> str:
    """Name of the child module holding the LoRA stack of a target of ``kind``."""
    return TABLE_DELTAS if kind == "param" else STACK_ATTR


def stack_of(module: nn.Module, *, create: bool = False, kind: str = "linear") -> LoraStack | None:
    """The LoRA stack of ``module`` (for a ``param`` target: of the module owning the table),
    made, with its hook for a linear or norm, when ``create``."""
    attr = stack_attr(kind)
    stack = module._modules.get(attr)
    if stack is None and create:
        stack = LoraStack(kind)
        module.add_module(attr, stack)
        if kind != "param":
            stack.__dict__["_hook"] = module.register_forward_hook(_apply_stack)
    return stack  # type: ignore[return-value]


def stacks(model: nn.Module) -> Iterator[tuple[nn.Module, LoraStack]]:
    """(owner module, stack) for every LoRA stack in ``model``, in module order."""
    for module in list(model.modules()):
        for attr in (STACK_ATTR, TABLE_DELTAS):
            stack = module._modules.get(attr)
            if isinstance(stack, LoraStack):
                yield module, stack


def drop_stack_if_empty(module: nn.Module, stack: LoraStack) -> None:
    if len(stack) == 0:
        hook = stack.__dict__.get("_hook")
        if hook is not None:
            hook.remove()
        del module._modules[stack_attr(stack.kind)]
