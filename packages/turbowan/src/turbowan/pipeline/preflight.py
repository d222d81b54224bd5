"""Pre-flight: every check of a run, done in one round before any model is loaded.

A 14B run spends minutes loading and sampling; a typo in the frame count or a wrong file must
not be discovered at the end, nor one problem per attempt. :func:`check_pipeline` and
:func:`check_run` check a :class:`~turbowan.pipeline.settings.RunSettings` into one collector,
so every problem of a run is reported together (one :class:`PreflightError`), each with its fix. Checkpoints are checked from their headers
(shapes and dtypes), never loaded here; the budget is compared with each model's minimum
under the strategy on ``meta`` copies built from those headers.

To add a check: write it in :mod:`turbowan.pipeline.checks` (or a module of its own) taking a
``collector``, and call it from :func:`check_pipeline` (fields fixed when the pipeline
is built) or :func:`check_run` (fields of one generation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from turbowan.dit.config import ATTENTION_CHOICES  # noqa: F401  (re-exported for the nodes)
from turbowan.lora import check as lora_check
from turbowan.pipeline import checks
from turbowan.pipeline.budget_fit import (
    check_budget_fits,
    demo_placed_models,
    placed_models_from_specs,
)
from turbowan.pipeline.checks import (  # noqa: F401  (the single checks, re-exported)
    ClipSettings,
    check_attention,
    check_image,
    check_output,
    check_placement,
    check_tokenizer,
    check_vae_tiling,
    default_dtype,
    parse_dtype,
)
from turbowan.pipeline.model_files import (  # noqa: F401  (re-exported)
    FLAG,
    MODEL_ROLES,
    inspect_model_file,
    inspect_model_files,
    required_problem,
)
from turbowan.pipeline.outputs import check_output_not_input
from turbowan.pipeline.problems import PreflightError, Problems, collecting
from turbowan.pipeline.settings import DEFAULT_FRAMES, DEFAULT_SLA_TOPK, ROLES, RunSettings

#: the checkpoints a pipeline uses; all but the low-noise expert (1-2 steps never reach it)
#: are required. ComfyUI brings its own text conditioning, `turbowan decode` uses the VAE only.
PIPELINE_ROLES = ROLES

new_collector = Problems
check_run_settings = checks.check_clip  # the ComfyUI sampler's name for it


@dataclass(frozen=True)
class PipelineFacts:
    """What pre-flight worked out for a pipeline: resolved device, dtype and SLA top-k, and a
    one-line description of each checkpoint."""

    device: torch.device
    dtype: torch.dtype
    sla_topk: float
    descriptions: dict[str, str]
    loras: tuple = ()  # the run's LoRAs as turbowan.lora.LoraSpec, each checked


@dataclass(frozen=True)
class CheckedRun:
    """One generation's inputs, checked and resolved (demo defaults filled in)."""

    clip: ClipSettings
    prompt: str
    image: Any  # the opened start image (PIL); None when the pipeline is built without one
    image_label: str  # what the run record says about the image


def check_pipeline(settings: RunSettings, *, roles: tuple[str, ...] = PIPELINE_ROLES,
                   collector: Problems | None = None) -> PipelineFacts | None:
    """The checkpoints, placement, attention, VAE tiling and budget of a pipeline."""
    s = settings
    with collecting(collector) as c:
        descriptions: dict[str, str] = {}
        specs: dict[str, dict[str, Any]] = {}
        if not s.is_demo:
            for role in roles:
                if role != "low" and getattr(s, role) is None:
                    c.add(required_problem(role))
            paths = {role: getattr(s, role) for role in ROLES}
            descriptions, specs = inspect_model_files(paths, c, tokenizer=s.tokenizer)
            check_tokenizer(s.tokenizer, c)
        loras, checked_loras = lora_check.check_settings_loras(s.loras, specs, s.is_demo, c)
        before = len(c.problems)  # the files' problems do not stop the budget check
        device = "cpu" if s.device is None and s.is_demo else s.device
        dev = check_placement(s.strategy, s.budget, device, c)
        topk = s.sla_topk if s.sla_topk is not None else _default_topk(s)
        check_attention(s.attention, topk, c)
        checks.check_home(s.home, c)
        check_vae_tiling(s.vae_tiling, s.vae_tile, s.vae_overlap, c)
        checks.check_threads(s.threads, c)
        dtype = c.check(lambda: parse_dtype(s.dtype, dev))
        if len(c.problems) == before:  # the meta models need valid settings (dtype, home...)
            if s.is_demo:
                def build() -> dict[str, Any]:
                    every = demo_placed_models(dtype=dtype, attention=s.attention, sla_topk=topk,
                                               home=s.home)
                    return {role: m for role, m in every.items() if role in roles}
            else:
                def build() -> dict[str, Any]:
                    return placed_models_from_specs(specs, dtype=dtype, attention=s.attention,
                                                    sla_topk=topk, home=s.home)
            models = c.check(lambda: lora_check.with_meta_loras(build(), checked_loras))
            if models is not None and s.home == "shared":
                checks.check_shared_room(models, c)
            if models is not None:
                check_budget_fits(models, strategy=s.strategy, budget=s.budget, device=dev,
                                  strategy_options=dict(s.strategy_options), collector=c)
        failed = len(c.problems) > before
    if failed or dev is None or dtype is None:
        return None
    return PipelineFacts(device=dev, dtype=dtype, sla_topk=float(topk), descriptions=descriptions,
                         loras=tuple(loras))


