"""rCM sampler for Wan2.2 I2V: 1-4 steps, two experts switched on the rectified-flow time.

The schedule is built from TrigFlow angles and converted to rectified-flow (RF) time in
float64; the sampler state is float64 too, because the few large steps amplify rounding.
The network sees ``1000 * t`` rounded through bfloat16 (what the reference script feeds it),
so the timestep dtype is an argument only for bit-parity tests against float32 fixtures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# TrigFlow angles (radians) after the first one; a run of n steps keeps the first n-1.
MID_ANGLES: tuple[float, ...] = (1.5, 1.4, 1.0)
MAX_STEPS = len(MID_ANGLES) + 1
DEFAULT_SIGMA_MAX = 200.0
DEFAULT_BOUNDARY = 0.9

Expert = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RCMSchedule:
    """The time grid of one run: ``t_rf`` has ``steps + 1`` entries ending at 0."""

    angles: torch.Tensor  # float64 TrigFlow angles
    t_rf: torch.Tensor  # float64 rectified-flow times, sin/(sin+cos)
    experts: tuple[str, ...]  # "high" or "low" for each step

    @property
    def steps(self) -> int:
        return len(self.experts)


@dataclass(frozen=True)
class StepInfo:
    """What a progress callback is told after each step."""

    step: int  # 0-based index of the step just finished
    steps: int
    expert: str  # "high" or "low"
    t: float  # RF time at the start of the step
    t_next: float
    timestep: float  # the value fed to the network
    state: torch.Tensor  # float64 state after the step (do not modify)


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(
            f"steps must be an integer from 1 to {MAX_STEPS} (rCM is distilled for 1-4 steps), "
            f"got {steps!r}; pass steps=4 for the best quality"
        )


def rcm_schedule(
    steps: int, sigma_max: float = DEFAULT_SIGMA_MAX, boundary: float = DEFAULT_BOUNDARY
) -> RCMSchedule:
    """TrigFlow angles [atan(sigma_max), *MID_ANGLES[:steps-1], 0] -> RF time, and the expert
    of every step (high until the first step whose t_rf is below ``boundary``)."""
    _check_steps(steps)
    if not (sigma_max > 0 and math.isfinite(sigma_max)):
        raise ValueError(f"sigma_max must be a positive finite number (default 200), got {sigma_max!r}")
    if not 0.0 <= boundary <= 1.0:
        raise ValueError(f"boundary is an RF time in [0, 1] (default 0.9), got {boundary!r}")
    angles = torch.tensor(
        [math.atan(sigma_max), *MID_ANGLES[: steps - 1], 0.0], dtype=torch.float64
    )
    t_rf = torch.sin(angles) / (torch.sin(angles) + torch.cos(angles))
    experts: list[str] = []
    switched = False
    for i in range(steps):
        if not switched and float(t_rf[i]) < boundary:
            switched = True
        experts.append("low" if switched else "high")
    return RCMSchedule(angles=angles, t_rf=t_rf, experts=tuple(experts))


def net_timestep(t: torch.Tensor, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(batch,) timestep for the network: t rounded to float32, times 1000 in float64, then
    cast to ``dtype`` (bf16 in the reference script) and handed over as float32."""
    value = t.to(torch.float32).to(torch.float64) * 1000.0
    return value.to(dtype).to(torch.float32).expand(batch).to(device)


