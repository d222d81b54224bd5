"""Convert a bf16 DiT state dict into the TurboWan int8 `-quant` format (spec §1.6, §2).

Only the 10 linears of every block are quantised (self/cross q, k, v, o and ffn.0/ffn.2):
``<layer>.weight`` becomes ``<layer>.int8_weight`` (int8) + ``<layer>.scale`` (fp32 per
128x128 tile); ``bias`` stays. ``proj_l`` and everything outside ``blocks`` are untouched,
as in the published files, so users can quantise their own fine-tunes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from turbowan.checkpoint.io import SAFETENSORS_SUFFIXES, load_state_dict
from turbowan.dit.config import BLOCK_LINEARS, config_from_state_dict
from turbowan.dit.keys import normalize_dit_keys
from turbowan.quant.int8_linear import quantize_blockwise

_QUANT_WEIGHT = re.compile(
    r"^blocks\.\d+\.(" + "|".join(re.escape(n) for n in BLOCK_LINEARS) + r")\.weight$"
)
OUTPUT_SUFFIXES = (".pth", ".pt", *SAFETENSORS_SUFFIXES)


def is_quantized_weight_key(key: str) -> bool:
    """True for the ``.weight`` keys the quant format stores as int8."""
    return _QUANT_WEIGHT.match(key) is not None


def iter_quantized(state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the quant-format tensors one at a time (bounded extra memory per layer)."""
    for key, tensor in state.items():
        if is_quantized_weight_key(key):
            if tensor.dim() != 2 or not tensor.is_floating_point():
                raise ValueError(
                    f"{key}: expected a 2-D floating weight, got {tensor.dtype} "
                    f"{tuple(tensor.shape)}"
                )
            q, scale = quantize_blockwise(tensor)
            base = key[: -len(".weight")]
            yield base + ".int8_weight", q
            yield base + ".scale", scale
        else:
            yield key, tensor


def quantize_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict in the int8 format; raises if ``state`` is already quantised."""
    layout = config_from_state_dict(state)
    if layout.quant != "none":
        raise ValueError("the checkpoint is already int8-quantised (it has .int8_weight keys)")
    return dict(iter_quantized(state))


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file")
    if dst.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(
            f"{dst}: unknown output format {dst.suffix!r}; use one of {', '.join(OUTPUT_SUFFIXES)}"
        )
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: output must differ from the input file")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --force (overwrite=True) to replace it")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"{dst.parent}: output directory does not exist")


def quantize_file(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False
) -> dict[str, int]:
    """Read a bf16 DiT checkpoint (.pth or .safetensors) and write its int8 version.

    The output format follows ``dst``'s suffix. Returns counts for the caller to report.
    """
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst, overwrite)
    state, _prefix, _dropped = normalize_dit_keys(load_state_dict(src))
    quantized = quantize_state_dict(state)
    tmp = dst.with_name(dst.name + ".partial")
    if dst.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in quantized.items()}, str(tmp))
    else:
        torch.save(quantized, tmp)
    os.replace(tmp, dst)
    return {
        "tensors_in": len(state),
        "tensors_out": len(quantized),
        "quantized_layers": sum(1 for k in state if is_quantized_weight_key(k)),
        "bytes_out": dst.stat().st_size,
    }
