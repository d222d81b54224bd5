"""LoRA key namings -> the Wan DiT module each key changes.

Community Wan LoRAs come in three namings of the same modules (facts from ComfyUI's
``comfy/lora.py`` / ``weight_adapter``, musubi-tuner and diffusers' Wan LoRA conversion):

* ComfyUI / diffusion-pipe / PEFT: Wan module names, ``diffusion_model.blocks.0.self_attn.q``
  + ``.lora_A.weight`` / ``.lora_B.weight`` (or ``.lora_down`` / ``.lora_up``);
* kohya / musubi-tuner: the same names with dots as underscores behind ``lora_unet_``,
  ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  (Wan-Fun files write ``lora_unet__``);
* diffusers: diffusers' module names behind ``transformer.``, ``blocks.0.attn1.to_q``.

Rather than one parser per naming, every target module of the model gets one alias per
naming (dotted and underscored, Wan and diffusers names), and a key is matched by stripping
a known prefix and a known tensor-role suffix and looking the rest up. The values may be
tensors or header specs (anything with ``.shape``), so the same matching runs in pre-flight
on file headers and at load time on the tensors.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model; the message says why and what to do."""


# tensor-role suffixes, longest first so ".lora_A.default.weight" wins over ".weight" forms
_ROLE_SUFFIXES: tuple[tuple[str, str], ...] = tuple(sorted((
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_A", "down"), (".lora_B", "up"),
    (".lora_B.bias", "diff_b"),  # diffusers' name for a bias delta
    (".alpha", "alpha"),
    (".diff", "diff"), (".diff_b", "diff_b"), (".w_norm", "diff"), (".b_norm", "diff_b"),
    (".lora_mid.weight", "mid"), (".dora_scale", "dora"),
    (".hada_w1_a", "loha"), (".hada_w1_b", "loha"), (".hada_w2_a", "loha"),
    (".hada_w2_b", "loha"), (".hada_t1", "loha"), (".hada_t2", "loha"),
    (".lokr_w1", "lokr"), (".lokr_w2", "lokr"), (".lokr_w1_a", "lokr"), (".lokr_w1_b", "lokr"),
    (".lokr_w2_a", "lokr"), (".lokr_w2_b", "lokr"), (".lokr_t2", "lokr"),
    (".a1.weight", "glora"), (".a2.weight", "glora"), (".b1.weight", "glora"),
    (".b2.weight", "glora"), (".set_weight", "set"), (".reshape_weight", "reshape"),
), key=lambda item: -len(item[0])))

#: adapter kinds turbowan does not run, and what to tell the user
UNSUPPORTED = {
    "loha": "LoHa (LyCORIS hada_*) adapters are not supported; use a plain LoRA "
            "(lora_A/lora_B or lora_down/lora_up), e.g. re-extract it as a LoRA",
    "lokr": "LoKr (LyCORIS lokr_*) adapters are not supported; use a plain LoRA "
            "(lora_A/lora_B or lora_down/lora_up), e.g. re-extract it as a LoRA",
    "glora": "GLoRA adapters are not supported; use a plain LoRA",
    "dora": "DoRA (dora_scale) LoRAs are not supported: their update depends on the full "
            "weight's norm, which an unmerged branch beside an int8 weight cannot give",
    "mid": "LoCon/Tucker lora_mid tensors (convolution LoRAs) are not supported",
    "set": "set_weight patches (whole replacement weights) are not supported",
    "reshape": "reshape_weight patches are not supported",
}

# prefixes trainers put in front of module names; the bare name is tried too
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.",
            "unet.", "model.", "lora_unet__", "lora_unet_", "lora_transformer_", "lycoris_")

