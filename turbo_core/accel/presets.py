"""Named settings: each mechanism's presets (in the mechanism table) and the three together
("Turbo4D").

Chosen from the sweeps of `python -m bench.bench_accel --sweep` on the trained default model; what
each costs and gains is in BENCHMARKS.md. Re-tune when the model or the sampler changes, and use
`python -m turbo_core.accel.calibrate` for a model-specific threshold.

In the combined presets each mechanism is set more gently than alone: their savings compound, and
so do their errors (a reused span whose error the step skip then holds over skipped steps).
"""
from __future__ import annotations

from typing import Optional

from .block_reuse import BlockReuseConfig
from .mechanisms import PRESET_NAMES, mechanism, names
from .registry import merge_spec, without
from .step_skip import PRESETS as STEP_PRESETS

# The step skip carries the saving where it has steps to skip; block reuse works on the calls it
# lets run (BENCHMARKS.md, "Per-call levels"): measured first (drift_prior 0: a span is reused only
# once it has run twice), it matched the step skip's PSNR on every schedule measured and added 1.16x
# on the large configuration, where the step skip runs 12 calls of 50; on the prior it cost 18 dB at
# 6 steps (a span reused right after the first call, its error then held over skipped steps). The
# sub-attention cache and the sequence pruner, which cost more than they save on a GPU, are left to
# their nodes.
TURBO4D_PRESETS = {
    "off": {},
    "quality": {"step": STEP_PRESETS["quality"], "block_reuse": BlockReuseConfig(threshold=0.12, drift_prior=0.0)},
    "balanced": {"step": STEP_PRESETS["balanced"], "block_reuse": BlockReuseConfig(threshold=0.25, drift_prior=0.0)},
    "fast": {"step": STEP_PRESETS["fast"], "block_reuse": BlockReuseConfig(threshold=0.4, drift_prior=0.0)},
}


def _check(name: str) -> None:
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}; pick one of {PRESET_NAMES}")


def preset_config(name_of_mechanism: str, name: str):
    """The config of one mechanism's preset (None for "off")."""
    m = mechanism(name_of_mechanism)
    _check(name)
    return m.presets[name]


def apply_preset(specs, name_of_mechanism: str, name: str) -> list:
    """The spec list with the mechanism at preset `name`; "off" removes it."""
    cfg = preset_config(name_of_mechanism, name)
    if cfg is None:
        return without(specs, [name_of_mechanism])
    return merge_spec(specs, name_of_mechanism, cfg)


def turbo4d_specs(name: str, specs: Optional[list] = None) -> list:
    """The spec list with every mechanism at the combined preset `name` ("off" removes them)."""
    _check(name)
    out = without(specs, names())
    for mech, cfg in TURBO4D_PRESETS[name].items():
        out = merge_spec(out, mech, cfg)
    return out
