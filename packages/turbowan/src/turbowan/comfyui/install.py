"""Register the node pack with a ComfyUI install: ``python -m turbowan.comfyui.install DIR``.

ComfyUI loads node packs from folders in ``custom_nodes/``. turbowan is an ordinary
installed package, so the folder only needs a two-line ``__init__.py`` that re-exports the
node mappings; upgrading turbowan (pip) upgrades the nodes. Next to it go the files ComfyUI
and its tools look for in a pack's folder: ``example_workflows/*.json`` (served under
/api/workflow_templates/turbowan and shown in the template browser) and ``pyproject.toml``
with the ``[tool.comfy]`` metadata of the Comfy Registry / ComfyUI-Manager.
Run it with ComfyUI's own Python after ``pip install turbowan`` into that Python.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

SHIM = (
    "# turbowan ComfyUI nodes: the code lives in the installed turbowan package\n"
    "from turbowan.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401\n"
)
PACK_NAME = "turbowan"


def install(comfyui_dir: str | Path) -> Path:
    """Write ``custom_nodes/turbowan/__init__.py`` under a ComfyUI folder; returns its path."""
    root = Path(comfyui_dir).expanduser()
    custom = root / "custom_nodes"
    if not custom.is_dir():
        raise ValueError(
            f"{str(root)!r} has no custom_nodes/ folder, so it is not a ComfyUI install; pass "
            "the folder that holds ComfyUI's main.py"
        )
    target = custom / PACK_NAME / "__init__.py"
    if target.exists() and target.read_text() != SHIM:
        raise ValueError(
            f"{target} already exists with other content (another pack named {PACK_NAME!r}?); "
            "move it away first"
        )
    target.parent.mkdir(exist_ok=True)
    target.write_text(SHIM)
    _copy_pack_files(target.parent)
    return target


def _copy_pack_files(folder: Path) -> None:
    """pyproject.toml and example_workflows/ from turbowan/comfyui/pack (refreshed each run)."""
    pack = resources.files("turbowan.comfyui") / "pack"
    with resources.as_file(pack) as source:
        shutil.copyfile(source / "pyproject.toml", folder / "pyproject.toml")
        workflows = folder / "example_workflows"
        workflows.mkdir(exist_ok=True)
        for path in sorted((source / "example_workflows").glob("*.json")):
            shutil.copyfile(path, workflows / path.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turbowan.comfyui.install", description=__doc__.splitlines()[0])
    parser.add_argument("comfyui_dir", help="the ComfyUI folder (the one holding main.py and custom_nodes/)")
    args = parser.parse_args(argv)
    try:
        target = install(args.comfyui_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {target}; restart ComfyUI and find the nodes under 'TurboWan'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
