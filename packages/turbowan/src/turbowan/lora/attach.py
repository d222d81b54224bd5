"""Attach LoRAs to a Wan DiT expert, change their strength, detach or merge them.

``attach_lora`` matches the file (any naming, see :mod:`turbowan.lora.formats`), checks every
shape, and puts one :class:`~turbowan.lora.branch.LoraBranch` beside each module it changes.
A model must not be under offload while LoRAs are added or removed (offloadkit packed its
tensors when it was staged): remove the handle, attach, apply again. That re-stages only
the expert that changed. ``set_lora_strength`` works at any time, offloaded or not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from turbowan.lora.branch import STACK_ATTR, LoraBranch, drop_stack_if_empty, stack_of
from turbowan.lora.files import load_lora_tensors, lora_name
from turbowan.lora.formats import LoraError, LoraMatch, TargetDelta, match_lora, model_targets

MERGED_ATTR = "_turbowan_merged_loras"


def _refuse_offloaded(model: nn.Module, what: str) -> None:
    import offloadkit

    if offloadkit.is_offloaded(model):
        raise LoraError(
            f"cannot {what} while the model is offloaded: offloadkit packed its tensors when it "
            "was staged. Remove the offload handle (handle.remove()), change the LoRAs, then "
            "apply offloadkit again (only this expert is re-staged); strengths can be changed "
            "at any time with set_lora_strength")


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module's output has: its float weight's (or, for int8, its bias's)."""
    for t in (getattr(module, "weight", None), getattr(module, "bias", None)):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return torch.float32


