"""Test-wide setup: one torch CPU thread (here and in the processes tests start); Triton
kernels run in the interpreter when there is no GPU; the ComfyUI stand-in
(tests/comfy_standin.py) is importable from both packages' tests; a fixture that installs
throwaway offloadkit plugins the way pip does."""

import os
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# The tests' tensors are tiny, so a second intra-op thread gains them little, and on
# a busy one (a shared CI runner) OpenMP's workers wait for cores other processes hold: the
# offloadkit tests took 170 s with two threads on a loaded 2-core machine, 40 s with one.
# OMP_NUM_THREADS reaches the processes tests start; set it to choose another count.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not torch.cuda.is_available():
    # Must be set before any module decorates a kernel with @triton.jit.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def make_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """Install a throwaway distribution: ``make_plugin(dist, source) -> module name``.

    A ``*.dist-info`` folder with ``METADATA`` and ``entry_points.txt`` next to the plugin
    module, on ``sys.path``: importlib.metadata finds it exactly as it finds a pip-installed
    plugin, and offloadkit's registry loads it through the ``offloadkit`` entry-point group.
    """
    from offloadkit import registry

    site = tmp_path / "site"
    site.mkdir()
    modules: list[str] = []

    def make(distribution: str, source: str, entry_name: str | None = None) -> str:
        module = f"okt_{distribution.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{distribution.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n"
        )
        (info / "entry_points.txt").write_text(
            f"[offloadkit]\n{entry_name or distribution} = {module}\n"
        )
        modules.append(module)
        registry.reset_registry()
        return module

    monkeypatch.syspath_prepend(str(site))
    yield make
    for module in modules:
        sys.modules.pop(module, None)
    registry.reset_registry()
