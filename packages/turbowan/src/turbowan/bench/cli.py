"""``turbowan-bench``: measure strategies x budgets on a DiT preset, or (``--plan``) predict
what each strategy would do on cards of given sizes for the full-size A14B, without a GPU.

Every argument is checked before a model is built, so a typo costs nothing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_TOKENS = {"tiny": 256, "small": 512}
DEFAULT_VIDEO = ("480p", "16:9", 81)
HOMES = ("pinned", "host", "disk", "shared")


class UsageError(ValueError):
    """A bad argument; printed as ``turbowan-bench: error: ...`` with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="turbowan-bench",
        description=(
            "Sweep offloadkit strategies x budgets on a Wan2.2 DiT preset with random weights "
            "(peak device memory, seconds per step, slowdown against all-resident measured in "
            "the same process), or with --plan predict each strategy's placement on GPUs of "
            "given sizes for the full-size A14B."
        ),
    )
    p.add_argument("--preset", choices=["tiny", "small", "wan2.2-i2v-a14b"],
                   help="DiT preset (random weights). Default: small; wan2.2-i2v-a14b with --plan")
    p.add_argument("--quant", default="int8", choices=["int8", "none"])
    p.add_argument("--attention", default="sla", choices=["sla", "original"])
    p.add_argument("--strategies", default="all",
                   help="comma list of strategy names, 'all' (every registered one, plugins "
                        "included), or name@budget to run a strategy at one budget only")
    p.add_argument("--budgets", default="25%,50%,100%",
                   help="comma list: sizes (8GB, 512MiB), N%% of THIS MODEL's weight bytes, or "
                        "'auto' (device free memory less a reserve). Default: 25%%,50%%,100%%")
    p.add_argument("--home", default="host",
                   help="comma list of home tiers for offloadkit runs: pinned, host, disk, "
                   "shared (one copy in /dev/shm, as several processes of a machine use it)")
    p.add_argument("--option", action="append", default=[], metavar="STRATEGY.KEY=VALUE",
                   help="strategy option, e.g. chunkwise.chunk_size=2 or manual.resident=0,3 "
                        "(a comma makes a list: manual.resident=0, is [0])")
    work = p.add_argument_group("workload (default: 480p 16:9 81 frames for A14B, "
                                "512 tokens for small, 256 for tiny)")
    work.add_argument("--resolution", help="480, 480p, 512, 720 or 720p")
    work.add_argument("--aspect-ratio", default="16:9", help="W:H, e.g. 16:9, 1:1")
    work.add_argument("--frames", type=int, help="video frames, 4n+1 (81, 77, 33, 1)")
    work.add_argument("--tokens", type=int, help="token count instead of a video size")
    p.add_argument("--device", help="cuda when there is one, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--steps", type=int, default=3, help="timed DiT steps per run (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--peers", help="comma list: diffusers, accelerate (or single variants)")
    p.add_argument("--paired", choices=["auto", "on", "off"], default="auto",
                   help="time each step against an all-resident copy kept in memory, step by "
                        "step (needs the weights twice; auto: on for CPU, off for CUDA)")
    p.add_argument("--no-resident-between", action="store_true",
                   help="measure all-resident only at the start and end (saves time on CUDA)")
    p.add_argument("--lora-rank", dest="lora_rank", type=int, metavar="R",
                   help="repeat every run with a random rank-R LoRA on every block linear and "
                        "report its time and bytes per step against the run without it")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write peak memory vs slowdown as PNG")
    p.add_argument("--markdown", metavar="PATH", help="write the runs as a markdown table")
    plan = p.add_argument_group("plan mode")
    plan.add_argument("--plan", action="store_true",
                      help="predict each strategy's plan per card size for the full A14B (meta)")
    plan.add_argument("--gpu", help="card sizes, default 8GB,12GB,16GB,20GB,24GB,48GB,80GB")
    plan.add_argument("--bandwidth", type=float,
                      help="host-to-device GB/s (default: measured here)")
    plan.add_argument("--block-ms", type=float,
                      help="compute ms per block at the workload (default: estimated from "
                           "FLOPs and a matmul rate measured here)")
    plan.add_argument("--reserve", help="device memory kept for activations, e.g. 6GiB "
                                        "(default: estimated from the workload)")
    plan.add_argument("--sp", help="also predict Ulysses sequence parallel over these process "
                      "counts, e.g. 1,2,4,8: per-rank peak, host RAM per node, step time")
    plan.add_argument("--link-bandwidth", dest="link_bandwidth", type=float, default=100.0,
                      help="GB/s of the GPU-to-GPU all-to-all with --sp (default 100: an "
                      "NVLink-class estimate; PCIe-only cards: about 20)")
    return p  # fmt: skip


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def parse_options(items: list[str]) -> dict[str, dict]:
    """``["chunkwise.chunk_size=2", "manual.resident=0,3"]`` -> per-strategy option dicts."""
    options: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        strategy, dot, name = key.partition(".")
        if not sep or not dot or not strategy or not name:
            raise UsageError(f"--option {item!r}: write STRATEGY.KEY=VALUE, e.g. chunkwise.chunk_size=2")
        options.setdefault(strategy, {})[name] = _option_value(raw)
    return options


