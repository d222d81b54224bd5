"""Build a :class:`ModelProfile` and the per-block layouts from a model.

Only shapes and dtypes are read, so a model built on ``meta`` (the full 14B Wan DiT, say)
can be profiled and planned without a byte of weights in memory.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from offloadkit.engine.layout import (
    BlockLayout,
    TensorRef,
    build_layout,
    module_tensor_refs,
    tensor_nbytes,
)
from offloadkit.errors import BlockDiscoveryError
from offloadkit.plans import HOME_TIERS, BlockProfile, ModelProfile

BlocksArg = torch.nn.ModuleList | Sequence[torch.nn.Module] | str | None


@dataclass(frozen=True)
class ModelLayout:
    """What the engine needs beyond the profile: module references and byte offsets."""

    blocks: tuple[BlockLayout, ...]
    block_modules: tuple[torch.nn.Module, ...]
    outside: tuple[TensorRef, ...]  # non-block and shared tensors, moved once, kept resident


def find_blocks(model: torch.nn.Module, blocks: BlocksArg = None) -> list[tuple[str, torch.nn.Module]]:
    """The blocks to stream, in execution order, with their qualified names.

    ``blocks`` may be a ModuleList of the model, a list of its submodules, or the dotted
    attribute name of one ("blocks", "model.layers"). Otherwise a plugin's
    ``offloadkit_find_blocks`` hook is asked, then the largest ModuleList of same-typed
    modules is taken.
    """
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(blocks, str):
        try:
            blocks = model.get_submodule(blocks)
        except AttributeError as exc:
            raise BlockDiscoveryError(
                f"blocks={blocks!r} names no submodule of {type(model).__name__} ({exc}). "
                "Pass the dotted attribute path of its ModuleList of blocks, e.g. blocks='layers'."
            ) from None
    if blocks is None:
        blocks = _plugin_blocks(model)
    if blocks is None:
        blocks = _largest_repeated_list(model)
    if blocks is None:
        raise BlockDiscoveryError(
            f"{type(model).__name__} has no ModuleList of two or more same-typed blocks for "
            "offloadkit to stream. Pass the blocks explicitly, e.g. "
            "offloadkit.apply(model, blocks=model.layers) or blocks='layers'."
        )
    found = list(blocks)
    if len(found) == 0:
        raise BlockDiscoveryError("blocks= is empty; pass the model's list of repeated blocks.")
    out = []
    for i, module in enumerate(found):
        if not isinstance(module, torch.nn.Module) or id(module) not in names:
            raise BlockDiscoveryError(
                f"blocks[{i}] is not a submodule of the model being offloaded; pass modules "
                "that belong to it (e.g. blocks=model.layers)."
            )
        if names[id(module)] == "":
            raise BlockDiscoveryError("blocks= must not contain the model itself.")
        out.append((names[id(module)], module))
    if len({id(m) for _, m in out}) != len(out):
        raise BlockDiscoveryError("blocks= lists the same module twice; list each block once.")
    return out


def _plugin_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    from offloadkit.registry import plugin_blocks

    return plugin_blocks(model)


def _largest_repeated_list(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    best, best_bytes = None, -1
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(tensor_nbytes(p) for p in module.parameters()) + sum(
            tensor_nbytes(b) for b in module.buffers()
        )
        if size > best_bytes:
            best, best_bytes = module, size
    return best


def layout_model(model: torch.nn.Module, blocks: BlocksArg = None) -> ModelLayout:
    """Split every tensor slot of ``model`` into per-block layouts and the rest.

    A tensor reachable from two places (tied embeddings, a table shared by all blocks) is
    never packed into a block: it is kept with the non-block tensors, so streaming a block
    can never leave another user of it pointing at an evicted slot.
    """
    found = find_blocks(model, blocks)
    all_refs = module_tensor_refs(model, "")
    uses = Counter(id(r.get()) for r in all_refs)
    storages = Counter(_storage_key(r.get()) for r in all_refs)
    storages.pop(None, None)

    def is_shared(t: torch.Tensor) -> bool:
        key = _storage_key(t)
        return uses[id(t)] > 1 or (key is not None and storages[key] > 1)

    in_blocks: set[int] = set()
    layouts = []
    for index, (name, module) in enumerate(found):
        refs = module_tensor_refs(module, name)
        in_blocks.update(id(r.module) for r in refs)
        own = [r for r in refs if not is_shared(r.get())]
        layouts.append(build_layout(index, name, own))
    inside: set[tuple[int, str]] = set()
    for _, module in found:
        for r in module_tensor_refs(module, ""):
            inside.add((id(r.module), r.attr))
    outside = []
    seen: set[tuple[int, str]] = set()
    for r in all_refs:
        key = (id(r.module), r.attr)
        if key in seen:
            continue
        seen.add(key)
        if key not in inside or is_shared(r.get()):
            outside.append(r)
    return ModelLayout(tuple(layouts), tuple(m for _, m in found), tuple(outside))


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    if t.device.type == "meta":
        return None
    return (str(t.device), t.untyped_storage().data_ptr())


def profile_from_layout(
    layout: ModelLayout,
    *,
    device: str | torch.device = "cpu",
    home: str = "host",
    device_total_bytes: int | None = None,
    device_free_bytes: int | None = None,
) -> ModelProfile:
    if home not in HOME_TIERS:
        raise ValueError(f"home={home!r} is not a home tier; use one of {', '.join(HOME_TIERS)}")
    dtype_bytes: Counter[str] = Counter()
    for block in layout.blocks:
        for e in block.entries:
            dtype_bytes[str(e.dtype).removeprefix("torch.")] += e.nbytes
    shared = []
    non_block = 0
    seen_tensors: set[int] = set()
    for r in layout.outside:
        t = r.get()
        if id(t) in seen_tensors:
            continue
        seen_tensors.add(id(t))
        non_block += tensor_nbytes(t)
        dtype_bytes[str(t.dtype).removeprefix("torch.")] += tensor_nbytes(t)
    inside_modules = {id(e.ref.module) for b in layout.blocks for e in b.entries}
    for b_module in layout.block_modules:
        inside_modules.update(id(m) for m in b_module.modules())
    for r in layout.outside:
        if id(r.module) in inside_modules:
            shared.append(r.qualname)
    blocks = tuple(
        BlockProfile(
            index=b.index,
            name=b.name,
            nbytes=b.nbytes,
            num_tensors=len(b.entries),
            dtypes=tuple(sorted({str(e.dtype).removeprefix("torch.") for e in b.entries})),
        )
        for b in layout.blocks
    )
    return ModelProfile(
        blocks=blocks,
        non_block_bytes=non_block,
        device=str(device),
        device_total_bytes=device_total_bytes,
        device_free_bytes=device_free_bytes,
        shared_tensors=tuple(sorted(shared)),
        dtype_bytes=dict(dtype_bytes),
        home=home,
    )


def with_device_memory(profile: ModelProfile, device: str | torch.device) -> ModelProfile:
    """``profile`` with the device's total and free memory as probed now (at staging, at
    placement, before a re-plan). The figures are advisory: a failed probe keeps the
    profile as it was, and strategies plan without them."""
    try:
        from offloadkit.probe import probe

        memory = probe(device)
    except Exception:  # noqa: BLE001 - figures are advisory
        return profile
    return dataclasses.replace(profile, device_total_bytes=memory.total_bytes,
                               device_free_bytes=memory.free_bytes)


def profile_model(
    model: torch.nn.Module,
    blocks: BlocksArg = None,
    *,
    device: str | torch.device = "cpu",
    home: str = "host",
    device_total_bytes: int | None = None,
    device_free_bytes: int | None = None,
) -> ModelProfile:
    """Profile ``model`` for planning; works on ``meta`` models. Device memory figures are
    taken as given (a planner for a GPU it does not have passes them in)."""
    return profile_from_layout(
        layout_model(model, blocks),
        device=device,
        home=home,
        device_total_bytes=device_total_bytes,
        device_free_bytes=device_free_bytes,
    )
