"""Video writing/reading: sizes, frame counts, fps, formats, atomic writes, latents files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from turbowan.pipeline import video_io
from turbowan.pipeline.latents_io import latents_path_for, load_latents, save_latents
from turbowan.pipeline.video_io import read_video, to_uint8_frames, write_video


def _frames(n=9, h=48, w=80) -> np.ndarray:
    # smooth gradients plus a moving square: compresses well, so decoded pixels stay close
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = (xx * 255 // (w - 1)).astype(np.uint8)
        out[i, ..., 1] = (yy * 255 // (h - 1)).astype(np.uint8)
        out[i, ..., 2] = 40
        out[i, 10:26, 4 * i : 4 * i + 16] = 230
    return out


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif"])
def test_roundtrip_keeps_count_size_and_pixels(tmp_path, suffix):
    frames = _frames()
    path = write_video(frames, tmp_path / f"clip{suffix}", fps=16)
    back = read_video(path)
    assert (back.num_frames, back.height, back.width) == (9, 48, 80)
    assert back.fps == pytest.approx(16, rel=0.02) if suffix != ".gif" else back.fps > 0
    err = np.abs(back.frames.astype(np.int16) - frames.astype(np.int16)).mean()
    assert err < 6.0, f"mean abs pixel error {err}"
    assert [p.name for p in tmp_path.iterdir()] == [f"clip{suffix}"]  # no temp files left


def test_mp4_is_h264_yuv420p_and_quality_changes_size(tmp_path):
    import av

    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    lo = write_video(noisy, tmp_path / "lo.mp4", quality=2)
    hi = write_video(noisy, tmp_path / "hi.mp4", quality=10)
    with av.open(str(hi)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264"
        assert s.codec_context.pix_fmt == "yuv420p"
    assert hi.stat().st_size > 2 * lo.stat().st_size


def test_gif_loops_forever(tmp_path):
    from PIL import Image

    path = write_video(_frames(3), tmp_path / "a.gif", fps=10)  # GIF timing is in 10 ms units
    with Image.open(path) as img:
        assert img.info.get("loop") == 0
        assert img.info.get("duration") == 100
        assert img.n_frames == 3


def test_written_file_has_ordinary_permissions(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        path = write_video(_frames(3), tmp_path / "p.mp4")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_failure_leaves_no_file(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io, "_write_av", boom)
    with pytest.raises(KeyboardInterrupt):
        write_video(_frames(), tmp_path / "x.mp4")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_only_replaced_when_complete(tmp_path, monkeypatch):
    target = tmp_path / "x.mp4"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise RuntimeError("encoder died")

    monkeypatch.setattr(video_io, "_write_av", boom)
    with pytest.raises(RuntimeError):
        write_video(_frames(), target)
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize(
    "name, msg",
    [("out.avi", "unknown video extension"), ("out", "unknown video extension")],
)
def test_bad_output_names(tmp_path, name, msg):
    with pytest.raises(ValueError, match=msg) as e:
        video_io.check_output_path(tmp_path / name)
    assert ".mp4" in str(e.value)


def test_output_directory_must_be_writable(tmp_path, monkeypatch):
    import os

    # the tests may run as root, where permission bits are not enforced: ask os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(ValueError, match="not writable"):
        video_io.check_output_path(tmp_path / "sub" / "v.mp4")


def test_output_parent_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        video_io.check_output_path(tmp_path / "f" / "v.mp4")


def test_odd_size_mp4_is_refused_with_a_fix(tmp_path):
    with pytest.raises(ValueError, match="even width and height"):
        write_video(_frames(h=47), tmp_path / "odd.mp4")


def test_quality_and_fps_ranges(tmp_path):
    with pytest.raises(ValueError, match="quality"):
        write_video(_frames(), tmp_path / "q.mp4", quality=11)
    with pytest.raises(ValueError, match="fps"):
        write_video(_frames(), tmp_path / "q.mp4", fps=0)


def test_to_uint8_frames_maps_range_and_layout():
    video = torch.zeros(1, 3, 2, 4, 6)
    video[0, 0, 1] = 1.0
    video[0, 2, 0] = -2.0  # clamped
    out = to_uint8_frames(video)
    assert out.shape == (2, 4, 6, 3) and out.dtype == np.uint8
    assert out[1, 0, 0].tolist() == [255, 128, 128]
    assert out[0, 0, 0].tolist() == [128, 128, 0]


def test_latents_roundtrip_with_settings(tmp_path):
    lat = torch.randn(1, 16, 3, 4, 6)
    p = save_latents(latents_path_for(tmp_path / "v.mp4"), lat, {"seed": 5, "vae": "demo"})
    assert p.name == "v.latents.safetensors"
    back, settings = load_latents(p)
    assert torch.equal(back, lat)
    assert settings == {"seed": 5, "vae": "demo"}


def test_latents_loader_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a turbowan latents file"):
        load_latents(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not found"):
        load_latents(tmp_path / "missing.latents.safetensors")
