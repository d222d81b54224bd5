"""Exception types. Each message names the problem and the fix."""

from __future__ import annotations


class OffloadError(RuntimeError):
    """Base class for every error offloadkit raises on purpose."""


class UnknownStrategyError(OffloadError, KeyError):
    """A strategy name that no installed plugin provides."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class PluginError(OffloadError):
    """A plugin problem that cannot be skipped (e.g. two plugins claim one strategy name)."""


class BudgetError(OffloadError, ValueError):
    """A malformed budget, or one below what the chosen strategy needs."""


class BlockDiscoveryError(OffloadError, ValueError):
    """The model has no recognisable list of repeated blocks and none was given."""


class BlockCoverageWarning(UserWarning):
    """The blocks found to stream hold under half of the model's weights."""


class AlreadyOffloadedError(OffloadError):
    """offloadkit.apply() was called on a model that is already under offload."""


class DeviceUnavailableError(OffloadError):
    """The requested device does not exist here (e.g. device='cuda' without CUDA)."""
