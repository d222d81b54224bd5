"""`turbowan generate`: start image + prompt -> video file. No model paths: the embedded demo.

Flags follow the upstream `wan2.2_i2v_infer.py` where it makes sense (--image, --prompt,
--frames, --resolution, --aspect-ratio, --steps, --sigma-max, --boundary, --seed, --ode,
--attention, --sla-topk). Every input is checked before anything is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from turbowan.cli.parallel_flags import add_arguments as add_distributed_arguments
from turbowan.dit.config import ATTENTION_CHOICES

#: offloadkit.HOME_TIERS, written out so the parser does not import offloadkit (and torch);
#: a test keeps the two equal
HOME_TIERS = ("pinned", "host", "disk", "shared")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="image-to-video; with no model paths, runs the embedded demo on the CPU",
        description="Generate a video from a start image and a prompt with TurboWan2.2-I2V-A14B. "
        "Without --high/--low/--vae/--text-encoder it runs the embedded demo (tiny models, "
        "random weights: the video is noise) so you can see the whole pipeline run in seconds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--image", help="start image (PNG/JPEG/WebP); demo: a built-in drawing")
    io.add_argument("--prompt", help="text prompt; demo: a built-in prompt")
    io.add_argument("-o", "--output", default="out/video.mp4",
                    help="video file: .mp4 (H.264), .webm (VP9) or .gif (looping)")
    io.add_argument("--fps", type=float, default=16, help="frame rate (Wan is trained at 16)")
    io.add_argument("--quality", type=int, default=8, help="1 (small file) .. 10 (near lossless)")
    io.add_argument("--batch", metavar="FILE.jsonl",
                    help="many videos, one JSON object a line (image, prompt, seed, output, "
                    "frames, ...; what a line leaves out comes from these flags); the models "
                    "load once")
    io.add_argument("--save-latents", action="store_true",
                    help="also keep <output>.latents.safetensors (always kept if decoding fails)")
    io.add_argument("--vae-tiling", dest="vae_tiling", action="store_true",
                    help="decode in overlapping spatial tiles: far less device memory for the "
                    "VAE at 720p, pixels close to (not equal to) an untiled decode")
    io.add_argument("--vae-tile", dest="vae_tile", type=int, default=256,
                    help="tile size in pixels with --vae-tiling (multiple of 8; 720p: 7x4 tiles)")
    io.add_argument("--vae-overlap", dest="vae_overlap", type=int, default=64,
                    help="pixels blended at each seam with --vae-tiling (multiple of 8)")

    models = p.add_argument_group("checkpoints (all or none; none = embedded demo)")
    models.add_argument("--high", help="high-noise expert, e.g. TurboWan2.2-I2V-A14B-high-720P-quant.pth")
    models.add_argument("--low", help="low-noise expert, e.g. TurboWan2.2-I2V-A14B-low-720P-quant.pth")
    models.add_argument("--vae", help="Wan2.1_VAE.pth (or wan_2.1_vae.safetensors)")
    models.add_argument("--text-encoder", dest="text_encoder",
                        help="models_t5_umt5-xxl-enc-bf16.pth or a umt5_xxl *.safetensors")
    models.add_argument("--tokenizer", help="umT5 tokenizer: spiece.model, tokenizer.json or their "
                        "folder (default: found next to the text encoder)")

    lora = p.add_argument_group("LoRA (repeatable; FILE or FILE:STRENGTH, strength default 1)")
    lora.add_argument("--lora", action="append", default=[], metavar="FILE[:S]",
                      help="a LoRA for both experts (.safetensors; ComfyUI/PEFT, kohya/musubi "
                      "or diffusers naming)")
    lora.add_argument("--lora-high", dest="lora_high", action="append", default=[],
                      metavar="FILE[:S]", help="a LoRA for the high-noise expert only")
    lora.add_argument("--lora-low", dest="lora_low", action="append", default=[],
                      metavar="FILE[:S]", help="a LoRA for the low-noise expert only")

    video = p.add_argument_group("video")
    video.add_argument("--frames", type=int, help="4n+1 frames (default 81; demo 17)")
    video.add_argument("--resolution", help="480, 480p, 512, 720 or 720p (default 720p; demo 128x128)")
    video.add_argument("--aspect-ratio", dest="aspect_ratio", help="16:9, 9:16, 4:3, 3:4 or 1:1 (default 16:9)")
    video.add_argument("--width", type=int, help="explicit width, a multiple of 16 (with --height)")
    video.add_argument("--height", type=int, help="explicit height, a multiple of 16 (with --width)")
    video.add_argument("--resize", choices=["crop", "stretch"], default="crop",
                       help="fit the image: centre-crop to the aspect (no distortion) or stretch")

    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, default=4, help="rCM steps, 1-4")
    sampling.add_argument("--sigma-max", dest="sigma_max", type=float, default=200.0,
                          help="initial sigma (I2V default 200)")
    sampling.add_argument("--boundary", type=float, default=0.9,
                          help="switch to the low-noise expert when t_rf drops below this")
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--ode", action="store_true", help="deterministic ODE steps instead of SDE")
    sampling.add_argument("--attention", choices=ATTENTION_CHOICES, default="sla")
    sampling.add_argument("--sla-topk", dest="sla_topk", type=float,
                          help="share of key blocks SLA keeps (default 0.1; demo 0.5)")

    place = p.add_argument_group("placement (offloadkit)")
    place.add_argument("--offload", default="adaptive",
                       help="offload strategy (see `offloadkit list`)")
    place.add_argument("--budget", default="auto",
                       help="device memory for weights: auto, 12GiB, 500MB, 80%% or bytes")
    place.add_argument("--home", choices=HOME_TIERS, default=None,
                       help="where the DiT experts' streamed weights live: host RAM (pinned up "
                       "to half the free RAM on CUDA), pinned (all page-locked: fastest uploads), "
                       "disk (a temporary file in $TMPDIR: least host RAM), or shared (one copy "
                       "per node in /dev/shm that every rank maps). Default: shared when "
                       "torchrun starts several processes on this node, else host")
    place.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if present; demo: cpu)")
    place.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                       help="compute dtype (default bf16 on CUDA, fp32 on CPU)")
    place.add_argument("--threads", type=int,
                       help="CPU threads for torch (default: torch's choice; demo: 1, because "
                       "its tiny tensors gain nothing from more and busy cores make them slower)")
    add_distributed_arguments(p)


class _Progress:
    """Stage announcements on stderr, and a tqdm bar over the sampling steps that starts
    when sampling starts (so its rate is not skewed by the text encoder and VAE)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar = None
        self.current = "setting up"  # the stage an error is reported in

    def on_stage(self, name: str) -> None:
        self.current = name
        if name.startswith("sampling"):
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc="sampling", unit="step", file=sys.stderr)
            return
        self.close()
        print(f"{name} ...", file=sys.stderr, flush=True)

    def on_step(self, info) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{info.expert} expert, t={info.t:.3f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def cpu_threads(requested: int | None, demo: bool) -> Iterator[None]:
    """Set torch's CPU thread count for this command, restore it after."""
    import torch

    before = torch.get_num_threads()
    wanted = requested if requested is not None else (1 if demo else None)
    if wanted is not None:
        if wanted < 1:
            raise ValueError(f"--threads must be at least 1, got {wanted}")
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_home() -> str:
    """One copy of the experts per node when torchrun runs several processes here (eight
    private copies of two 14B experts would not fit most hosts), else host RAM (and on
    Windows, which has no file locks for the shared tier)."""
    from offloadkit import shared_home_supported
    from turbowan.distributed.context import LaunchEnv

    return "shared" if LaunchEnv.read().local_world > 1 and shared_home_supported() else "host"


def settings_from_args(args: argparse.Namespace):
    """The command line as one :class:`RunSettings` (the whole run: pre-flight checks it all)."""
    from turbowan.pipeline.settings import RunSettings

    return RunSettings(
        high=args.high, low=args.low, vae=args.vae, text_encoder=args.text_encoder,
        tokenizer=args.tokenizer, strategy=args.offload, budget=args.budget, device=args.device,
        dtype=args.dtype, home=args.home or default_home(), threads=args.threads, attention=args.attention,
        sla_topk=args.sla_topk, vae_tiling=args.vae_tiling, vae_tile=args.vae_tile,
        vae_overlap=args.vae_overlap, image=args.image, prompt=args.prompt, frames=args.frames,
        resolution=args.resolution, aspect_ratio=args.aspect_ratio, width=args.width,
        height=args.height, resize=args.resize, steps=args.steps, sigma_max=args.sigma_max,
        boundary=args.boundary, seed=args.seed, ode=args.ode, output=args.output, fps=args.fps,
        quality=args.quality, save_latents=args.save_latents,
        # (FILE[:S], expert): parsed by pre-flight, which reports a bad one with the rest
        loras=tuple((text, expert) for expert, texts in (
            ("both", args.lora), ("high", args.lora_high), ("low", args.lora_low))
            for text in texts),
    )


def run(args: argparse.Namespace) -> int:
    from turbowan.distributed import cli as dist_cli
    from turbowan.pipeline.i2v import DecodeFailedError, DecodeInterrupted, I2VPipeline
    from turbowan.pipeline.preflight import PreflightError
    from turbowan.pipeline.settings import ROLES
    from turbowan.resource_errors import describe_resource_error
    from turbowan.sampler.rcm import MAX_STEPS

    demo = all(getattr(args, role) is None for role in ROLES)
    problems = dist_cli.check(args, demo, gpus=args.gpus)  # before anything is read
    leader = dist_cli.LaunchEnv.read().rank == 0  # until the groups form
    if problems:
        if leader:  # the same refusal on every rank: say it once
            print(f"turbowan generate: error: {PreflightError(problems)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.gpus is not None:
        return dist_cli.relaunch(args.gpus, getattr(args, "argv", sys.argv[1:]))
    dist_cli.adjust_args(args)
    settings = settings_from_args(args)
    progress = _Progress(0)  # one per video below; its stage names a resource error
    try:
        if demo and leader:
            print("turbowan: no checkpoints given, running the embedded demo.", file=sys.stderr)
            from turbowan.pipeline.demo import NOISE_NOTICE

            print(NOISE_NOTICE, file=sys.stderr)
        # every problem of the run in one round; with --batch the lines are checked below
        pipe = I2VPipeline(settings, whole_run=args.batch is None)
        jobs = _jobs(args)
        for job in jobs:  # every video's inputs, before anything loads
            pipe.check_inputs(**job)
        from turbowan.pipeline.timings import Timings

        pipe.parallel = parallel = dist_cli.join(args, pipe.device)  # loads nothing
        leader = dist_cli.is_leader(parallel)
        if parallel is not None:
            from turbowan.pipeline.batch import share

            jobs = share(jobs, parallel.group_index, parallel.groups)
        for job in jobs:
            steps = job.get("steps", args.steps)
            progress = _Progress(steps if isinstance(steps, int) and 1 <= steps <= MAX_STEPS
                                  and leader else 0)
            try:
                with cpu_threads(settings.threads, demo):
                    result = pipe.generate(
                        callback=progress.on_step,
                        timings=Timings(on_start=progress.on_stage if leader else None), **job)
                spread = dist_cli.stage_spread(parallel, result.timings) if parallel else None
            finally:
                progress.close()
            if leader:
                _report(result, spread, parallel, demo)
    except (PreflightError, ValueError) as exc:
        print(f"turbowan generate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DecodeInterrupted as exc:
        print(f"turbowan generate: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("turbowan generate: interrupted; no video was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DecodeFailedError as exc:
        print(f"turbowan generate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and dist_cli.is_lost_peer(exc):
            print(f"turbowan generate: {dist_cli.lost_peer_message(exc)}", file=sys.stderr)
            return EXIT_FAILED
        # a full disk, exhausted memory, or a file that vanished after the checks
        message = describe_resource_error(exc, progress.current)
        if message is None and not isinstance(exc, OSError):
            raise
        print(f"turbowan generate: error: {message or exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        dist_cli.shutdown()
    return EXIT_OK


def _jobs(args: argparse.Namespace) -> list[dict]:
    """generate() arguments of each video: none over the flags, or each line of --batch."""
    from turbowan.pipeline.batch import read_batch

    return [{}] if args.batch is None else read_batch(args.batch, {"output": args.output})


def _report(result, spread, parallel, demo: bool) -> None:
    """The leader's account of one video: timing table, per-rank spread, files written."""
    from turbowan.distributed.pipeline import spread_summary

    s = result.settings
    print(result.timings.summary(device=s["device"]), file=sys.stderr)
    if spread:
        print(spread_summary(spread, parallel.sp.size), file=sys.stderr)
    if result.latents_path is not None:
        print(f"latents: {result.latents_path}", file=sys.stderr)
    print(f"wrote {result.output} ({s['frames']} frames, {s['width']}x{s['height']}, "
          f"{s['fps']:g} fps, seed {s['seed']})")
    if demo:
        print("(demo weights are random: the video is noise; see `turbowan generate --help` "
              "for real checkpoints)")
