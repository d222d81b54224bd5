"""Sessions: tests, demo, bench, lint.

torch is installed first and pinned to the CPU build's version, so no package that
merely says `torch>=...` can pull a multi-GB CUDA build into a CI environment.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"
PACKAGES = ["-e", "packages/offloadkit", "-e", "packages/turbowan"]
TEST_DEPS = ["pytest>=8", "pytest-benchmark>=4", "psutil>=5.9"]
# Optional extras the tests exercise for real: bench plots and the accelerate peer.
EXTRAS_UNDER_TEST = ["matplotlib>=3.8", "accelerate>=0.30"]


def _install_project(session: nox.Session, *extra: str) -> None:
    session.install(TORCH)
    session.install(*PACKAGES, *extra)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite, as .ci/run does (arguments after `--` go to pytest)."""
    _install_project(session, *TEST_DEPS, *EXTRAS_UNDER_TEST)
    # The example plugin is installed the way a user installs it: with pip, as a package.
    session.install("./plugins/offloadkit-manual")
    session.run("pytest", *session.posargs, env={"TRITON_INTERPRET": "1"})


@nox.session
def demo(session: nox.Session) -> None:
    """Run the embedded image-to-video demo on the CPU (tiny weights, writes a video)."""
    _install_project(session)
    session.run("turbowan", "generate", *(session.posargs or ["-o", "out/demo.mp4"]))


@nox.session
def bench(session: nox.Session) -> None:
    """Run the pytest-benchmark suites in benchmarks/ and keep their JSON per machine."""
    _install_project(session, *TEST_DEPS, *EXTRAS_UNDER_TEST, "diffusers>=0.32")
    session.install("./plugins/offloadkit-manual")
    session.run(
        "pytest",
        "benchmarks",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "-o",
        "python_files=bench_*.py",
        "--benchmark-only",
        "--benchmark-autosave",
        *session.posargs,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check with the rules in pyproject.toml."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
