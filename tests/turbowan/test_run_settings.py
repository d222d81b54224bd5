"""One RunSettings per run, checked in one round: every problem at once, nothing read first."""

from __future__ import annotations

import pytest

from turbowan.cli.main import main
from turbowan.pipeline.i2v import I2VPipeline
from turbowan.pipeline.preflight import PreflightError
from turbowan.pipeline.settings import RunSettings, field_names

FOUR_PROBLEMS = ("unknown strategy 'fastest'", "'12G'", "frames must be 4n+1", "unknown video extension '.avi'")


@pytest.fixture
def nothing_written(monkeypatch):
    """Writing the demo weights (the first thing a run does after its checks) fails the test."""
    import turbowan.pipeline.demo

    def forbidden(*a, **k):
        raise AssertionError("demo weights written despite bad input")

    monkeypatch.setattr(turbowan.pipeline.demo, "write_demo_checkpoints", forbidden)
    monkeypatch.setattr(turbowan.pipeline.demo, "write_demo_vae", forbidden)


def _assert_four(text: str) -> None:
    assert "4 problems found before starting" in text
    for problem in FOUR_PROBLEMS:
        assert text.count(problem) == 1, problem


def test_four_problems_of_the_cli_come_in_one_round(tmp_path, capsys, nothing_written):
    """Strategy and budget (placement) and frames and extension (the clip) used to come in
    two runs: the constructor refused the first two, generate() the next two."""
    out = tmp_path / "x.avi"
    code = main(["generate", "--offload", "fastest", "--budget", "12G", "--frames", "16", "-o", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("turbowan generate: error:") == 1
    _assert_four(err)
    assert list(tmp_path.iterdir()) == []


def test_four_problems_of_the_python_api_come_in_one_round(tmp_path, nothing_written):
    with pytest.raises(PreflightError) as err:
        I2VPipeline.demo(strategy="fastest", budget="12G", frames=16, output=tmp_path / "x.avi",
                         directory=tmp_path / "demo")
    assert len(err.value.problems) == 4
    _assert_four(str(err.value))
    with pytest.raises(PreflightError) as err:  # the settings object itself, the same answer
        I2VPipeline(RunSettings(strategy="fastest", budget="12G", frames=16, output=tmp_path / "x.avi"))
    assert len(err.value.problems) == 4
    assert list(tmp_path.iterdir()) == []


def test_a_real_run_without_an_image_is_told_with_the_rest(tmp_path, capsys):
    """The CLI checks the whole run: a missing --image comes with the other problems."""
    assert main(["generate", "--high", str(tmp_path / "h.pth"), "--frames", "16",
                 "-o", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err
    for problem in ("no start image", "frames must be 4n+1", "h.pth' does not exist",
                    "--vae is required", "--text-encoder is required",
                    "4 steps reach the low-noise expert"):
        assert problem in err
    assert "6 problems" in err


def test_run_fields_given_to_the_pipeline_are_its_defaults(tmp_path, one_torch_thread):
    pipe = I2VPipeline.demo(frames=5, width=16, height=16, steps=2, seed=3,
                            directory=tmp_path / "demo")
    record = pipe.check_inputs()
    assert (record["frames"], record["width"], record["height"], record["seed"]) == (5, 16, 16, 3)
    # generate() overrides them for one call; the pipeline keeps its own
    assert pipe.check_inputs(frames=9)["frames"] == 9
    assert pipe.settings.frames == 5
    with pytest.raises(PreflightError, match="4n\\+1"):
        pipe.check_inputs(frames=8)


def test_unknown_settings_are_named():
    with pytest.raises(TypeError, match="unknown setting.*frmaes"):
        RunSettings().replace(frmaes=5)
    pipe = I2VPipeline.demo()
    with pytest.raises(TypeError, match=r"unknown setting.*strategy.*generate\(\) takes"):
        pipe.generate(strategy="layerwise")  # placement is fixed when the pipeline is built


def test_every_field_has_a_scope_and_the_settings_are_frozen():
    import turbowan

    assert turbowan.RunSettings is RunSettings  # the public name
    assert set(field_names()) == set(field_names("pipeline")) | set(field_names("run"))
    assert not set(field_names("pipeline")) & set(field_names("run"))
    s = RunSettings(strategy_options={"prefetch": 2})
    with pytest.raises(AttributeError):
        s.frames = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.strategy_options["prefetch"] = 3  # type: ignore[index]


def test_strategy_options_pass_through_from_files_and_demo():
    pipe = I2VPipeline.demo(strategy="chunkwise", chunk_size=2)
    assert pipe.strategy_options == {"chunk_size": 2}
    assert pipe.settings.strategy == "chunkwise"


def test_attention_is_checked_when_the_model_is_built_not_in_its_forward(monkeypatch):
    """The SLA op's public entry checks its arguments; the DiT checked them once when it was
    built, so its forward (once per block per step) goes straight to the kernel."""
    import torch

    import turbowan.dit.model
    import turbowan.ops.sla
    from turbowan.dit.config import PRESETS
    from turbowan.dit.meta import build_meta

    checked = []
    real = turbowan.dit.model.check_attention
    monkeypatch.setattr(turbowan.dit.model, "check_attention", lambda *a: checked.append(a) or real(*a))
    model = build_meta(PRESETS["tiny"], attention="sla", sla_topk=0.5).to_empty(device="cpu")
    for i, tensor in enumerate([*model.parameters(), *model.buffers()]):
        tensor.data = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(i)) * 0.02
    assert checked == [("sla", 0.5)]

    def forbidden(*a, **k):
        raise AssertionError("SLA arguments checked again in the forward")

    monkeypatch.setattr(turbowan.ops.sla, "_check_qkv", forbidden)
    monkeypatch.setattr(turbowan.ops.sla, "_check_options", forbidden)
    x, y = torch.randn(1, 16, 1, 16, 16), torch.randn(1, 20, 1, 16, 16)
    with torch.inference_mode():
        out = model(x, torch.tensor([900.0]), torch.randn(1, 8, 4096), y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert checked == [("sla", 0.5)]
    with pytest.raises(AssertionError, match="checked again"):  # the public op still checks
        turbowan.ops.sparse_linear_attention(torch.randn(1, 128, 2, 128), torch.randn(1, 128, 2, 128),
                                             torch.randn(1, 128, 2, 128), topk=0.5)
