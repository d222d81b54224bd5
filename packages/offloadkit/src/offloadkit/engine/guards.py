"""What a model under offload refuses, with an error that says why and what to do instead.

While offloadkit holds a model, its block tensors are stand-ins bound to slots and the real
weights live in the home tier. Operations that assume the module owns its weights would
silently break it, so each module of the model gets instance-level guards (removed again by
``remove()``):

- ``.to()``, ``.half()``, ``.cuda()``, ``.float()`` ... (all go through ``Module._apply``):
  refused when they would change a tensor's device or dtype; a call that changes nothing
  (``pipe.to(device)`` on a model already there) passes.
- ``copy.deepcopy``, ``pickle`` and ``torch.save(model)``: refused (``__deepcopy__`` and
  ``__reduce_ex__`` are looked up on the instance), naming ``handle.state_dict()``.
- another offloader (accelerate hooks, diffusers group offloading) on the same model, found
  before apply and at each forward (:func:`foreign_offloader`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from offloadkit.errors import OffloadError

_GUARDED = ("_apply", "__deepcopy__", "__reduce_ex__")
_REMEDY = ("call handle.remove() first (the model is then whole again), or save "
           "handle.state_dict() instead")


def foreign_offloader(modules: Iterable[tuple[str, torch.nn.Module]]) -> str | None:
    """A description of another offloader's hooks on these modules, or None."""
    for name, module in modules:
        where = f"module {name!r}" if name else "the model"
        hook = module.__dict__.get("_hf_hook")
        if hook is not None:
            return (f"accelerate hook {type(hook).__name__} on {where} (cpu_offload, "
                    "disk_offload, dispatch_model or enable_model_cpu_offload); remove it with "
                    "accelerate.hooks.remove_hook_from_module(model, recurse=True)")
        registry = module.__dict__.get("_diffusers_hook")
        names = list(getattr(registry, "hooks", {}) or ())
        if any("offload" in n for n in names):
            return (f"diffusers group offloading ({', '.join(names)}) on {where}; build the "
                    "model again without enable_group_offload()/apply_group_offloading()")
    return None


def refuse_foreign(modules: Iterable[tuple[str, torch.nn.Module]], when: str) -> None:
    found = foreign_offloader(modules)
    if found is not None:
        raise OffloadError(
            f"{when}: this model is also placed by another offloader: {found}. Two offloaders "
            "would move the same weights behind each other's back; use one of them."
        )


def install(modules: Iterable[tuple[str, torch.nn.Module]]) -> Callable[[], None]:
    """Put the guards on every module; return the function that takes them off."""
    undo: list[tuple[torch.nn.Module, str, Any]] = []
    for name, module in modules:
        where = name or type(module).__name__
        for attr in _GUARDED:
            undo.append((module, attr, module.__dict__.get(attr, _MISSING)))
        module.__dict__["_apply"] = _guarded_apply(module, where)
        module.__dict__["__deepcopy__"] = _refuse_copy(where, "copy.deepcopy()")
        module.__dict__["__reduce_ex__"] = _refuse_copy(where, "pickle / torch.save(model)")

    def uninstall() -> None:
        for module, attr, previous in reversed(undo):
            if previous is _MISSING:
                module.__dict__.pop(attr, None)
            else:
                module.__dict__[attr] = previous

    return uninstall


_MISSING = object()


def _refuse_copy(where: str, what: str) -> Callable[..., Any]:
    def refuse(*_: Any, **__: Any) -> Any:
        raise OffloadError(
            f"{what} of {where!r} while offloadkit offloads it: its weights are in "
            f"offloadkit's home tier, not in the module (its tensors are stand-ins); {_REMEDY}."
        )

    return refuse


def _guarded_apply(module: torch.nn.Module, where: str) -> Callable[..., Any]:
    """``Module._apply`` that lets through only conversions that change no tensor."""
    original = type(module)._apply

    def _apply(fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        kinds = {(t.dtype, t.device) for t in [*module.parameters(), *module.buffers()]}
        for dtype, device in kinds:
            probe = torch.empty(0, dtype=dtype, device=device)
            try:
                out = fn(probe)
            except Exception:  # noqa: BLE001 - e.g. .cuda() without CUDA: it would move
                out = None
            if not isinstance(out, torch.Tensor) or (out.dtype, out.device) != (dtype, device):
                raise OffloadError(
                    f"{where!r} is offloaded by offloadkit: .to()/.half()/.cuda()/.float() "
                    "(or another library moving it, e.g. an offloader's hook) would change "
                    f"its {dtype} tensors on {device}, which offloadkit streams in place. "
                    "Nothing was changed. Call handle.remove(), convert the model, then "
                    "offloadkit.apply() it again."
                )
        return module  # nothing would change: no-op, like the real call

    _apply.__wrapped__ = original  # type: ignore[attr-defined]
    return _apply
