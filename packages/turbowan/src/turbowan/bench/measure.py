"""What one timed bench run measures: step seconds, CUDA peak, RSS split, the run record.

A leaf of the bench package: the sweep and the peer runs both time through these.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from turbowan.bench import machine
from turbowan.bench.models import BenchInputs
from turbowan.bench.report import RUN_KEYS


def empty_run(**values) -> dict:
    record = dict.fromkeys(RUN_KEYS)
    record.update(values)
    return record


def time_steps(model, inputs: BenchInputs, *, steps: int, warmup: int, device: str,
               after_warmup: Callable[[], None] | None = None, reference=None,
               reference_seconds: list[float] | None = None) -> list[float]:  # fmt: skip
    """Seconds of each timed DiT call, after ``warmup`` untimed ones.

    With a ``reference`` (an untouched all-resident copy), each timed call is paired with
    one of the reference, timed just before it into ``reference_seconds``: load from other
    processes then hits both sides of the ratio alike.
    """

    def call(m) -> float:
        start = time.perf_counter()
        m(inputs.x, inputs.t, inputs.context, inputs.y)
        machine.synchronize(device)
        return time.perf_counter() - start

    with torch.inference_mode():
        for _ in range(warmup):
            call(model)
            if reference is not None:
                call(reference)
        if after_warmup is not None:
            after_warmup()
        seconds = []
        for _ in range(steps):
            if reference is not None and reference_seconds is not None:
                reference_seconds.append(call(reference))
            seconds.append(call(model))
    return seconds


def reset_cuda_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def cuda_peak(device: str) -> int | None:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    return None


def rss_split() -> dict:
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "RssFile:")):
                    key = "rss_anon_bytes" if line.startswith("RssAnon") else "rss_file_bytes"
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out
