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


def placed_models_from_specs(specs: dict[str, dict[str, Any]], *, dtype: torch.dtype,
                             attention: str, sla_topk: float, home: str) -> dict[str, PlacedModel]:
    """role -> meta model, configured from the headers pre-flight read (no second read of
    any file). Roles missing from ``specs`` (not given, or already reported as bad) are left out."""
    from turbowan.pipeline.model_files import MODEL_ROLES

    out: dict[str, PlacedModel] = {}
    for role, role_specs in specs.items():
        family = MODEL_ROLES[role][0]
        if family == "dit":
            from turbowan.dit.config import config_from_state_dict
            from turbowan.dit.keys import normalize_dit_keys

            layout = config_from_state_dict(normalize_dit_keys(role_specs)[0])
            out[role] = placed_dit(layout.config, quant=layout.quant, attention=attention,
                                   sla_topk=sla_topk, dtype=dtype, home=home)
        elif family == "vae":
            from turbowan.vae.config import config_from_state_dict as vae_config
            from turbowan.vae.config import strip_prefix

            out[role] = placed_vae(vae_config(strip_prefix(role_specs)), dtype=dtype)
        else:
            from turbowan.text_encoder.config import config_from_state_dict as te_config
            from turbowan.text_encoder.naming import to_wan_names

            shapes = {k: v.shape for k, v in role_specs.items()}
            renamed, _ = to_wan_names(shapes, shapes, source=role)
            out[role] = placed_text_encoder(te_config(renamed, source=role), dtype=dtype)
    return out


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


def _budget_bytes_for_check(budget: Any, device: torch.device) -> int:
    """The budget as bytes. ``"auto"`` is read at placement from the memory free then (the
    text encoder, released by then, may hold some now), so it is checked against the most
    it can ever be: the device's total less the activation reserve, as ``offloadkit.stage``
    does. Sizes and percentages of the total do not change, so they are resolved now."""
    from offloadkit.budget import auto_reserve_bytes, parse_budget
    from offloadkit.probe import probe

    if budget is None or (isinstance(budget, str) and budget.strip().lower() == "auto"):
        total = probe(device).total_bytes
        return max(0, total - auto_reserve_bytes(total))
    return parse_budget(budget, str(device))


def check_budget_fits(models: dict[str, PlacedModel], *, strategy: str, budget: Any,
                      device: torch.device, strategy_options: dict[str, Any] | None = None,
                      collector: Problems | None = None) -> None:
    """The budget holds the least the strategy needs for every model it will place."""
    import offloadkit
    from offloadkit.engine.options import ENGINE_OPTIONS
    from offloadkit.engine.profile import profile_model, with_device_memory
    from offloadkit.strategy import describe_bytes

    with collecting(collector) as c:
        options = {k: v for k, v in (strategy_options or {}).items() if k not in ENGINE_OPTIONS}

        def make_strategy() -> Any:
            return offloadkit.get_strategy(strategy)(**options)

        chosen = c.check(make_strategy)
        if chosen is None or not getattr(chosen, "uses_budget", True):
            return  # cpu_only places nothing on the device: any budget will do
        budget_bytes = c.check(lambda: _budget_bytes_for_check(budget, device))
        if budget_bytes is None:
            return
        layerwise = offloadkit.get_strategy("layerwise")()
        short: dict[int, list[str]] = {}  # need -> labels of the models that need it
        layerwise_need = 0
        for role, placed in models.items():
            profile = with_device_memory(
                profile_model(placed.model, placed.blocks, device=device, home=placed.home), device)
            need = chosen.min_device_bytes(profile)
            layerwise_need = max(layerwise_need, layerwise.min_device_bytes(profile))
            if budget_bytes < need:
                short.setdefault(need, []).append(MODEL_LABELS.get(role, role))
        if short:
            most = max(short)
            what = "; ".join(f"the {' and the '.join(labels)} {'needs' if len(labels) == 1 else 'each need'} "
                             f"{describe_bytes(need)}" for need, labels in short.items())
            # layerwise streams everything, but with prefetch it holds two blocks, more than
            # adaptive's least: suggest it only where it really needs less
            alternative = (f"--offload layerwise (needs {describe_bytes(layerwise_need)})"
                           if layerwise_need < most else
                           "--offload cpu_only (no device memory, slow)")
            c.add(f"--budget {budget!r} is {describe_bytes(budget_bytes)}, below the minimum of "
                  f"strategy {strategy!r}: {what}. Pass --budget {math.ceil(most / 2**20)}MiB or "
                  f"more, or use {alternative}")