# Wan name -> diffusers name inside a block, and for the modules outside the blocks
_BLOCK_DIFFUSERS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}
_TOP_DIFFUSERS = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out", "head.modulation": "scale_shift_table",
}
# module names of Wan models that the Wan2.2 I2V A14B experts do not have, with the reason
_OTHER_WAN = {
    "k_img": "the CLIP image cross-attention of Wan2.1 I2V/FLF2V (Wan2.2 A14B has none)",
    "v_img": "the CLIP image cross-attention of Wan2.1 I2V/FLF2V (Wan2.2 A14B has none)",
    "add_k_proj": "the CLIP image cross-attention of Wan2.1 I2V/FLF2V (Wan2.2 A14B has none)",
    "add_v_proj": "the CLIP image cross-attention of Wan2.1 I2V/FLF2V (Wan2.2 A14B has none)",
    "img_emb": "the CLIP image embedder of Wan2.1 I2V (Wan2.2 A14B has none)",
    "image_embedder": "the CLIP image embedder of Wan2.1 I2V (Wan2.2 A14B has none)",
    "vace": "VACE blocks (a Wan VACE model)",
}
# what a file whose keys match nothing looks like, from telltale key fragments
_FAMILY_HINTS = (
    (("lora_te_", "lora_te1_", "lora_te2_", "text_encoder."), "a text-encoder LoRA (SD/SDXL/Flux CLIP or T5)"),
    (("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks"),
     "a Stable Diffusion / SDXL UNet LoRA"),
    (("double_blocks", "single_blocks", "single_transformer_blocks"), "a Flux / HunyuanVideo LoRA"),
    (("transformer_blocks",), "a LoRA for a diffusers transformer with transformer_blocks "
                              "(Flux, LTX-Video, CogVideoX, Qwen-Image, ...)"),
    (("blocks",), "a Wan DiT LoRA whose modules or block numbers this expert does not have"),
)

def _linear_types() -> tuple[type, ...]:
    from turbowan.quant.int8_linear import Int8Linear

    return (nn.Linear, Int8Linear)


def _norm_types() -> tuple[type, ...]:
    from turbowan.dit.model import AffineLayerNorm, RMSNorm

    return (RMSNorm, AffineLayerNorm)


@dataclass(frozen=True)
class Target:
    """A module (or block parameter) of the model that a LoRA may change."""

    name: str  # Wan module path, e.g. "blocks.3.self_attn.q"
    kind: str  # "linear" | "norm" | "param"
    weight_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None


def model_targets(model: nn.Module) -> dict[str, Target]:
    """Every linear, norm and modulation table of a Wan DiT (works on ``meta`` models)."""
    linear, norm = _linear_types(), _norm_types()
    out: dict[str, Target] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, linear):
            bias = getattr(module, "bias", None)
            shape = (module.out_features, module.in_features)
            out[name] = Target(name, "linear", shape, None if bias is None else tuple(bias.shape))
        elif isinstance(module, norm):
            bias = getattr(module, "bias", None)
            out[name] = Target(name, "norm", tuple(module.weight.shape),
                               None if bias is None else tuple(bias.shape))
        mod = module._parameters.get("modulation") if hasattr(module, "_parameters") else None
        if mod is not None:
            pname = f"{name}.modulation"
            out[pname] = Target(pname, "param", tuple(mod.shape), None)
    return out


def _diffusers_name(wan: str) -> str | None:
    parts = wan.split(".")
    if len(parts) > 2 and parts[0] == "blocks":
        inner = _BLOCK_DIFFUSERS.get(".".join(parts[2:]))
        return None if inner is None else f"blocks.{parts[1]}.{inner}"
    return _TOP_DIFFUSERS.get(wan)


def alias_table(targets: Mapping[str, Target]) -> dict[str, tuple[str, str]]:
    """alias -> (target name, naming) for the Wan and diffusers names, dotted and underscored."""
    table: dict[str, tuple[str, str]] = {}
    for name in targets:
        table.setdefault(name, (name, "wan"))
        table.setdefault(name.replace(".", "_"), (name, "wan"))
        diff = _diffusers_name(name)
        if diff is not None:
            table.setdefault(diff, (name, "diffusers"))
            table.setdefault(diff.replace(".", "_"), (name, "diffusers"))
    return table