def _materialise(value: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A LoRA tensor in the module's dtype and device; header specs become ``meta`` tensors
    of the right size (pre-flight profiles a model with LoRAs it has not read yet)."""
    if not isinstance(value, torch.Tensor):
        return torch.empty(tuple(value.shape), dtype=dtype, device="meta")
    return value.detach().to(device=device, dtype=dtype).contiguous()


def _alpha_scale(delta: TargetDelta) -> float:
    """alpha / rank (1 without alpha, as ComfyUI and PEFT do)."""
    if delta.alpha is None or delta.down is None or not isinstance(delta.alpha, torch.Tensor):
        return 1.0
    return float(delta.alpha.float().reshape(()).item()) / delta.rank


def _branch_tensors(delta: TargetDelta, module: nn.Module) -> dict[str, torch.Tensor]:
    ref = getattr(module, "weight", None)
    if ref is None:
        ref = getattr(module, "int8_weight", None)
    device = ref.device if isinstance(ref, torch.Tensor) else torch.device("cpu")
    dtype = torch.float32 if delta.target.kind == "norm" else _compute_dtype(module)
    out: dict[str, torch.Tensor] = {}
    if delta.down is not None:
        rank = delta.rank
        out["down"] = _materialise(delta.down, dtype=dtype, device=device).reshape(rank, -1)
        out["up"] = _materialise(delta.up, dtype=dtype, device=device).reshape(-1, rank)
    for role in ("diff", "diff_b"):
        value = getattr(delta, role)
        if value is not None:
            out[role] = _materialise(value, dtype=dtype, device=device)
    return out


def _tensors_of(lora: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if isinstance(lora, Mapping):
        return lora, "LoRA"
    return load_lora_tensors(lora), str(lora)


def match_for_model(model: nn.Module, lora: str | os.PathLike[str] | Mapping[str, Any],
                    *, source: str | None = None) -> LoraMatch:
    """Match a LoRA (path, tensors or header specs) against ``model`` without changing it."""
    tensors, where = _tensors_of(lora)
    return match_lora(tensors, model_targets(model), source=source or where)


def attach_lora(model: nn.Module, lora: str | os.PathLike[str] | Mapping[str, Any], *,
                strength: float = 1.0, name: str | None = None, merge: bool = False,
                source: str | None = None) -> LoraMatch:
    """Add a LoRA to ``model`` as unmerged branches (or, ``merge=True``, folded into the
    weights of a non-quantised expert). ``lora`` is a file path or a mapping of its tensors
    (or header specs, giving ``meta`` branches for planning). Returns what matched and what
    did not; raises :class:`LoraError` for a file that does not fit the model."""
    if name is None:
        name = lora_name(lora) if not isinstance(lora, Mapping) else "lora"
    name = lora_name(name)
    _refuse_offloaded(model, "attach a LoRA")
    if name in attached_loras(model) or name in model.__dict__.get(MERGED_ATTR, {}):
        raise LoraError(f"a LoRA named {name!r} is already attached; detach it first or give "
                        "this one another name")
    match = match_for_model(model, lora, source=source)
    modules = dict(model.named_modules())
    if merge:
        _merge(model, match, modules, float(strength), name)
        return match
    for target, delta in match.deltas.items():
        module = modules[target]
        branch = LoraBranch(**_branch_tensors(delta, module), scale=_alpha_scale(delta),
                            strength=strength)
        stack = stack_of(module, create=True, kind=delta.target.kind)
        stack[name] = branch
    return match


def _merge(model: nn.Module, match: LoraMatch, modules: dict[str, nn.Module], strength: float,
           name: str) -> None:
    from turbowan.quant.int8_linear import Int8Linear

    int8 = [t for t in match.deltas if isinstance(modules[t], Int8Linear)]
    if int8:
        raise LoraError(f"merge=True needs a bf16 (non-quantised) expert, but {int8[0]} is int8: "
                        "merging would re-quantise the weights. Leave merge off: int8 experts "
                        "run LoRAs as unmerged branches, exactly")
    with torch.no_grad():
        for target, delta in match.deltas.items():
            module = modules[target]
            tensors = _branch_tensors(delta, module)
            weight = module.weight
            w = weight.float()
            if "down" in tensors:
                w = w + (strength * _alpha_scale(delta)) * (tensors["up"].float() @ tensors["down"].float())
            if "diff" in tensors:
                w = w + strength * tensors["diff"].float()
            weight.data = w.to(weight.dtype)  # a new tensor: a memory-mapped file is not written
            if "diff_b" in tensors:
                bias = module.bias
                bias.data = (bias.float() + strength * tensors["diff_b"].float()).to(bias.dtype)
    model.__dict__.setdefault(MERGED_ATTR, {})[name] = strength


def _branches(model: nn.Module, name: str | None = None) -> list[tuple[nn.Module, str, LoraBranch]]:
    found = []
    for module in model.modules():
        stack = module._modules.get(STACK_ATTR)
        if stack is None:
            continue
        for key, branch in stack.items():
            if name is None or key == name:
                found.append((module, key, branch))
    return found


def attached_loras(model: nn.Module) -> dict[str, float]:
    """name -> strength of the unmerged LoRAs on ``model``, in the order they were attached."""
    out: dict[str, float] = {}
    for _, key, branch in _branches(model):
        out.setdefault(key, branch.strength)
    return out


def _unknown(model: nn.Module, name: str) -> LoraError:
    have = ", ".join(attached_loras(model)) or "none"
    return LoraError(f"no LoRA named {name!r} is attached (attached: {have})")


def set_lora_strength(model: nn.Module, name: str, strength: float) -> None:
    """Change a LoRA's strength; nothing moves or is re-packed (the strength is not data).
    0 gives exactly the model without it."""
    branches = _branches(model, name)
    if not branches:
        raise _unknown(model, name)
    for _, _, branch in branches:
        branch.strength = float(strength)


def detach_lora(model: nn.Module, name: str) -> None:
    """Remove a LoRA's branches; the model is then exactly as before it was attached."""
    _refuse_offloaded(model, "detach a LoRA")
    branches = _branches(model, name)
    if not branches:
        raise _unknown(model, name)
    for module, key, _ in branches:
        del module._modules[STACK_ATTR][key]
        drop_stack_if_empty(module)


def lora_nbytes(model: nn.Module, name: str | None = None) -> int:
    """Bytes of the LoRA tensors on ``model`` (of one LoRA with ``name``)."""
    return sum(branch.nbytes() for _, _, branch in _branches(model, name))
