"""Peers in the same run: the same model and inputs under diffusers group offloading and
accelerate's cpu/disk offload, measured like offloadkit's runs so the table compares like
with like. A peer that is not installed is skipped with a message saying how to get it.

Each peer gets a freshly built (bit-identical) model, because peers do not restore a model
the way ``handle.remove()`` does.
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from turbowan.bench import machine

Setup = Callable[[torch.nn.Module, str, Path], None]


@dataclass(frozen=True)
class PeerVariant:
    name: str
    package: str
    home: str  # where the peer keeps the weights between uses
    setup: Setup
    needs_cuda: bool = False


def _diffusers_group(*, use_stream: bool, disk: bool) -> Setup:
    def setup(model: torch.nn.Module, device: str, workdir: Path) -> None:
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(
            model,
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=use_stream,
            non_blocking=use_stream,
            offload_to_disk_path=str(workdir) if disk else None,
        )

    return setup


# SLA reads proj_l's weights inside its own forward (not through proj_l's), so accelerate must
# load that module's weights as a whole.
PRELOAD = ["SparseLinearAttention"]


def _blocks_and_rest(model: torch.nn.Module, device: str) -> torch.nn.ModuleList:
    """accelerate offloads the block list (as offloadkit does); the rest goes to the device.

    Offloading the whole model breaks on modules whose weights are read outside their own
    forward (the DiT's time embedding), and offloadkit keeps non-block weights resident too.
    """
    blocks = model.blocks
    for _name, child in model.named_children():
        if child is not blocks:
            child.to(device)
    return blocks


def _accelerate_cpu(model: torch.nn.Module, device: str, workdir: Path) -> None:
    from accelerate import cpu_offload

    blocks = _blocks_and_rest(model, device)
    cpu_offload(blocks, execution_device=torch.device(device), offload_buffers=True,
                preload_module_classes=PRELOAD)  # fmt: skip


def _accelerate_disk(model: torch.nn.Module, device: str, workdir: Path) -> None:
    from accelerate import disk_offload

    blocks = _blocks_and_rest(model, device)
    disk_offload(blocks, str(workdir), execution_device=torch.device(device), offload_buffers=True,
                 preload_module_classes=PRELOAD)  # fmt: skip


VARIANTS: dict[str, list[PeerVariant]] = {
    "diffusers": [
        PeerVariant("diffusers_group", "diffusers", "pinned", _diffusers_group(use_stream=False, disk=False)),
        PeerVariant("diffusers_group_stream", "diffusers", "pinned",
                    _diffusers_group(use_stream=True, disk=False), needs_cuda=True),
        PeerVariant("diffusers_group_disk", "diffusers", "disk", _diffusers_group(use_stream=False, disk=True)),
    ],
    "accelerate": [
        PeerVariant("accelerate_cpu_offload", "accelerate", "host", _accelerate_cpu),
        PeerVariant("accelerate_disk_offload", "accelerate", "disk", _accelerate_disk),
    ],
}  # fmt: skip


def parse_peers(text: str | None) -> list[str]:
    """``"diffusers,accelerate"`` -> peer variant names; unknown names list the known ones."""
    if not text:
        return []
    chosen: list[str] = []
    known = {v.name: v for variants in VARIANTS.values() for v in variants}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if item in VARIANTS:
            chosen.extend(v.name for v in VARIANTS[item])
        elif item in known:
            chosen.append(item)
        else:
            names = ", ".join([*VARIANTS, *known])
            raise ValueError(f"unknown peer {item!r}; use any of: {names}")
    return list(dict.fromkeys(chosen))


def _variant(name: str) -> PeerVariant:
    return next(v for variants in VARIANTS.values() for v in variants if v.name == name)


def run_peers(sweep, names: list[str], inputs) -> list[dict]:
    """Measure each named peer variant; returns the run records (skips go to ``sweep.skip``)."""
    from turbowan.bench.measure import cuda_peak, empty_run, reset_cuda_peak, rss_split, time_steps

    spec = sweep.spec
    runs: list[dict] = []
    for name in names:
        variant = _variant(name)
        if importlib.util.find_spec(variant.package) is None:
            sweep.skip(name, None, variant.home, f"{variant.package} is not installed; "
                       f"`pip install {variant.package}` to compare against it")  # fmt: skip
            continue
        if variant.needs_cuda and not spec.device.startswith("cuda"):
            sweep.skip(name, None, variant.home, "needs a CUDA device (side-stream prefetch)")
            continue
        workdir = Path(tempfile.mkdtemp(prefix=f"turbowan-bench-{name}-"))
        model = sweep._build()
        try:
            machine.release_freed_memory()
            rss_before = machine.current_rss_bytes()
            machine.reset_peak_rss()
            reset_cuda_peak(spec.device)
            start = time.perf_counter()
            variant.setup(model, spec.device, workdir)
            setup = time.perf_counter() - start
            setup_rss: dict = {}

            def after_warmup(store: dict = setup_rss) -> None:
                store["peak"] = machine.peak_rss_bytes()
                machine.reset_peak_rss()

            paired: list[float] = []
            seconds = time_steps(model, inputs, steps=spec.steps, warmup=spec.warmup,
                                 device=spec.device, after_warmup=after_warmup,
                                 reference=sweep.reference, reference_seconds=paired)  # fmt: skip
            steady = machine.peak_rss_bytes()
            rss_split_now = rss_split()
        except Exception as exc:  # a peer that fails on this model is reported, not fatal
            sweep.skip(name, None, variant.home, exc)
            continue
        finally:
            del model
            shutil.rmtree(workdir, ignore_errors=True)
            machine.release_freed_memory()
        record = empty_run(
            kind="peer", strategy=name, home=variant.home, budget=None,
            cuda_max_memory_allocated_bytes=cuda_peak(spec.device),
            peak_rss_bytes=max(setup_rss.get("peak") or 0, steady or 0) or None,
            setup_seconds=setup, seconds_per_step=statistics.median(seconds), step_seconds=seconds,
            min_seconds_per_step=min(seconds),
            note=f"{variant.package} peer; device peak from torch.cuda only",
        )  # fmt: skip
        if paired:
            record["paired_resident_step_seconds"] = paired
        record["steady_rss_bytes"] = steady
        record["rss_before_bytes"] = rss_before
        record.update(rss_split_now)
        record["resident_index"] = len(sweep.resident) - 1
        runs.append(record)
        sweep.log(f"{name}: {record['seconds_per_step']:.3f} s/step")
    return runs
