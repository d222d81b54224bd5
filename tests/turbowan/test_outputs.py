"""Outputs never replace inputs, and a latents file cannot choose where decode writes."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from turbowan.cli.main import main
from turbowan.pipeline.i2v import I2VPipeline
from turbowan.pipeline.latents_io import save_latents
from turbowan.pipeline.preflight import PreflightError


def test_output_equal_to_the_input_image_is_refused(tmp_path, monkeypatch):
    gif = tmp_path / "start.gif"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(gif)
    before = gif.read_bytes()
    pipe = I2VPipeline.demo(directory=tmp_path / "demo")
    monkeypatch.chdir(tmp_path)
    for output in (gif, "start.gif", "./start.gif"):  # the same file, however it is spelled
        with pytest.raises(PreflightError, match=r"-o .*start\.gif' is the --image input"):
            pipe.generate(image=gif, output=output)
    assert gif.read_bytes() == before
    assert not (tmp_path / "demo").exists()  # refused before any work


def test_decode_without_output_writes_beside_the_latents_file(tmp_path, capsys, one_torch_thread):
    elsewhere = tmp_path / "elsewhere" / "chosen-by-the-file.mp4"
    settings = {"demo": True, "vae": "demo", "output": str(elsewhere), "fps": 16, "quality": 5,
                "device": "cpu", "dtype": "float32"}
    latents = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    path = save_latents(tmp_path / "runs" / "clip.latents.safetensors", latents, settings)
    assert main(["decode", str(path)]) == 0
    written = tmp_path / "runs" / "clip.mp4"
    assert written.is_file() and written.stat().st_size > 0
    assert not elsewhere.parent.exists()
    assert str(written) in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "runs")) == ["clip.latents.safetensors", "clip.mp4"]
