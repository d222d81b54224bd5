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
    """Return the strategy classes this plugin provides (subclasses of ``offloadkit.Strategy``).

    Each class has a unique ``name`` (what users pass as ``strategy=``; a name another plugin
    or a built-in already uses is a :class:`~offloadkit.PluginError` naming both) and a
    one-line ``description`` (shown by ``offloadkit list``). A strategy is policy only:

    - ``plan(profile, budget_bytes) -> Plan``: which blocks stay resident, which stream, in
      what groups, how far ahead to prefetch. Pure: it reads sizes, never a device. It is
      called only with a budget of at least ``min_device_bytes(profile)``; the planner
      (``offloadkit.make_plan``) checks that once and ends its error with ``budget_hint``.
    - ``replan(plan, stats, profile) -> Plan | None`` (optional): a better plan from measured
      stats while the model runs.
    - declared class attributes: ``option_defaults``, ``budget_hint``, ``uses_budget``,
      ``uses_device``, and ``placement`` (None for offloadkit's engine, or a subclass of
      ``offloadkit.Placement`` for a strategy that brings its own mechanism).

    What comes back is checked: a ``plan()`` that returns anything but a valid
    :class:`~offloadkit.Plan` within the budget (every block placed once, ``group_size >= 1``,
    ``prefetch_depth >= 0``, ``num_slots >= prefetch_depth + 1`` when blocks stream) is a
    ``PluginError`` naming the plugin and the rule, raised by ``apply`` before anything
    moves; a ``replan()`` that raises or breaks a rule keeps the current plan with a warning.
    A class with a wrongly typed declaration is skipped with a warning, like a plugin that
    fails to import.
    """


@hookspec(firstresult=True)
def offloadkit_find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """Return the list of repeated blocks to stream for ``model``, or None to pass.

    Lets a plugin teach offloadkit the layout of a model family whose blocks the generic
    search (the largest ModuleList of same-typed modules) would not find. The first plugin
    that answers wins. An answer that is not a ModuleList (or a list of the model's
    submodules) is a :class:`~offloadkit.PluginError` naming the plugin.
    """
