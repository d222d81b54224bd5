"""The two naming schemes of umT5 checkpoints, and recognising files that are not umT5 at all.

"wan" is the upstream `models_t5_umt5-xxl-enc-bf16.pth` layout (`blocks.N.attn.q.weight`);
"comfy" is the Hugging Face / ComfyUI T5 layout (`encoder.block.N.layer.0.SelfAttention.q.weight`).
The mapping works on module paths, so companion tensors such as ComfyUI's `<linear>.scale_weight`
are renamed along with the weight they belong to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch
from torch import nn

from turbowan.text_encoder.config import TextEncoderMismatchError, check_width

__all__ = [
    "IGNORED_KEYS",
    "comfy_to_wan_key",
    "detect_naming",
    "renamed_view",
    "strip_prefix",
    "to_wan_names",
    "wan_to_comfy",
    "wan_to_comfy_key",
]

V = TypeVar("V")

# (wan module path, comfy module path) patterns; {n} is the block index
_BLOCK_MODULES: tuple[tuple[str, str], ...] = (
    ("norm1", "layer.0.layer_norm"),
    ("attn.q", "layer.0.SelfAttention.q"),
    ("attn.k", "layer.0.SelfAttention.k"),
    ("attn.v", "layer.0.SelfAttention.v"),
    ("attn.o", "layer.0.SelfAttention.o"),
    ("pos_embedding.embedding", "layer.0.SelfAttention.relative_attention_bias"),
    ("norm2", "layer.1.layer_norm"),
    ("ffn.gate.0", "layer.1.DenseReluDense.wi_0"),  # the GELU branch
    ("ffn.fc1", "layer.1.DenseReluDense.wi_1"),  # the linear branch
    ("ffn.fc2", "layer.1.DenseReluDense.wo"),
)
_TOP_MODULES: tuple[tuple[str, str], ...] = (
    ("token_embedding", "shared"),
    ("norm", "encoder.final_layer_norm"),
)
_WAN_TO_COMFY_BLOCK = dict(_BLOCK_MODULES)
_COMFY_TO_WAN_BLOCK = {c: w for w, c in _BLOCK_MODULES}
_WAN_TO_COMFY_TOP = dict(_TOP_MODULES)
_COMFY_TO_WAN_TOP = {c: w for w, c in _TOP_MODULES}

_WAN_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_COMFY_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")

# tensors that carry no encoder weight: ComfyUI's fp8 marker, an embedded tokenizer,
# the activation scales of fp8 files, and the decoder half of full T5 checkpoints
IGNORED_KEYS = ("scaled_fp8", "spiece_model")
_IGNORED_SUFFIXES = (".scale_input",)
_IGNORED_PREFIXES = ("decoder.", "lm_head.")

# a key that only exists in each scheme, used to find the scheme and any wrapper prefix
_ANCHORS = {
    "wan": "blocks.0.attn.q.weight",
    "comfy": "encoder.block.0.layer.0.SelfAttention.q.weight",
}


def _split(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def wan_to_comfy_key(key: str) -> str:
    """`blocks.3.attn.q.weight` -> `encoder.block.3.layer.0.SelfAttention.q.weight`."""
    module, param = _split(key)
    if module in _WAN_TO_COMFY_TOP:
        return f"{_WAN_TO_COMFY_TOP[module]}.{param}"
    m = _WAN_BLOCK.match(module)
    if m and m.group(2) in _WAN_TO_COMFY_BLOCK:
        return f"encoder.block.{m.group(1)}.{_WAN_TO_COMFY_BLOCK[m.group(2)]}.{param}"
    raise KeyError(f"{key!r} is not a umT5 encoder key in the upstream (wan) naming")


def comfy_to_wan_key(key: str) -> str:
    """`encoder.block.3.layer.1.DenseReluDense.wi_0.weight` -> `blocks.3.ffn.gate.0.weight`."""
    module, param = _split(key)
    if module == "encoder.embed_tokens":  # some files duplicate the shared embedding here
        return f"token_embedding.{param}"
    if module in _COMFY_TO_WAN_TOP:
        return f"{_COMFY_TO_WAN_TOP[module]}.{param}"
    m = _COMFY_BLOCK.match(module)
    if m and m.group(2) in _COMFY_TO_WAN_BLOCK:
        return f"blocks.{m.group(1)}.{_COMFY_TO_WAN_BLOCK[m.group(2)]}.{param}"
    raise KeyError(f"{key!r} is not a umT5 encoder key in the HF/ComfyUI naming")


def wan_to_comfy(state: Mapping[str, V]) -> dict[str, V]:
    """Rename a wan-named state dict to the HF/ComfyUI names (for writing such files)."""
    return {wan_to_comfy_key(k): v for k, v in state.items()}


def _foreign_family(keys: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> str | None:
    """Name the family of a text encoder that is not umT5, with its width, or None."""
    for key in keys:
        if key.endswith("text_model.embeddings.token_embedding.weight"):
            width = int(shapes[key][-1])
            kind = "CLIP-L" if width == 768 else ("CLIP-G/bigG" if width >= 1280 else "CLIP")
            check_width(width, "", f"a {kind} text encoder, {key} is {tuple(shapes[key])}")
            return f"a {kind} text encoder (width {width})"
    for key in keys:
        if key.endswith("DenseReluDense.wi.weight"):  # T5 v1.0: ReLU FFN, not gated
            width = int(shapes[key][-1])
            check_width(width, "", f"a T5 (v1.0, ReLU feed-forward) encoder, {key} is {tuple(shapes[key])}")
            return f"a T5 v1.0 encoder (ReLU feed-forward, width {width})"
    return None


def strip_prefix(keys: Sequence[str]) -> tuple[str, str]:
    """Find the naming scheme and any wrapper prefix (e.g. `text_encoders.umt5xxl.transformer.`)."""
    for naming, anchor in _ANCHORS.items():
        for key in keys:
            if key.endswith(anchor) and (key == anchor or key[: -len(anchor)].endswith(".")):
                return naming, key[: -len(anchor)]
    return "", ""


def detect_naming(keys: Sequence[str]) -> str:
    """'wan' or 'comfy' (ignoring any wrapper prefix); '' when neither scheme is present."""
    return strip_prefix(keys)[0]


def _is_ignored(key: str) -> bool:
    return (
        key in IGNORED_KEYS
        or key.endswith(_IGNORED_SUFFIXES)
        or key.startswith(_IGNORED_PREFIXES)
    )


def to_wan_names(
    state: Mapping[str, V],
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    source: str = "checkpoint",
) -> tuple[dict[str, V], str]:
    """Rename a checkpoint (either scheme, any wrapper prefix) to wan names; return (state, naming).

    ``shapes`` (key -> shape) is used to describe foreign encoders; by default the values of
    ``state`` are taken as tensors. Unknown keys are an error naming them, so a truncated or
    mismatched file never loads half-way.
    """
    keys = list(state)
    if shapes is None:
        shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    try:
        foreign = _foreign_family(keys, shapes)
    except TextEncoderMismatchError as exc:
        raise TextEncoderMismatchError(f"{source}{exc}") from None
    naming, prefix = strip_prefix(keys)
    if foreign is not None or not naming:
        sample = ", ".join(keys[:4])
        what = foreign or f"not a umT5 encoder (first keys: {sample})"
        raise TextEncoderMismatchError(
            f"{source}: {what}. turbowan needs the umT5-xxl text encoder "
            "(models_t5_umt5-xxl-enc-bf16.pth, or ComfyUI's umt5_xxl_*.safetensors)."
        )
    rename = (lambda k: k) if naming == "wan" else comfy_to_wan_key
    out: dict[str, V] = {}
    unknown: list[str] = []
    duplicate_embedding: V | None = None
    for key, value in state.items():
        if not key.startswith(prefix):
            if not _is_ignored(key):
                unknown.append(key)
            continue
        short = key[len(prefix) :]
        if _is_ignored(short):
            continue
        if short.startswith("encoder.embed_tokens."):
            duplicate_embedding = value
            continue
        try:
            out[rename(short)] = value
        except KeyError:
            unknown.append(key)
    if "token_embedding.weight" not in out and duplicate_embedding is not None:
        out["token_embedding.weight"] = duplicate_embedding
    if unknown:
        more = f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""
        raise TextEncoderMismatchError(
            f"{source}: unexpected tensors for a umT5 encoder in the {naming} naming: "
            f"{', '.join(unknown[:8])}{more}"
        )
    if naming == "wan":  # the wan scheme has no other tensor than the ones listed in the spec
        for key in out:
            module, _ = _split(key)
            m = _WAN_BLOCK.match(module)
            if not (module in _WAN_TO_COMFY_TOP or (m and m.group(2) in _WAN_TO_COMFY_BLOCK)):
                raise TextEncoderMismatchError(f"{source}: unexpected tensor {key!r} for a umT5 encoder")
    return out, naming


def renamed_view(model: nn.Module) -> nn.Module:
    """A module tree holding the same parameters as ``model`` under the HF/ComfyUI names."""
    root = nn.Module()
    for wan_key, param in model.named_parameters():
        parent = root
        *path, leaf = wan_to_comfy_key(wan_key).split(".")
        for part in path:
            child = getattr(parent, part, None)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.register_parameter(leaf, param)
    return root
