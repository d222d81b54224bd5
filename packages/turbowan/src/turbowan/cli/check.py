"""`turbowan check FILE`: validate a downloaded checkpoint without loading its tensors."""

from __future__ import annotations

import argparse
import json

EXIT_OK, EXIT_MISMATCH, EXIT_UNREADABLE = 0, 1, 2


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check",
        help="validate a checkpoint's keys/shapes/dtypes against a preset (header only)",
        description="Read only the header (safetensors) or a memory map (.pth, weights_only) "
        "and compare every key, shape and dtype with the preset. Exit 0: matches; "
        "1: does not match (report printed); 2: file unreadable (missing, truncated, unsafe).",
    )
    p.add_argument("file", help="checkpoint (.pth or .safetensors)")
    p.add_argument("--preset", help="expected preset; default: detect the closest one")
    p.add_argument("--quant", choices=["int8", "none"], help="DiT: insist on this layout")
    p.add_argument("--attention", choices=["sla", "original"], help="DiT: insist on this")
    p.add_argument("--naming", choices=["wan", "comfy"], help="umT5: insist on this naming")
    p.add_argument("--json", action="store_true", help="machine-readable report")


def run(args: argparse.Namespace) -> int:
    from turbowan.checkpoint.io import CheckpointReadError
    from turbowan.checkpoint.report import check_against_preset

    try:
        report = check_against_preset(
            args.file,
            args.preset,
            quant=args.quant,
            attention=args.attention,
            naming=args.naming,
        )
    except CheckpointReadError as exc:
        print(f"turbowan check: cannot read the file: {exc}")  # the error carries the fix
        return EXIT_UNREADABLE
    except ValueError as exc:
        print(f"turbowan check: {exc}")
        return EXIT_UNREADABLE
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.format())
    return EXIT_OK if report.ok else EXIT_MISMATCH
