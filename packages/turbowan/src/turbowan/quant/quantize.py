"""Convert a bf16 DiT state dict into the TurboWan int8 `-quant` format (spec §1.6, §2).

Only the 10 linears of every block are quantised (self/cross q, k, v, o and ffn.0/ffn.2):
``<layer>.weight`` becomes ``<layer>.int8_weight`` (int8) + ``<layer>.scale`` (fp32 per
128x128 tile); ``bias`` stays. ``proj_l`` and everything outside ``blocks`` are untouched,
as in the published files, so users can quantise their own fine-tunes. A `.safetensors`
output is written layer by layer (the converted model is never whole in RAM).
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
from turbowan.quant.int8_linear import quantize_blockwise, tiles
from turbowan.quant.safetensors_stream import write_safetensors_streaming

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


def _require_unquantized(state: Mapping[str, torch.Tensor]) -> None:
    layout = config_from_state_dict(state)
    if layout.quant != "none":
        raise ValueError(
            "the checkpoint is already int8-quantised (it has .int8_weight keys): load it as "
            "it is, or quantise the bf16 checkpoint it was made from"
        )


def quantize_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict in the int8 format; raises if ``state`` is already quantised."""
    _require_unquantized(state)
    return dict(iter_quantized(state))


def quantized_plan(
    state: Mapping[str, torch.Tensor],
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the quant-format tensors, in output order, without work."""
    plan: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for key, tensor in state.items():
        if is_quantized_weight_key(key):
            rows, cols = tensor.shape
            base = key[: -len(".weight")]
            plan.append((base + ".int8_weight", (rows, cols), torch.int8))
            plan.append((base + ".scale", (tiles(rows), tiles(cols)), torch.float32))
        else:
            plan.append((key, tuple(tensor.shape), tensor.dtype))
    return plan


def _write_safetensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Quantise layer by layer while writing: peak extra memory is one layer."""
    pending: dict[str, torch.Tensor] = {}

    def produce(name: str) -> torch.Tensor:
        if name in pending:
            return pending.pop(name)
        if name.endswith(".int8_weight"):
            base = name[: -len(".int8_weight")]
            q, scale = quantize_blockwise(state[base + ".weight"])
            pending[base + ".scale"] = scale
            return q
        return state[name]

    write_safetensors_streaming(path, quantized_plan(state), produce)


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
    _require_unquantized(state)
    tmp = dst.with_name(dst.name + ".partial")
    try:
        if dst.suffix.lower() in SAFETENSORS_SUFFIXES:
            _write_safetensors(state, tmp)
        else:
            # torch.save pickles the whole dict at once: the int8 result (~14 GB for A14B) is
            # held in RAM; the input stays memory-mapped
            torch.save(dict(iter_quantized(state)), tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave gigabytes of half-written file behind
        raise
    return {
        "tensors_in": len(state),
        "tensors_out": len(quantized_plan(state)),
        "quantized_layers": sum(1 for k in state if is_quantized_weight_key(k)),
        "bytes_out": dst.stat().st_size,
    }
