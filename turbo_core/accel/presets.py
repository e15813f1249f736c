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

from .block_reuse import FAMILY_PRESETS as BLOCK_FAMILY_PRESETS, BlockReuseConfig
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

# Per model family, the presets measured to differ (the others take TURBO4D_PRESETS). The SV4D UNets
# (BENCHMARKS.md, "Block reuse on the UNet's spans"): there block reuse keeps its reuse across the
# calls the step skip skips (block_reuse.FAMILY_PRESETS), which paid on SV4D 2.0 at 50 steps; on the
# embedded model it cost 18 dB at 6 steps, hence the drift_prior 0 and max_skipped 0 above.
TURBO4D_FAMILY_PRESETS = {
    family: {name: {"step": STEP_PRESETS[name], "block_reuse": cfg} for name, cfg in variants.items()}
    for family, variants in BLOCK_FAMILY_PRESETS.items()
}
DEFAULT_FAMILY = "default"


def model_family(net) -> str:
    """The preset family of a network: its `preset_family` attribute (SV4DUNet: "sv4d"), else
    "default" (the embedded model and every other network)."""
    return str(getattr(net, "preset_family", None) or DEFAULT_FAMILY)


def turbo4d_variant(name: str, family: Optional[str] = None) -> str:
    """The family whose Turbo4D preset `name` a model of `family` runs: `family` where it has its
    own variant of that preset, else "default"."""
    _check(name)
    return family if family in TURBO4D_FAMILY_PRESETS and name in TURBO4D_FAMILY_PRESETS[family] else DEFAULT_FAMILY


FAMILY_TITLES = {"sv4d": "SV4D"}


def variant_note(title: str, preset: str, family: str) -> str:
    """The line a run's statistics show for a preset taken in a family's variant."""
    return (f"{title} {preset}: the {FAMILY_TITLES.get(family, family)} variant of the preset (block reuse kept "
            f"across the calls the step skip skips; BENCHMARKS.md)")


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


def turbo4d_specs(name: str, specs: Optional[list] = None, family: Optional[str] = None) -> list:
    """The spec list with every mechanism at the combined preset `name` ("off" removes them), in the
    variant of the model's `family` (model_family(net)) where it has one (turbo4d_variant)."""
    variant = turbo4d_variant(name, family)
    preset = TURBO4D_PRESETS[name] if variant == DEFAULT_FAMILY else TURBO4D_FAMILY_PRESETS[variant][name]
    out = without(specs, names())
    for mech, cfg in preset.items():
        out = merge_spec(out, mech, cfg)
    return out
