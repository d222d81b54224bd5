"""`load_text_encoder`: a umT5 checkpoint (either naming, bf16/fp32/fp8-scaled) -> TextEncoder.

Order of work, cheapest checks first: read the tensor shapes (safetensors: header only), refuse
foreign encoders by width, find the tokenizer (or fail saying what to download), and only then
build the model on ``meta`` and assign the memory-mapped tensors into it (no second copy).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from turbowan.checkpoint.io import (
    SAFETENSORS_SUFFIXES,
    TensorSpec,
    load_state_dict,
    read_tensor_specs,
)
from turbowan.checkpoint.report import compare_specs, module_specs
from turbowan.dtypes import parse_float_dtype
from turbowan.text_encoder.config import (
    TextEncoderMismatchError,
    UMT5Config,
    config_from_state_dict,
)
from turbowan.text_encoder.fp8 import (
    ScaledFP8Linear,
    dequantize_scaled,
    is_fp8,
    use_scaled_fp8_linears,
)
from turbowan.text_encoder.meta import build_meta
from turbowan.text_encoder.model import UMT5Encoder, zero_padding
from turbowan.text_encoder.naming import to_wan_names
from turbowan.text_encoder.tokenizer import (
    DOWNLOAD_HINT,
    TEXT_LEN,
    MissingTokenizerError,
    UMT5Tokenizer,
    demo_tokenizer,
)

__all__ = ["TextEncoder", "load_text_encoder"]

log = logging.getLogger(__name__)

EMBEDDED_TOKENIZER_KEY = "spiece_model"
# where upstream (Wan-AI repositories) and HF snapshots keep the tokenizer next to the weights
_BESIDE = ("spiece.model", "tokenizer.json", "google/umt5-xxl/spiece.model",
           "google/umt5-xxl/tokenizer.json")
FP8_MODES = ("dequantize", "per_layer")

TokenizerArg = UMT5Tokenizer | str | os.PathLike | bool | None


class TextEncoder(nn.Module):
    """umT5 encoder plus its tokenizer: prompts -> (B, 512, dim) with rows after EOS zeroed.

    ``model.blocks`` is the ModuleList offloadkit streams; ``forward(ids, mask)`` is the bare
    encoder (padding rows not zeroed), ``encode(prompts)`` is what the pipeline hands the DiT.
    """

    def __init__(
        self, model: UMT5Encoder, tokenizer: UMT5Tokenizer | None, *, source: str = ""
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.source = source

    @property
    def config(self) -> UMT5Config:
        return self.model.config

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(ids, mask)

    def tokenize(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise MissingTokenizerError(
                f"this text encoder ({self.source}) was loaded without a tokenizer, so it can "
                f"only run forward(ids, mask). {DOWNLOAD_HINT}"
            )
        return self.tokenizer(prompts)

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str] | str) -> torch.Tensor:
        """Prompts -> (B, text_len, dim) hidden states, rows from the EOS+1 on set to zero."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("encode() needs at least one prompt (an empty string is fine)")
        ids, mask = self.tokenize(prompts)
        hidden = self.model(ids, mask)
        return zero_padding(hidden, mask)


def _read_specs(path: Path) -> tuple[dict[str, TensorSpec], dict[str, torch.Tensor] | None]:
    """Shapes without data for safetensors; a .pth is mmap-loaded once and reused later."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return read_tensor_specs(path), None
    state = load_state_dict(path, mmap=True)
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in state.items()}, state


def _embedded_tokenizer(
    path: Path, specs: Mapping[str, TensorSpec], state: Mapping[str, torch.Tensor] | None
) -> UMT5Tokenizer | None:
    key = next((k for k in specs if k.rpartition(".")[2] == EMBEDDED_TOKENIZER_KEY
                or k == EMBEDDED_TOKENIZER_KEY), None)
    if key is None:
        return None
    if state is not None:
        tensor = state[key]
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as fh:
            tensor = fh.get_tensor(key)
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    return UMT5Tokenizer.from_sentencepiece_bytes(data, f"{path} [{key}]")


def _resolve_tokenizer(
    tokenizer: TokenizerArg,
    path: Path,
    specs: Mapping[str, TensorSpec],
    state: Mapping[str, torch.Tensor] | None,
) -> UMT5Tokenizer | None:
    if tokenizer is False:
        return None
    if isinstance(tokenizer, UMT5Tokenizer):
        return tokenizer
    if tokenizer is True:
        tokenizer = None
    if tokenizer is not None:
        if str(tokenizer) == "demo" and not Path(tokenizer).exists():
            return demo_tokenizer()
        return UMT5Tokenizer.from_file(tokenizer)
    embedded = _embedded_tokenizer(path, specs, state)
    if embedded is not None:
        return embedded
    for name in _BESIDE:
        candidate = path.parent / name
        if candidate.is_file():
            log.info("using the tokenizer found next to the text encoder: %s", candidate)
            return UMT5Tokenizer.from_file(candidate)
    raise MissingTokenizerError(
        f"no tokenizer for the text encoder {path}: the file embeds none and there is no "
        f"spiece.model or tokenizer.json next to it. {DOWNLOAD_HINT} (Pass tokenizer=False to "
        "load the encoder for forward(ids, mask) only.)"
    )


def _default_dtype(specs: Mapping[str, TensorSpec]) -> torch.dtype:
    """The file's own float dtype; fp8 files compute in bfloat16."""
    floats = [s.dtype for s in specs.values() if s.dtype.is_floating_point]
    if any(is_fp8(dt) for dt in floats):
        return torch.bfloat16
    embed = specs.get("token_embedding.weight")
    if embed is not None:
        return embed.dtype
    return max(set(floats), key=floats.count) if floats else torch.float32


