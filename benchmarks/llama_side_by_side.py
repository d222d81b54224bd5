"""offloadkit beside accelerate and diffusers on a transformers Llama, in one process.

A LlamaForCausalLM with random weights from a config (default: 16 layers, hidden 512, GQA
8/4 heads, vocab 8192; about 230 MB fp32) runs one forward over a batch of tokens under:

    resident                  a plain copy, no offload (the noise floor: should be ~1.0)
    offloadkit layerwise      every layer streams from host RAM
    offloadkit adaptive 50%   budget = half the weight bytes
    offloadkit layerwise disk every layer streams from a safetensors file
    accelerate cpu_offload    on the decoder layers (the rest stays put, as with offloadkit)
    accelerate disk_offload   the same, weights in accelerate's offload folder
    diffusers group (layers)  apply_group_offloading(model.model, block_level, 1 per group)
    diffusers group (root)    the same on the LlamaForCausalLM itself: it has no block list
                              at the top, so diffusers makes the whole model one group

Timing is interleaved: every variant lives at once, and each round times the untouched
baseline copy and the variants alternately (baseline, v1, baseline, v2, baseline, ...; the
order rotates per round), so load from other processes hits all of them alike. The ratio is
the median over rounds of a variant's time over the mean of the two baseline runs beside it;
``fastest / fastest`` divides the variant's fastest run by the baseline's fastest (other jobs
only ever add time). Memory is measured while each variant is set up, before timing:
``peak RSS added`` is the process peak (Linux VmHWM, reset per variant) during building the
copy, setting the variant up and one forward, less the RSS before; ``RSS held`` is what the
variant still holds after that. Every output is compared bitwise with the baseline's.

On device ``cpu`` no PCIe is involved: offloadkit copies each streamed block into a slot (its
CUDA code path, with memcpy), while the peers' onload to ``cpu`` is a no-op ``.to("cpu")``
for host-resident weights; the CPU ratio measures each tool's own overhead, not transfer
hiding. Run on a GPU with ``--device cuda`` for that.

    python benchmarks/llama_side_by_side.py                  # markdown table on stdout
    python benchmarks/llama_side_by_side.py --rounds 7 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import offloadkit
from turbowan.bench import machine


@dataclass
class Variant:
    label: str
    setup: Callable[[torch.nn.Module, Path], Any]  # returns an offloadkit handle or None
    model: torch.nn.Module | None = None
    handle: Any = None
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def build_llama(layers: int, hidden: int, vocab: int, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def variants(device: str, budget_half: int) -> list[Variant]:
    dev = torch.device(device)

    def offload(strategy: str, budget: int | str, home: str = "host") -> Callable:
        def setup(model: torch.nn.Module, workdir: Path) -> Any:
            extra = {"disk_path": str(workdir / "weights.safetensors")} if home == "disk" else {}
            return offloadkit.apply(model, strategy, device=device, budget=budget, home=home,
                                    **extra)
        return setup

    def accelerate_cpu(model: torch.nn.Module, workdir: Path) -> None:
        from accelerate import cpu_offload

        model.to(dev)
        cpu_offload(model.model.layers, execution_device=dev, offload_buffers=True)

    def accelerate_disk(model: torch.nn.Module, workdir: Path) -> None:
        from accelerate import disk_offload

        model.to(dev)
        disk_offload(model.model.layers, str(workdir / "accelerate"), execution_device=dev,
                     offload_buffers=True)

    def diffusers_group(on_layers: bool) -> Callable:
        def setup(model: torch.nn.Module, workdir: Path) -> None:
            from diffusers.hooks import apply_group_offloading

            model.to(dev)
            apply_group_offloading(model.model if on_layers else model, onload_device=dev,
                                   offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1,
                                   use_stream=dev.type == "cuda")
        return setup

    def resident(model: torch.nn.Module, workdir: Path) -> None:
        model.to(dev)

    full = 1 << 50  # layerwise streams every layer whatever the budget
    return [
        Variant("resident (plain copy)", resident),
        Variant("offloadkit layerwise", offload("layerwise", full)),
        Variant("offloadkit adaptive 50%", offload("adaptive", budget_half)),
        Variant("offloadkit layerwise disk", offload("layerwise", full, home="disk")),
        Variant("accelerate cpu_offload", accelerate_cpu),
        Variant("accelerate disk_offload", accelerate_disk),
        Variant("diffusers group (layers)", diffusers_group(True)),
        Variant("diffusers group (root)", diffusers_group(False)),
    ]


def forward(model: torch.nn.Module, tokens: torch.Tensor, device: str) -> tuple[float, torch.Tensor]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=tokens).logits
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    baseline = build_llama(args.layers, args.hidden, args.vocab).to(args.device)
    total = weight_bytes(baseline)
    tokens = torch.randint(0, args.vocab, (1, args.tokens),
                           generator=torch.Generator().manual_seed(1)).to(args.device)
    forward(baseline, tokens, args.device)
    _, expected = forward(baseline, tokens, args.device)
    workroot = Path(tempfile.mkdtemp(prefix="llama-side-by-side-"))
    chosen = [v for v in variants(args.device, total // 2)
              if not args.only or any(k in v.label for k in args.only)]
    try:
        for v in chosen:  # set up one at a time, measuring memory
            workdir = workroot / v.label.replace(" ", "_").replace("%", "")
            workdir.mkdir()
            machine.release_freed_memory()
            rss_before = machine.current_rss_bytes() or 0
            machine.reset_peak_rss()
            start = time.perf_counter()
            v.model = copy.deepcopy(baseline)
            v.handle = v.setup(v.model, workdir)
            v.figures["setup_seconds"] = time.perf_counter() - start
            _, out = forward(v.model, tokens, args.device)
            v.figures["bit_equal"] = bool(torch.equal(out.cpu(), expected.cpu()))
            del out
            v.figures["peak_rss_added_bytes"] = (machine.peak_rss_bytes() or 0) - rss_before
            machine.release_freed_memory()
            v.figures["rss_held_bytes"] = (machine.current_rss_bytes() or 0) - rss_before
            if v.handle is not None:
                v.figures["before"] = v.handle.stats()
            print(f"set up {v.label}: {v.figures['setup_seconds']:.1f} s", flush=True)
        baseline_seconds: list[float] = []
        for r in range(args.rounds):  # interleaved: base, v1, base, v2, base, ... per round
            order = chosen[r % len(chosen):] + chosen[: r % len(chosen)]
            before = forward(baseline, tokens, args.device)[0]
            baseline_seconds.append(before)
            for v in order:  # each against the mean of the baseline runs on either side
                v.seconds.append(forward(v.model, tokens, args.device)[0])
                after = forward(baseline, tokens, args.device)[0]
                baseline_seconds.append(after)
                v.ratios.append(v.seconds[-1] / ((before + after) / 2))
                before = after
            print(f"round {r + 1}/{args.rounds}: baseline {before * 1e3:.0f} ms", flush=True)
        rows = [summarise(v, min(baseline_seconds)) for v in chosen]
    finally:
        for v in chosen:
            if v.handle is not None:
                v.handle.remove()
        shutil.rmtree(workroot, ignore_errors=True)
    return {
        "schema": "llama-side-by-side/1",
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/llama_side_by_side.py " + " ".join(args.argv),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average": os.getloadavg(), "device": args.device},
        "versions": versions(),
        "model": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
                  "weight_bytes": total, "tokens": args.tokens},
        "rounds": args.rounds,
        "baseline_seconds": baseline_seconds,
        "rows": rows,
    }


def summarise(v: Variant, fastest_baseline: float) -> dict[str, Any]:
    row = {"label": v.label, "median_ms": statistics.median(v.seconds) * 1e3,
           "min_ms": min(v.seconds) * 1e3,
           "ratio_to_resident": statistics.median(v.ratios),
           "min_ratio_to_resident": min(v.seconds) / fastest_baseline,
           "ratio_spread": [min(v.ratios), max(v.ratios)],
           **{k: val for k, val in v.figures.items() if k != "before"}}
    if v.handle is not None:
        before, after = v.figures["before"], v.handle.stats()
        forwards = max(1, after.forwards - before.forwards)
        row.update(resident_blocks=after.resident_blocks, streamed_blocks=after.streamed_blocks,
                   peak_device_bytes=after.peak_device_bytes,
                   moved_bytes_per_forward=(after.bytes_transferred
                                            - before.bytes_transferred) // forwards)
    return row


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("torch", "offloadkit", "transformers", "accelerate", "diffusers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def markdown(result: dict[str, Any]) -> str:
    mib = 2**20
    lines = ["| variant | median ms / forward | ratio to resident: median of pairs (range) | "
             "fastest / fastest | bit-equal | peak RSS added MiB | RSS held MiB | setup s | "
             "offloadkit blocks resident / streamed, MiB moved per forward |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        blocks = (f"{r['resident_blocks']} / {r['streamed_blocks']}, "
                  f"{r['moved_bytes_per_forward'] / mib:.0f}") if "streamed_blocks" in r else "-"
        lo, hi = r["ratio_spread"]
        lines.append(f"| {r['label']} | {r['median_ms']:.0f} | {r['ratio_to_resident']:.2f} "
                     f"({lo:.2f}-{hi:.2f}) | {r['min_ratio_to_resident']:.2f} | "
                     f"{'yes' if r['bit_equal'] else 'no'} | "
                     f"{r['peak_rss_added_bytes'] / mib:.0f} | {r['rss_held_bytes'] / mib:.0f} | "
                     f"{r['setup_seconds']:.1f} | {blocks} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="run the variants whose label has any of these")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    result = run(args)
    print(f"\n{result['model']}, {result['rounds']} rounds, {result['machine']}, "
          f"{result['versions']}\n")
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
