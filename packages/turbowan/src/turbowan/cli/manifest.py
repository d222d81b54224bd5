"""`turbowan manifest`: the keys, shapes and dtypes a preset's checkpoint must hold."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "manifest",
        help="print the expected key -> shape/dtype table of a preset (built on meta)",
        description="Build a preset on the meta device (no memory, no weights) and print "
        "every state-dict key with its shape and dtype, as the real checkpoint stores it.",
    )
    p.add_argument("--preset", required=True, help="e.g. wan2.2-i2v-a14b, tiny, umt5-xxl")
    p.add_argument("--quant", choices=["int8", "none"], help="DiT only (default int8)")
    p.add_argument("--attention", choices=["sla", "original"], help="DiT only (default sla)")
    p.add_argument("--naming", choices=["wan", "comfy"], help="umT5 only (default wan)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _default_options(preset: str) -> dict[str, str]:
    import inspect

    from turbowan.presets import family_module

    params = inspect.signature(family_module(preset).build_manifest_model).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and isinstance(p.default, str)
    }


def manifest_dict(preset: str, **options: str | None) -> dict:
    """The manifest as a JSON-ready dict (also used by tests and other tools)."""
    from turbowan.checkpoint.report import expected_specs

    opts = {k: v for k, v in options.items() if v is not None}
    specs = expected_specs(preset, **opts)
    opts = {**_default_options(preset), **opts}  # show what was built, defaults included
    tensors = {
        k: {"shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch.")}
        for k, s in specs.items()
    }
    return {
        "preset": preset,
        "options": opts,
        "num_tensors": len(specs),
        "num_elements": sum(s.numel for s in specs.values()),
        "bytes": sum(s.numel * s.dtype.itemsize for s in specs.values()),
        "tensors": tensors,
    }


def run(args: argparse.Namespace) -> int:
    try:
        data = manifest_dict(
            args.preset, quant=args.quant, attention=args.attention, naming=args.naming
        )
    except ValueError as exc:
        print(f"turbowan manifest: {exc}")
        return 2
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    width = max(len(k) for k in data["tensors"])
    for key, info in data["tensors"].items():
        shape = str(tuple(info["shape"]))
        print(f"{key:<{width}}  {shape:<18} {info['dtype']}")
    opts = ", ".join(f"{k}={v}" for k, v in sorted(data["options"].items())) or "no options"
    print(
        f"# {data['preset']} ({opts}): {data['num_tensors']} tensors, "
        f"{data['num_elements']:,} elements, {data['bytes']:,} bytes"
    )
    return 0
