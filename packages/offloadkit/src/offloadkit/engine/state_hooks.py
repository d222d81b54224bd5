"""``state_dict()`` and ``load_state_dict()`` of a model whose blocks are offloaded.

The modules hold stand-ins while their blocks live in the home tier, so PyTorch's own
machinery would save NaN stand-ins and load into memory the next group overwrites. Hooks on
the modules that own block tensors make ``state_dict()`` read the real values from the home
tier, and refuse ``load_state_dict()`` before anything loads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from offloadkit.engine.layout import BlockLayout, TensorEntry
from offloadkit.errors import OffloadError

ReadEntry = Callable[[int, TensorEntry], torch.Tensor]


def install(blocks: Sequence[BlockLayout], named_modules: list[tuple[str, torch.nn.Module]],
            read_entry: ReadEntry) -> list[Callable[[], None]]:
    """Hook every module that owns block tensors; returns what takes the hooks off."""
    return [*_state_dict_reads_home(blocks, read_entry),
            *_load_state_dict_refused(blocks, named_modules)]


def _state_dict_reads_home(blocks: Sequence[BlockLayout], read_entry: ReadEntry
                           ) -> list[Callable[[], None]]:
    """``state_dict()`` of the model (or of any part of it) returns the real weights, read
    from the home tier, in place of the stand-ins the modules hold."""
    owned: dict[int, tuple[torch.nn.Module, list[tuple[int, TensorEntry]]]] = {}
    for block in blocks:
        for entry in block.entries:
            module = entry.ref.module
            owned.setdefault(id(module), (module, []))[1].append((block.index, entry))
    undo = []
    for module, entries in owned.values():
        def hook(_module: torch.nn.Module, state: dict, prefix: str, _meta: Any,
                 entries: list[tuple[int, TensorEntry]] = entries) -> None:
            for index, entry in entries:
                key = prefix + entry.ref.attr
                if key in state:
                    state[key] = read_entry(index, entry)

        undo.append(module.register_state_dict_post_hook(hook).remove)
    return undo


def _load_state_dict_refused(blocks: Sequence[BlockLayout],
                             named_modules: list[tuple[str, torch.nn.Module]]
                             ) -> list[Callable[[], None]]:
    """``load_state_dict`` would copy into the stand-ins (or into a slot the next group
    overwrites): refused before anything loads, by the outermost module it reaches."""
    modules = dict(named_modules)
    below: dict[str, list[str]] = {}  # module name -> block tensors under it, relative
    for block in blocks:
        for entry in block.entries:
            parts = entry.ref.qualname.split(".")
            for depth in range(len(parts)):
                below.setdefault(".".join(parts[:depth]), []).append(".".join(parts[depth:]))
    undo = []
    for name, names in below.items():
        module = modules.get(name)
        if module is None:
            continue

        def pre(_module: torch.nn.Module, state: dict, prefix: str, *_: Any,
                names: list[str] = names) -> None:
            hit = next((prefix + n for n in names if prefix + n in state), None)
            if hit is not None:
                raise OffloadError(
                    f"load_state_dict() while offloadkit offloads the model: {hit!r} is a "
                    "streamed block tensor (a stand-in in the module). Nothing was loaded. "
                    "Call handle.remove(), load, then offloadkit.apply() again."
                )

        undo.append(module.register_load_state_dict_pre_hook(pre).remove)
    return undo
