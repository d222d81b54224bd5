"""`turbowan generate` in several processes: torchrun end to end (two launchers, two groups)
against one process, a killed rank (ranks forked from tests/turbowan/worlds.py, no launcher),
the refusals made before anything loads, and `--gpus` handing over to torchrun's launcher."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from worlds import RankExit, run_world

from turbowan.cli.main import main
from turbowan.distributed.context import LaunchEnv
from turbowan.distributed.preflight import launch_problems
from turbowan.pipeline.i2v import I2VPipeline
from turbowan.pipeline.latents_io import load_latents
from turbowan.pipeline.video_io import read_video, to_uint8_frames

SMALL = ["--frames", "5", "--width", "64", "--height", "64"]  # the VAE dominates the demo
A14B_HEADS = 40
TILES = ["--vae-tile", "32", "--vae-overlap", "16"]  # 3 x 3 tiles of the 64 x 64 demo


@pytest.fixture(scope="module")
def demo_reference(one_torch_thread):
    """The one-process demo the multi-process runs are compared with (default seed and
    prompt; tiled decode, as --vae-parallel runs it), and its pipeline."""
    pipe = I2VPipeline.demo(vae_tiling=True, vae_tile=32, vae_overlap=16)
    return pipe, pipe.generate(frames=5, width=64, height=64)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shared_copies() -> set[str]:
    from offloadkit.engine.shared import PREFIX, default_dir

    return {n for n in os.listdir(default_dir()) if n.startswith(PREFIX + "turbowan-")}


def test_torchrun_two_launchers_two_groups_write_the_one_process_videos(tmp_path,
                                                                        demo_reference):
    """End to end under torchrun, one run for every launcher check (each launch costs
    seconds): two launchers (`--nnodes 2` on loopback, a c10d rendezvous on 127.0.0.1) of
    `--nproc-per-node 2` each make a world of 4, cut into 2 groups of `--sp 2`; each group
    makes its --batch line with --vae-parallel, and its leader alone writes and reports."""
    import json

    (tmp_path / "jobs.jsonl").write_text(
        json.dumps({"output": "a.mp4"}) + "\n\n"
        + json.dumps({"seed": 7, "output": "b.mp4", "prompt": "a boat"}) + "\n")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    shm_before = _shared_copies()
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n),
         "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-id", "turbowan-test",
         "--rdzv-endpoint", f"127.0.0.1:{port}", "--master-addr", "127.0.0.1",
         "-m", "turbowan", "generate", "--sp", "2", "--vae-parallel", *TILES,
         "--batch", "jobs.jsonl", "--save-latents", *SMALL],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for n in (0, 1)]
    try:
        outs = [p.communicate(timeout=150) for p in launchers]
    finally:
        for p in launchers:
            p.kill()
    assert [p.returncode for p in launchers] == [0, 0], [o[1][-3000:] for o in outs]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.latents.safetensors", "a.mp4", "b.latents.safetensors", "b.mp4", "jobs.jsonl"]
    written = "".join(o[0] for o in outs)
    assert written.count("wrote a.mp4") == 1 and written.count("wrote b.mp4") == 1
    tables = "".join(o[1] for o in outs).split("per-rank seconds over the 2 ranks")
    assert len(tables) == 3 and all("sampling (low expert)" in t for t in tables[1:])
    # two processes per launcher: the experts default to one mapped copy (--home shared),
    # and no copy outlives the run
    stages = "".join(o[1] for o in outs).splitlines()
    lows = [line for line in stages if line.lstrip().startswith("sampling (low expert)")
            and "packed (" in line]
    assert len(lows) == 2 and all("packed (shared)" in line for line in lows), lows
    assert _shared_copies() == shm_before

    pipe, ref = demo_reference
    b = pipe.generate(prompt="a boat", seed=7, frames=5, width=64, height=64, decode=False)
    for name, seed, expect in (("a", ref.settings["seed"], ref), ("b", 7, b)):
        latents, settings = load_latents(tmp_path / f"{name}.latents.safetensors")
        assert settings["seed"] == seed
        assert (settings["vae_tiling"], settings["vae_tile"]) == (True, 32)  # --vae-parallel's
        # 4 dual-expert steps with 1 head per rank: the fp32 sums run in another order
        assert (latents - expect.latents).abs().max() <= 1e-5, name
        video = read_video(tmp_path / f"{name}.mp4")
        assert (video.num_frames, video.width, video.height) == (5, 64, 64)
    frames = to_uint8_frames(pipe.decode(load_latents(tmp_path / "a.latents.safetensors")[0]))
    assert np.abs(frames.astype(int) - ref.frames.astype(int)).max() <= 1  # within 1 LSB


@pytest.mark.parametrize("kwargs,expect", [
    (dict(sp=3, gpus=None, env=LaunchEnv(world=3)),
     "--sp 3 does not divide the model's 40 attention heads; valid sizes: 1, 2, 4, 5, 8, 10, 20, 40"),
    (dict(sp=4, gpus=None, env=LaunchEnv(world=6)),
     "6 processes cannot form groups of --sp 4"),
    (dict(sp=None, gpus=2, env=LaunchEnv(world=2)), "already runs under a launcher"),
    (dict(sp=2, gpus=None, env=LaunchEnv(world=4)),
     "4 processes with --sp 2 form 2 groups, each making its own videos: pass --batch"),
])
def test_launch_refusals(kwargs, expect):
    problems = launch_problems(num_heads=A14B_HEADS, device_type="cpu", device_count=0, **kwargs)
    assert any(expect in p for p in problems), problems


def test_local_rank_beyond_the_devices_is_refused():
    env = LaunchEnv(world=4, rank=3, local_rank=3, local_world=4)
    problems = launch_problems(sp=4, gpus=None, env=env, num_heads=A14B_HEADS,
                               device_type="cuda", device_count=2)
    assert problems == ["LOCAL_RANK 3 but this machine has 2 CUDA device(s): start at most 2 "
                        "processes per node (torchrun --nproc-per-node)"]


def _demo_files(tmp_path):
    from turbowan.pipeline.demo import write_demo_checkpoints

    return write_demo_checkpoints(tmp_path / "models")


def test_cli_refuses_before_loading(tmp_path, monkeypatch, capsys):
    """Real (demo-format) checkpoints: the head count comes from the DiT header; the load
    functions are made to fail, so a refusal that loaded anything would show."""
    files = _demo_files(tmp_path)
    import turbowan.dit.loading

    monkeypatch.setattr(turbowan.dit.loading, "load_dit", lambda *a, **k: pytest.fail("loaded"))
    real = ["--high", str(files.high), "--low", str(files.low), "--vae", str(files.vae),
            "--text-encoder", str(files.text_encoder), "--tokenizer", "demo"]
    for env, extra, expect in (
        ({"WORLD_SIZE": "4"}, ["--sp", "4"], "--sp 4 does not divide the model's 2 attention "
                                             "heads; valid sizes: 1, 2"),
        ({"WORLD_SIZE": "2"}, ["--gpus", "2"], "already runs under a launcher (WORLD_SIZE=2)"),
        ({}, ["--sp", "2"], "--sp 2 needs 2 processes: start them with torchrun"),
    ):
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert main(["generate", *real, "--image", "x.png", *extra]) == 2
        assert expect in capsys.readouterr().err


def test_gpus_hands_over_to_torchrun(monkeypatch):
    """--gpus N runs torchrun's own entry point with this command line minus --gpus."""
    import torch.distributed.run as torchrun

    seen = {}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torchrun, "run", lambda launch: seen.setdefault("launch", launch))
    assert main(["generate", "--gpus", "2", "--seed", "5", "-o", "x.mp4"]) == 0
    launch = seen["launch"]
    assert (launch.nproc_per_node, launch.standalone, launch.module) == ("2", True, True)
    assert [launch.training_script, *launch.training_script_args] == [
        "turbowan", "generate", "--seed", "5", "-o", "x.mp4"]
    assert torch.distributed.is_initialized() is False


