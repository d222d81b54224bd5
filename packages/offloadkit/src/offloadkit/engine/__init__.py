"""The mechanism shared by every strategy: profile, pack, place, stream, account.

``engine.core.Engine`` is built by ``offloadkit.StagedModel``; this package's namespace only
re-exports the profiling helpers (shapes and byte counts, no device)."""

from __future__ import annotations

from offloadkit.engine.profile import find_blocks, layout_model, profile_model

__all__ = ["find_blocks", "layout_model", "profile_model"]
