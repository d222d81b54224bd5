"""What the loader nodes hand to the sampler: a checked checkpoint plus how to place it.

The loaders read only the checkpoint header (key names, shapes, dtypes), so a wrong file
fails at the loader in a second; the weights are read when the sampler runs, with the
low-noise expert streamed in from disk while the high-noise one samples. Nothing stays
in memory between runs, so a TurboWan workflow does not hold ~29 GB of host RAM while
ComfyUI runs other workflows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from turbowan.dit.config import config_from_state_dict
from turbowan.dit.keys import normalize_dit_keys
from turbowan.pipeline import preflight


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
    loras: tuple = ()  # turbowan.lora.LoraSpec, added by TurboWanLoraLoader nodes

    def placement(self) -> tuple[str, str, str, float]:
        return self.strategy, self.budget, self.attention, float(self.sla_topk)


@dataclass(frozen=True)
class TurboWanVAE:
    """A checked Wan2.1 VAE checkpoint (ComfyUI TURBOWAN_VAE)."""

    path: Path
    nbytes: int
    description: str


def _tensor_bytes(specs: dict) -> int:
    return sum(spec.numel * spec.dtype.itemsize for spec in specs.values())


def _node_message(node: str, exc: Exception) -> str:
    # preflight words its messages for the CLI (--high, --vae); name the node input instead
    text = str(exc)
    for flag in ("--high ", "--low ", "--vae ", "--high: ", "--vae: "):
        text = text.replace(flag, "")
    return f"{node}: {text}"


def check_dit(path: Path, *, attention: str, sla_topk: float, strategy: str, budget: str,
              device) -> TurboWanModel:
    """Header check of a DiT expert and of its placement settings; loads no weights."""
    c = preflight.new_collector()
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
        description=description,
    )


def check_vae(path: Path) -> TurboWanVAE:
    try:
        description, specs = preflight.inspect_model_file("vae", path)
    except ValueError as exc:
        raise ValueError(_node_message("TurboWanVAELoader", exc)) from None
    return TurboWanVAE(path=path, nbytes=_tensor_bytes(specs), description=description)