def _default_topk(settings: RunSettings) -> float:
    from turbowan.pipeline.demo import DEMO_SLA_TOPK

    return DEMO_SLA_TOPK if settings.is_demo else DEFAULT_SLA_TOPK


def check_run(settings: RunSettings, *, complete: bool = True,
              collector: Problems | None = None) -> CheckedRun | None:
    """The clip, schedule, image, prompt and output of one generation (demo defaults filled
    in). ``complete=False``: the run is not fully given yet (a pipeline built without an
    image; :meth:`I2VPipeline.generate` gives the rest), so a missing image, or a missing
    low-noise expert for the default 4 steps, is not a problem yet."""
    from turbowan.pipeline import demo as demo_mod
    from turbowan.sampler.rcm import rcm_schedule

    s = settings
    image, prompt, frames, width, height = s.image, s.prompt, s.frames, s.width, s.height
    if s.is_demo:
        image = demo_mod.demo_image() if image is None else image
        prompt = demo_mod.DEMO_PROMPT if prompt is None else prompt
        frames = demo_mod.DEMO_FRAMES if frames is None else frames
        if width is None and height is None and s.resolution is None and s.aspect_ratio is None:
            width, height = demo_mod.DEMO_WIDTH, demo_mod.DEMO_HEIGHT
    with collecting(collector) as c:
        before = len(c.problems)
        if image is None and complete:
            c.add("no start image: pass --image PATH (PNG/JPEG), or give no model paths to run the demo")
        prompt = "" if prompt is None else prompt
        if not isinstance(prompt, str):
            c.add(f"prompt must be a string, got {type(prompt).__name__}")
        clip = checks.check_clip(
            frames=DEFAULT_FRAMES if frames is None else frames, resolution_key=s.resolution,
            aspect_ratio=s.aspect_ratio, width=width, height=height, steps=s.steps,
            sigma_max=s.sigma_max, boundary=s.boundary, seed=s.seed, ode=s.ode, resize=s.resize,
            collector=c)
        try:
            experts = rcm_schedule(s.steps, float(s.sigma_max), float(s.boundary)).experts
        except (TypeError, ValueError):
            experts = ()  # reported by check_clip
        if complete and "low" in experts and not s.is_demo and s.low is None:
            c.add(f"{s.steps} steps reach the low-noise expert (t < {s.boundary}); pass --low, or "
                  "use --steps 2 (the high expert only)")
        check_output(s.output, fps=s.fps, quality=s.quality, collector=c)
        check_output_not_input(s.output, {"--image": image,
                                          **{FLAG[role]: getattr(s, role) for role in ROLES},
                                          "--tokenizer": s.tokenizer}, c)
        if s.save_latents and s.output is None:
            c.add("save_latents=True needs output= (the latents go next to the video)")
        pil = check_image(image, c) if image is not None else None
        failed = len(c.problems) > before
    if failed or clip is None:
        return None
    label = (str(image) if isinstance(image, (str, os.PathLike)) else
             "built-in" if s.is_demo and s.image is None else "in-memory" if image is not None else "none")
    return CheckedRun(clip=clip, prompt=prompt, image=pil, image_label=label)


__all__ = ["PIPELINE_ROLES", "CheckedRun", "PipelineFacts", "PreflightError", "Problems",
           "check_pipeline", "check_run"]
