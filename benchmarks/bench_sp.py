"""Ulysses sequence parallel: time per DiT forward at sp = 1, 2, 4, 8 in one invocation.

    python benchmarks/bench_sp.py --preset small --tokens 4096 --sp 1,2 --json out.json   # CPU, gloo
    python benchmarks/bench_sp.py --preset wan2.2-i2v-a14b --device cuda --resolution 480p --sp 1,2,4,8
    python benchmarks/bench_sp.py --preset small --tokens 1024 --sp 2 --offload layerwise --home host,shared

sp = 1 runs in this process; each larger sp is a spawned world (gloo on the CPU, NCCL on
CUDA, rank r on cuda:r) running the same forward on the same inputs, so the ratios come from
one run. Per sp: fastest forward (s), speed-up against sp = 1, all-to-all time per block
(the four trades of one self-attention, timed alone), peak device memory per rank (CUDA).
Weights are random (speed does not depend on their values); the DiT is int8 by default.
On the CPU the figure is the gloo overhead (the ranks share the machine's cores).

With ``--offload STRATEGY`` each rank places its DiT with offloadkit (``--budget``), once per
``--home`` tier; every rank then reports its stall time and its host memory (USS, PSS), and
the node's host memory for the weights is the PSS summed over the ranks: with ``--home
shared`` the ranks map one copy, with ``host`` each holds its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from _timing import min_time  # noqa: E402

# Wan2.2's published I2V-A14B speed-ups with Ulysses + FSDP (H100, 720p): 1 -> 4 -> 8 GPUs
WAN22_PUBLISHED = {4: 3.64, 8: 6.64}


def _grid(args: argparse.Namespace) -> tuple[int, int, int]:
    if args.tokens:
        return (1, 2, args.tokens // 2)  # grid (T, H/2, W/2) with T*H*W/4 = tokens
    from turbowan.pipeline.resolution import resolve_size

    width, height = resolve_size(args.resolution, args.aspect_ratio)
    return ((args.frames - 1) // 4 + 1, height // 16, width // 16)


def _model(args: argparse.Namespace, device: torch.device):
    from turbowan.dit.config import get_preset
    from turbowan.dit.meta import build_meta

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_meta(get_preset(args.preset), quant=args.quant, attention=args.attention,
                       sla_topk=0.1, dtype=dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype.is_floating_point:
                t.normal_(0, 0.02, generator=gen)
            else:
                t.random_(-127, 128, generator=gen)
    return model.requires_grad_(False)


def _inputs(args, model, device):
    t, h, w = _grid(args)
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    return (torch.randn(1, 16, t, 2 * h, 2 * w, generator=g).to(device), torch.tensor([900.0]),
            torch.randn(1, 512, cfg.text_dim, generator=g).to(device),
            torch.randn(1, 20, t, 2 * h, 2 * w, generator=g).to(device))


def _host_memory() -> dict:
    import psutil

    info = psutil.Process().memory_full_info()
    return {"uss_gib": info.uss / 2**30, "pss_gib": getattr(info, "pss", 0) / 2**30}


def measure(args: argparse.Namespace, device: torch.device, sp=None, home: str = "host",
            key: str = "") -> dict:
    from turbowan.bench.machine import synchronize
    from turbowan.distributed import enable_sequence_parallel, head_to_seq, seq_to_head

    handle = None
    if args.offload:
        import offloadkit

        model = _model(args, torch.device("cpu"))
        world = dist.get_world_size() if dist.is_initialized() else 1
        shared = {"shared_key": key, "shared_users": world} if home == "shared" else {}
        handle = offloadkit.apply(model, args.offload, device=device, budget=args.budget,
                                  home=home, **shared)
    else:
        model = _model(args, device)
    inputs = _inputs(args, model, device)
    shard = enable_sequence_parallel(model, sp) if sp is not None else None

    def forward():
        with torch.no_grad():
            model(*inputs)
        synchronize(str(device))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = min_time(forward, rounds=args.rounds, warmup=1)
    out = {"forward_s": seconds, "tokens": math.prod(_grid(args))}
    if device.type == "cuda":
        out["peak_device_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if handle is not None:
        stats = handle.stats()
        out.update(home=home, stall_s=stats.stall_seconds / max(stats.forwards, 1),
                   host_shared_gib=stats.host_shared_bytes / 2**30, **_host_memory())
    if shard is not None:
        sizes = shard.sizes
        cfg = model.config
        q = torch.randn(1, sizes[sp.rank], cfg.num_heads, cfg.head_dim,
                        dtype=model.compute_dtype, device=device)

        def trades():
            heads = [seq_to_head(q, sizes, sp) for _ in range(3)]
            head_to_seq(heads[0], sizes, sp)
            synchronize(str(device))

        out["a2a_ms_per_block"] = 1000 * min_time(trades, rounds=args.rounds, warmup=1)
    if handle is not None:
        handle.remove()
    return out


def _rank(rank: int, world: int, args: argparse.Namespace, where: str, home: str) -> None:
    from datetime import timedelta

    from turbowan.distributed import SequenceParallel

    torch.set_num_threads(args.threads)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{where}/store", rank=rank,
                            world_size=world, timeout=timedelta(seconds=600))
    try:
        result = measure(args, device, SequenceParallel.of(), home, key=Path(where).name)
        everyone = [None] * world
        dist.all_gather_object(everyone, result)
        if rank == 0:
            Path(where, "result.json").write_text(json.dumps(everyone))
    finally:
        dist.destroy_process_group()


def run_world(args: argparse.Namespace, world: int, home: str = "host") -> list[dict]:
    with tempfile.TemporaryDirectory() as where:
        mp.start_processes(_rank, args=(world, args, where, home), nprocs=world, join=True,
                           start_method="spawn")
        return json.loads(Path(where, "result.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--quant", default="int8", choices=["int8", "none"])
    p.add_argument("--attention", default="sla", choices=["sla", "original"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sp", default="1,2", help="comma-separated sizes")
    p.add_argument("--tokens", type=int, help="token count instead of --resolution/--frames")
    p.add_argument("--resolution", default="480p")
    p.add_argument("--aspect-ratio", dest="aspect_ratio", default="16:9")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--offload", help="place each rank's DiT with this offloadkit strategy")
    p.add_argument("--budget", default="auto", help="offloadkit budget with --offload")
    p.add_argument("--home", default="host", help="comma list of home tiers with --offload")
    p.add_argument("--json", help="write the record here")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sp.split(",")]
    record = {"preset": args.preset, "quant": args.quant, "attention": args.attention,
              "device": args.device, "threads_per_process": args.threads,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": os.uname().nodename,
              "torch": torch.__version__, "runs": {}}
    homes = args.home.split(",") if args.offload else ["host"]
    record.update(offload=args.offload, budget=args.budget if args.offload else None)
    base = None
    for n in sizes:
        for home in homes:
            if n == 1:
                torch.set_num_threads(args.threads)
                device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
                per_rank = [measure(args, device, home=home, key=f"bench-sp-{os.getpid()}")]
            else:
                per_rank = run_world(args, n, home)
            slowest = max(r["forward_s"] for r in per_rank)
            base = slowest if n == 1 and base is None else base
            row = {"forward_s": slowest, "per_rank": per_rank}
            if base is not None:
                row["speedup_vs_sp1"] = base / slowest
            if n in WAN22_PUBLISHED:
                row["wan22_published_speedup"] = WAN22_PUBLISHED[n]
            label = str(n) if not args.offload else f"{n}/{home}"
            record["runs"][label] = row
            a2a = max((r.get("a2a_ms_per_block", 0.0) for r in per_rank), default=0.0)
            memory = ""
            if args.offload:
                row["node_pss_gib"] = sum(r["pss_gib"] for r in per_rank)
                memory = (f", home {home}: node host memory {row['node_pss_gib']:.2f} GiB (PSS "
                          f"summed), stall {max(r['stall_s'] for r in per_rank):.3f} s/forward")
            print(f"sp={n}: {slowest:.3f} s/forward, x{row.get('speedup_vs_sp1', float('nan')):.2f} "
                  f"vs sp=1, all-to-all {a2a:.1f} ms/block, tokens {per_rank[0]['tokens']}{memory}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
