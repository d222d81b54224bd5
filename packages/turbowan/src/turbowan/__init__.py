"""turbowan: TurboDiffusion Wan2.2 image-to-video, placed on the device by offloadkit.

The public entry points are imported lazily so that `import turbowan` stays cheap and a
command such as `turbowan check` never pays for modules it does not use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_dit": "turbowan.dit.loading",
    "load_vae": "turbowan.vae.loading",
    "load_text_encoder": "turbowan.text_encoder.loading",
    "I2VPipeline": "turbowan.pipeline.i2v",
    "RunSettings": "turbowan.pipeline.settings",
    "rcm_sample": "turbowan.sampler.rcm",
    "ops": "turbowan.ops",
    "lora": "turbowan.lora",
    "LoraSpec": "turbowan.lora",
}

__all__ = sorted(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'turbowan' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
