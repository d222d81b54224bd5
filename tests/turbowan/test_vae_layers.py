"""Unit behaviour of the causal VAE layers that the golden test covers only end to end."""

from __future__ import annotations

import pytest
import torch

from turbowan.vae.cache import FIRST_CHUNK, CausalCache
from turbowan.vae.layers import CausalConv3d, Resample, ResidualBlock

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module.eval()


def test_causal_conv_never_sees_the_future():
    conv = _seeded(CausalConv3d(2, 3, 3, padding=1))
    x = torch.randn(1, 2, 5, 4, 4)
    y = conv(x)
    x2 = x.clone()
    x2[:, :, 3:] += 5.0  # change frames 3 and 4 only
    y2 = conv(x2)
    assert y.shape == x.shape[:1] + (3,) + x.shape[2:]
    assert torch.equal(y[:, :, :3], y2[:, :, :3])
    assert not torch.allclose(y[:, :, 3:], y2[:, :, 3:])


def test_residual_block_chunked_with_cache_equals_whole_clip():
    block = _seeded(ResidualBlock(4, 6))
    x = torch.randn(1, 4, 9, 5, 5)
    whole = block(x)
    cache = CausalCache()
    pieces = []
    for start, stop in [(0, 1), (1, 5), (5, 9)]:
        cache.start_chunk()
        pieces.append(block(x[:, :, start:stop], cache))
    torch.testing.assert_close(torch.cat(pieces, dim=2), whole, atol=1e-5, rtol=1e-5)
    assert len(cache) == 2  # one slot per temporal conv, the 1x1x1 shortcut has none


def test_up3d_interleaves_channel_halves_into_consecutive_frames():
    b, c, t = 1, 3, 2
    doubled = torch.arange(b * 2 * c * t, dtype=torch.float32).reshape(b, 2 * c, t, 1, 1)
    frames = Resample._double_frames(doubled)
    assert frames.shape == (b, c, 2 * t, 1, 1)
    for i in range(t):
        assert torch.equal(frames[:, :, 2 * i], doubled[:, :c, i])  # channels [0:C] -> 2t
        assert torch.equal(frames[:, :, 2 * i + 1], doubled[:, c:, i])  # [C:2C] -> 2t+1


def test_up3d_first_chunk_quirk():
    """Spec §6.4: latent frame 0 skips the time conv; latent frame 1 then sees zero padding
    (not frame 0's features); from frame 2 on the cached frames are the left context."""
    up = _seeded(Resample(4, "up3d"))
    a, b, c = (torch.randn(1, 4, 1, 3, 3) for _ in range(3))
    cache = CausalCache()
    cache.start_chunk()
    out_a = up(a, cache)
    assert out_a.shape[2] == 1 and cache[0] is FIRST_CHUNK
    cache.start_chunk()
    out_b = up(b, cache)
    assert out_b.shape[2] == 2
    assert torch.equal(out_b, up(b))  # no cache = plain causal zero padding
    cache.start_chunk()
    out_c = up(c, cache)
    # with context: the last two outputs of the uncached [b, c] clip (zero, b, c padding)
    torch.testing.assert_close(out_c, up(torch.cat([b, c], dim=2))[:, :, 2:], atol=1e-6, rtol=0)
    assert not torch.allclose(out_c, up(c))


def test_down3d_first_frame_alone_then_pairs():
    down = _seeded(Resample(4, "down3d"))
    # a fixed input: the two paths sum in different orders, so a 1e-6 bound holds for a given
    # input, not for every draw of the global RNG (other tests' draws used to shift it)
    x = torch.randn(1, 4, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    cache = CausalCache()
    cache.start_chunk()
    first = down(x[:, :, :1], cache)
    cache.start_chunk()
    rest = down(x[:, :, 1:5], cache)
    assert first.shape == (1, 4, 1, 4, 4) and rest.shape == (1, 4, 2, 4, 4)
    # 4 frames plus the cached last frame of the previous chunk, stride 2, no padding
    spatial = Resample(4, "down2d")
    spatial.resample.load_state_dict(down.resample.state_dict())
    context = spatial(x)
    torch.testing.assert_close(rest, down.time_conv(context), atol=1e-6, rtol=0)
    torch.testing.assert_close(first, context[:, :, :1], atol=1e-6, rtol=0)
