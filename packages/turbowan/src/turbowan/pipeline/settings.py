"""`RunSettings`: everything one run needs, in one frozen value that pre-flight checks once.

The CLI, the Python API (`I2VPipeline`, `from_files`, `demo`), `turbowan decode` and the
ComfyUI nodes all build this one object instead of passing a dozen keywords around, so a new
setting is added in one place: a field here (with its default and its scope) and a check in
:mod:`turbowan.pipeline.checks` (listed in :mod:`turbowan.pipeline.preflight`).

Fields are what the user gave, not yet resolved: ``None`` means "the default for this kind of
run" (the demo has its own frame count, size, SLA top-k and thread count). Each field has a
scope in its metadata: ``"pipeline"`` fields are fixed when the pipeline is built (checkpoints,
placement, attention); ``"run"`` fields may change per :meth:`I2VPipeline.generate` call.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from turbowan.pipeline.conditioning import DEFAULT_RESIZE
from turbowan.pipeline.video_io import DEFAULT_FPS, DEFAULT_QUALITY
from turbowan.sampler.rcm import DEFAULT_BOUNDARY, DEFAULT_SIGMA_MAX

DEFAULT_FRAMES = 81  # upstream default
DEFAULT_SLA_TOPK = 0.1
#: tiled VAE decode: 256-pixel tiles with 64-pixel seams cut a 720p frame (1280x720) into
#: 7x4 tiles, so the decoder's activations are those of a 256x256 clip
DEFAULT_VAE_TILE = 256
DEFAULT_VAE_OVERLAP = 64
#: the checkpoints of a pipeline, by role (the CLI flag is ``--`` + the role with dashes)
ROLES = ("high", "low", "vae", "text_encoder")

PathLike = str | os.PathLike[str]


def _pipeline(default: Any = None, **kw: Any) -> Any:
    return field(default=default, metadata={"scope": "pipeline"}, **kw)


def _run(default: Any = None) -> Any:
    return field(default=default, metadata={"scope": "run"})


@dataclass(frozen=True)
class ModelFiles:
    """Checkpoint paths of one pipeline (tokenizer: path, "demo", a tokenizer, or None)."""

    high: Path | None
    low: Path | None
    vae: Path | None
    text_encoder: Path | None
    tokenizer: Any = None


@dataclass(frozen=True)
class RunSettings:
    """The inputs of one image-to-video run (see the module docstring for ``None``)."""

    # checkpoints; all four None: the embedded demo
    high: PathLike | None = _pipeline()
    low: PathLike | None = _pipeline()
    vae: PathLike | None = _pipeline()
    text_encoder: PathLike | None = _pipeline()
    tokenizer: Any = _pipeline()  # path, "demo", a tokenizer object; None: next to the encoder
    demo: bool | None = _pipeline()  # None: the demo exactly when no checkpoint is given
    # placement (offloadkit)
    strategy: str = _pipeline("adaptive")
    strategy_options: Mapping[str, Any] = _pipeline(default_factory=dict, default=dataclasses.MISSING)
    budget: int | str | None = _pipeline("auto")
    device: str | torch.device | None = _pipeline()  # None: cuda if present (demo: cpu)
    dtype: torch.dtype | str | None = _pipeline()  # None: bf16 on CUDA, fp32 on the CPU
    home: str = _pipeline("host")
    threads: int | None = _pipeline()  # CPU threads (CLI); None: torch's choice (demo: 1)
    # the DiT's attention
    attention: str = _pipeline("sla")
    sla_topk: float | None = _pipeline()  # None: 0.1 (demo: 0.5)
    # VAE decode
    vae_tiling: bool = _pipeline(False)
    vae_tile: int = _pipeline(DEFAULT_VAE_TILE)
    vae_overlap: int = _pipeline(DEFAULT_VAE_OVERLAP)
    # the VAE's own placement (the ComfyUI VAE loader's); None: the experts' strategy/budget
    vae_strategy: str | None = _pipeline()
    vae_budget: int | str | None = _pipeline()
    vae_strategy_options: Mapping[str, Any] | None = _pipeline()
    # LoRAs of the experts: each a path, "FILE:STRENGTH", (path, strength[, expert]),
    # ("FILE:S", expert) or a turbowan.lora.LoraSpec; checked by turbowan.lora.check
    loras: tuple = _pipeline(())
    # reserved for sequence parallelism (branch i14-distributed): add it as a pipeline field
    # here, with a check in turbowan.pipeline.checks
    # the clip
    image: Any = _run()  # path, PIL image, array or tensor; demo: a built-in drawing
    prompt: str | None = _run()
    frames: int | None = _run()  # None: 81 (demo: 17)
    resolution: str | None = _run()
    aspect_ratio: str | None = _run()
    width: int | None = _run()
    height: int | None = _run()
    resize: str = _run(DEFAULT_RESIZE)
    # sampling
    steps: int = _run(4)
    sigma_max: float = _run(DEFAULT_SIGMA_MAX)
    boundary: float = _run(DEFAULT_BOUNDARY)
    seed: int = _run(0)
    ode: bool = _run(False)
    # output
    output: PathLike | None = _run()
    fps: float = _run(DEFAULT_FPS)
    quality: int = _run(DEFAULT_QUALITY)
    save_latents: bool = _run(False)

    def __post_init__(self) -> None:
        # a read-only copy: the caller's dict may change after the settings are checked
        object.__setattr__(self, "strategy_options", MappingProxyType(dict(self.strategy_options)))

    @property
    def is_demo(self) -> bool:
        """The embedded demo (tiny models, random weights): by default, when no checkpoint is given."""
        if self.demo is not None:
            return bool(self.demo)
        return all(getattr(self, role) is None for role in ROLES)

    def replace(self, **changes: Any) -> RunSettings:
        """A copy with ``changes``; an unknown name is a TypeError listing the known ones."""
        check_names(changes, field_names())
        return dataclasses.replace(self, **changes)


def field_names(scope: str | None = None) -> tuple[str, ...]:
    """Names of the fields of ``scope`` ("pipeline", "run"; None: all), in order."""
    return tuple(f.name for f in dataclasses.fields(RunSettings)
                 if scope is None or f.metadata.get("scope") == scope)


def check_names(given: Mapping[str, Any], allowed: tuple[str, ...], where: str = "RunSettings") -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; {where} takes {', '.join(allowed)}")


def settings_from(strategy_options: Mapping[str, Any], **fields: Any) -> RunSettings:
    """RunSettings from keyword arguments, where keywords that are not fields are the
    strategy's options (``from_files(..., prefetch=2)``, as ``offloadkit.apply`` takes them)."""
    names = set(field_names())
    options = {k: v for k, v in strategy_options.items() if k not in names}
    fields.update({k: v for k, v in strategy_options.items() if k in names})
    if options:
        fields["strategy_options"] = {**fields.get("strategy_options", {}), **options}
    return RunSettings(**fields)
