"""Turbo4D core: plain PyTorch, no ComfyUI import.

The SCM layout and attention dispatch, the reference 4D network, the accelerators, the procedural
scene generator and the metrics. Usable from a plain script as well as from the ComfyUI nodes.
"""

__version__ = "0.1.0"
