"""The embedded demo pipeline, stage by stage: text encoder, VAE encode, rCM sampling (both
experts, each placed by offloadkit), VAE decode, and the whole run with the video write.

Timing the stages separately shows where a run's time goes; the whole-run case checks that
the stages add up (file writing and pre-flight checks are the difference). Tiny random
weights: these are the pipeline's overheads on the CPU, not Wan's model cost.

    nox -s bench -- -k pipeline
    pytest benchmarks/bench_pipeline.py -p no:cacheprovider -o addopts= \
        -o python_files='bench_*.py' --benchmark-only
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from turbowan.pipeline import demo as demo_mod
from turbowan.pipeline.i2v import I2VPipeline as Pipeline

ROUNDS = 2
STEPS = 4


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    directory = tmp_path_factory.mktemp("demo-weights")
    pipeline = Pipeline.demo(strategy="adaptive", budget="auto", device="cpu",
                             directory=directory)  # fmt: skip
    pipeline._ensure_demo_files()  # write the checkpoints once, outside every timing
    yield pipeline


@pytest.fixture(scope="module")
def settings(pipe: Pipeline) -> dict:
    return pipe.check_inputs()


@pytest.fixture(scope="module")
def conditioning(pipe: Pipeline, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    context = pipe.encode_prompt(settings["prompt"])
    y = pipe.encode_image(demo_mod.demo_image(), settings["frames"], settings["width"],
                          settings["height"], settings["resize"])  # fmt: skip
    return context, y


def _info(benchmark: BenchmarkFixture, settings: dict) -> None:
    benchmark.group = "demo pipeline stages (cpu)"
    benchmark.extra_info.update(frames=settings["frames"], width=settings["width"],
                                height=settings["height"], steps=STEPS, strategy="adaptive")  # fmt: skip


def test_pipeline_text_encoder(benchmark: BenchmarkFixture, pipe: Pipeline, settings: dict) -> None:
    _info(benchmark, settings)
    context = benchmark.pedantic(pipe.encode_prompt, args=(settings["prompt"],),
                                 rounds=ROUNDS, warmup_rounds=1)  # fmt: skip
    assert context.dim() == 3 and torch.isfinite(context).all()


def test_pipeline_vae_encode(benchmark: BenchmarkFixture, pipe: Pipeline, settings: dict) -> None:
    _info(benchmark, settings)
    image = demo_mod.demo_image()
    args = (image, settings["frames"], settings["width"], settings["height"], settings["resize"])
    y = benchmark.pedantic(pipe.encode_image, args=args, rounds=ROUNDS, warmup_rounds=1)
    assert y.shape[1] == 20 and torch.isfinite(y).all()


def test_pipeline_sampling(benchmark: BenchmarkFixture, pipe: Pipeline, settings: dict,
                           conditioning) -> None:  # fmt: skip
    _info(benchmark, settings)
    context, y = conditioning

    def sample() -> torch.Tensor:
        return pipe.sample(y, context, steps=STEPS, sigma_max=settings["sigma_max"],
                           boundary=settings["boundary"], seed=0, ode=False)  # fmt: skip

    latents = benchmark.pedantic(sample, rounds=ROUNDS, warmup_rounds=1)
    assert latents.shape[1] == 16 and torch.isfinite(latents).all()


def test_pipeline_vae_decode(benchmark: BenchmarkFixture, pipe: Pipeline, settings: dict,
                             conditioning) -> None:  # fmt: skip
    _info(benchmark, settings)
    context, y = conditioning
    latents = pipe.sample(y, context, steps=STEPS, sigma_max=settings["sigma_max"],
                          boundary=settings["boundary"], seed=0, ode=False)  # fmt: skip
    video = benchmark.pedantic(pipe.decode, args=(latents,), rounds=ROUNDS, warmup_rounds=1)
    assert video.shape[2] == settings["frames"] and torch.isfinite(video).all()


def test_pipeline_whole_run(benchmark: BenchmarkFixture, pipe: Pipeline, settings: dict,
                            tmp_path: Path) -> None:  # fmt: skip
    _info(benchmark, settings)
    out = tmp_path / "demo.mp4"
    result = benchmark.pedantic(pipe.generate, kwargs={"output": out, "steps": STEPS},
                                rounds=1, warmup_rounds=0)  # fmt: skip
    benchmark.extra_info["stages"] = result.timings.as_dict()
    assert out.stat().st_size > 0
