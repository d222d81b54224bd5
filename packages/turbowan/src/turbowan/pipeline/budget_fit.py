"""Does the budget hold what the strategy needs for every model the run places?

offloadkit refuses a too-small budget too, but only when a model is placed, after the text
encoder (or a 14B expert) has been read; this asks the same question of ``meta`` models,
built from the headers pre-flight already read (the demo: from its presets), before anything
loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from turbowan.limits import reported
from turbowan.pipeline.problems import Problems, collecting

#: what a budget problem calls each model the pipeline places
MODEL_LABELS = {"text_encoder": "text encoder", "vae": "VAE", "high": "high-noise expert",
                "low": "low-noise expert"}


@dataclass(frozen=True)
class PlacedModel:
    """A model as the pipeline will place it, built on ``meta`` (no weights): what offloadkit
    needs to state the least budget a strategy can run it in."""

    model: torch.nn.Module
    blocks: Any  # offloadkit's ``blocks=`` argument, the same the pipeline passes
    home: str = "host"


def placed_dit(config: Any, *, quant: str, attention: str, sla_topk: float, dtype: torch.dtype,
               home: str = "host") -> PlacedModel:
    """The expert as ``load_dit`` builds it, placed with ``blocks="blocks"`` like the pipeline."""
    from turbowan.dit.meta import build_meta

    model = build_meta(config, quant=quant, attention=attention, sla_topk=sla_topk, dtype=dtype)
    return PlacedModel(model, "blocks", home)


def placed_vae(config: Any, *, dtype: torch.dtype) -> PlacedModel:
    """The VAE as ``load_vae`` leaves it; the encoder and decoder are its streamed blocks."""
    from turbowan.pipeline.placement import vae_blocks
    from turbowan.vae.meta import build_meta

    model = build_meta(config, dtype=dtype)
    return PlacedModel(model, vae_blocks(model))


def placed_text_encoder(config: Any, *, dtype: torch.dtype) -> PlacedModel:
    """The umT5 encoder as ``load_text_encoder`` leaves it (fp8 dequantised, all floats in
    the compute dtype), streamed by its ``blocks`` like the pipeline places it."""
    from turbowan.text_encoder.loading import TextEncoder
    from turbowan.text_encoder.meta import build_meta

    model = TextEncoder(build_meta(config, dtype=dtype), None)
    return PlacedModel(model, model.blocks)


@reported("building the models on meta from their checkpoint headers")
def placed_models_from_specs(specs: dict[str, dict[str, Any]], *, dtype: torch.dtype,
                             attention: str, sla_topk: float, home: str) -> dict[str, PlacedModel]:
    """role -> meta model, configured from the headers pre-flight read (no second read of
    any file). Roles missing from ``specs`` (not given, or already reported as bad) are left out."""
    from turbowan.pipeline.model_files import MODEL_ROLES, header_config

    out: dict[str, PlacedModel] = {}
    for role, role_specs in specs.items():
        family = MODEL_ROLES[role][0]
        config = header_config(family, role_specs, role).config
        if family == "dit":
            out[role] = placed_dit(config.config, quant=config.quant, attention=attention,
                                   sla_topk=sla_topk, dtype=dtype, home=home)
        elif family == "vae":
            out[role] = placed_vae(config, dtype=dtype)
        else:
            out[role] = placed_text_encoder(config, dtype=dtype)
    return out


@reported("building the demo models on meta")
def demo_placed_models(*, dtype: torch.dtype, attention: str, sla_topk: float,
                       home: str) -> dict[str, PlacedModel]:
    """The demo's models on ``meta``, from the presets its checkpoints are written from
    (the files do not exist yet when the demo pipeline is checked)."""
    from turbowan.pipeline import demo
    from turbowan.text_encoder.config import preset_config
    from turbowan.vae.config import PRESETS as VAE_PRESETS

    expert = placed_dit(demo.demo_dit_config(), quant=demo.DEMO_DIT_QUANT, attention=attention,
                        sla_topk=sla_topk, dtype=dtype, home=home)
    return {"text_encoder": placed_text_encoder(preset_config(demo.DEMO_TEXT_PRESET), dtype=dtype),
            "vae": placed_vae(VAE_PRESETS[demo.DEMO_VAE_PRESET], dtype=dtype),
            "high": expert, "low": expert}


def check_budget_fits(models: dict[str, PlacedModel], *, strategy: str, budget: Any,
                      device: torch.device, strategy_options: dict[str, Any] | None = None,
                      collector: Problems | None = None) -> None:
    """The budget holds the least the strategy needs for every model it will place
    (``offloadkit.check_fits``; ``"auto"`` is compared by its ceiling). One problem names
    every model that does not fit, the budget that would, and a strategy that needs less."""
    import offloadkit

    options = dict(strategy_options or {})
    # one profile per meta model and device, whatever asks for it: the short-budget path asks
    # layerwise too, and the demo's two experts are one model (a real 14B expert is thousands
    # of tensors to walk). The blocks and home of a PlacedModel are fixed by its model.
    profiles: dict[tuple[int, str, str], offloadkit.ModelProfile] = {}

    def fits(placed: PlacedModel, role: str, chosen: str = strategy) -> Any:
        # the device check_fits would profile a model for: none for a strategy without one
        target = (offloadkit.resolve_device(device) if offloadkit.get_strategy(chosen).uses_device
                  else torch.device("cpu"))
        key = (id(placed.model), placed.home, str(target))
        if key not in profiles:
            profiles[key] = offloadkit.profile_model(placed.model, placed.blocks, device=target,
                                                     home=placed.home)
        return offloadkit.check_fits(profiles[key], chosen, budget, target,
                                     name=MODEL_LABELS.get(role, role),
                                     **(options if chosen == strategy else {}))

    with collecting(collector) as c:
        reports = {}
        for role, placed in models.items():
            report = c.check(lambda placed=placed, role=role: fits(placed, role))
            if report is None:
                return
            reports[role] = report
        short: dict[int, list[str]] = {}  # need -> labels of the models that need it
        for role, report in reports.items():
            if not report.fits:
                short.setdefault(report.minimum_bytes, []).append(MODEL_LABELS.get(role, role))
        if not short:
            return
        budget_bytes = next(iter(reports.values())).budget_bytes
        most = max(short)
        # layerwise streams everything, but with prefetch it holds two blocks, more than
        # adaptive's least: suggest it only where it really needs less
        layerwise_need = max(fits(placed, role, "layerwise").minimum_bytes
                             for role, placed in models.items())
        describe = offloadkit.describe_bytes
        what = "; ".join(f"the {' and the '.join(labels)} {'needs' if len(labels) == 1 else 'each need'} "
                         f"{describe(need)}" for need, labels in short.items())
        alternative = (f"--offload layerwise (needs {describe(layerwise_need)})"
                       if layerwise_need < most else "--offload cpu_only (no device memory, slow)")
        c.add(f"--budget {budget!r} is {describe(budget_bytes)}, below the minimum of "
              f"strategy {strategy!r}: {what}. Pass --budget {math.ceil(most / 2**20)}MiB or "
              f"more, or use {alternative}")
