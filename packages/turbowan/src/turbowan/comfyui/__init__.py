"""ComfyUI node pack for TurboWan2.2 I2V (see turbowan.comfyui.install to set it up).

Importing this does not import ComfyUI; the nodes reach it only when they run.
"""

from turbowan.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
