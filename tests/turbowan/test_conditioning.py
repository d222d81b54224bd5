"""Resolution table, frame rule, resize modes, clip/mask/y layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from turbowan.pipeline.conditioning import (
    build_clip,
    build_y,
    image_to_tensor,
    open_image,
    resize_image,
)
from turbowan.pipeline.resolution import check_frames, latent_shape, resolve_size


@pytest.mark.parametrize(
    "res, ar, size",
    [("480", "16:9", (768, 432)), ("480p", "16:9", (832, 480)), ("480p", "1:1", (640, 640)),
     ("512", "3:4", (512, 640)), ("720", "16:9", (1280, 704)), ("720p", "9:16", (720, 1280)),
     ("720p", "4:3", (960, 720))],
)
def test_resolution_table(res, ar, size):
    assert resolve_size(res, ar) == size


def test_every_table_entry_is_a_multiple_of_16():
    from turbowan.pipeline.resolution import VIDEO_RES_SIZE_INFO

    sizes = [s for row in VIDEO_RES_SIZE_INFO.values() for s in row.values()]
    assert len(sizes) == 25
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in sizes)


def test_explicit_size_and_errors():
    assert resolve_size(width=128, height=96) == (128, 96)
    with pytest.raises(ValueError, match="multiple of 16.*try 128 or 144"):
        resolve_size(width=130, height=96)
    with pytest.raises(ValueError, match="both --width and --height"):
        resolve_size(width=128)
    with pytest.raises(ValueError, match="unknown resolution '1080p'.*480p"):
        resolve_size("1080p")
    with pytest.raises(ValueError, match="unknown aspect ratio '16:10'"):
        resolve_size("480p", "16:10")


@pytest.mark.parametrize("frames", [1, 5, 17, 77, 81])
def test_frames_4n_plus_1_accepted(frames):
    assert check_frames(frames) == frames


@pytest.mark.parametrize("frames, hint", [(16, "try 13 or 17"), (80, "try 77 or 81"), (0, "try"), (-3, "try")])
def test_frames_rejected_with_neighbours(frames, hint):
    with pytest.raises(ValueError, match=hint):
        check_frames(frames)


def test_latent_shape():
    assert latent_shape(81, 832, 480) == (16, 21, 60, 104)
    assert latent_shape(77, 1280, 720) == (16, 20, 90, 160)


def _checker(w, h):
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = 255
    a[:, :, 2] = np.arange(w, dtype=np.uint8)[None, :]
    return Image.fromarray(a)


def test_crop_keeps_aspect_stretch_does_not():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (50, 0, 150, 100))  # a white centre square, 100x100
    crop = np.asarray(resize_image(img, 64, 64, "crop"))
    stretch = np.asarray(resize_image(img, 64, 64, "stretch"))
    assert crop.shape == stretch.shape == (64, 64, 3)
    assert crop.mean() > 250  # only the white square survives the centre crop
    assert 100 < stretch.mean() < 150  # stretched: black edges stay, about half the area


def test_crop_equals_stretch_when_aspect_matches():
    img = _checker(160, 90)
    a = np.asarray(resize_image(img, 64, 36, "crop"))
    b = np.asarray(resize_image(img, 64, 36, "stretch"))
    assert np.array_equal(a, b)


def test_unknown_resize_mode():
    with pytest.raises(ValueError, match="'crop'.*'stretch'"):
        resize_image(_checker(8, 8), 8, 8, "pad")


def test_image_to_tensor_range():
    img = Image.new("RGB", (4, 2), (255, 0, 128))
    t = image_to_tensor(img)
    assert t.shape == (3, 2, 4)
    assert t[0].eq(1).all() and t[1].eq(-1).all()
    assert t[2, 0, 0].item() == pytest.approx(128 / 255 * 2 - 1, abs=1e-6)


def test_open_image_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        open_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot be read as an image"):
        open_image(bad)


def test_clip_is_image_then_grey():
    img = torch.rand(3, 8, 16) * 2 - 1
    clip = build_clip(img, 9)
    assert clip.shape == (1, 3, 9, 8, 16)
    assert torch.equal(clip[0, :, 0], img)
    assert clip[:, :, 1:].abs().sum() == 0


def test_y_is_mask_then_latents():
    lat = torch.randn(2, 16, 5, 4, 6)
    y = build_y(lat)
    assert y.shape == (2, 20, 5, 4, 6)
    assert y[:, :4, 0].eq(1).all() and y[:, :4, 1:].eq(0).all()
    assert torch.equal(y[:, 4:], lat)


def test_exif_orientation_of_a_phone_photo_is_applied(tmp_path):
    from PIL import Image

    from turbowan.pipeline.conditioning import open_image

    # stored 40 wide x 20 high, left half red, right half blue; tag 6 = "rotate 90 CW to view"
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())
    upright = open_image(path)
    assert upright.size == (20, 40)  # portrait, as a viewer shows it
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    with Image.open(path) as pil:  # a PIL image given directly is turned the same way
        assert open_image(pil).size == (20, 40)
    plain = tmp_path / "plain.jpg"
    stored.save(plain, quality=95)
    assert open_image(plain).size == (40, 20)  # no tag, no turn
