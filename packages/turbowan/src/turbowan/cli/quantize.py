"""`turbowan quantize IN OUT`: bf16 DiT checkpoint -> TurboWan int8 block-wise format."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="convert a bf16 DiT checkpoint into the int8 -quant format",
        description="Quantise the 10 linears of every block per 128x128 tile (scale = amax/128), "
        "leaving proj_l and everything outside the blocks as they are. The output format "
        "follows OUT's suffix (.pth or .safetensors).",
    )
    p.add_argument("input", help="bf16 (or fp32/fp16) DiT checkpoint, .pth or .safetensors")
    p.add_argument("output", help="where to write the int8 checkpoint (.pth or .safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from turbowan.checkpoint.io import CheckpointReadError
    from turbowan.quant.quantize import quantize_file

    try:
        counts = quantize_file(args.input, args.output, overwrite=args.force)
    except (CheckpointReadError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"turbowan quantize: {exc}")
        return 2
    print(
        f"wrote {args.output}: {counts['quantized_layers']} linears quantised to int8, "
        f"{counts['tensors_in']} -> {counts['tensors_out']} tensors, "
        f"{counts['bytes_out']:,} bytes"
    )
    return 0
