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
    p.add_argument("--full", action="store_true",
                   help="also read every tensor and report NaN/Inf values (reads the whole file)")


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
    non_finite = _scan(args.file) if args.full else {}
    if args.json:
        print(json.dumps({**report.to_dict(), **({"non_finite": non_finite} if args.full else {})},
                         indent=1))
    else:
        print(report.format())
        if args.full:
            print(_format_non_finite(args.file, non_finite))
    return EXIT_OK if report.ok and not non_finite else EXIT_MISMATCH


def _scan(path: str) -> dict[str, int]:
    from turbowan.finite import non_finite_tensors

    return non_finite_tensors(path)


def _format_non_finite(path: str, found: dict[str, int]) -> str:
    if not found:
        return f"{path}: every tensor is finite (full scan)"
    lines = [f"{path}: {len(found)} tensors hold NaN/Inf values (a damaged download or a broken "
             "fine-tune; such weights give a black video):"]
    lines += [f"  {key}: {count} non-finite values" for key, count in list(found.items())[:10]]
    if len(found) > 10:
        lines.append(f"  ... and {len(found) - 10} more")
    return "\n".join(lines)
