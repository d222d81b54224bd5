"""`turbowan generate` / `turbowan decode` as a user runs them (in-process, tiny sizes)."""

from __future__ import annotations

import pytest
import torch

from turbowan.cli.main import main
from turbowan.pipeline.video_io import read_video

SMALL = ["--frames", "5", "--width", "32", "--height", "16", "--steps", "2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_writes_the_video_and_says_it_is_noise(tmp_path, capsys):
    out = tmp_path / "sub" / "demo.mp4"
    assert main(["generate", "-o", str(out), *SMALL, "--seed", "7"]) == 0
    video = read_video(out)
    assert (video.num_frames, video.height, video.width) == (5, 16, 32)
    captured = capsys.readouterr()
    assert "embedded demo" in captured.err and "RANDOM weights" in captured.err
    assert "--high" in captured.err  # says how to point it at real checkpoints
    for stage in ("text encoder", "VAE encode", "sampling (high expert)", "VAE decode", "total"):
        assert stage in captured.err
    # each stage is announced as it starts, then the progress bar runs over the 2 steps
    announced = [line for line in captured.err.splitlines() if line.endswith(" ...")]
    assert announced == ["text encoder ...", "VAE encode ...", "VAE decode ...", "write video ..."]
    assert "2/2" in captured.err
    assert f"wrote {out} (5 frames, 32x16, 16 fps, seed 7)" in captured.out
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo.mp4"]


def test_bad_input_exits_2_before_any_work(tmp_path, capsys, monkeypatch):
    import turbowan.pipeline.demo

    def forbidden(*a, **k):
        raise AssertionError("demo weights written despite bad input")

    monkeypatch.setattr(turbowan.pipeline.demo, "write_demo_checkpoints", forbidden)
    assert main(["generate", "-o", str(tmp_path / "v.mp4"), "--frames", "80"]) == 2
    err = capsys.readouterr().err
    assert "frames must be 4n+1" in err and "77 or 81" in err
    assert main(["generate", "-o", str(tmp_path / "v.mkv")]) == 2
    assert "unknown video extension '.mkv'" in capsys.readouterr().err
    assert main(["generate", "-o", str(tmp_path / "v.mp4"), "--offload", "nope"]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    assert main(["generate", "-o", str(tmp_path / "v.mp4"), "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert torch.get_num_threads() == 1  # the command restored the caller's thread count


def test_some_but_not_all_checkpoints(tmp_path, capsys):
    ckpt = tmp_path / "high.pth"
    assert main(["generate", "--high", str(ckpt), "--image", "x.png", "-o", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err
    assert "--vae is required" in err and "--text-encoder is required" in err
    assert "high.pth' does not exist" in err


def test_ctrl_c_while_sampling_leaves_nothing(tmp_path, capsys, monkeypatch):
    from turbowan.pipeline import i2v

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(i2v, "rcm_sample", interrupted)
    out = tmp_path / "v.mp4"
    assert main(["generate", "-o", str(out), *SMALL]) == 130
    assert "interrupted; no video was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_decode_rejects_other_files(tmp_path, capsys):
    other = tmp_path / "x.safetensors"
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert main(["decode", str(other), "-o", str(tmp_path / "v.mp4")]) == 2
    assert "not a turbowan latents file" in capsys.readouterr().err
    assert main(["decode", str(tmp_path / "missing.latents.safetensors")]) == 2


def test_decode_bad_device_is_a_clear_error_without_a_recorded_dtype(tmp_path, capsys):
    from turbowan.pipeline.latents_io import read_latents_settings, save_latents

    settings = {"output": str(tmp_path / "v.mp4"), "demo": True, "vae": "demo"}
    path = save_latents(tmp_path / "v.latents.safetensors", torch.zeros(1, 16, 1, 2, 2), settings)
    assert read_latents_settings(path) == settings
    assert main(["decode", str(path), "--device", "tpu"]) == 2
    assert "'tpu'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.latents.safetensors"]


@pytest.mark.parametrize("flag", ["--help"])
def test_help_lists_the_upstream_flags(flag, capsys):
    with pytest.raises(SystemExit):
        main(["generate", flag])
    text = capsys.readouterr().out
    for name in ("--image", "--prompt", "--high", "--low", "--vae", "--text-encoder", "--tokenizer",
                 "--frames", "--resolution", "--aspect-ratio", "--width", "--height", "--steps",
                 "--sigma-max", "--boundary", "--seed", "--ode", "--attention", "--sla-topk",
                 "--offload", "--budget", "--device", "--fps", "--quality", "--resize",
                 "--save-latents", "-o"):
        assert name in text


def test_the_parser_imports_neither_torch_nor_offloadkit():
    """`turbowan --help` and a mistyped flag answer at once: building the parser imports
    argparse-level modules only (it once imported torch through offloadkit and the
    distributed flags: 2.3 s instead of 0.1 s)."""
    import subprocess
    import sys

    code = ("import sys; from turbowan.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'offloadkit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_parsers_home_tiers_are_offloadkits():
    import offloadkit
    from turbowan.cli import generate

    assert generate.HOME_TIERS == offloadkit.HOME_TIERS
