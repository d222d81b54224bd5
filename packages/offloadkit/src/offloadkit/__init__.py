"""offloadkit: run models whose weights do not fit on the device by streaming blocks.

Weights live in a home tier (pinned host RAM, pageable host RAM, one shared-memory copy
per node, or a safetensors file) and
move to the device one whole block at a time, overlapped with compute. *Where* blocks go is a
strategy; strategies are pluggy plugins found through the ``offloadkit`` entry-point group.

Everything a client needs is importable from here; the submodules are internal.
"""

from __future__ import annotations

from offloadkit.api import apply, is_offloaded, offloaded, stage
from offloadkit.budget import Budget, parse_budget
from offloadkit.distributed import agreed_budget
from offloadkit.engine.profile import profile_model
from offloadkit.engine.shared import check_shared_room, shared_home_supported
from offloadkit.errors import (
    AlreadyOffloadedError,
    BlockCoverageWarning,
    BlockDiscoveryError,
    BudgetError,
    DeviceUnavailableError,
    OffloadError,
    PluginError,
    UnknownStrategyError,
)
from offloadkit.fits import FitReport, check_fits
from offloadkit.handle import OffloadHandle
from offloadkit.hookspecs import hookimpl
from offloadkit.ledger import OffloadStats
from offloadkit.placement import Placement
from offloadkit.planner import make_plan
from offloadkit.plans import HOME_TIERS, BlockProfile, ModelProfile, Plan
from offloadkit.probe import DeviceMemory, probe, resolve_device
from offloadkit.registry import get_strategy, list_strategies
from offloadkit.staged import StagedModel
from offloadkit.strategy import Strategy
from offloadkit.units import describe_bytes, format_bytes

__all__ = [
    "HOME_TIERS",
    "AlreadyOffloadedError",
    "BlockCoverageWarning",
    "BlockDiscoveryError",
    "BlockProfile",
    "Budget",
    "BudgetError",
    "DeviceMemory",
    "DeviceUnavailableError",
    "FitReport",
    "ModelProfile",
    "OffloadError",
    "OffloadHandle",
    "OffloadStats",
    "Placement",
    "Plan",
    "PluginError",
    "StagedModel",
    "Strategy",
    "UnknownStrategyError",
    "agreed_budget",
    "apply",
    "check_fits",
    "check_shared_room",
    "describe_bytes",
    "format_bytes",
    "get_strategy",
    "hookimpl",
    "is_offloaded",
    "list_strategies",
    "make_plan",
    "offloaded",
    "parse_budget",
    "probe",
    "profile_model",
    "resolve_device",
    "shared_home_supported",
    "stage",
]
__version__ = "0.1.0"
