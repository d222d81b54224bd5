"""offloadkit: run models whose weights do not fit on the device by streaming blocks.

Weights live in a home tier (pinned host RAM, pageable host RAM or a safetensors file) and
move to the device one whole block at a time, overlapped with compute. *Where* blocks go is a
strategy; strategies are pluggy plugins found through the ``offloadkit`` entry-point group.
"""

from __future__ import annotations

from offloadkit.api import apply, is_offloaded, offloaded, stage
from offloadkit.budget import parse_budget
from offloadkit.engine import profile_model
from offloadkit.errors import (
    BudgetError,
    OffloadError,
    PluginError,
    UnknownStrategyError,
)
from offloadkit.handle import OffloadHandle
from offloadkit.hookspecs import hookimpl
from offloadkit.ledger import OffloadStats
from offloadkit.probe import DeviceMemory, probe
from offloadkit.registry import get_strategy, list_strategies
from offloadkit.staged import StagedModel
from offloadkit.strategy import ModelProfile, Plan, Strategy

__all__ = [
    "BudgetError",
    "DeviceMemory",
    "ModelProfile",
    "OffloadError",
    "OffloadHandle",
    "OffloadStats",
    "Plan",
    "PluginError",
    "StagedModel",
    "Strategy",
    "UnknownStrategyError",
    "apply",
    "get_strategy",
    "hookimpl",
    "is_offloaded",
    "list_strategies",
    "offloaded",
    "parse_budget",
    "probe",
    "profile_model",
    "stage",
]
__version__ = "0.1.0"
