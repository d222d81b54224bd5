"""The hooks a plugin may implement. Every hook name starts with ``offloadkit_``.

A plugin is a module named in the ``offloadkit`` entry-point group; its functions decorated
with :data:`hookimpl` are registered. The built-in strategies use exactly this path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch

    from offloadkit.strategy import Strategy

PROJECT_NAME = "offloadkit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def offloadkit_register_strategies() -> list[type[Strategy]]:
    """Return the strategy classes this plugin provides.

    Each class has a unique ``name`` (what users pass as ``strategy=``) and a one-line
    ``description`` (shown by ``offloadkit list``).
    """


@hookspec(firstresult=True)
def offloadkit_find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """Return the list of repeated blocks to stream for ``model``, or None to pass.

    Lets a plugin teach offloadkit the layout of a model family whose blocks the generic
    search (every outermost ModuleList/Sequential of blocks, see
    ``offloadkit.engine.discovery``) would not find or would order wrongly. A list of
    modules is accepted too. The first plugin that answers wins over the search.
    """
