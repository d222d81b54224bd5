"""`--batch FILE.jsonl`: many videos from one loading of the command, one JSON object a line.

Each line names what differs for its video (``image``, ``prompt``, ``seed``, ``output``,
``frames``...); anything a line leaves out comes from the command line. Lines without an
``output`` get ``<output stem>-<line number><suffix>``. In a multi-process run the world's
``world / sp`` groups share the lines round-robin, each making its own videos.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: the keys of a batch line: generate()'s per-video arguments
JOB_KEYS = ("image", "prompt", "seed", "output", "frames", "resolution", "aspect_ratio",
            "width", "height", "steps", "sigma_max", "boundary", "ode", "resize", "fps",
            "quality")


class BatchFileError(ValueError):
    """The batch file cannot be read or a line is not a valid job; names the line."""


def read_batch(path: str | os.PathLike[str], defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Jobs (generate() keyword arguments) of a JSON-lines file, blank lines skipped; each
    over ``defaults`` (at least ``output``, from which lines without one get theirs)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise BatchFileError(f"--batch {str(p)!r}: cannot read it ({exc.strerror or exc})") from None
    jobs: list[dict[str, Any]] = []
    outputs: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--batch {p.name} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BatchFileError(f"{where}: not JSON ({exc.msg}); write one object a line, "
                                 'e.g. {"image": "a.png", "prompt": "...", "seed": 1}') from None
        if not isinstance(entry, dict):
            raise BatchFileError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        unknown = sorted(set(entry) - set(JOB_KEYS))
        if unknown:
            raise BatchFileError(f"{where}: unknown key(s) {', '.join(unknown)}; a line may set "
                                 f"{', '.join(JOB_KEYS)}")
        job = {**defaults, **entry}
        if "output" not in entry:
            out = Path(defaults["output"])
            job["output"] = str(out.with_name(f"{out.stem}-{number:03d}{out.suffix}"))
        if job["output"] in outputs:
            raise BatchFileError(f"{where}: output {job['output']!r} is also line "
                                 f"{outputs[job['output']]}'s; give each line its own output")
        outputs[job["output"]] = number
        jobs.append(job)
    if not jobs:
        raise BatchFileError(f"--batch {p.name}: no jobs (the file has no JSON lines)")
    return jobs


def share(jobs: list[dict[str, Any]], group: int, groups: int) -> list[dict[str, Any]]:
    """The jobs of data-parallel group ``group`` of ``groups``: every groups-th, from its own."""
    return jobs[group::groups]
