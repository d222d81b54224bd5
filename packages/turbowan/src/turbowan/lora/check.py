"""Pre-flight for a run's LoRAs: every file checked from its header against the expert it
changes (exists, safe format, a naming we know, shapes of this model) before any weight is
read, and the LoRA bytes added to the experts the budget check plans with."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from turbowan.lora.files import LoraSpec, read_lora_specs
from turbowan.lora.formats import LoraError, LoraMatch, match_lora, model_targets

FLAGS = {"both": "--lora", "high": "--lora-high", "low": "--lora-low"}
ROLES = ("high", "low")


def coerce_loras(loras: Iterable[Any] | None) -> list[LoraSpec]:
    """LoraSpec list from what users pass (see :meth:`LoraSpec.coerce`)."""
    if loras is None:
        return []
    if isinstance(loras, (str, os.PathLike, LoraSpec)):
        loras = [loras]
    return [LoraSpec.coerce(item) for item in loras]


def check_settings_loras(raw: Any, headers: Mapping[str, Mapping[str, Any]], is_demo: bool,
                         collector: Any) -> tuple[list[LoraSpec], dict[str, list]]:
    """Pre-flight of ``RunSettings.loras``: (the LoraSpec list, the checked headers for
    :func:`with_meta_loras`). ``headers``: role -> checkpoint header of the files that passed."""
    loras = collector.check(lambda: coerce_loras(raw))
    if not loras:
        return [], {}
    experts = collector.check(demo_meta_experts if is_demo else lambda: meta_experts(headers))
    if experts is None:
        return loras, {}
    return loras, check_loras(loras, experts, collector)


def check_loras(loras: list[LoraSpec], experts: Mapping[str, nn.Module], collector: Any
                ) -> dict[str, list[tuple[LoraSpec, dict[str, Any]]]]:
    """Check each LoRA against each expert it applies to (``experts``: role -> model, on
    ``meta`` is enough); problems go to ``collector``. Returns role -> [(spec, header)] of
    the LoRAs that passed, for :func:`with_meta_loras`."""
    checked: dict[str, list[tuple[LoraSpec, dict[str, Any]]]] = {role: [] for role in ROLES}
    names: dict[str, set[str]] = {role: set() for role in ROLES}
    targets = {role: model_targets(model) for role, model in experts.items()}
    for spec in loras:
        flag = FLAGS[spec.expert]
        header = collector.check(lambda spec=spec, flag=flag: _read(spec, flag))
        if header is None:
            continue
        roles = [r for r in ROLES if spec.applies_to(r)]
        for role in roles:
            if role not in targets:
                if spec.expert == role:
                    collector.add(f"{flag} {spec.path}: no {role}-noise expert is given "
                                  f"(--{role}); pass it or drop this LoRA")
                continue
            if spec.name in names[role]:
                collector.add(f"{flag} {spec.path}: two LoRAs on the {role}-noise expert are "
                              f"named {spec.name!r}; rename one of the files")
                continue
            try:
                match_lora(header, targets[role], source=f"{flag} {spec.path}")
            except LoraError as exc:
                collector.add(str(exc))
                break
            names[role].add(spec.name)
            checked[role].append((spec, header))
    return checked


def _read(spec: LoraSpec, flag: str) -> dict[str, Any]:
    try:
        return read_lora_specs(spec.path)
    except LoraError as exc:
        raise LoraError(f"{flag}: {exc}") from None


def with_meta_loras(models: dict[str, Any], checked: Mapping[str, list[tuple[LoraSpec, Any]]]
                    ) -> dict[str, Any]:
    """The budget check's ``meta`` experts with their LoRA branches attached (as ``meta``
    tensors of the right size), so the planner sees what will really stream."""
    from turbowan.lora.attach import attach_lora, attached_loras

    for role, items in checked.items():
        placed = models.get(role)
        if placed is None:
            continue
        for spec, header in items:
            if spec.name in attached_loras(placed.model):  # one meta model for both experts
                continue
            attach_lora(placed.model, header, name=spec.name, strength=spec.strength,
                        source=str(spec.path))
    return models


def meta_experts(headers: Mapping[str, Mapping[str, Any]]) -> dict[str, nn.Module]:
    """role -> the expert on ``meta``, configured from its checkpoint header (no weights)."""
    from turbowan.dit.meta import build_meta
    from turbowan.pipeline.model_files import header_config

    out = {}
    for role in ROLES:
        if role in headers:
            layout = header_config("dit", dict(headers[role]), role).config
            out[role] = build_meta(layout.config, quant=layout.quant)
    return out


def demo_meta_experts() -> dict[str, nn.Module]:
    """The demo's two experts on ``meta``, from the preset its checkpoints are written from."""
    from turbowan.dit.meta import build_meta
    from turbowan.pipeline import demo

    return {role: build_meta(demo.demo_dit_config(), quant=demo.DEMO_DIT_QUANT)
            for role in ROLES}


def attach_for_expert(model: nn.Module, loras: Iterable[LoraSpec], role: str) -> list[LoraMatch]:
    """Attach the run's LoRAs for ``role`` to a freshly loaded expert; what a file holds
    that does not apply is reported once as a warning (count and first keys)."""
    from turbowan.lora.attach import attach_lora

    matches = []
    for spec in loras:
        if not spec.applies_to(role):
            continue
        match = attach_lora(model, spec.path, strength=spec.strength, name=spec.name,
                            source=f"LoRA {spec.path.name}")
        summary = match.problems_summary()
        if summary:
            warnings.warn(f"LoRA {spec.path.name} on the {role}-noise expert: {summary}",
                          stacklevel=2)
        matches.append(match)
    return matches
