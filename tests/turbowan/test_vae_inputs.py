"""Bad input to the VAE: each is a clear error naming the problem and the fix, before work."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import turbowan
from turbowan.vae.config import VAECheckpointError
from turbowan.vae.frames import FrameCountError, check_frame_count, check_spatial_size
from turbowan.vae.loading import check_frame_count as exported_check
from turbowan.vae.meta import build_manifest_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("frames", "latent"), [(1, 1), (5, 2), (9, 3), (77, 20), (81, 21)])
def test_valid_frame_counts(frames, latent):
    assert check_frame_count(frames) == latent


@pytest.mark.parametrize(
    ("frames", "nearest"),
    [(80, "use 77 or 81"), (78, "use 77 or 81"), (2, "use 1 or 5"), (10, "use 9 or 13")],
)
def test_invalid_frame_counts_name_the_nearest_valid_ones(frames, nearest):
    with pytest.raises(FrameCountError, match=f"got {frames} frames; the Wan VAE needs 4n\\+1"):
        check_frame_count(frames)
    with pytest.raises(ValueError, match=nearest):  # FrameCountError is a ValueError
        exported_check(frames)


@pytest.mark.parametrize("frames", [0, -3])
def test_no_frames_is_an_error(frames):
    with pytest.raises(FrameCountError, match="at least 1 frame"):
        check_frame_count(frames)


def test_spatial_size_must_be_multiple_of_8():
    check_spatial_size(480, 832)
    with pytest.raises(ValueError, match="height 33 is not a multiple of 8.*use 32 or 40"):
        check_spatial_size(33, 48)
    with pytest.raises(ValueError, match="width 4 is not a multiple of 8.*use 8"):
        check_spatial_size(32, 4)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    model = build_manifest_model("wan2.1-vae-tiny")
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("vae") / "tiny.pth"
    torch.save(state, path)
    return turbowan.load_vae(path)


def _forbid_encoder(vae) -> list[int]:
    calls: list[int] = []
    vae.encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_encode_rejects_bad_frame_count_before_any_work(tiny_vae):
    calls = _forbid_encoder(tiny_vae)
    with pytest.raises(FrameCountError, match="got 8 frames.*use 5 or 9"):
        tiny_vae.encode(torch.zeros(1, 3, 8, 16, 16))
    assert calls == []
    assert tiny_vae.encode(torch.zeros(1, 3, 5, 16, 16)).shape == (1, 16, 2, 2, 2)
    assert calls  # the hook does observe real work


def test_single_image_and_batches(tiny_vae):
    gen = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 1, 16, 24, generator=gen) * 2 - 1
    latents = tiny_vae.encode(image)
    assert latents.shape == (1, 16, 1, 2, 3)
    assert tiny_vae.decode(latents).shape == (1, 3, 1, 16, 24)
    clips = torch.rand(2, 3, 5, 16, 16, generator=gen) * 2 - 1
    batched = tiny_vae.encode(clips)
    for i in range(2):  # samples do not leak into each other through the cache
        torch.testing.assert_close(batched[i : i + 1], tiny_vae.encode(clips[i : i + 1]))
    decoded = tiny_vae.decode(batched)
    torch.testing.assert_close(decoded[1:], tiny_vae.decode(batched[1:]))


@pytest.mark.parametrize(
    ("video", "message"),
    [
        (torch.zeros(3, 5, 16, 16), r"\(B, 3, F, H, W\), got \(3, 5, 16, 16\).*unsqueeze"),
        (torch.zeros(1, 4, 5, 16, 16), r"\(B, 3, F, H, W\)"),
        (torch.zeros(1, 3, 5, 16, 16, dtype=torch.uint8), r"float pixels.*127\.5 - 1"),
        (torch.full((1, 3, 5, 16, 16), 255.0), r"values reach 255.*video / 127\.5 - 1"),
        (torch.zeros(1, 3, 5, 20, 16), r"height 20 is not a multiple of 8"),
    ],
)
def test_encode_rejects_bad_videos(tiny_vae, video, message):
    with pytest.raises(ValueError, match=message):
        tiny_vae.encode(video)


def test_decode_rejects_wrong_latent_channels(tiny_vae):
    with pytest.raises(ValueError, match=r"\(B, 16, T, H, W\), got \(1, 48, 2, 4, 4\)"):
        tiny_vae.decode(torch.zeros(1, 48, 2, 4, 4))


WAN22_SHAPES = {  # what identifies Wan2.2_VAE.pth: z_dim 48, 12-channel patchified input
    "encoder.conv1.weight": (160, 12, 3, 3, 3),
    "conv1.weight": (96, 96, 1, 1, 1),
    "conv2.weight": (48, 48, 1, 1, 1),
    "decoder.conv1.weight": (1024, 48, 3, 3, 3),
}


@pytest.mark.parametrize(
    "keys", [sorted(WAN22_SHAPES), ["conv1.weight"], ["encoder.conv1.weight", "conv2.weight"]]
)
def test_wan22_vae_is_rejected_with_the_right_file_named(tmp_path, keys):
    fake = {k: torch.zeros(WAN22_SHAPES[k]) for k in keys}
    path = tmp_path / "Wan2.2_VAE.pth"
    torch.save(fake, path)
    with pytest.raises(VAECheckpointError) as err:
        turbowan.load_vae(path)
    text = str(err.value)
    assert "Wan2.2 VAE" in text and "TI2V-5B" in text
    assert "Wan2.2-I2V-A14B" in text and "Wan2.1_VAE.pth" in text


def test_diffusers_layout_is_rejected_with_a_hint(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3, 3)}, str(path))
    with pytest.raises(VAECheckpointError, match="diffusers-format.*Wan2.1_VAE.pth"):
        turbowan.load_vae(path)


def test_wrong_shapes_are_reported_before_loading(tmp_path):
    state = dict(build_manifest_model("wan2.1-vae-tiny").state_dict())
    state = {k: torch.zeros(v.shape) for k, v in state.items()}
    state["decoder.head.2.weight"] = torch.zeros(3, 8, 1, 3, 3)
    del state["encoder.middle.1.proj.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(VAECheckpointError) as err:
        turbowan.load_vae(path)
    text = str(err.value)
    assert "1 missing: encoder.middle.1.proj.bias" in text
    assert "1 unexpected: extra.weight" in text
    assert "decoder.head.2.weight (3, 8, 1, 3, 3) (expected (3, 8, 3, 3, 3))" in text
    assert "turbowan check" in text


def test_unknown_dtype_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown dtype 'half4'; use one of fp32"):
        turbowan.load_vae(tmp_path / "missing.pth", dtype="half4")
