"""Faults a real `turbowan generate` process meets: SIGTERM/SIGHUP act like Ctrl-C; a full
disk (a file-size limit) or exhausted memory (an address-space limit) end in one message naming
the stage and the fix, never in an abort or a traceback.

The child runs the real CLI; the only test addition is a *gate* (a wait at one point of the run,
announced on stderr) so the signal lands at a known stage instead of racing the run. Each run is
a fork of one server process that imported torch and turbowan once (tests/turbowan/
process_server.py): the run is still its own process with its own signal handlers, limits, exit
and clean-up.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from process_server import run_cli

from turbowan.pipeline.latents_io import load_latents

SMALL = ["--frames", "5", "--width", "64", "--height", "64", "--home", "disk"]


def leftovers(tmpdir: Path) -> list[str]:
    """turbowan's and offloadkit's temporary files (torch's own caches are not ours)."""
    return sorted(p.name for p in tmpdir.iterdir() if p.name.startswith(("offloadkit-", "turbowan-")))


def test_sigterm_after_sampling_keeps_latents_and_removes_temporaries(server, tmp_path):
    out = tmp_path / "out" / "clip.mp4"
    rc, err, tmpdir = run_cli(server, tmp_path, ["generate", *SMALL, "-o", str(out)],
                              gate="decode", send=signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err
    latents_file = out.with_name("clip.latents.safetensors")
    assert latents_file.is_file(), err
    latents, settings = load_latents(latents_file)
    assert tuple(latents.shape) == (1, 16, 2, 8, 8) and settings["frames"] == 5
    assert f"turbowan decode {latents_file}" in err
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == [latents_file.name]  # no .partial video
    assert leftovers(tmpdir) == []  # the demo's files and both disk tiers are gone
    assert "Traceback" not in err


def test_sighup_while_the_low_expert_stages_stops_the_thread_and_cleans_up(server, tmp_path):
    out = tmp_path / "out" / "clip.mp4"
    rc, err, tmpdir = run_cli(server, tmp_path, ["generate", *SMALL, "-o", str(out)],
                              gate="staging", send=signal.SIGHUP)
    assert rc == 128 + signal.SIGHUP, err
    assert "interrupted" in err and "Traceback" not in err and "terminate called" not in err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # sampling never finished
    assert leftovers(tmpdir) == []  # the half-written disk tier of the low expert too


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    """Real-format checkpoints and a start image, written once here."""
    from PIL import Image

    from turbowan.pipeline.demo import write_demo_checkpoints

    root = tmp_path_factory.mktemp("real")
    image = root / "start.png"
    Image.new("RGB", (64, 64), (200, 120, 40)).save(image)
    return write_demo_checkpoints(root / "ckpt"), image


def real_format_args(real_files, *extra: str) -> list[str]:
    """`generate` on checkpoints written beforehand (nothing large is written during the run)."""
    from turbowan.text_encoder.tokenizer import DEMO_TOKENIZER

    files, image = real_files
    return ["generate", "--high", str(files.high), "--low", str(files.low), "--vae", str(files.vae),
            "--text-encoder", str(files.text_encoder), "--tokenizer", str(DEMO_TOKENIZER),
            "--image", str(image), "--device", "cpu", "--threads", "1", *SMALL, *extra]


def test_full_tmpdir_with_disk_home_is_one_message_not_an_abort(server, tmp_path, real_files):
    out = tmp_path / "out" / "clip.mp4"
    args = real_format_args(real_files, "-o", str(out))
    rc, err, tmpdir = run_cli(server, tmp_path, args, fsize=256 * 1024)
    assert rc == 1, err
    assert "the disk is full or a file-size limit was reached" in err, err
    assert "--home host" in err and "sampling (high expert)" in err
    assert "Traceback" not in err and "terminate called" not in err
    assert leftovers(tmpdir) == []


def test_full_disk_after_sampling_reports_both_failures_in_one_message(server, tmp_path, real_files):
    """The video cannot be written and the latents rescue cannot either: one message, no
    second traceback from inside the rescue."""
    out = tmp_path / "out" / "clip.mp4"
    args = real_format_args(real_files, "--steps", "2", "-o", str(out))  # the high expert only
    args[args.index("disk")] = "host"  # nothing written before the video
    rc, err, _ = run_cli(server, tmp_path, args, fsize=2048)
    assert rc == 1, err
    assert "sampling finished but write video: the disk is full" in err, err
    assert "the sampled latents could not be kept: saving the latents: the disk is full" in err
    assert "Traceback" not in err and "SafetensorError" not in err.split("(")[0]
    assert not out.exists() and not list(out.parent.glob(".*partial*"))


def test_host_memory_exhausted_in_vae_encode_is_one_line(server, tmp_path):
    # within the family's bounds (4093 frames, 2560x1440) but a 181 GB pixel clip
    args = ["generate", "--frames", "4093", "--width", "2560", "--height", "1440",
            "-o", str(tmp_path / "big.mp4")]
    rc, err, tmpdir = run_cli(server, tmp_path, args, address_space=24 << 30)
    assert rc == 1, err
    lines = [line for line in err.splitlines() if line.startswith("turbowan generate: error")]
    assert len(lines) == 1, err
    assert "VAE encode: out of host memory" in lines[0] and "lower --frames" in lines[0]
    assert "Traceback" not in err
    assert leftovers(tmpdir) == []
