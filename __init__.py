"""Turbo4D: fast multi-view 4D generation for ComfyUI (V views x F frames from one reference video).

ComfyUI imports this file as a package. The core (`turbo_core/`, plain PyTorch) is imported by its
own top-level name, so the pack folder goes at the end of sys.path (last, so that its `tests` or
`scripts` never shadow anyone's); the node modules are imported relatively, because ComfyUI already
owns the top-level name `nodes`.

Outside ComfyUI (pytest imports the repository root as a package because of this file) there is no
`comfy_api`, and the file registers nothing.
"""
import os
import sys

_PACK = os.path.dirname(os.path.abspath(__file__))
if _PACK not in sys.path:
    sys.path.append(_PACK)

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:
    ComfyExtension = None

WEB_DIRECTORY = "./web"

if ComfyExtension is not None:
    from .nodes import node_list

    class Turbo4DExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return node_list()

    async def comfy_entrypoint() -> Turbo4DExtension:
        return Turbo4DExtension()

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
