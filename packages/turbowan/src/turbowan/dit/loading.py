"""`load_dit`: any Wan2.2 I2V DiT checkpoint -> a ready model, configured from the file.

The file is opened safely (``weights_only=True`` + mmap for `.pth`, safetensors otherwise),
its configuration is inferred from tensor shapes, the model is built on ``meta`` and the
file's tensors are assigned into it (``assign=True``): tensors already in the right dtype
are used in place (still memory-mapped), so RAM never holds two copies of the weights.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from turbowan.checkpoint.io import load_state_dict, read_tensor_specs
from turbowan.checkpoint.report import CheckpointMismatchError, compare_specs, module_specs
from turbowan.dit.config import PROJ_L, DetectedLayout, check_attention, config_from_state_dict
from turbowan.dit.keys import normalize_dit_keys
from turbowan.dit.meta import build_meta
from turbowan.dit.model import WanDiT
from turbowan.quant.int8_linear import MODES, set_int8_mode

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _default_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The file's own floating dtype (bf16 for the real files), so nothing is upcast."""
    dtype = state["patch_embedding.weight"].dtype
    return dtype if dtype in FLOAT_DTYPES else torch.bfloat16


def _validate_args(
    attention: str, sla_topk: float, dtype: torch.dtype | None, int8_mode: str
) -> None:
    check_attention(attention, sla_topk)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16 or None; got {dtype}")
    if int8_mode not in MODES:
        raise ValueError(f"int8_mode must be one of {MODES}; got {int8_mode!r}")
    if int8_mode == "triton" and not torch.cuda.is_available():
        # a CPU-loaded model may still run on CUDA (offloading), so only a machine without
        # CUDA is refused here, before the file is read rather than at the first forward
        from turbowan.quant.int8_triton import check_runnable

        check_runnable(torch.device("cpu"))


def detect_layout(path: str | os.PathLike[str]) -> DetectedLayout:
    """Configuration, quantisation and attention kind of a DiT file, from its header."""
    specs, _, _ = normalize_dit_keys(read_tensor_specs(path))
    return config_from_state_dict(specs)


def load_dit(
    path: str | os.PathLike[str],
    *,
    attention: str = "sla",
    sla_topk: float = 0.1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    int8_mode: str = "fast",
) -> WanDiT:
    """Load a Wan2.2 I2V DiT checkpoint (.pth quant or bf16, or .safetensors).

    The architecture (width, layers, FFN width, in/out channels, text width; heads =
    width/128) and the quantisation come from the file. ``attention="original"`` accepts
    and ignores the SLA ``proj_l`` weights that every TurboWan file carries (one warning).
    ``dtype`` is the compute dtype (default: the file's, bf16 for the real files); norm
    weights stay fp32. ``int8_mode`` picks the Int8Linear path: "fast" (dequantise, default),
    "reference" (upstream W8A8 numerics in torch) or "triton" (the same on a Triton kernel).
    """
    _validate_args(attention, sla_topk, dtype, int8_mode)
    device = torch.device(device)
    state = load_state_dict(path)
    state, prefix, _dropped = normalize_dit_keys(state)
    source = str(Path(path)) + (f" (keys under {prefix!r})" if prefix else "")
    try:
        layout = config_from_state_dict(state)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc

    if attention in ("sla", "sagesla") and layout.attention != "sla":
        raise ValueError(
            f"{source} has no SLA proj_l weights (it was not trained with SLA), so "
            f"attention={attention!r} cannot run it faithfully; use attention='original'"
        )
    if attention == "original" and layout.attention == "sla":
        ignored = [k for k in state if PROJ_L in k]
        warnings.warn(
            f"{source}: ignoring {len(ignored)} SLA proj_l tensors because attention='original' "
            "(dense SDPA has no linear branch); use attention='sla' to run the model as trained",
            stacklevel=2,
        )
        state = {k: v for k, v in state.items() if PROJ_L not in k}

    compute_dtype = dtype or _default_dtype(state)
    model = build_meta(layout.config, quant=layout.quant, attention=attention,
                       sla_topk=sla_topk, dtype=compute_dtype)
    expected = module_specs(model)
    report = compare_specs(
        expected,
        state,  # tensors carry .shape and .dtype, all the comparison reads
        source=source,
        expected_label=f"the model inferred from it ({layout.describe()})",
    )
    if not report.ok:
        report.looks_like = layout.describe()
        raise CheckpointMismatchError(report)

    # cast only what differs (e.g. bf16 weights for an fp32 run, bf16 norms to fp32);
    # everything else is assigned as the memory-mapped tensor itself
    converted = {
        k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype) for k, v in state.items()
    }
    del state
    model.load_state_dict(converted, strict=True, assign=True)
    model.requires_grad_(False)
    model.eval()
    set_int8_mode(model, int8_mode)
    if device.type != "cpu":
        model.to(device)
    return model
