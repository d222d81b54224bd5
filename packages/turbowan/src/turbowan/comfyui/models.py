"""What the loader nodes hand to the sampler: a checked checkpoint plus how to place it.

The loaders read only the checkpoint header (key names, shapes, dtypes), so a wrong file
fails at the loader in a second; the weights are read when the sampler runs, with the
low-noise expert streamed in from disk while the high-noise one samples. Nothing stays
in memory between runs, so a TurboWan workflow does not hold ~29 GB of host RAM while
ComfyUI runs other workflows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from turbowan.dit.config import config_from_state_dict
from turbowan.dit.keys import normalize_dit_keys
from turbowan.pipeline import preflight
from turbowan.pipeline.budget_fit import PlacedModel, placed_dit, placed_vae


@dataclass(frozen=True)
class TurboWanModel:
    """A checked DiT expert checkpoint and the settings it runs with (ComfyUI TURBOWAN_MODEL)."""

    path: Path
    attention: str
    sla_topk: float
    strategy: str
    budget: str
    text_dim: int
    nbytes: int  # tensor bytes in the file: what the expert weighs once loaded
    description: str
    #: LoRAs applied to this expert (TurboWanLoraLoader returns a copy with one more)
    loras: tuple[Any, ...] = ()
    strategy_options: str = ""  # JSON object for the strategy (e.g. manual's resident list)

    def placement(self) -> tuple[str, str, str, float, str]:
        return (self.strategy, self.budget, self.attention, float(self.sla_topk),
                self.strategy_options)

    def options(self) -> dict[str, Any]:
        return parse_strategy_options(self.strategy_options)


@dataclass(frozen=True)
class TurboWanVAE:
    """A checked Wan2.1 VAE checkpoint (ComfyUI TURBOWAN_VAE)."""

    path: Path
    nbytes: int
    description: str
    strategy: str = "adaptive"
    budget: str = "auto"
    strategy_options: str = ""

    def options(self) -> dict[str, Any]:
        return parse_strategy_options(self.strategy_options)


def parse_strategy_options(text: str) -> dict[str, Any]:
    """The loaders' strategy_options input: empty, or a JSON object of strategy options."""
    if not text or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"strategy_options must be a JSON object such as "
                         f'{{"resident": [0, 2]}}, got {text!r} ({exc.msg})') from None
    if not isinstance(value, dict):
        raise ValueError(f"strategy_options must be a JSON object, got {text!r}")
    return value


def _tensor_bytes(specs: dict) -> int:
    return sum(spec.numel * spec.dtype.itemsize for spec in specs.values())


def _node_message(node: str, exc: Exception) -> str:
    # preflight words its messages for the CLI (--high, --vae); name the node input instead
    text = str(exc)
    for flag in ("--high ", "--low ", "--vae ", "--high: ", "--vae: "):
        text = text.replace(flag, "")
    return f"{node}: {text}"


def check_dit(path: Path, *, attention: str, sla_topk: float, strategy: str, budget: str,
              device, strategy_options: str = "") -> TurboWanModel:
    """Header check of a DiT expert and of its placement settings; loads no weights."""
    c = preflight.new_collector()
    options = c.check(lambda: _strategy_with(strategy, strategy_options))
    preflight.check_attention(attention, sla_topk, collector=c)
    preflight.check_placement(strategy, budget, device, collector=c)
    checked = c.check(lambda: preflight.inspect_model_file("high", path))  # reads the header once
    layout = None
    if checked is not None:
        description, specs = checked
        layout = config_from_state_dict(normalize_dit_keys(specs)[0])
        if attention in ("sla", "sagesla") and layout.attention != "sla":
            c.add(f"{path.name} has no SLA proj_l weights, so attention_type={attention!r} "
                  "cannot run it as trained; choose attention_type 'original'")
    if layout is not None and not c.problems:
        c.check(lambda: check_fits(path, placed_dit(
            layout.config, quant=layout.quant, attention=attention, sla_topk=sla_topk,
            dtype=_run_dtype(device)), strategy=strategy, budget=budget, device=device,
            options=options))
    if attention == "sagesla":
        from turbowan.ops.sagesla import sagesla_available

        if not sagesla_available():
            c.add("attention_type 'sagesla' needs SpargeAttn (spas_sage_attn), which is not "
                  "installed in ComfyUI's Python; install it or choose 'sla'")
    try:
        c.raise_if_any()
    except preflight.PreflightError as exc:
        raise ValueError(_node_message("TurboWanModelLoader", exc)) from None
    assert checked is not None and layout is not None
    return TurboWanModel(
        path=path, attention=attention, sla_topk=float(sla_topk), strategy=strategy,
        budget=str(budget), text_dim=layout.config.text_dim, nbytes=_tensor_bytes(specs),
        description=description, strategy_options=strategy_options.strip(),
    )


def check_vae(path: Path, *, strategy: str = "adaptive", budget: str = "auto",
              device: torch.device | None = None, strategy_options: str = "") -> TurboWanVAE:
    """Header check of the VAE and of its own placement settings; loads no weights."""
    from turbowan.pipeline.model_files import header_config

    device = device if device is not None else torch.device("cpu")
    try:
        preflight.check_placement(strategy, budget, device)
        options = _strategy_with(strategy, strategy_options)
        description, specs = preflight.inspect_model_file("vae", path)
        placed = placed_vae(header_config("vae", specs, str(path)).config,
                            dtype=_run_dtype(device))
        check_fits(path, placed, strategy=strategy, budget=budget, device=device, options=options)
    except (ValueError, TypeError) as exc:  # PreflightError is a ValueError
        raise ValueError(_node_message("TurboWanVAELoader", exc)) from None
    return TurboWanVAE(path=path, nbytes=_tensor_bytes(specs), description=description,
                       strategy=strategy, budget=str(budget),
                       strategy_options=strategy_options.strip())


def _strategy_with(strategy: str, text: str) -> dict[str, Any]:
    """The parsed options, checked by building the strategy with them (a plugin's own
    option errors, such as manual's missing resident list, surface at the loader)."""
    import offloadkit

    options = parse_strategy_options(text)
    offloadkit.get_strategy(strategy)(**options)
    return options


def _run_dtype(device: torch.device) -> torch.dtype:
    return preflight.default_dtype(torch.device(device))


def check_fits(path: Path, placed: PlacedModel, *, strategy: str, budget: Any,
               device: torch.device, options: dict[str, Any] | None = None) -> None:
    """The budget holds the least ``strategy`` needs for the model in ``path`` (built on
    meta as the sampler will place it), answered by ``offloadkit.check_fits``; else a
    ValueError naming file, strategy, minimum (bytes and GiB) and the fix, raised when the
    loader runs rather than minutes later in the sampler."""
    import offloadkit

    report = offloadkit.check_fits(placed.model, strategy, budget, torch.device(device),
                                   blocks=placed.blocks, home=placed.home, name=path.name,
                                   **(options or {}))
    if not report.fits:
        raise ValueError(f"{report.message} In this node: set budget to "
                         f"{math.ceil(report.minimum_bytes / 2**20)}MiB or more, or choose "
                         "another offload_strategy")
