"""Attach LoRAs to a Wan DiT expert, change their strength, detach or merge them.

``attach_lora`` matches the file (any naming, see :mod:`turbowan.lora.formats`), checks every
shape, and puts one :class:`~turbowan.lora.branch.LoraBranch` beside each module (or
modulation table) it changes. A merged LoRA keeps the tensors it replaced, so it detaches
exactly too.
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

from turbowan.lora.branch import LoraBranch, LoraStack, drop_stack_if_empty, stack_of, stacks
from turbowan.lora.files import load_lora_tensors, lora_name
from turbowan.lora.formats import LoraError, LoraMatch, TargetDelta, match_lora, model_targets

#: name -> (strength, match) of the merged LoRAs, in the order they were merged
MERGED_ATTR = "_turbowan_merged_loras"
#: "module.param" -> the tensor a merge replaced (kept so detach restores it exactly)
ORIGINALS_ATTR = "_turbowan_premerge_tensors"


def _refuse_offloaded(model: nn.Module, what: str) -> None:
    import offloadkit

    if offloadkit.is_offloaded(model):
        raise LoraError(
            f"cannot {what} while the model is offloaded: offloadkit packed its tensors when it "
            "was staged. Remove the offload handle (handle.remove()), change the LoRAs, then "
            "apply offloadkit again (only this expert is re-staged); strengths can be changed "
            "at any time with set_lora_strength")


def _owner(modules: Mapping[str, nn.Module], delta: TargetDelta) -> tuple[nn.Module, str]:
    """(the module a delta's stack hangs on, the name of the tensor it changes there): the
    linear or norm itself, or for a modulation table the block or head that owns it."""
    name = delta.target.name
    if delta.target.kind == "param":
        owner, _, param = name.rpartition(".")
        return modules[owner], param
    return modules[name], "weight"


def _compute_dtype(module: nn.Module, kind: str) -> torch.dtype:
    """The dtype the target computes in: fp32 for norms, tables and the fp32 linears (time
    embedding, head); else its float weight's (or, for int8, its bias's)."""
    if kind in ("norm", "param"):
        return torch.float32
    declared = getattr(type(module), "compute_dtype", None)  # dit.model.Fp32Linear
    if isinstance(declared, torch.dtype):
        return declared
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


def _branch_tensors(delta: TargetDelta, module: nn.Module, param: str
                    ) -> dict[str, torch.Tensor]:
    ref = getattr(module, param, None)
    if ref is None:
        ref = getattr(module, "int8_weight", None)
    device = ref.device if isinstance(ref, torch.Tensor) else torch.device("cpu")
    dtype = _compute_dtype(module, delta.target.kind)
    out: dict[str, torch.Tensor] = {}
    if delta.down is not None:
        rank = delta.rank
        out["down"] = _materialise(delta.down, dtype=dtype, device=device).reshape(rank, -1)
        out["up"] = _materialise(delta.up, dtype=dtype, device=device).reshape(-1, rank)
    if delta.diff is not None:  # a Conv3d-shaped patch_embedding delta becomes the Linear's
        diff = _materialise(delta.diff, dtype=dtype, device=device)
        out["diff"] = diff.reshape(delta.target.weight_shape)
    if delta.diff_b is not None:
        out["diff_b"] = _materialise(delta.diff_b, dtype=dtype, device=device)
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
    if name in attached_loras(model) or name in merged_loras(model):
        raise LoraError(f"a LoRA named {name!r} is already attached; detach it first or give "
                        "this one another name")
    match = match_for_model(model, lora, source=source)
    modules = dict(model.named_modules())
    if merge:
        _merge(model, match, modules, float(strength))
        model.__dict__.setdefault(MERGED_ATTR, {})[name] = (float(strength), match)
        return match
    for delta in match.deltas.values():
        module, param = _owner(modules, delta)
        branch = LoraBranch(**_branch_tensors(delta, module, param), scale=_alpha_scale(delta),
                            strength=strength)
        stack = stack_of(module, create=True, kind=delta.target.kind)
        stack[name] = branch
    return match


def _merge(model: nn.Module, match: LoraMatch, modules: dict[str, nn.Module],
           strength: float) -> None:
    """Fold a LoRA into the weights of a non-quantised expert. Each replaced tensor is kept
    (the first time a merge touches it), so detaching restores the model bit for bit."""
    from turbowan.quant.int8_linear import Int8Linear

    int8 = [t for t, d in match.deltas.items() if isinstance(_owner(modules, d)[0], Int8Linear)]
    if int8:
        raise LoraError(f"merge=True needs a bf16 (non-quantised) expert, but {int8[0]} is int8: "
                        "merging would re-quantise the weights. Leave merge off: int8 experts "
                        "run LoRAs as unmerged branches, exactly")
    originals = model.__dict__.setdefault(ORIGINALS_ATTR, {})
    with torch.no_grad():
        for target, delta in match.deltas.items():
            module, param = _owner(modules, delta)
            tensors = _branch_tensors(delta, module, param)
            changes: dict[str, torch.Tensor | None] = {param: None, "bias": None}
            if "down" in tensors:  # float64 on the weight's device, rounded once at the end
                changes[param] = (strength * _alpha_scale(delta)) * (
                    tensors["up"].double() @ tensors["down"].double())
            if "diff" in tensors:
                diff = strength * tensors["diff"].double()
                changes[param] = diff if changes[param] is None else changes[param] + diff
            if "diff_b" in tensors:
                changes["bias"] = strength * tensors["diff_b"].double()
            for pname, change in changes.items():
                if change is None:
                    continue
                tensor = getattr(module, pname)
                originals.setdefault(f"{target}:{pname}", (module, pname, tensor.data))
                # a new tensor: a memory-mapped file is not written, and the original is kept
                tensor.data = (tensor.double() + change).to(tensor.dtype)


def _unmerge(model: nn.Module, name: str) -> None:
    """Detach a merged LoRA exactly: put back the tensors the merges replaced, then merge the
    other merged LoRAs again, in their order, as if this one had never been merged."""
    merged = model.__dict__[MERGED_ATTR]
    del merged[name]
    for module, pname, original in model.__dict__.pop(ORIGINALS_ATTR, {}).values():
        getattr(module, pname).data = original
    modules = dict(model.named_modules())
    for strength, match in merged.values():
        _merge(model, match, modules, strength)
    if not merged:
        del model.__dict__[MERGED_ATTR]


def _branches(model: nn.Module, name: str | None = None
              ) -> list[tuple[nn.Module, LoraStack, str, LoraBranch]]:
    found = []
    for module, stack in stacks(model):
        for key, branch in stack.items():
            if name is None or key == name:
                found.append((module, stack, key, branch))
    return found


def attached_loras(model: nn.Module) -> dict[str, float]:
    """name -> strength of the unmerged LoRAs on ``model``, in the order they were attached."""
    out: dict[str, float] = {}
    for _, _, key, branch in _branches(model):
        out.setdefault(key, branch.strength)
    return out


def merged_loras(model: nn.Module) -> dict[str, float]:
    """name -> strength of the LoRAs merged into ``model``'s weights (``merge=True``)."""
    return {n: s for n, (s, _) in model.__dict__.get(MERGED_ATTR, {}).items()}


