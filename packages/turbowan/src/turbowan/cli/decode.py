"""`turbowan decode LATENTS -o OUT`: finish a run whose decoding failed or was deferred.

The latents file carries the run's settings (VAE, fps, quality, dtype); flags override them.
Latents from the embedded demo are decoded with the demo VAE unless --vae is given.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "decode",
        help="decode a .latents.safetensors file (from generate) into a video",
        description="Decode the latents `turbowan generate` saved (with --save-latents, or "
        "automatically when decoding failed) into a video file.",
    )
    p.add_argument("latents", help="the <output>.latents.safetensors file")
    p.add_argument("-o", "--output", help="video file (.mp4/.webm/.gif); default: beside the latents "
                   "file, with its name (clip.latents.safetensors -> clip.mp4)")
    p.add_argument("--vae", help="Wan2.1_VAE.pth; default: the VAE recorded in the latents file")
    p.add_argument("--fps", type=float, help="frame rate (default: as recorded, else 16)")
    p.add_argument("--quality", type=int, help="1..10 (default: as recorded, else 8)")
    p.add_argument("--offload", default="adaptive", help="offload strategy for the VAE")
    p.add_argument("--budget", default="auto", help="device memory for the VAE's weights")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: as recorded)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: as recorded")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; "
                   "1 for demo latents)")


def run(args: argparse.Namespace) -> int:
    from turbowan.cli.generate import cpu_threads
    from turbowan.pipeline.decode import decode_latents_file
    from turbowan.pipeline.latents_io import read_latents_settings

    try:
        # the header is enough to choose the thread count; the tensor is read once, below
        demo = bool(read_latents_settings(args.latents).get("demo")) and args.vae is None
        with cpu_threads(args.threads, demo):
            path, timings = decode_latents_file(
                args.latents, output=args.output, vae=args.vae, fps=args.fps,
                quality=args.quality, strategy=args.offload, budget=args.budget, device=args.device,
                dtype=args.dtype,
            )
    except ValueError as exc:
        print(f"turbowan decode: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("turbowan decode: interrupted; no video was written.", file=sys.stderr)
        return 130
    print(timings.summary(), file=sys.stderr)
    print(f"wrote {path}")
    return 0
