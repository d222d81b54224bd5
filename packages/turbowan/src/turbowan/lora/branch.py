"""The unmerged LoRA branch: ``y = base(x) + s * (alpha/rank) * up(down(x))`` beside a module.

The base weights (int8 or bf16) are never touched, so the checkpoint stays exact and the
int8 GEMM runs as before. Each LoRA's tensors are *non-persistent buffers* of a small child
module of the module they change (``blocks.3.self_attn.q.lora.<name>.down``): they are part of
that block for offloadkit, so they stream in the block's one contiguous copy and the planner
counts their bytes, while ``state_dict()`` still equals the checkpoint. The strength is a
plain Python float on the branch, not packed data: changing it moves and re-packs nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: name of the child module that holds a target's LoRA branches
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
        """s * (alpha/rank) * up(down(x)) + s * diff(x) + s * diff_b, in x's dtype."""
        out = None
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

    def extra_repr(self) -> str:
        rank = "" if self.down is None else f"rank={self.down.shape[0]}, "
        return f"{rank}scale={self.scale:g}, strength={self.strength:g}"


class LoraStack(nn.ModuleDict):
    """The LoRA branches of one target module, by LoRA name, applied in order by a forward
    hook on the target (the hook handle lives outside ``_modules``)."""


def _normed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The weight-free part of one of the DiT's norms, in fp32, as its forward computes it."""
    from turbowan.dit.model import AffineLayerNorm

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
    if module.__dict__.get("_lora_kind") == "norm":
        normed = _normed(module, x)
        delta = sum(b.norm_delta(normed) for b in active)
        return (output.float() + delta).to(output.dtype)
    for branch in active:
        delta = branch.linear_delta(x)
        if delta is not None:
            output = output + delta.to(output.dtype)
    return output


def stack_of(module: nn.Module, *, create: bool = False, kind: str = "linear") -> LoraStack | None:
    """The LoRA stack of ``module`` (made, with its hook, when ``create``)."""
    stack = module._modules.get(STACK_ATTR)
    if stack is None and create:
        stack = LoraStack()
        module.add_module(STACK_ATTR, stack)
        module.__dict__["_lora_kind"] = kind
        stack.__dict__["_hook"] = module.register_forward_hook(_apply_stack)
    return stack  # type: ignore[return-value]


def drop_stack_if_empty(module: nn.Module) -> None:
    stack = module._modules.get(STACK_ATTR)
    if stack is not None and len(stack) == 0:
        stack.__dict__["_hook"].remove()
        del module._modules[STACK_ATTR]
        module.__dict__.pop("_lora_kind", None)
