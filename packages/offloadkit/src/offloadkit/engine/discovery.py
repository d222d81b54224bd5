"""Which submodules of a model stream as blocks.

A *block list* is a ``ModuleList`` or ``nn.Sequential`` (the model itself included) holding
two or more distinct submodules with weights, either all of one type (transformer layers,
timm's ``blocks``) or all composite modules of mixed types (UNet ``down_blocks``). The search
takes every outermost block list, so a list inside a block of another chosen list is never
taken twice and the choice covers the most bytes: Flux gets ``transformer_blocks`` and
``single_transformer_blocks``, a UNet its down and up blocks and the mid block's resnets.
Lists of plain layers (a Sequential of Linear) count only when the lists of composite blocks
hold under half of the weights, so a small MLP beside a transformer's layers stays resident.
Lists holding under ``MIN_LIST_SHARE`` of the weights stay resident.

Order is module registration order (lists in the order the model registers them, each list
in index order). That is the execution order of nearly every model; where it is not (a
UNet registers ``up_blocks`` before ``mid_block``), outputs stay exact and the engine loads
the out-of-order block when it is called (``stats().mispredicted_loads``); pass ``blocks=``
in execution order to avoid that.

A module registered twice (the same module at two places) shares its weights between them,
so it is never a block: it stays resident with the other shared tensors.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Sequence

import torch

from offloadkit.errors import BlockCoverageWarning, BlockDiscoveryError

BlocksArg = torch.nn.Module | Sequence[torch.nn.Module | str] | str | None

LIST_TYPES = (torch.nn.ModuleList, torch.nn.Sequential)
#: block lists holding less than this share of the model's weights are not streamed
MIN_LIST_SHARE = 0.01
#: discovered blocks covering less than this share of the weights trigger a warning
WARN_BELOW_SHARE = 0.5


def find_blocks(model: torch.nn.Module, blocks: BlocksArg = None
                ) -> list[tuple[str, torch.nn.Module]]:
    """The blocks to stream, in execution order, with their qualified names.

    ``blocks`` may be one ModuleList/Sequential of the model, its dotted path ("layers"), or a
    list mixing submodules and dotted paths; a list entry that is a ModuleList or Sequential
    stands for its children. Otherwise a plugin's ``offloadkit_find_blocks`` hook is asked,
    then the generic search (module docstring) runs.
    """
    names = {id(m): n for n, m in model.named_modules()}
    if blocks is None:
        found = _plugin_blocks(model)  # a plugin's answer is deliberate, like blocks=
        if found is None:
            found = discover(model)
            warn_if_low_coverage(model, found)
        else:
            found = list(found)
        explicit = False
    else:
        found = _resolve(model, blocks)
        explicit = True
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
        where = "blocks=" if explicit else "the offloadkit_find_blocks hook"
        raise BlockDiscoveryError(f"{where} lists the same module twice; list each block once.")
    _refuse_nested(out)
    return out


def _plugin_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    from offloadkit.registry import plugin_blocks

    return plugin_blocks(model)


def _resolve(model: torch.nn.Module, blocks: BlocksArg) -> list[torch.nn.Module]:
    """``blocks=`` as given, paths looked up and lists expanded into their children."""
    if isinstance(blocks, str | torch.nn.Module):
        top = _lookup(model, blocks) if isinstance(blocks, str) else blocks
        return list(top.children()) if isinstance(top, LIST_TYPES) else [top]
    out: list[torch.nn.Module] = []
    for item in blocks:
        module = _lookup(model, item) if isinstance(item, str) else item
        if isinstance(module, LIST_TYPES):
            out.extend(module.children())
        else:
            out.append(module)
    return out


def _lookup(model: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise BlockDiscoveryError(
            f"blocks={path!r} names no submodule of {type(model).__name__} ({exc}). Pass "
            "dotted paths of its blocks or block lists, e.g. blocks='layers' or "
            "blocks=['transformer_blocks', 'single_transformer_blocks']."
        ) from None


def _refuse_nested(found: list[tuple[str, torch.nn.Module]]) -> None:
    owner: dict[int, str] = {}
    for name, module in found:
        for sub in module.modules():
            owner.setdefault(id(sub), name)
    for name, module in found:
        if owner[id(module)] != name:
            raise BlockDiscoveryError(
                f"block {name!r} lies inside block {owner[id(module)]!r}; a block cannot "
                "hold another. List either the outer block or the inner ones."
            )


# ---------------------------------------------------------------------- generic search
def module_sizes(model: torch.nn.Module) -> dict[int, int]:
    """Weight bytes (parameters and buffers) under each module, by ``id``."""
    sizes: dict[int, int] = {}

    def visit(module: torch.nn.Module) -> int:
        if id(module) in sizes:
            return sizes[id(module)]
        own = sum(t.numel() * t.element_size()
                  for t in [*module._parameters.values(), *module._buffers.values()]
                  if t is not None)
        sizes[id(module)] = total = own + sum(visit(c) for c in module.children())
        return total

    visit(model)
    return sizes


def discover(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Children of every outermost block list, in registration order (module docstring).

    Lists of composite blocks come first; lists of plain layers (a Sequential of Linear) are
    added only when those cover under half of the weights, so the MLP Sequentials beside a
    transformer's layer list stay resident while a model made of layers still streams."""
    sizes = module_sizes(model)
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    chosen = _outermost_lists(model, sizes, uses, layers_too=False)
    if sum(sizes[id(m)] for m in chosen) < WARN_BELOW_SHARE * sizes[id(model)]:
        chosen = _outermost_lists(model, sizes, uses, layers_too=True)
    if not chosen:
        raise BlockDiscoveryError(_not_found_message(model, sizes, uses))
    return chosen


