"""rCM sampler against the upstream golden trajectories (tests/data/golden/sampler_rcm_i2v.*)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from turbowan.sampler.rcm import net_timestep, rcm_sample, rcm_schedule

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "sampler_rcm_i2v.safetensors"))


@pytest.fixture(scope="module")
def golden_json() -> dict:
    return json.loads((GOLDEN / "sampler_rcm_i2v.json").read_text())


class StandIn:
    """The closed-form experts the fixture used, recording what they were fed."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, t, ctx, y):
        b = x.shape[0]
        T = t.to(torch.float32).view(b, 1, 1, 1, 1)
        m = ctx.to(torch.float32).reshape(b, -1).mean(dim=1).view(b, 1, 1, 1, 1)
        if self.kind == "high":
            v = 0.5 * x + 0.001 * T + 0.1 * y[:, 4:20] + 0.01 * m
        else:
            v = -0.3 * x + 0.5 * torch.sin(T / 1000) + 0.2 * y[:, 4:20] * y[:, 0:1] - 0.01 * m
        self.calls.append((x.clone(), t.clone(), v.clone()))
        return v


def _run(golden, steps, sigma, ode, **kw):
    high, low = StandIn("high"), StandIn("low")
    order: list[str] = []
    states: list[torch.Tensor] = []

    def cb(info):
        order.append(info.expert)
        states.append(info.state.clone())

    out = rcm_sample(
        high,
        low,
        y=golden["inputs.y_B_C_T_H_W"],
        context=golden["inputs.crossattn_emb"],
        steps=steps,
        sigma_max=sigma,
        ode=ode,
        net_dtype=torch.float32,
        timestep_dtype=torch.float32,
        callback=cb,
        **kw,
    )
    return out, high, low, order, states


@pytest.mark.parametrize("sigma", [200, 80])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_schedule_matches_golden(golden_json, steps, sigma):
    ref = golden_json["schedules"][f"sigma_max={sigma}"][f"num_steps={steps}"]
    sched = rcm_schedule(steps, sigma)
    assert sched.t_rf.dtype == torch.float64
    assert sched.angles.tolist() == pytest.approx(ref["trigflow_angle"], abs=1e-15, rel=0)
    assert sched.t_rf.tolist() == pytest.approx(ref["t_rf"], abs=1e-15, rel=0)
    assert list(sched.experts) == ref["expert_per_step"]
    bf16 = [float(net_timestep(t, 1, torch.bfloat16, torch.device("cpu"))[0]) for t in sched.t_rf[:-1]]
    fp32 = [float(net_timestep(t, 1, torch.float32, torch.device("cpu"))[0]) for t in sched.t_rf[:-1]]
    assert bf16 == ref["timesteps_B_T_if_pipeline_dtype_bf16"]
    assert fp32 == ref["timesteps_B_T_passed_fp32"]


def test_four_steps_run_high_high_low_low():
    assert rcm_schedule(4).experts == ("high", "high", "low", "low")
    assert rcm_schedule(3).experts == ("high", "high", "low")
    assert rcm_schedule(2).experts == ("high", "high")
    assert rcm_schedule(1).experts == ("high",)
    # the switch is on t_rf, not on the step index: a low boundary keeps the high expert
    assert rcm_schedule(4, boundary=0.5).experts == ("high",) * 4


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_trajectory_with_injected_noise(golden, mode):
    pre = f"traj.sigma200.steps4.{mode}."
    step_noises = [golden[pre + f"noise{i}"] for i in range(4)] if mode == "sde" else None
    out, high, low, order, states = _run(
        golden, 4, 200, mode == "ode", noise=golden[pre + "init_noise"], step_noises=step_noises
    )
    assert order == ["high", "high", "low", "low"]
    assert len(high.calls) == 2 and len(low.calls) == 2
    x0 = golden[pre + "init_noise"].double() * rcm_schedule(4).t_rf[0]
    assert torch.equal(x0, golden[pre + "x0_f64"])
    for i, state in enumerate(states):
        ref = golden[pre + f"x{i + 1}_f64"]
        assert state.dtype == torch.float64
        assert (state - ref).abs().max().item() <= 1e-12
    calls = high.calls + low.calls
    for i, (x_in, t_in, v) in enumerate(calls):
        assert torch.equal(x_in, golden[pre + f"x{i}_f64"].float())
        assert torch.equal(t_in, golden[pre + f"timestep{i}"].view(1))
        assert (v - golden[pre + f"v{i}"]).abs().max().item() <= 1e-6
    assert (out - golden[f"final.sigma200.steps4.{mode}"]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("mode", ["ode", "sde"])
@pytest.mark.parametrize("sigma", [200, 80])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_final_with_seeded_cpu_generator(golden, steps, sigma, mode):
    gen = torch.Generator().manual_seed(0)
    out, high, low, order, _ = _run(golden, steps, sigma, mode == "ode", generator=gen)
    ref = golden[f"final.sigma{sigma}.steps{steps}.{mode}"]
    assert out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= 1e-6
    assert order == list(rcm_schedule(steps, sigma).experts)


def test_same_seed_same_result_and_different_seed_differs(golden):
    a = _run(golden, 4, 200, False, generator=torch.Generator().manual_seed(3))[0]
    b = _run(golden, 4, 200, False, generator=torch.Generator().manual_seed(3))[0]
    c = _run(golden, 4, 200, False, generator=torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 1e-3


def test_bf16_timesteps_are_what_the_net_sees(golden):
    high, low = StandIn("high"), StandIn("low")
    rcm_sample(
        high, low, y=golden["inputs.y_B_C_T_H_W"], context=golden["inputs.crossattn_emb"],
        steps=4, generator=torch.Generator().manual_seed(0),
    )
    seen = [float(c[1][0]) for c in high.calls + low.calls]
    assert seen == [996.0, 932.0, 852.0, 608.0]
    assert high.calls[0][0].dtype == torch.bfloat16


@pytest.mark.parametrize("steps", [0, 5, 2.0])
def test_bad_step_count_is_explained(golden, steps):
    with pytest.raises(ValueError, match="1 to 4"):
        rcm_schedule(steps)


def test_missing_low_expert_is_an_error_only_when_needed(golden):
    kw = dict(y=golden["inputs.y_B_C_T_H_W"], context=golden["inputs.crossattn_emb"])
    out = rcm_sample(StandIn("high"), None, steps=2, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="low-noise expert"):
        rcm_sample(StandIn("high"), None, steps=3, generator=torch.Generator().manual_seed(0), **kw)


def test_no_noise_source_is_explained(golden):
    with pytest.raises(ValueError, match="generator"):
        rcm_sample(
            StandIn("high"), StandIn("low"), y=golden["inputs.y_B_C_T_H_W"],
            context=golden["inputs.crossattn_emb"], steps=1,
        )


def test_schedule_first_time_is_sigma_over_one_plus_sigma():
    for sigma in (80.0, 200.0, 1600.0):
        assert float(rcm_schedule(1, sigma).t_rf[0]) == pytest.approx(sigma / (1 + sigma), abs=1e-14)
    assert math.isclose(float(rcm_schedule(4).t_rf[-1]), 0.0)