def _option_value(raw: str):
    if "," in raw:
        return [_option_value(part) for part in raw.split(",") if part]
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(raw.lower(), raw)


def resolve_workload(args, preset: str):
    from turbowan.bench import workload as wl

    video = args.resolution is not None or args.frames is not None
    if args.tokens is not None and video:
        raise UsageError("give either --tokens or --resolution/--frames, not both")
    try:
        if args.tokens is not None:
            return wl.from_tokens(args.tokens)
        if video or preset not in DEFAULT_TOKENS:
            resolution = args.resolution or DEFAULT_VIDEO[0]
            frames = args.frames if args.frames is not None else DEFAULT_VIDEO[2]
            return wl.from_video(resolution, args.aspect_ratio, frames)
        return wl.from_tokens(DEFAULT_TOKENS[preset])
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def resolve_strategies(text: str) -> list[str]:
    """Names (or name@budget) checked against the registry; 'all' expands to every one."""
    import offloadkit

    known = offloadkit.list_strategies()
    items = _split(text)
    if not items:
        raise UsageError(f"--strategies is empty; use 'all' or some of: {', '.join(known)}")
    out: list[str] = []
    for item in items:
        if item == "all":
            out.extend(known)
            continue
        name = item.split("@", 1)[0]
        if name not in known:
            raise UsageError(
                f"unknown strategy {name!r}; installed strategies: {', '.join(known)} "
                "(plugins appear here once pip-installed)"
            )
        out.append(item)
    return list(dict.fromkeys(out))


def check_budgets(labels: list[str], device: str) -> None:
    from offloadkit import BudgetError
    from turbowan.bench.sweep import resolve_budget

    if not labels:
        raise UsageError("--budgets is empty; use e.g. 25%,50%,100% or 8GB,auto")
    for label in labels:
        try:
            resolve_budget(label, 1, device) if label.lower() != "auto" else None
        except BudgetError as exc:
            raise UsageError(f"--budgets: {exc}") from None


def resolve_device(text: str | None) -> str:
    """cuda when there is one, else cpu; a named device must be one offloadkit can place on
    (its check: cpu or an existing cuda:N)."""
    import torch

    import offloadkit

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = offloadkit.resolve_device(text)
    except offloadkit.DeviceUnavailableError as exc:
        raise UsageError(f"--device {text}: {exc}") from None
    return "cpu" if device.type == "cpu" else text  # the sweep compares names with "cpu"


def _header(args, argv: list[str], device: str) -> dict:
    from turbowan.bench import machine

    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "turbowan-bench " + shlex.join(argv),
        "machine": machine.machine_info(device),
        "versions": machine.package_versions(),
        "git": machine.git_revision(),
    }


# ------------------------------------------------------------------------------ plan mode


