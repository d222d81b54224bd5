"""Register the node pack with a ComfyUI install: ``python -m turbowan.comfyui.install DIR``.

ComfyUI loads node packs from folders in ``custom_nodes/``. turbowan is an ordinary
installed package, so the folder only needs a two-line ``__init__.py`` that re-exports the
node mappings; upgrading turbowan (pip) upgrades the nodes with nothing to copy again.
Run it with ComfyUI's own Python after ``pip install turbowan`` into that Python.
"""

from __future__ import annotations

import argparse
import sys
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
    return target


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
