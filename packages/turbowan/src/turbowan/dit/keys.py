"""Normalise DiT checkpoint key names before matching them against the model.

Real TurboWan files carry no prefix, but wrapped exports do (``net.``,
``model.diffusion_model.``, ``module.``, a test fixture's ``weights.``), and FSDP/activation
checkpointing leaves ``_checkpoint_wrapped_module.`` inside names. The prefix is found from
the one key every Wan DiT has, so unrelated tensors stored beside the weights are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

ANCHOR = "patch_embedding.weight"
WRAPPER = "_checkpoint_wrapped_module."
V = TypeVar("V")


def normalize_dit_keys(state: Mapping[str, V]) -> tuple[dict[str, V], str, list[str]]:
    """Return (renamed mapping, prefix removed, keys dropped because they lie outside it)."""
    renamed = {k.replace(WRAPPER, ""): v for k, v in state.items()}
    anchors = [k for k in renamed if k.endswith(ANCHOR)]
    if len(anchors) != 1 or anchors[0] == ANCHOR:
        return renamed, "", []
    prefix = anchors[0][: -len(ANCHOR)]
    kept = {k[len(prefix) :]: v for k, v in renamed.items() if k.startswith(prefix)}
    dropped = [k for k in renamed if not k.startswith(prefix)]
    return kept, prefix, dropped
