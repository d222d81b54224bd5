"""``offloadkit`` command line: what strategies are installed, how much memory a device has."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence

import torch

from offloadkit import registry
from offloadkit.budget import format_bytes
from offloadkit.errors import OffloadError
from offloadkit.probe import DeviceMemory, probe


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 offloadkit error, 2 usage error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except OffloadError as exc:
        print(f"offloadkit: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `offloadkit list --json | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    from offloadkit import __version__

    parser = argparse.ArgumentParser(
        prog="offloadkit",
        description="Stream model weights to the device block by block; inspect the setup.",
    )
    parser.add_argument("--version", action="version", version=f"offloadkit {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    listing = commands.add_parser(
        "list", help="installed strategies, the plugin each comes from, and what it does"
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=_run_list)

    memory = commands.add_parser("probe", help="total and free memory of a device")
    memory.add_argument(
        "--device",
        help="cpu, cuda or cuda:N (default: host RAM and every CUDA device)",
    )
    memory.add_argument("--json", action="store_true", help="machine-readable output")
    memory.set_defaults(run=_run_probe)
    return parser


def _run_list(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", registry.PluginLoadWarning)
        records = registry.strategy_records()
        failures = registry.plugin_failures()
    if args.json:
        payload = {
            "strategies": [
                {
                    "name": r.name,
                    "plugin": r.plugin,
                    "distribution": r.distribution,
                    "builtin": r.builtin,
                    "description": r.description,
                }
                for r in records
            ],
            "failed_plugins": [
                {
                    "plugin": f.plugin,
                    "distribution": f.distribution,
                    "error": f"{type(f.error).__name__}: {f.error}",
                }
                for f in failures
            ],
        }
        print(json.dumps(payload, indent=2))
    else:
        rows = [(r.name, _plugin_label(r), r.description) for r in records]
        _print_table(("STRATEGY", "PLUGIN", "DESCRIPTION"), rows)
    for warning in caught:
        if issubclass(warning.category, registry.PluginLoadWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
    return 0


def _run_probe(args: argparse.Namespace) -> int:
    if args.device is not None:
        memories = [probe(args.device)]
    else:
        cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        memories = [probe("cpu"), *(probe(d) for d in cuda)]
    if args.json:
        print(json.dumps([m.to_dict() for m in memories], indent=2))
    else:
        _print_table(
            ("DEVICE", "NAME", "TOTAL", "FREE", "SOURCE"), [_memory_row(m) for m in memories]
        )
    return 0


def _memory_row(memory: DeviceMemory) -> tuple[str, ...]:
    return (
        memory.device,
        memory.name,
        format_bytes(memory.total_bytes),
        format_bytes(memory.free_bytes),
        memory.source,
    )


def _plugin_label(record: registry.StrategyRecord) -> str:
    return "offloadkit (built-in)" if record.builtin else f"{record.plugin} ({record.distribution})"


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
        print("  ".join(cells).rstrip())


if __name__ == "__main__":
    sys.exit(main())