def _cli_rank(rank: int, world: int, argv: list[str], port: int, where: str) -> int:
    """One rank of `turbowan generate` as a launcher starts it (torchrun's variables, a TCP
    rendezvous on loopback), its output to files; rank 1 samples its first video, then
    SIGKILLs itself where it would sample the second, as a crashed GPU process (or the
    kernel's OOM killer) would end it."""
    import signal

    from turbowan.cli.main import main
    from turbowan.pipeline import i2v

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for fd, name in ((1, "out"), (2, "err")):
        os.dup2(os.open(os.path.join(where, f"rank{rank}.{name}"),
                        os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.chdir(where)
    if rank == 1:
        real, calls = i2v.I2VPipeline.sample, []

        def sample(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *args, **kwargs)

        i2v.I2VPipeline.sample = sample
    code = main(["generate", *argv])
    sys.stdout.flush()
    sys.stderr.flush()
    return code, "torch._dynamo" in sys.modules


def test_a_killed_rank_ends_the_run_with_an_error(tmp_path, demo_reference):
    """Two ranks of the real CLI with --sp 2 (one group of the whole world) and a batch of
    two videos; rank 1 is SIGKILLed where it should sample the second. No launcher tears the
    run down here (as none does for the ranks on another machine): rank 0, in its first
    all-to-all, loses its peer and stops with turbowan's error, well within the collective
    timeout, instead of a silent hang. The first video is written, the second is not. A rank
    that hangs instead is ended by the collective timeout (test_distributed_dit)."""
    import json
    import time

    (tmp_path / "jobs.jsonl").write_text("{}\n" + json.dumps({"seed": 7}) + "\n")
    start = time.monotonic()
    codes = run_world(_cli_rank, 2, tmp_path,
                      ["--sp", "2", "--dist-timeout", "60", "--batch", "jobs.jsonl", "-o",
                       "v.mp4", "--save-latents", "--vae-parallel", *TILES, *SMALL],
                      _free_port(), str(tmp_path), init=False, exits_ok=True, timeout=120)
    assert codes == [(1, False), RankExit(-9)]  # rank 0: EXIT_FAILED; rank 1: SIGKILLed
    # (False: a run never imported torch._dynamo, 3 s per process; pre-flight's meta umT5 did)
    assert time.monotonic() - start < 60  # the peer's loss, not the timeout, ended rank 0
    err = (tmp_path / "rank0.err").read_text()
    assert "turbowan generate: error on rank 0: lost contact with another process of the run" \
        in err, err
    assert (tmp_path / "rank0.out").read_text().count("wrote v-001.mp4") == 1
    assert not (tmp_path / "v-002.mp4").exists()
    latents, _ = load_latents(tmp_path / "v-001.latents.safetensors")
    assert (latents - demo_reference[1].latents).abs().max() <= 1e-5


def test_batch_in_one_process(tmp_path, monkeypatch, capsys, one_torch_thread):
    import json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"seed": 4}) + "\n"
                                         + json.dumps({"seed": 5, "frames": 9}) + "\n")
    assert main(["generate", "--batch", "jobs.jsonl", "-o", "v.mp4", "--save-latents",
                 *SMALL]) == 0
    out = capsys.readouterr().out
    assert "wrote v-001.mp4 (5 frames" in out and "wrote v-002.mp4 (9 frames" in out
    latents, _ = load_latents(tmp_path / "v-002.latents.safetensors")
    ref = I2VPipeline.demo().generate(seed=5, frames=9, width=64, height=64, decode=False)
    assert torch.equal(latents, ref.latents)


@pytest.mark.parametrize("lines,expect", [
    (['{"seed": 1}', "[1]"], "line 2: expected a JSON object, got list"),
    (['{"seed": 1, "colour": 2}'], "line 1: unknown key(s) colour; a line may set image,"),
    (['{"output": "a.mp4"}', '{"output": "a.mp4"}'], "line 2: output 'a.mp4' is also line 1's"),
    (["{seed: 1}"], "line 1: not JSON"),
    (["{\"frames\": 6}"], "frames must be 4n+1"),
])
def test_bad_batch_lines_are_refused_before_loading(lines, expect, tmp_path, monkeypatch, capsys):
    import turbowan.pipeline.demo

    monkeypatch.setattr(turbowan.pipeline.demo, "write_demo_checkpoints",
                        lambda *a: pytest.fail("loaded"))
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["generate", "--batch", str(tmp_path / "jobs.jsonl")]) == 2
    assert expect in capsys.readouterr().err