def _outermost_lists(model: torch.nn.Module, sizes: dict[int, int], uses: Counter,
                     layers_too: bool) -> list[torch.nn.Module]:
    floor = MIN_LIST_SHARE * sizes[id(model)]
    chosen: list[torch.nn.Module] = []
    seen: set[int] = set()

    def visit(module: torch.nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        members = _list_members(module, sizes, uses, layers_too)
        if members is not None and sizes[id(module)] >= floor:
            chosen.extend(members)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return chosen


def _list_members(module: torch.nn.Module, sizes: dict[int, int], uses: Counter,
                  layers_too: bool) -> list[torch.nn.Module] | None:
    """The blocks of ``module`` if it is a block list, else None. ``layers_too``: accept
    a list of plain layers (modules without submodules) too."""
    if not isinstance(module, LIST_TYPES):
        return None
    members = [c for c in module.children() if sizes[id(c)] > 0 and uses[id(c)] == 1]
    if len(members) < 2:
        return None
    composite = all(next(c.children(), None) is not None for c in members)
    if len({type(c) for c in members}) == 1 and (composite or layers_too):
        return members
    if composite:
        return members  # mixed types, every one a composite block (UNet down_blocks)
    return None


def _not_found_message(model: torch.nn.Module, sizes: dict[int, int], uses: Counter) -> str:
    lines = []
    for name, module in model.named_modules():
        if isinstance(module, LIST_TYPES):
            repeats = [c for c in module.children() if uses[id(c)] > 1]
            if repeats:
                lines.append(f"{name or 'the model'!s} holds a module registered more than once "
                             "(its weights are shared, so it stays resident)")
    largest = _largest(model, sizes)
    listed = ", ".join(f"{n!r} ({type_name}, {_mib(b)})" for n, type_name, b in largest)
    why = (" " + "; ".join(lines) + ".") if lines else ""
    return (
        f"offloadkit found no block list in {type(model).__name__}: no ModuleList or "
        f"nn.Sequential holding two or more distinct blocks with weights.{why} Its largest "
        f"submodules: {listed or 'none'}. Pass the blocks to stream, e.g. "
        "offloadkit.apply(model, blocks=model.layers) or blocks=['encoder.layers', "
        "'decoder.layers'] (dotted paths of blocks or of block lists)."
    )


def _largest(model: torch.nn.Module, sizes: dict[int, int], count: int = 5, depth: int = 2
             ) -> list[tuple[str, str, int]]:
    """The biggest submodules up to ``depth`` levels down."""
    rows = [(name, type(module).__name__, sizes[id(module)])
            for name, module in model.named_modules()
            if name and name.count(".") < depth and sizes[id(module)] > 0]
    rows.sort(key=lambda row: -row[2])
    return rows[:count]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


# ---------------------------------------------------------------------- coverage warning
def warn_if_low_coverage(model: torch.nn.Module, block_modules: Sequence[torch.nn.Module]
                         ) -> None:
    """Warn when the blocks found hold under half of the weights: offloading then saves
    little, and the message names the largest modules left resident so the user can pass
    ``blocks=`` themselves."""
    sizes = module_sizes(model)
    block_bytes, total_bytes = sum(sizes[id(b)] for b in block_modules), sizes[id(model)]
    if total_bytes <= 0 or block_bytes >= WARN_BELOW_SHARE * total_bytes:
        return
    names = {id(m): n for n, m in model.named_modules()}
    inside = {id(m) for b in block_modules for m in b.modules()}
    holders = {id(model)}
    for block in block_modules:
        parts = names[id(block)].split(".")
        holders.update(id(model.get_submodule(".".join(parts[:k]))) for k in range(1, len(parts)))
    outside = []

    def visit(module: torch.nn.Module, name: str) -> None:
        if id(module) in inside:
            return
        if id(module) not in holders:
            outside.append((name, type(module).__name__, sizes[id(module)]))
            return
        for attr, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None:
                outside.append((f"{name}.{attr}" if name else attr, type(t).__name__,
                                t.numel() * t.element_size()))
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    outside.sort(key=lambda row: -row[2])
    listed = ", ".join(f"{n!r} ({kind}, {_mib(b)})" for n, kind, b in outside[:3] if b > 0)
    warnings.warn(
        f"offloadkit streams {len(block_modules)} blocks holding only "
        f"{100 * block_bytes / total_bytes:.0f}% of {type(model).__name__}'s weights; the rest "
        f"stays on the device. Largest modules left outside the blocks: {listed}. Pass "
        "blocks=[...] (modules or dotted paths) to stream more of the model.",
        BlockCoverageWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """``stacklevel`` that points the warning at the first frame outside offloadkit."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("offloadkit"):
        frame, level = frame.f_back, level + 1
    return level

