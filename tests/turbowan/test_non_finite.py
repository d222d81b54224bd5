"""NaN/Inf never becomes a black video with success: the run stops naming the stage, the
latents are kept, and `turbowan check --full` finds the tensors responsible."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from turbowan.cli.main import main
from turbowan.pipeline.demo import write_demo_checkpoints
from turbowan.pipeline.i2v import DecodeFailedError, I2VPipeline
from turbowan.pipeline.latents_io import load_latents

RUN = dict(frames=5, width=64, height=64, steps=2)  # 2 steps: the high expert only


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_demo_checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "start.png"
    Image.new("RGB", (64, 64), (90, 160, 210)).save(path)
    return path


def poisoned(path, tmp_path, key, value):
    state = load_file(str(path))
    assert key in state
    state[key] = torch.full_like(state[key], value)
    out = tmp_path / f"poisoned_{path.name}"
    save_file(state, str(out))
    return out


def pipeline(files, **override):
    kw = dict(high=files.high, low=None, vae=files.vae, text_encoder=files.text_encoder,
              tokenizer="demo", device="cpu")
    kw.update(override)
    return I2VPipeline.from_files(**kw)


def test_nan_weights_stop_after_sampling_and_keep_the_latents(files, image, tmp_path, capsys,
                                                              one_torch_thread):
    high = poisoned(files.high, tmp_path, "head.head.weight", float("nan"))
    out = tmp_path / "out" / "clip.mp4"
    with pytest.raises(DecodeFailedError) as err:
        pipeline(files, high=high).generate(image, "a kite", output=out, **RUN)
    message = str(err.value)
    assert "sampling produced" in message and "NaN/Inf" in message and "check --full" in message
    assert not out.exists()
    latents, _ = load_latents(err.value.latents_path)  # kept for inspection
    assert torch.isnan(latents).any()
    # the full check names the tensor; the header-only check cannot see it
    assert main(["check", str(high)]) == 0
    capsys.readouterr()
    assert main(["check", str(high), "--full"]) == 1
    report = capsys.readouterr().out
    assert "head.head.weight" in report and "non-finite" in report
    assert main(["check", str(files.high), "--full"]) == 0
    assert "every tensor is finite" in capsys.readouterr().out


def test_inf_vae_stops_at_decode(files, image, tmp_path, one_torch_thread):
    vae = poisoned(files.vae, tmp_path, "decoder.head.2.weight", float("inf"))
    out = tmp_path / "out" / "clip.mp4"
    with pytest.raises(DecodeFailedError, match="VAE decode produced") as err:
        pipeline(files, vae=vae).generate(image, "a kite", output=out, **RUN)
    assert not out.exists()
    latents, _ = load_latents(err.value.latents_path)
    assert torch.isfinite(latents).all()  # sampling was fine; decode it with a good VAE later