def run_plan(args, argv: list[str]) -> int:
    from offloadkit import BudgetError, parse_budget
    from turbowan.bench import plan as planmod
    from turbowan.bench.report import plan_table, write_json
    from turbowan.dit.config import get_preset

    started = time.perf_counter()
    if args.lora_rank is not None:
        raise UsageError("--lora-rank measures sweeps; it does not apply to --plan")
    preset = args.preset or "wan2.2-i2v-a14b"
    try:
        cards = planmod.parse_cards(args.gpu or planmod.DEFAULT_CARDS)
        reserve_given = parse_budget(args.reserve, "cpu") if args.reserve else None
    except BudgetError as exc:
        raise UsageError(str(exc)) from None
    strategies = [s.split("@", 1)[0] for s in resolve_strategies(args.strategies)]
    _check_before_measuring(args, None)
    workload = resolve_workload(args, preset)
    config = get_preset(preset)
    device = "cuda" if _cuda() else "cpu"
    if args.bandwidth is not None and args.bandwidth <= 0:
        raise UsageError("--bandwidth must be a positive number of GB/s")
    if args.block_ms is not None and args.block_ms <= 0:
        raise UsageError("--block-ms must be a positive number of milliseconds")

    bandwidth = args.bandwidth * 1e9 if args.bandwidth else None
    rate_source = []
    flops = None
    if bandwidth is None or args.block_ms is None:
        measured_bw, flops, where = planmod.measured_rates(device)
        if bandwidth is None:
            bandwidth = measured_bw
            rate_source.append(f"bandwidth {where}")
        if args.block_ms is None:
            rate_source.append(f"block time from FLOPs at {flops / 1e12:.2f} TFLOP/s {where}")
    if args.bandwidth:
        rate_source.append("bandwidth given")
    if args.block_ms is not None:
        block_seconds = args.block_ms / 1000
        rate_source.append("block time given")
    else:
        block_seconds = planmod.block_seconds_for(config, workload, args.attention, flops)
    reserve = reserve_given if reserve_given is not None else (
        planmod.activation_bytes(config, workload.tokens, batch=workload.batch)
        + planmod.CUDA_OVERHEAD_BYTES
    )  # fmt: skip
    profile = planmod.meta_profile(preset, quant=args.quant, attention=args.attention)
    rows = planmod.plan_strategy_rows(profile, strategies, cards, reserve_bytes=reserve,
                                      bandwidth=bandwidth, block_seconds=block_seconds)  # fmt: skip
    elapsed = time.perf_counter() - started

    print(f"plan for {preset} ({args.quant}, {args.attention}) built on meta: "
          f"{profile.num_blocks} blocks of {profile.max_block_bytes / 2**20:.1f} MiB, "
          f"{profile.non_block_bytes / 2**20:.1f} MiB outside blocks, "
          f"{profile.total_bytes / 2**30:.2f} GiB in all")
    print(f"workload: {workload.description}, {workload.tokens} tokens; reserve for activations "
          f"and CUDA: {reserve / 2**30:.2f} GiB ({'given' if reserve_given is not None else 'estimated'})")
    print(f"rates: {bandwidth / 1e9:.1f} GB/s host-to-device, {block_seconds * 1e3:.1f} ms per "
          f"block ({'; '.join(rate_source)})")
    print(plan_table(rows))
    print("budget = card - reserve: pass it as offloadkit.apply(..., budget=...) and the plan's "
          "predicted peak is the most the engine will place.")
    if device == "cpu" and (args.bandwidth is None or args.block_ms is None):
        print("note: rates were measured on this machine's CPU; for your GPU give e.g. "
              "--bandwidth 25 --block-ms 340 (PCIe 4.0, RTX 4090 at 480p/81, bf16)")
    sp_rows = _sp_plan(args, profile, config, workload, cards, strategies, bandwidth,
                       block_seconds) if args.sp else None
    print(f"planned in {elapsed:.1f} s")
    if args.json:
        document = _header(args, argv, device)
        document.update({
            "mode": "plan", "preset": preset, "quant": args.quant, "attention": args.attention,
            "workload": workload.as_dict(), "reserve_bytes": reserve,
            "bandwidth_bytes_per_s": bandwidth, "block_seconds": block_seconds,
            "rate_source": rate_source, "block_bytes": [b.nbytes for b in profile.blocks],
            "non_block_bytes": profile.non_block_bytes, "plans": rows,
        })  # fmt: skip
        if sp_rows is not None:
            document["sequence_parallel"] = {
                "link_bandwidth_bytes_per_s": args.link_bandwidth * 1e9, "rows": sp_rows}
        write_json(args.json, document)
        print(f"wrote {args.json}")
    return 0


def _sp_plan(args, profile, config, workload, cards, strategies, bandwidth, block_seconds):
    """The --sp table: per-rank plans of the first strategy for each process count."""
    from turbowan.bench.sp_plan import sp_rows, sp_table

    try:
        sizes = [int(n) for n in _split(args.sp)]
    except ValueError:
        raise UsageError(f"--sp {args.sp!r}: give process counts such as 1,2,4,8") from None
    if not sizes or min(sizes) < 1 or args.link_bandwidth <= 0:
        raise UsageError("--sp needs counts of at least 1 and a positive --link-bandwidth")
    if 1 not in sizes:
        sizes = [1, *sizes]  # the speed-up is against one GPU
    rows = sp_rows(profile, config, tokens=workload.tokens, cards=cards, sizes=sizes,
                   strategy=strategies[0], bandwidth=bandwidth,
                   link_bandwidth=args.link_bandwidth * 1e9, block_seconds=block_seconds)
    print(f"\nUlysses sequence parallel ({strategies[0]}, all-to-all at "
          f"{args.link_bandwidth:g} GB/s; host RAM per node for both experts, private homes or --home shared):")
    print(sp_table(rows))
    return rows


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------ sweep mode


def _check_before_measuring(args, options: dict[str, dict]) -> None:
    """Output paths writable, named strategies buildable (see ``bench.checks``)."""
    from turbowan.bench.checks import BenchCheckError, check_named_strategies, check_output_file

    try:
        for flag in ("json", "markdown", "plot"):
            check_output_file(f"--{flag}", getattr(args, flag, None))
        if options is not None:
            check_named_strategies(args.strategies, options)
    except BenchCheckError as exc:
        raise UsageError(str(exc)) from None