def split_role(key: str) -> tuple[str, str] | None:
    """(module part, role) of a LoRA key, or None for a key of no known role."""
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _lookup(stem: str, table: Mapping[str, tuple[str, str]]) -> tuple[str, str, str] | None:
    """(target, naming, prefix) for a key's module part, trying each known prefix."""
    for prefix in PREFIXES:
        if stem.startswith(prefix):
            hit = table.get(stem[len(prefix):])
            if hit is not None:
                return hit[0], hit[1], prefix
    hit = table.get(stem)
    return None if hit is None else (hit[0], hit[1], "")


def naming_label(prefixes: Counter[str], namings: Counter[str]) -> str:
    """How a matched file is named, in the words users know."""
    if any(p.startswith("lora_unet") for p in prefixes):
        return "kohya/musubi-tuner"
    if namings.get("diffusers", 0) > namings.get("wan", 0):
        return "diffusers"
    return "ComfyUI/PEFT"


def guess_family(keys: list[str]) -> str:
    """What a file that matches no module of the expert looks like."""
    joined = " ".join(keys[:2000])
    for fragments, label in _FAMILY_HINTS:
        if any(f in joined for f in fragments):
            return label
    return "not a LoRA in any naming turbowan knows (ComfyUI/PEFT, kohya/musubi, diffusers)"


def _other_wan_reason(key: str) -> str | None:
    for fragment, reason in _OTHER_WAN.items():
        if fragment in key:
            return reason
    return None


@dataclass
class TargetDelta:
    """One LoRA's change to one target: a low-rank pair and/or full weight / bias deltas."""

    target: Target
    down: Any = None  # (rank, in) tensor or spec
    up: Any = None  # (out, rank)
    alpha: Any = None
    diff: Any = None  # full weight delta, the target weight's shape
    diff_b: Any = None  # bias delta
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])


@dataclass
class LoraMatch:
    """A LoRA file matched against a model: what applies where, and what does not."""

    source: str
    naming: str
    deltas: dict[str, TargetDelta]
    unmatched: list[str]  # keys that name no module of the model

    def describe(self) -> str:
        n = len(self.deltas)
        ranks = sorted({d.rank for d in self.deltas.values() if d.rank is not None})
        rank = f", rank {'/'.join(map(str, ranks))}" if ranks else ""
        return f"{self.naming} LoRA, {n} module{'s' if n != 1 else ''}{rank}"

    def problems_summary(self, limit: int = 5) -> str | None:
        """'N keys match no module: ...' (count and the first few), or None when all apply."""
        lines = []
        if self.unmatched:
            first = ", ".join(self.unmatched[:limit])
            more = f" (and {len(self.unmatched) - limit} more)" if len(self.unmatched) > limit else ""
            reasons = {r for k in self.unmatched if (r := _other_wan_reason(k))}
            why = f"; they target {'; '.join(sorted(reasons))}" if reasons else ""
            lines.append(f"{len(self.unmatched)} key(s) match no module of the expert: "
                         f"{first}{more}{why}")
        return "\n".join(lines) if lines else None


def _flat2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """A conv-shaped LoRA factor (r, c, 1, 2, 2) as the linear one it equals (r, c*1*2*2)."""
    return (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (shape[0], 1)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in value.shape)


def _width_hint(width: int) -> str:
    known = {5120: "a Wan 14B model (Wan2.1 14B or Wan2.2 A14B)", 1536: "Wan2.1 1.3B",
             3072: "Wan2.2 TI2V 5B"}
    return known.get(width, f"a model of width {width}")


