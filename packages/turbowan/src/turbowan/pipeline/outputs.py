"""Where a run writes, kept apart from what it reads.

A video is written to a temporary file and renamed over its output path, and the latents go
next to it: an output that names an input (the start image, a checkpoint, the tokenizer) would
silently replace that input. `turbowan decode` writes next to the latents file by default; the
output path stored inside a latents file is data from that file, not a place to write.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from turbowan.pipeline.latents_io import LATENTS_SUFFIX, latents_path_for
from turbowan.pipeline.problems import Problems, collecting
from turbowan.pipeline.video_io import VIDEO_SUFFIXES

__all__ = ["check_output_not_input", "default_decode_output"]


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_not_input(output: str | os.PathLike[str] | None,
                           inputs: Mapping[str, Any], collector: Problems | None = None) -> None:
    """Refuse an output (or the latents file beside it) that is one of ``inputs``
    (flag -> path; non-path values such as an in-memory image are skipped)."""
    if output is None:
        return
    with collecting(collector) as c:
        written = {"-o": Path(output), "the latents file": latents_path_for(output)}
        for flag, value in inputs.items():
            if not isinstance(value, (str, os.PathLike)):
                continue
            for what, path in written.items():
                if _same_file(path, Path(value)):
                    c.add(f"{what} {str(path)!r} is the {flag} input; writing it would replace "
                          "that file. Choose another output path (e.g. -o out/video.mp4)")


def default_decode_output(latents: str | os.PathLike[str],
                          recorded_output: str | None = None) -> Path:
    """clip.latents.safetensors -> clip.mp4 in the latents file's own folder (the recorded
    output only lends its video extension)."""
    latents = Path(latents)
    name = latents.name
    stem = name[: -len(LATENTS_SUFFIX)] if name.endswith(LATENTS_SUFFIX) else latents.stem
    suffix = Path(str(recorded_output)).suffix.lower() if recorded_output else ""
    return latents.with_name(stem + (suffix if suffix in VIDEO_SUFFIXES else ".mp4"))
