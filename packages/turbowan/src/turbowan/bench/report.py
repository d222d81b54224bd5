"""Present sweep and plan results three ways: a terminal table for people, JSON for machines
and comparisons across runs, and a PNG (peak memory against slowdown) for the trade-off.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

SCHEMA = "turbowan-bench/1"

# Keys every run record carries (None where a figure does not apply or was not measurable).
RUN_KEYS = (
    "kind",  # "baseline" (all resident), "offloadkit" or "peer"
    "strategy",
    "home",  # home tier of the weights: "pinned", "host", "disk", "shared" (None for baseline)
    "budget",  # the budget as the user wrote it
    "budget_bytes",
    "peak_device_bytes",  # offloadkit ledger (or torch.cuda for peers)
    "cuda_max_memory_allocated_bytes",
    "host_pinned_bytes",
    "host_pageable_bytes",
    "host_shared_bytes",
    "disk_bytes",
    "peak_rss_bytes",
    "setup_seconds",
    "seconds_per_step",  # median of the timed steps
    "min_seconds_per_step",
    "step_seconds",
    "resident_seconds_per_step",
    "ratio_to_resident",  # median / mean of the resident medians measured before and after
    "min_ratio_to_resident",  # fastest step / fastest neighbouring resident step (noise-robust)
    "predicted_slowdown",  # plan mode's simulator on this run's plan and measured rates
    "bytes_transferred",
    "bytes_per_step",
    "transfers",  # host-to-device copies in the timed steps (a block, or a group of blocks)
    "transfer_seconds",
    "achieved_gbps",
    "stall_seconds",
    "oom_recoveries",
    "resident_blocks",
    "streamed_blocks",
    "predicted_peak_device_bytes",
    "within_budget",
    "lora_rank",  # --lora-rank: this run had a random LoRA of this rank (None: no LoRA)
    "lora_bytes",  # bytes of that LoRA's tensors
    "lora_time_ratio",  # s/step over the same run without the LoRA
    "lora_bytes_per_step_ratio",  # bytes per copy over the same run without the LoRA: a
    # step makes the same copies either way (a 2-step window may cut the prefetch ring at
    # another copy, so raw bytes per step are compared per copy)
    "note",
)


def gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(r) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _count(blocks) -> str:
    return "-" if blocks is None else str(len(blocks) if isinstance(blocks, (list, tuple)) else blocks)


def runs_table(runs: Sequence[dict]) -> str:
    """One line per run: memory, time and traffic side by side."""
    headers = [
        "strategy", "home", "budget GiB", "peak dev GiB", "peak RSS GiB", "RSS steps GiB",
        "s/step", "x resident", "x res. fastest",
        "res/str", "GB/step", "GB/s", "stall s", "OOM", "LoRA", "x no LoRA", "GB x no LoRA",
    ]  # fmt: skip
    rows = []
    for r in runs:
        rows.append([
            r["strategy"],
            r.get("home") or "-",
            gib(r.get("budget_bytes")),
            gib(r.get("peak_device_bytes")),
            gib(r.get("peak_rss_bytes")),
            gib(r.get("steady_rss_bytes")),
            _fmt(r.get("seconds_per_step"), ".3f"),
            _fmt(r.get("ratio_to_resident"), ".3f"),
            _fmt(r.get("min_ratio_to_resident"), ".3f"),
            f"{_count(r.get('resident_blocks'))}/{_count(r.get('streamed_blocks'))}",
            _fmt(None if r.get("bytes_per_step") is None else r["bytes_per_step"] / 1e9, ".2f"),
            _fmt(r.get("achieved_gbps"), ".1f"),
            _fmt(r.get("stall_seconds"), ".3f"),
            _fmt(r.get("oom_recoveries"), "d"),
            "-" if r.get("lora_rank") is None else f"r{r['lora_rank']}",
            _fmt(r.get("lora_time_ratio"), ".3f"),
            _fmt(r.get("lora_bytes_per_step_ratio"), ".3f"),
        ])  # fmt: skip
    return _table(headers, rows)


def skip_line(skip: dict) -> str:
    """``skipped layerwise @ 100% (host): reason``; peers have no budget, checks no home."""
    where = (f" @ {skip['budget']}" if skip.get("budget") is not None else "") + (
        f" ({skip['home']})" if skip.get("home") else "")
    return f"skipped {skip['strategy']}{where}: {skip['reason']}"


def skipped_lines(skipped: Sequence[dict]) -> str:
    return "\n".join(skip_line(s) for s in skipped)


def plan_table(rows: Sequence[dict]) -> str:
    """One line per card and strategy: what would stay resident, stream, and what it costs."""
    headers = [
        "card", "strategy", "budget GiB", "resident", "streamed", "group", "slots", "prefetch",
        "pred. peak GiB", "pred. x resident", "note",
    ]  # fmt: skip
    lines = []
    for r in rows:
        lines.append([
            r["card"],
            r["strategy"],
            gib(r.get("budget_bytes")),
            _fmt(r.get("resident_count"), "d"),
            _fmt(r.get("streamed_count"), "d"),
            _fmt(r.get("group_size"), "d"),
            _fmt(r.get("slots"), "d"),
            _fmt(r.get("prefetch_depth"), "d"),
            gib(r.get("predicted_peak_device_bytes")),
            _fmt(r.get("predicted_slowdown"), ".3f"),
            r.get("note") or "",
        ])  # fmt: skip
    return _table(headers, lines)


def write_json(path: str | Path, document: dict) -> Path:
    """Write atomically (temporary file, then rename): an interrupt while the partial results
    are rewritten after a run leaves the previous complete file, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"schema": SCHEMA, **document}
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_plot(path: str | Path, runs: Sequence[dict], title: str) -> Path:
    """Peak device memory (x) against slowdown (y), one marker per strategy and budget."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(
            "--plot needs matplotlib; install it with `pip install 'turbowan[plot]'`"
        ) from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>P*Xhp"
    names = sorted({f"{r['strategy']}" + (f" ({r['home']})" if r.get("home") else "") for r in runs})
    for i, name in enumerate(names):
        group = [
            r for r in runs
            if f"{r['strategy']}" + (f" ({r['home']})" if r.get("home") else "") == name
            and r.get("ratio_to_resident") is not None
        ]  # fmt: skip
        xs = [
            (r.get("peak_device_bytes") or r.get("cuda_max_memory_allocated_bytes") or 0) / 2**30
            for r in group
        ]
        ys = [r["ratio_to_resident"] for r in group]
        ax.scatter(xs, ys, marker=markers[i % len(markers)], label=name, s=50)
        for x, y, r in zip(xs, ys, group):
            if r.get("budget"):
                ax.annotate(str(r["budget"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("peak device memory (GiB)")
    ax.set_ylabel("time per step / all-resident")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def markdown_runs(document: dict) -> str:
    """The runs of a sweep document as a markdown table (MiB, seconds, ratios), for results/."""
    lines = [
        "| strategy | home | budget | budget MiB | peak device MiB | peak RSS MiB | RSS in steps MiB "
        "| s/step (median) | x resident (median) | x resident (fastest) | predicted x "
        "| MB moved/step | GB/s | stall s | OOM | LoRA | LoRA MiB | x no LoRA | MB x no LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in document["runs"]:
        moved = r.get("bytes_per_step")
        lines.append(
            f"| {r['strategy']} | {r.get('home') or '-'} | {r.get('budget') or '-'} "
            f"| {_mib(r.get('budget_bytes'))} | {_mib(r.get('peak_device_bytes'))} "
            f"| {_mib(r.get('peak_rss_bytes'))} | {_mib(r.get('steady_rss_bytes'))} "
            f"| {_fmt(r.get('seconds_per_step'), '.2f')} | {_fmt(r.get('ratio_to_resident'), '.3f')} "
            f"| {_fmt(r.get('min_ratio_to_resident'), '.3f')} "
            f"| {_fmt(r.get('predicted_slowdown'), '.3f')} "
            f"| {'-' if moved is None else format(moved / 1e6, '.1f')} "
            f"| {_fmt(r.get('achieved_gbps'), '.1f')} | {_fmt(r.get('stall_seconds'), '.3f')} "
            f"| {_fmt(r.get('oom_recoveries'), 'd')} "
            f"| {'-' if r.get('lora_rank') is None else 'rank ' + str(r['lora_rank'])} "
            f"| {_mib(r.get('lora_bytes'))} | {_fmt(r.get('lora_time_ratio'), '.3f')} "
            f"| {_fmt(r.get('lora_bytes_per_step_ratio'), '.3f')} |"
        )
    skipped = document.get("skipped", [])
    if skipped:
        lines.append("")
        lines += [f"- skipped {s['strategy']} @ {s['budget']}: {s['reason']}" for s in skipped]
    return "\n".join(lines)