class _NoiseSource:
    """Draws the initial noise and the per-step SDE noises, or replays injected ones."""

    def __init__(
        self,
        shape: tuple[int, ...],
        device: torch.device,
        generator: torch.Generator | None,
        noise: torch.Tensor | None,
        step_noises: Sequence[torch.Tensor] | None,
    ) -> None:
        self.shape = shape
        self.device = device
        self.generator = generator
        self.initial = noise
        self.step_noises = list(step_noises) if step_noises is not None else None

    def _draw(self) -> torch.Tensor:
        if self.generator is None:
            raise ValueError(
                "no noise to draw: pass generator=torch.Generator(device).manual_seed(seed), "
                "or inject noise= and (for SDE) step_noises="
            )
        gen_device = self.generator.device
        sample = torch.randn(self.shape, generator=self.generator, dtype=torch.float32, device=gen_device)
        return sample.to(self.device)

    def first(self) -> torch.Tensor:
        if self.initial is not None:
            if tuple(self.initial.shape) != self.shape:
                raise ValueError(
                    f"injected noise has shape {tuple(self.initial.shape)}, expected {self.shape} "
                    "(batch, 16, latent frames, latent height, latent width)"
                )
            return self.initial.to(self.device, torch.float32)
        return self._draw()

    def step(self, i: int) -> torch.Tensor:
        if self.step_noises is not None:
            if i >= len(self.step_noises):
                raise ValueError(f"step_noises has {len(self.step_noises)} entries; step {i} needs one more")
            return self.step_noises[i].to(self.device, torch.float32)
        return self._draw()


def rcm_sample(
    high: Expert,
    low: Expert | None,
    *,
    y: torch.Tensor,
    context: torch.Tensor,
    steps: int = 4,
    sigma_max: float = DEFAULT_SIGMA_MAX,
    boundary: float = DEFAULT_BOUNDARY,
    ode: bool = False,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    step_noises: Sequence[torch.Tensor] | None = None,
    net_dtype: torch.dtype = torch.bfloat16,
    timestep_dtype: torch.dtype = torch.bfloat16,
    callback: Callable[[StepInfo], None] | None = None,
) -> torch.Tensor:
    """Sample I2V latents with rCM; returns float32 (B, 16, T, H, W).

    ``high``/``low`` are called as ``expert(x, t, context, y)`` with x in ``net_dtype``,
    t of shape (B,) and must return the RF velocity. ``low`` may be None only when the
    schedule never reaches the boundary (1-2 steps). Noise comes from ``generator``
    (initial draw first, then one per step, the last one wasted as upstream does) unless
    ``noise``/``step_noises`` inject it. ``callback`` gets a :class:`StepInfo` after each step.
    """
    schedule = rcm_schedule(steps, sigma_max, boundary)
    if y.dim() != 5 or y.shape[1] != 20:
        raise ValueError(
            f"y must be (batch, 20, T, H, W) = [mask 4 | image latents 16], got {tuple(y.shape)}"
        )
    if "low" in schedule.experts and low is None:
        raise ValueError(
            f"{steps} steps with boundary {boundary} reach the low-noise expert; pass low="
        )
    batch, _, frames, height, width = y.shape
    shape = (batch, 16, frames, height, width)
    device = y.device
    source = _NoiseSource(shape, device, generator, noise, step_noises)

    t_rf = schedule.t_rf
    x = source.first().to(torch.float64) * t_rf[0].to(device)
    y_net = y.to(net_dtype)
    ctx_net = context.to(net_dtype)
    for i, expert_name in enumerate(schedule.experts):
        expert = high if expert_name == "high" else low
        assert expert is not None
        t_cur, t_next = t_rf[i], t_rf[i + 1]
        timestep = net_timestep(t_cur, batch, timestep_dtype, device)
        with torch.no_grad():
            v = expert(x.to(net_dtype), timestep, ctx_net, y_net).to(torch.float64)
        t_cur_d, t_next_d = t_cur.to(device), t_next.to(device)
        if ode:
            x = x - (t_cur_d - t_next_d) * v
        else:
            # The re-noise term is formed in float32 (float32 noise times t'), as upstream's
            # type promotion does; only then is it added to the float64 prediction.
            eps = source.step(i)
            renoise = t_next_d.to(torch.float32) * eps
            x = (1.0 - t_next_d) * (x - t_cur_d * v) + renoise.to(torch.float64)
        if callback is not None:
            callback(
                StepInfo(
                    step=i,
                    steps=schedule.steps,
                    expert=expert_name,
                    t=float(t_cur),
                    t_next=float(t_next),
                    timestep=float(timestep[0]),
                    state=x,
                )
            )
    return x.to(torch.float32)
