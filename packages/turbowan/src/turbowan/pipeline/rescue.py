"""Keep sampled latents when a later stage fails, without the rescue itself raising.

The rescue runs while another error (out of memory, Ctrl-C, SIGTERM, a full disk) is already
on its way out; if saving fails too, that is said in the same message instead of a second
traceback hiding the first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from turbowan.pipeline.results import save_latents_file
from turbowan.resource_errors import describe_resource_error

__all__ = ["failure_text", "rescue_latents"]


def rescue_latents(output: Path, latents: torch.Tensor, settings: dict[str, Any],
                   saved: Path | None = None) -> tuple[Path | None, str]:
    """(path of the saved latents or None, how to finish); never raises."""
    if saved is None:
        try:
            saved = save_latents_file(output, latents, settings)
        except BaseException as exc:  # noqa: BLE001 - reported in the message, never re-raised
            why = describe_resource_error(exc, "saving the latents") or (
                f"saving the latents failed ({type(exc).__name__}: {exc})")
            return None, f"the sampled latents could not be kept: {why}"
    return saved, (f"the sampled latents are saved in {saved}; finish with:\n"
                   f"  turbowan decode {saved} -o {output}")


def failure_text(exc: BaseException, timings: Any) -> str:
    """What went wrong after sampling, naming the stage (the last one recorded)."""
    from turbowan.finite import NonFiniteError

    if isinstance(exc, NonFiniteError):
        return str(exc)  # names its stage
    stage = timings.stages[-1].name if timings.stages else "decoding"
    return describe_resource_error(exc, stage) or f"{stage} failed ({type(exc).__name__}: {exc})"