def run_sweep(args, argv: list[str]) -> int:
    import torch

    from turbowan.bench import machine
    from turbowan.bench.peers import parse_peers
    from turbowan.bench.report import runs_table, skipped_lines, write_json, write_plot
    from turbowan.bench.sweep import Sweep, SweepSpec, strategy_budget_pairs

    args.preset = args.preset or "small"
    device = resolve_device(args.device)
    workload = resolve_workload(args, args.preset)
    strategies = resolve_strategies(args.strategies)
    _check_before_measuring(args, parse_options(args.option))
    budgets = _split(args.budgets)
    check_budgets(budgets + [s.split("@", 1)[1] for s in strategies if "@" in s], device)
    homes = _split(args.home)
    bad = [h for h in homes if h not in HOMES]
    if bad or not homes:
        raise UsageError(f"--home {args.home!r}: use a comma list of {', '.join(HOMES)}")
    try:
        peers = parse_peers(args.peers)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.steps < 1 or args.warmup < 0:
        raise UsageError("--steps must be >= 1 and --warmup >= 0")
    if args.lora_rank is not None and args.lora_rank < 1:
        raise UsageError(f"--lora-rank must be a rank of at least 1, got {args.lora_rank}")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib: pip install 'turbowan[plot]'")
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    spec = SweepSpec(
        preset=args.preset, workload=workload, device=device, quant=args.quant,
        attention=args.attention, dtype=getattr(torch, dtype_name), steps=args.steps,
        warmup=args.warmup, seed=args.seed, runs=strategy_budget_pairs(strategies, budgets),
        homes=homes, peers=peers, resident_between=not args.no_resident_between,
        paired=args.paired == "on" or (args.paired == "auto" and device == "cpu"),
        strategy_options=parse_options(args.option), lora_rank=args.lora_rank,
    )  # fmt: skip
    log = lambda line: print(line, flush=True)
    pinned = machine.measure_copy_bandwidth(device, pinned=True)
    # on the CPU nothing is page-locked: both are the same memcpy, measured once
    pageable = (machine.measure_copy_bandwidth(device, pinned=False) if device.startswith("cuda")
                else pinned)
    rates = {"pinned_bandwidth_bytes_per_s": pinned, "pageable_bandwidth_bytes_per_s": pageable}
    log(f"host-to-{device} copy: pinned {rates['pinned_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"pageable {rates['pageable_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")  # fmt: skip
    # the disk tier reads into pageable staging (from the page cache when warm)
    # a shared copy is page-locked (cudaHostRegister) like pinned memory
    tiers = {"pinned": "pinned", "host": "pageable", "disk": "pageable", "shared": "pinned"}
    spec.bandwidths = {h: rates[f"{t}_bandwidth_bytes_per_s"] for h, t in tiers.items()}
    document = _header(args, argv, device)
    document.update({"mode": "sweep", "complete": False, "rates": rates, "preset": args.preset,
                     "workload": workload.as_dict()})  # fmt: skip

    def save_partial(runs: list[dict], skipped: list[dict]) -> None:
        """Keep what has been measured if a later run crashes or a timeout kills us."""
        if args.json:
            write_json(args.json, {**document, "runs": runs, "skipped": skipped})

    try:
        result = Sweep(spec, log=log, on_progress=save_partial).run()
    except MemoryError as exc:
        raise UsageError(str(exc)) from None
    print()
    print(runs_table(result["runs"]))
    if result["skipped"]:
        print(skipped_lines(result["skipped"]))
    document.update({**result, "complete": True})
    if args.json:
        write_json(args.json, document)
        log(f"wrote {args.json}")
    if args.markdown:
        from pathlib import Path

        from turbowan.bench.report import markdown_runs

        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown_runs(document) + "\n")
        log(f"wrote {args.markdown}")
    if args.plot:
        title = f"{args.preset} {args.quant} {args.attention}, {workload.description}, {device}"
        write_plot(args.plot, result["runs"], title)
        log(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    from turbowan.interrupts import signals_as_interrupt

    threads = torch.get_num_threads()  # --threads is for this run, not for the caller
    with signals_as_interrupt() as stop:  # SIGTERM/SIGHUP end it like Ctrl-C
        try:
            code = run_plan(args, argv) if args.plan else run_sweep(args, argv)
        except UsageError as exc:
            print(f"turbowan-bench: error: {exc}", file=sys.stderr)
            code = 2
        except KeyboardInterrupt:
            kept = (f"; the runs measured so far are in {args.json} (\"complete\": false)"
                    if args.json and Path(args.json).is_file() else "")
            print(f"turbowan-bench: interrupted{kept}", file=sys.stderr)
            code = 130
        finally:
            torch.set_num_threads(threads)
    return stop.exit_code(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
