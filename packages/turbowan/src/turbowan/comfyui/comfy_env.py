"""The few ComfyUI modules the node pack touches, imported only when a node runs.

Keeping every ComfyUI import here means the node classes can be imported (and their
INPUT_TYPES listed) without ComfyUI, and the error when ComfyUI is missing is one clear
sentence instead of an ImportError deep inside a node.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch


class ComfyUINotFoundError(RuntimeError):
    """A node ran outside ComfyUI."""


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ComfyUINotFoundError(
            f"the turbowan ComfyUI nodes need ComfyUI's {name!r} module ({exc}); run them inside "
            "ComfyUI, or use `turbowan generate` / turbowan.I2VPipeline outside it"
        ) from None


def folder_paths() -> Any:
    return _module("folder_paths")


def model_management() -> Any:
    return _module("comfy.model_management")


def file_choices(folder: str) -> list[str]:
    """Names ComfyUI lists for a models folder; empty (not an error) outside ComfyUI, so the
    node classes still describe themselves."""
    try:
        return list(folder_paths().get_filename_list(folder))
    except ComfyUINotFoundError:
        return []


def full_path(folder: str, name: str) -> Path:
    """The file ``name`` in ComfyUI's ``folder`` (e.g. diffusion_models), or a clear error."""
    found = folder_paths().get_full_path(folder, name)
    if found is None or not os.path.isfile(found):
        raise ValueError(
            f"{name!r} is not in ComfyUI's {folder}/ folder; put the file in "
            f"ComfyUI/models/{folder}/ (or a folder extra_model_paths.yaml maps to it) and "
            "refresh the page (press R)"
        )
    return Path(found)


def compute_device() -> torch.device:
    return torch.device(model_management().get_torch_device())


def free_device_memory(nbytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload its own models until ``nbytes`` are free on ``device``.

    turbowan's models are placed by offloadkit, outside ComfyUI's model list, so ComfyUI
    cannot see them; without this call a text encoder ComfyUI still holds on the GPU would
    compete with the DiT for the same memory.
    """
    model_management().free_memory(int(nbytes), device)


def empty_cache() -> None:
    mm = model_management()
    soft = getattr(mm, "soft_empty_cache", None)
    if soft is not None:
        soft()


def raise_if_interrupted() -> None:
    """Honour ComfyUI's Cancel button between sampling steps."""
    check = getattr(model_management(), "throw_exception_if_processing_interrupted", None)
    if check is not None:
        check()


def progress_bar(total: int) -> Any:
    """ComfyUI's progress bar (the green bar on the node), or None where there is none."""
    try:
        utils = importlib.import_module("comfy.utils")
    except ImportError:
        return None
    bar_cls = getattr(utils, "ProgressBar", None)
    return bar_cls(total) if bar_cls is not None else None


def output_directory() -> Path:
    return Path(folder_paths().get_output_directory())


def save_path(prefix: str, width: int, height: int) -> tuple[Path, str, int, str]:
    """(folder, file stem, counter, subfolder) for a new output file, ComfyUI's naming."""
    fp = folder_paths()
    folder, stem, counter, subfolder, _ = fp.get_save_image_path(prefix, str(output_directory()),
                                                                 width, height)
    return Path(folder), stem, int(counter), subfolder
