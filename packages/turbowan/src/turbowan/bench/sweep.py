"""Measure strategies x budgets (and peers) on one model in one process.

Why one process, with all-resident timings taken between the runs: on a shared or
thermally throttled machine the speed drifts over minutes, and a slowdown ratio is only
meaningful against a baseline measured under the same conditions.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from turbowan.bench import machine
from turbowan.bench.measure import cuda_peak, empty_run, reset_cuda_peak, rss_split, time_steps
from turbowan.bench.models import BenchInputs, bench_inputs, build_bench_model
from turbowan.bench.report import skip_line
from turbowan.bench.workload import Workload

Log = Callable[[str], None]


@dataclass
class SweepSpec:
    """Everything a sweep needs, resolved from the command line."""

    preset: str
    workload: Workload
    device: str = "cpu"
    quant: str = "int8"
    attention: str = "sla"
    dtype: torch.dtype = torch.float32
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    runs: list[tuple[str, str]] = field(default_factory=list)  # (strategy, budget label)
    homes: list[str] = field(default_factory=lambda: ["host"])
    peers: list[str] = field(default_factory=list)
    resident_between: bool = True
    paired: bool = False  # keep an all-resident copy and alternate steps with it (CPU)
    # measured host-to-device bytes/s per home tier, for the predicted slowdown
    bandwidths: dict[str, float] = field(default_factory=dict)
    strategy_options: dict[str, dict] = field(default_factory=dict)
    lora_rank: int | None = None  # repeat every run with a random LoRA of this rank


def resolve_budget(label: str, model_bytes: int, device: str) -> int:
    """Bytes for a budget label. ``N%`` is a share of *this model's weights* (not of the
    device): the bench asks what keeping that share on the device costs."""
    from offloadkit import BudgetError, parse_budget

    text = label.strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            raise BudgetError(f"budget {label!r}: use a number before %, e.g. 50%") from None
        if not 0 < share <= 100:
            raise BudgetError(f"budget {label!r}: a share must be above 0% and at most 100%")
        return math.floor(model_bytes * share / 100)
    return parse_budget(text, device)


class Sweep:
    """Runs one :class:`SweepSpec`; ``run()`` returns the JSON-ready result document."""

    def __init__(self, spec: SweepSpec, log: Log = print,
                 on_progress: Callable[[list[dict], list[dict]], None] | None = None) -> None:  # fmt: skip
        self.spec = spec
        self.log = log
        self.on_progress = on_progress  # called with (runs, skipped) after every run
        self.runs: list[dict] = []
        self.skipped: list[dict] = []
        self.resident: list[float] = []  # medians of the all-resident measurements, in order
        self.resident_min: list[float] = []  # and their fastest steps
        self.reference = None  # all-resident twin for paired timing
        self._plans: dict[tuple, str] = {}  # plan -> first budget label it was measured at
        self.lora: dict | None = None  # the random LoRA of --lora-rank

    # ---------------------------------------------------------------- building
    def _build(self):
        s = self.spec
        start = time.perf_counter()
        model = build_bench_model(s.preset, quant=s.quant, attention=s.attention, dtype=s.dtype,
                                  seed=s.seed)  # fmt: skip
        self.log(f"built {s.preset} ({s.quant}, {s.attention}) with random weights "
                 f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
        return model

    # ---------------------------------------------------------------- measurements
    def measure_resident(self, model, inputs: BenchInputs) -> dict:
        """All weights on the device, no hooks: the baseline every ratio divides by."""
        s = self.spec
        machine.release_freed_memory()
        machine.reset_peak_rss()
        reset_cuda_peak(s.device)
        moved = s.device != "cpu"
        if moved:
            model.to(s.device)
        seconds = time_steps(model, inputs, steps=s.steps, warmup=s.warmup, device=s.device)
        record = empty_run(
            kind="baseline", strategy="resident", budget="-",
            peak_device_bytes=self.model_bytes,
            cuda_max_memory_allocated_bytes=cuda_peak(s.device),
            peak_rss_bytes=machine.peak_rss_bytes(),
            seconds_per_step=statistics.median(seconds), step_seconds=seconds,
            min_seconds_per_step=min(seconds),
            bytes_transferred=0, bytes_per_step=0, stall_seconds=0.0, oom_recoveries=0,
            resident_blocks=self.num_blocks, streamed_blocks=0,
        )  # fmt: skip
        if moved:
            model.to("cpu")
            torch.cuda.synchronize()
        self.resident.append(record["seconds_per_step"])
        self.resident_min.append(record["min_seconds_per_step"])
        record["resident_index"] = len(self.resident) - 1
        self.log(f"resident: {record['seconds_per_step']:.3f} s/step")
        return record

    def _resident_run(self, model, inputs: BenchInputs, *, lora: bool = False) -> None:
        """All-resident baseline; a model that does not fit on the device leaves ratios empty.
        ``lora``: also all-resident with the LoRA, right after (not a baseline itself)."""
        try:
            self.runs.append(self.measure_resident(model, inputs))
            if lora and self.lora is not None:
                self.runs.append(self._resident_lora_run(model, inputs))
        except torch.OutOfMemoryError as exc:
            model.to("cpu")
            torch.cuda.empty_cache()
            self.skip("resident", "-", None, f"all weights do not fit on {self.spec.device} ({exc})"
                       "; ratios to all-resident are left empty")  # fmt: skip

    def _resident_lora_run(self, model, inputs: BenchInputs) -> dict:
        """All-resident with the LoRA attached; with paired timing each step alternates with
        the plain resident copy, so the ratio is the LoRA's own cost, free of drift."""
        from turbowan.bench.lora import lora_attached

        s = self.spec
        with lora_attached(model, self.lora) as nbytes:
            if self.reference is None:
                record = self.measure_resident(model, inputs)
                self.resident.pop()
                self.resident_min.pop()
            else:
                moved = s.device != "cpu"
                if moved:
                    model.to(s.device)
                paired: list[float] = []
                try:
                    seconds = time_steps(model, inputs, steps=s.steps, warmup=s.warmup,
                                         device=s.device, reference=self.reference,
                                         reference_seconds=paired)  # fmt: skip
                finally:
                    if moved:
                        model.to("cpu")
                record = empty_run(
                    strategy="resident", budget="-", seconds_per_step=statistics.median(seconds),
                    step_seconds=seconds, min_seconds_per_step=min(seconds),
                    bytes_transferred=0, bytes_per_step=0, stall_seconds=0.0, oom_recoveries=0,
                    resident_blocks=self.num_blocks, streamed_blocks=0,
                    paired_resident_step_seconds=paired)  # fmt: skip
        record.update(kind="lora", lora_rank=s.lora_rank, lora_bytes=nbytes,
                      peak_device_bytes=self.model_bytes + nbytes,
                      resident_index=len(self.resident) - 1)
        self.log(f"resident + LoRA rank {s.lora_rank}: {record['seconds_per_step']:.3f} s/step")
        return record

    def _check_host_memory(self) -> None:
        """Refuse before building a model the host cannot hold; drop the paired copy if only
        one fits. Figures come from the model built on meta (no allocation)."""
        import psutil

        from turbowan.bench.models import estimate_model_bytes

        s = self.spec
        need = estimate_model_bytes(s.preset, quant=s.quant, attention=s.attention, dtype=s.dtype)
        available = psutil.virtual_memory().available
        if need > 0.9 * available:
            raise MemoryError(
                f"{s.preset} with {str(s.dtype).removeprefix('torch.')} compute needs "
                f"{need / 2**30:.1f} GiB of host RAM for its weights, {available / 2**30:.1f} GiB "
                "is available: use a smaller --preset, --dtype bfloat16, or --plan (no weights)"
            )
        if s.paired and 2 * need > 0.9 * available:
            s.paired = False
            self.log(f"paired timing off: a second copy ({need / 2**30:.1f} GiB) does not fit in "
                     f"{available / 2**30:.1f} GiB of free RAM")  # fmt: skip

    @property
    def _between(self) -> bool:
        """Resident timings between runs are only needed when steps are not paired."""
        return self.spec.resident_between and not self.spec.paired

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.runs, self.skipped)

    def measure_offloadkit(self, model, inputs: BenchInputs, strategy: str, budget: str,
                           budget_bytes: int, home: str) -> dict:  # fmt: skip
        import offloadkit

        s = self.spec
        machine.release_freed_memory()
        rss_before = machine.current_rss_bytes()
        machine.reset_peak_rss()
        reset_cuda_peak(s.device)
        start = time.perf_counter()
        options = dict(s.strategy_options.get(strategy, {}))
        if home == "shared":  # this process alone maps the copy: its name goes at once
            from turbowan.distributed.pipeline import shared_home_options

            options.update(shared_home_options(None))
        handle = offloadkit.apply(model, strategy=strategy, device=s.device, budget=budget_bytes,
                                  home=home, **options)  # fmt: skip
        try:
            setup = time.perf_counter() - start
            before: dict = {}

            def snapshot() -> None:
                before["stats"] = handle.stats()
                before["rss"] = machine.peak_rss_bytes()
                machine.reset_peak_rss()

            paired: list[float] = []
            seconds = time_steps(model, inputs, steps=s.steps, warmup=s.warmup, device=s.device,
                                 after_warmup=snapshot, reference=self.reference,
                                 reference_seconds=paired)  # fmt: skip
            steady_rss = machine.peak_rss_bytes()
            rss_split_now = rss_split()
            stats = handle.stats()
            plan = getattr(handle, "plan", None)
        finally:
            handle.remove()
        first = before["stats"]
        moved = stats.bytes_transferred - first.bytes_transferred
        transfer_s = stats.transfer_seconds - first.transfer_seconds
        record = empty_run(
            kind="offloadkit", strategy=strategy, home=home, budget=budget,
            budget_bytes=budget_bytes,
            peak_device_bytes=stats.peak_device_bytes,
            cuda_max_memory_allocated_bytes=cuda_peak(s.device),
            host_pinned_bytes=stats.host_pinned_bytes,
            host_pageable_bytes=stats.host_pageable_bytes,
            host_shared_bytes=stats.host_shared_bytes,
            disk_bytes=stats.disk_bytes,
            peak_rss_bytes=max(before["rss"] or 0, steady_rss or 0) or None,
            setup_seconds=setup,
            seconds_per_step=statistics.median(seconds), step_seconds=seconds,
            min_seconds_per_step=min(seconds),
            bytes_transferred=moved, bytes_per_step=moved // max(1, s.steps),
            transfers=stats.transfers - first.transfers,
            transfer_seconds=transfer_s,
            achieved_gbps=(moved / transfer_s / 1e9) if transfer_s > 0 else None,
            stall_seconds=stats.stall_seconds - first.stall_seconds,
            oom_recoveries=stats.oom_recoveries,
            resident_blocks=stats.resident_blocks, streamed_blocks=stats.streamed_blocks,
            predicted_peak_device_bytes=getattr(plan, "predicted_peak_device_bytes", None),
            within_budget=stats.peak_device_bytes <= budget_bytes,
        )  # fmt: skip
        record["steady_rss_bytes"] = steady_rss
        record["rss_before_bytes"] = rss_before
        if paired:
            record["paired_resident_step_seconds"] = paired
        record.update(rss_split_now)
        if plan is not None:
            record["plan_streamed_blocks"] = list(plan.streamed)
        record["group_size"] = stats.group_size
        record["prefetch_depth"] = stats.prefetch_depth
        record["num_slots"] = stats.num_slots
        record["replans"] = stats.replans
        return record

    # ---------------------------------------------------------------- the sweep
    def run(self) -> dict:
        from offloadkit import profile_model

        s = self.spec
        self._check_host_memory()
        model = self._build()
        config = model.config
        inputs = bench_inputs(config, s.workload, dtype=s.dtype, seed=s.seed).to(s.device)
        profile = profile_model(model, device=s.device)
        self.model_bytes = profile.total_bytes
        self.num_blocks = profile.num_blocks
        self.block_bytes = [b.nbytes for b in profile.blocks]
        self.log(f"model: {self.model_bytes / 2**30:.3f} GiB of weights in {self.num_blocks} blocks "
                 f"(+{profile.non_block_bytes / 2**20:.1f} MiB outside blocks); "
                 f"workload: {s.workload.description}, {s.workload.tokens} tokens")  # fmt: skip

        if s.paired:
            self.reference = self._build().to(s.device)
            self.log("paired timing: every step alternates with an all-resident copy")
        if s.lora_rank is not None:
            from turbowan.bench.lora import random_lora

            self.lora = random_lora(model, s.lora_rank, s.seed)
        self._resident_run(model, inputs, lora=True)
        self._progress()
        for strategy, budget in s.runs:
            self._offloadkit_runs(model, inputs, profile, strategy, budget)
        if self.resident and (len(self.resident) < 2 or not self._between):
            self._resident_run(model, inputs)

        if s.peers:
            del model
            machine.release_freed_memory()
            from turbowan.bench.peers import run_peers

            self.runs.extend(run_peers(self, s.peers, inputs))
        self._ratios()
        if self.lora is not None:
            from turbowan.bench.lora import pair_lora_runs

            pair_lora_runs(self.runs)
        return {
            "preset": s.preset, "quant": s.quant, "attention": s.attention,
            "dtype": str(s.dtype).removeprefix("torch."), "device": s.device,
            "workload": s.workload.as_dict(), "steps": s.steps, "warmup": s.warmup,
            "model_bytes": self.model_bytes, "num_blocks": self.num_blocks,
            "block_bytes": list(self.block_bytes), "lora_rank": s.lora_rank,
            "non_block_bytes": profile.non_block_bytes,
            "resident_seconds_per_step": list(self.resident),
            "runs": self.runs, "skipped": self.skipped,
        }  # fmt: skip

    def _offloadkit_runs(self, model, inputs, profile, strategy: str, budget: str) -> None:
        """One run per home tier, after checks that do not depend on the tier."""
        import offloadkit

        s = self.spec
        try:
            budget_bytes = resolve_budget(budget, self.model_bytes, s.device)
            report = offloadkit.check_fits(profile, strategy, budget_bytes,
                                           **s.strategy_options.get(strategy, {}))
        except Exception as exc:
            self.skip(strategy, budget, None, exc)
            return
        if not report.fits:
            self.skip(strategy, budget, None,
                       f"budget {budget_bytes / 2**20:.2f} MiB is below the "
                       f"{report.minimum_bytes / 2**20:.2f} MiB this strategy needs")  # fmt: skip
            return
        same = self._same_plan_as(report.plan, strategy, budget)
        if same is not None:
            self.skip(strategy, budget, None, f"same plan as {strategy} @ {same}: measured once")
            return
        for home in s.homes:
            self._one_offloadkit_run(model, inputs, strategy, budget, budget_bytes, home)
            self._progress()

    def _same_plan_as(self, plan, strategy: str, budget: str) -> str | None:
        """The budget label already measured with an identical plan (e.g. layerwise, which
        ignores extra budget), so a sweep does not time the same placement twice."""
        key = (strategy, plan.resident, plan.streamed, plan.group_size, plan.prefetch_depth,
               plan.num_slots)  # fmt: skip
        first = self._plans.setdefault(key, budget)
        return None if first == budget else first

    def _one_offloadkit_run(self, model, inputs, strategy: str, budget: str, budget_bytes: int,
                            home: str) -> None:  # fmt: skip
        label = f"{strategy} @ {budget} ({home})"
        try:
            record = self.measure_offloadkit(model, inputs, strategy, budget, budget_bytes, home)
        except Exception as exc:  # a strategy that cannot run here is reported, not fatal
            self.skip(strategy, budget, home, exc)
            return
        record["resident_index"] = len(self.resident) - 1
        self.runs.append(record)
        self.log(f"{label}: {record['seconds_per_step']:.3f} s/step, peak "
                 f"{record['peak_device_bytes'] / 2**20:.1f} MiB of {budget_bytes / 2**20:.1f} MiB")  # fmt: skip
        if self.lora is not None:
            self._lora_run(model, inputs, strategy, budget, budget_bytes, home)
        if self._between and self.resident:
            self._resident_run(model, inputs)

    def _lora_run(self, model, inputs, strategy: str, budget: str, budget_bytes: int,
                  home: str) -> None:  # fmt: skip
        """The same run again with the LoRA attached (offloadkit re-stages the expert)."""
        from turbowan.bench.lora import lora_attached

        try:
            with lora_attached(model, self.lora) as nbytes:
                record = self.measure_offloadkit(model, inputs, strategy, budget, budget_bytes,
                                                 home)  # fmt: skip
        except Exception as exc:
            self.skip(f"{strategy}+lora", budget, home, exc)
            return
        record.update(kind="lora", lora_rank=self.spec.lora_rank, lora_bytes=nbytes,
                      resident_index=len(self.resident) - 1)
        self.runs.append(record)
        self.log(f"{strategy} @ {budget} ({home}) + LoRA rank {self.spec.lora_rank}: "
                 f"{record['seconds_per_step']:.3f} s/step")

    def skip(self, strategy: str, budget: str | None, home: str | None, reason) -> None:
        """Record (and log) a run that could not be measured; ``reason`` may be an exception.
        Peers have no budget (None)."""
        text = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
        record = {"strategy": strategy, "budget": budget, "home": home, "reason": text}
        self.skipped.append(record)
        self.log(skip_line(record))

    def _ratios(self) -> None:
        """Each run divided by the mean of the resident timings taken just before and after."""
        for record in self.runs:
            index = record.pop("resident_index", None)
            if record["kind"] == "baseline":
                record["resident_seconds_per_step"] = record["seconds_per_step"]
                record["ratio_to_resident"] = record["min_ratio_to_resident"] = 1.0
                continue
            if not self.resident and not record.get("paired_resident_step_seconds"):
                continue  # no baseline could be measured: ratios stay empty
            if index is None or index < 0:
                baseline = statistics.median(self.resident)
                fastest = min(self.resident_min)
            else:
                baseline = statistics.fmean(self.resident[index : index + 2])
                fastest = min(self.resident_min[index : index + 2])
            paired = record.get("paired_resident_step_seconds")
            if paired:
                baseline, fastest = statistics.median(paired), min(paired)
            record["resident_seconds_per_step"] = baseline
            if record.get("seconds_per_step") is not None and baseline > 0:
                record["ratio_to_resident"] = record["seconds_per_step"] / baseline
                record["min_ratio_to_resident"] = record["min_seconds_per_step"] / fastest
            self._predict(record, fastest)

    def _predict(self, record: dict, resident_seconds: float) -> None:
        """What plan mode would have predicted for this run, from the measured bandwidth and
        the resident step split evenly over the blocks: a check of the planner's model."""
        streamed = record.get("plan_streamed_blocks")
        bandwidth = self.spec.bandwidths.get(record.get("home") or "")
        if streamed is None or not bandwidth or resident_seconds <= 0:
            return
        from turbowan.bench.simulate import simulate_step

        per_block = resident_seconds / max(1, self.num_blocks)
        prediction = simulate_step(
            block_bytes=self.block_bytes, block_seconds=[per_block] * self.num_blocks,
            streamed=streamed, bandwidth=bandwidth, group_size=record["group_size"],
            slots=max(1, record["num_slots"]), prefetch_depth=max(1, record["prefetch_depth"]),
        )  # fmt: skip
        record["predicted_slowdown"] = prediction.slowdown


def strategy_budget_pairs(strategies: Sequence[str], budgets: Sequence[str]) -> list[tuple[str, str]]:
    """``name`` crosses with every budget; ``name@budget`` runs at that budget only."""
    pairs = []
    for item in strategies:
        if "@" in item:
            name, budget = item.split("@", 1)
            pairs.append((name.strip(), budget.strip()))
        else:
            pairs.extend((item, b) for b in budgets)
    return pairs
