"""The pack's own socket types (ComfyUI matches sockets by these names)."""
from comfy_api.latest import io

# {"video": (F, 3, H, W) in [-1, 1] reference-view frames, "fps": float, "source": str}; the
# Synthetic 4D Scene adds "ground_truth" (F, V, 3, H, W) and "cameras" (V, 2).
Turbo4DInput = io.Custom("TURBO4D_INPUT")
# turbo_core.accel.stats.RunStats of the last sampling run.
Turbo4DStats = io.Custom("TURBO4D_STATS")
# {"seed", "config": SceneConfig, "cameras": (V, 2), "ground_truth": (F, V, 3, H, W), "masks"}
Turbo4DScene = io.Custom("TURBO4D_SCENE")
# turbo_core.multiview.GridLayout: the V x F layout of the view-major IMAGE beside it (nodes/layout.py).
Turbo4DLayout = io.Custom("TURBO4D_LAYOUT")