def _check_specs(model: nn.Module, specs: Mapping[str, TensorSpec], source: str) -> None:
    """Keys and shapes against the meta model, before any tensor data is read or converted."""
    found = {k: s for k, s in specs.items() if not k.endswith(".scale_weight")}
    report = compare_specs(module_specs(model), found, source=source, expected_label="umT5")
    missing, unexpected = sorted(report.missing), sorted(report.unexpected)
    wrong = [f"{k} {got} (expected {want})" for k, want, got in report.wrong_shape]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:4])})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:4])})")
    if wrong:
        parts.append(f"{len(wrong)} of another shape (e.g. {', '.join(wrong[:3])})")
    if parts:
        raise TextEncoderMismatchError(
            f"{source}: {'; '.join(parts)}. The file is incomplete or not a umT5 encoder; "
            "re-download it or check it with `turbowan check`."
        )


def load_text_encoder(
    path: str | os.PathLike[str],
    tokenizer: TokenizerArg = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    fp8: str = "dequantize",
    text_len: int = TEXT_LEN,
) -> TextEncoder:
    """Load a umT5 text encoder from the upstream .pth or a ComfyUI/HF .safetensors file.

    ``tokenizer``: None finds one (embedded in the file, or spiece.model / tokenizer.json next to
    it); a path (spiece.model, tokenizer.json or their folder); "demo" (the tiny demo model); a
    ``UMT5Tokenizer``; or False (no tokenizer: ``forward(ids, mask)`` only).
    ``dtype``: compute dtype (default: the file's; bfloat16 for fp8 files).
    ``fp8``: for fp8-scaled files, "dequantize" at load, or "per_layer" to keep fp8 weights in
    memory and dequantise each Linear when it runs (half the memory).
    """
    path = Path(path)
    source = str(path)
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8={fp8!r}; use one of {', '.join(FP8_MODES)}")
    compute_dtype = parse_float_dtype(dtype, what="the text encoder")

    specs, state = _read_specs(path)
    shapes = {k: s.shape for k, s in specs.items()}
    wan_specs, naming = to_wan_names(specs, shapes, source=source)
    config = config_from_state_dict({k: s.shape for k, s in wan_specs.items()}, source=source)
    tok = _resolve_tokenizer(tokenizer, path, specs, state)
    if tok is not None:
        if tok.text_len != text_len:
            tok.text_len = text_len
        if tok.vocab_size > config.vocab_size:
            raise TextEncoderMismatchError(
                f"tokenizer {tok.source} has {tok.vocab_size} pieces but the encoder {source} "
                f"embeds only {config.vocab_size}: the tokenizer does not belong to this encoder"
            )
    if compute_dtype is None:
        compute_dtype = _default_dtype(wan_specs)
    model = build_meta(config, dtype=compute_dtype)
    _check_specs(model, wan_specs, source)

    if state is None:
        state = load_state_dict(path, mmap=True)
    wan_state, _ = to_wan_names(state, source=source)
    state = None  # only wan_state holds the file's tensors now; converting frees them one by one
    keep: dict[str, torch.Tensor] = {}
    if fp8 == "per_layer" and use_scaled_fp8_linears(model, wan_state):
        for name, module in model.named_modules():
            if isinstance(module, ScaledFP8Linear):  # fp8 bytes stay as they are in the file
                keep[f"{name}.weight"] = wan_state.pop(f"{name}.weight")
                scale = wan_state.pop(f"{name}.scale_weight", None)
                keep[f"{name}.scale_weight"] = scale.float() if scale is not None else torch.ones(())
    wan_state = {**dequantize_scaled(wan_state, compute_dtype, consume=True), **keep}
    model.load_state_dict(wan_state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.to(device)
    log.info("loaded umT5 encoder %s (%s naming, %d layers, width %d, %s)",
             source, naming, config.num_layers, config.dim, compute_dtype)
    return TextEncoder(model, tok, source=source)
