"""``load_vae``: read a Wan2.1 VAE checkpoint (upstream .pth or ComfyUI .safetensors).

The file is read memory-mapped with ``weights_only=True`` (or as safetensors), the model is
built on ``meta`` from the shapes found, and the tensors are assigned in place: there is never
a second full copy of the weights in RAM.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from turbowan.checkpoint import load_state_dict
from turbowan.checkpoint.report import compare_specs, module_specs
from turbowan.dtypes import parse_float_dtype
from turbowan.vae.config import VAECheckpointError, config_from_state_dict, strip_prefix
from turbowan.vae.frames import FrameCountError, check_frame_count, check_spatial_size
from turbowan.vae.meta import build_meta
from turbowan.vae.model import WanVAE

__all__ = [
    "FrameCountError",
    "VAECheckpointError",
    "WanVAE",
    "check_frame_count",
    "check_spatial_size",
    "load_vae",
    "strip_prefix",
]

def _compare_keys(path: str, model: WanVAE, state: Mapping[str, torch.Tensor]) -> None:
    """Fail with a readable report before assigning anything (dtypes are cast on load)."""
    report = compare_specs(
        module_specs(model), state, source=path, expected_label="the Wan2.1 VAE layout"
    )
    wrong = sorted(f"{k} {found} (expected {want})" for k, want, found in report.wrong_shape)
    parts = [
        f"{len(items)} {label}: {', '.join(items[:10])}"
        for label, items in (
            ("missing", sorted(report.missing)),
            ("unexpected", sorted(report.unexpected)),
            ("wrong shape", wrong),
        )
        if items
    ]
    if parts:
        raise VAECheckpointError(
            f"{path}: does not match the Wan2.1 VAE layout ({'; '.join(parts)}). "
            "Use the original Wan2.1_VAE.pth or ComfyUI's wan_2.1_vae.safetensors; "
            "`turbowan check FILE --preset wan2.1-vae` prints the full comparison."
        )


def load_vae(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> WanVAE:
    """Load ``Wan2.1_VAE.pth`` / ``wan_2.1_vae.safetensors`` (or a tiny file of that layout).

    ``dtype`` is the compute dtype (upstream runs the VAE in bf16 on the GPU); latents and
    decoded video are returned in float32 regardless.
    """
    dtype = parse_float_dtype(dtype, what="the VAE") or torch.float32
    device = torch.device(device)
    state = strip_prefix(load_state_dict(path))
    config = config_from_state_dict(state)
    model = build_meta(config)
    _compare_keys(str(path), model, state)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