def match_lora(tensors: Mapping[str, Any], targets: Mapping[str, Target], *, source: str,
               table: Mapping[str, tuple[str, str]] | None = None) -> LoraMatch:
    """Match every key of a LoRA against ``targets`` and check every shape.

    Raises :class:`LoraError` for an unsupported adapter kind, a file where nothing matches
    (saying what it looks like), inconsistent ranks, or shapes of another model size."""
    table = alias_table(targets) if table is None else table
    keys = sorted(tensors)
    deltas: dict[str, TargetDelta] = {}
    unmatched: list[str] = []
    prefixes: Counter[str] = Counter()
    namings: Counter[str] = Counter()
    for key in keys:
        split = split_role(key)
        if split is None:
            unmatched.append(key)
            continue
        stem, role = split
        if role in UNSUPPORTED:
            raise LoraError(f"{source}: {UNSUPPORTED[role]} (key {key!r})")
        hit = _lookup(stem, table)
        if hit is None:
            unmatched.append(key)
            continue
        name, naming, prefix = hit
        prefixes[prefix] += 1
        namings[naming] += 1
        delta = deltas.setdefault(name, TargetDelta(targets[name]))
        if getattr(delta, role) is not None:
            raise LoraError(f"{source}: two keys give the {role} tensor of {name} "
                            f"({delta.keys[-1]!r} and {key!r}); the file mixes namings")
        setattr(delta, role, tensors[key])
        delta.keys.append(key)
    if not deltas:
        shown = ", ".join(repr(k) for k in keys[:3])
        raise LoraError(
            f"{source}: none of its {len(keys)} keys names a module of the Wan2.2 I2V expert; "
            f"it looks like {guess_family(keys)} (keys such as {shown}). Use a LoRA trained "
            "for Wan2.2 I2V A14B (or Wan 14B) in ComfyUI/PEFT, kohya/musubi or diffusers naming")
    for delta in deltas.values():
        _check_delta(delta, source)
    label = naming_label(prefixes, namings)
    return LoraMatch(source, label, deltas, unmatched)


def _check_delta(d: TargetDelta, source: str) -> None:
    t = d.target
    where = f"{source}: {t.name}"
    if (d.down is None) != (d.up is None):
        have, miss = ("down (lora_A)", "up (lora_B)") if d.up is None else ("up (lora_B)", "down (lora_A)")
        raise LoraError(f"{where} has the {have} tensor but no {miss}; the file is incomplete")
    if d.alpha is not None and d.down is None:
        raise LoraError(f"{where} has an alpha but no lora_down/lora_up pair")
    if d.down is not None:
        if t.kind != "linear":
            what = "a modulation table" if t.kind == "param" else f"a {t.kind}"
            raise LoraError(f"{where} is {what}, not a linear layer; low-rank pairs apply "
                            "only to linear layers (a table or norm takes a full .diff delta)")
        down, up = _flat2d(_shape(d.down)), _flat2d(_shape(d.up))
        out_f, in_f = t.weight_shape
        if down[0] != up[1]:
            raise LoraError(
                f"{where}: wrong rank shapes: down (lora_A) is {_shape(d.down)} (rank {down[0]}) "
                f"but up (lora_B) is {_shape(d.up)} (rank {up[1]}); the file is damaged or mixes "
                "two LoRAs")
        if (up[0], down[1]) != (out_f, in_f):
            # every linear of a block reads or writes the model width (ffn.2 writes it)
            width, theirs = (out_f, up[0]) if t.name.endswith("ffn.2") else (in_f, down[1])
            raise LoraError(
                f"{where}: wrong dims: the LoRA changes a ({up[0]} x {down[1]}) weight but the "
                f"expert's is ({out_f} x {in_f}); it was trained for {_width_hint(theirs)}, "
                f"not this expert (width {width}). Use a LoRA made for this model")
        if d.alpha is not None and math.prod(_shape(d.alpha)) != 1:
            raise LoraError(f"{where}: alpha must be one number, got shape {_shape(d.alpha)}")
    # a Conv3d-shaped patch_embedding delta (out, 36, 1, 2, 2) is the Linear's (out, 144)
    flat_ok = t.kind == "linear" and d.diff is not None and _flat2d(_shape(d.diff)) == t.weight_shape
    if d.diff is not None and _shape(d.diff) != t.weight_shape and not flat_ok:
        raise LoraError(f"{where}: the full weight delta (.diff) has shape {_shape(d.diff)} but "
                        f"the weight is {t.weight_shape}: a LoRA for another model size")
    if d.diff_b is not None:
        if t.bias_shape is None:
            raise LoraError(f"{where} has no bias, but the LoRA gives a bias delta (.diff_b)")
        if _shape(d.diff_b) != t.bias_shape:
            raise LoraError(f"{where}: the bias delta (.diff_b) has shape {_shape(d.diff_b)} but "
                            f"the bias is {t.bias_shape}: a LoRA for another model size")
