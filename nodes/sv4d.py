"""SV4D / SV4D 2.0 files as the Turbo4D Model Loader sees them.

The UNet runs in the core (`turbo_core.models.sv4d`: `load_sv4d`, all three accelerators), but the
pack has no SV4D conditioning yet (CLIP vision per frame, VAE latents of the input frames and of the
reference views, the polar/azimuth vector), so the loader cannot turn an SV4D file into a MODEL that
samples. What it can do is recognise one from the safetensors header alone (no tensor is read, a
2 B-parameter checkpoint costs nothing) and say so, instead of the generic "not a Turbo4D SCM
network" of `turbo_core.models.io.load_model`.

The loader calls `check_not_sv4d(path)` before `load_model(path)`.
"""
from __future__ import annotations

import os
from typing import Optional

from turbo_core.models.io import CheckpointError
from turbo_core.models.sv4d import parameter_count, read_sv4d_config

NAMES = {"sv4d": "SV4D", "sv4d2": "SV4D 2.0"}

NODES: list = []  # the SV4D node family (conditioning, sampling) is not written yet


def describe_sv4d(path: str) -> Optional[str]:
    """"SV4D 2.0 UNet (width 320, 2.01 B parameters, ...)" when the file's keys and shapes are an
    SV4D or SV4D 2.0 UNet, else None (any other file, readable or not, is not this module's
    business: the loader's own checks report it)."""
    try:
        cfg = read_sv4d_config(path)
    except (CheckpointError, OSError, ValueError):
        return None
    mode = ""
    if cfg.version == "sv4d2":
        mode = ", camera attention over pixel groups" if cfg.use_3d_attention else ", camera attention over views (8-view model)"
    return (f"{NAMES[cfg.version]} UNet (width {cfg.model_channels}, "
            f"{parameter_count(cfg) / 1e9:.2f} B parameters{mode})")


def check_not_sv4d(path: str) -> None:
    """Raises CheckpointError naming the model when `path` is an SV4D file; returns otherwise."""
    what = describe_sv4d(path)
    if what is None:
        return
    raise CheckpointError(
        f"{os.path.basename(path)} is an {what}. Turbo4D runs SV4D's UNet in its core "
        f"(turbo_core.models.sv4d.load_sv4d), but its ComfyUI conditioning nodes (CLIP vision per frame, "
        f"VAE latents, camera angles) are not in the pack yet, so this loader cannot sample with it. "
        f"Pick a Turbo4D SCM network here.")
