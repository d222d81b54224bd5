"""The mechanism shared by every strategy: profile, pack, place, stream, account."""

from __future__ import annotations

from offloadkit.engine.profile import find_blocks, layout_model, profile_model

__all__ = ["Engine", "find_blocks", "layout_model", "profile_model"]


def __getattr__(name: str):  # Engine pulls in torch.cuda machinery; import it on first use
    if name == "Engine":
        from offloadkit.engine.core import Engine

        return Engine
    raise AttributeError(name)