def _unknown(model: nn.Module, name: str) -> LoraError:
    have = ", ".join([*attached_loras(model), *(f"{n} (merged)" for n in merged_loras(model))])
    return LoraError(f"no LoRA named {name!r} is attached (attached: {have or 'none'})")


def set_lora_strength(model: nn.Module, name: str, strength: float) -> None:
    """Change a LoRA's strength; nothing moves or is re-packed (the strength is not data).
    0 gives exactly the model without it."""
    branches = _branches(model, name)
    if not branches:
        if name in merged_loras(model):
            raise LoraError(f"LoRA {name!r} is merged into the weights (merge=True), so its "
                            "strength is fixed: detach_lora it and attach it again with the new "
                            "strength, or attach it unmerged (merge=False) to change it freely")
        raise _unknown(model, name)
    for _, _, _, branch in branches:
        branch.strength = float(strength)


def detach_lora(model: nn.Module, name: str) -> None:
    """Remove a LoRA (unmerged or merged); the model is then exactly as before it was
    attached, bit for bit."""
    _refuse_offloaded(model, "detach a LoRA")
    if name in merged_loras(model):
        _unmerge(model, name)
        return
    branches = _branches(model, name)
    if not branches:
        raise _unknown(model, name)
    for module, stack, key, _ in branches:
        del stack[key]
        drop_stack_if_empty(module, stack)


def lora_nbytes(model: nn.Module, name: str | None = None) -> int:
    """Bytes of the unmerged LoRA tensors on ``model`` (of one LoRA with ``name``)."""
    return sum(branch.nbytes() for _, _, _, branch in _branches(model, name))
