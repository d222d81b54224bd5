"""3-D rotary position embedding of the Wan DiT (spec §1.3), device-agnostic.

The 64 rotation pairs of a 128-wide head are split t:22 | h:21 | w:21. Frequencies are
10000^(-2j/44) for time and 10000^(-2j/42) for height and width; pair p rotates the
adjacent channels (2p, 2p+1). Angles are built in float64 and the rotation runs in fp32.
"""

from __future__ import annotations

import torch

THETA = 10000.0


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Pairs per axis (t, h, w): [c - 2(c//3), c//3, c//3] with c = head_dim // 2."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _axis_freqs(pairs: int) -> torch.Tensor:
    dim = 2 * pairs
    return 1.0 / THETA ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def _rope_angles64(grid: tuple[int, int, int], head_dim: int) -> torch.Tensor:
    """Rotation angle of every (token, pair) in float64, on the CPU."""
    t, h, w = grid
    pt, ph, pw = axis_pairs(head_dim)
    at = torch.outer(torch.arange(t, dtype=torch.float64), _axis_freqs(pt))
    ah = torch.outer(torch.arange(h, dtype=torch.float64), _axis_freqs(ph))
    aw = torch.outer(torch.arange(w, dtype=torch.float64), _axis_freqs(pw))
    return torch.cat(
        [
            at[:, None, None, :].expand(t, h, w, pt),
            ah[None, :, None, :].expand(t, h, w, ph),
            aw[None, None, :, :].expand(t, h, w, pw),
        ],
        dim=-1,
    ).reshape(t * h * w, pt + ph + pw)


def rope_angles(
    grid: tuple[int, int, int], head_dim: int = 128, device: torch.device | str | None = None
) -> torch.Tensor:
    """Rotation angle of every (token, pair): (T*H*W, head_dim/2) float32, tokens t-major."""
    return _rope_angles64(grid, head_dim).to(device=device, dtype=torch.float32)


def rope_cos_sin(
    grid: tuple[int, int, int], head_dim: int = 128, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (L, head_dim/2) float32, taken of the float64 angles (as the
    reference's complex128 rotation does), not of angles already rounded to float32."""
    angles = _rope_angles64(grid, head_dim)
    return (
        angles.cos().to(device=device, dtype=torch.float32),
        angles.sin().to(device=device, dtype=torch.float32),
    )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, L, H, D) by per-token angles; result in x's dtype."""
    b, seq, heads, d = x.shape
    pairs = x.float().reshape(b, seq, heads, d // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    rotated = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1)
    return rotated.reshape(b, seq, heads, d).to(x.dtype)
