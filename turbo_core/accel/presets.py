"""Named settings for each accelerator and for the three together ("Turbo4D").

PROVISIONAL: these values are first guesses from the reasoning in each module and from runs on
randomly initialised networks; they are to be re-tuned on the trained default model with
`python -m bench.bench_accel --sweep` (speed vs PSNR against full compute) and
`python -m turbo_core.accel.calibrate`. Until then "quality" aims at changes no one sees, "fast"
at the largest speedup that keeps the structure.

In the combined presets each mechanism is set more gently than alone: their savings compound, and
so do their errors (a block the bypass skips is one the cache cannot refresh).
"""
from __future__ import annotations

from typing import Optional

from .bypass import ChainBypassConfig, apply_chain_bypass
from .cache import RollingCacheConfig, apply_rolling_cache
from .prune import TokenPrunerConfig, apply_token_pruning

PRESET_NAMES = ("off", "quality", "balanced", "fast")

CACHE_PRESETS = {
    "off": None,
    "quality": RollingCacheConfig(threshold=0.08, max_age=2, start_percent=0.2, end_percent=0.95),
    "balanced": RollingCacheConfig(threshold=0.15, max_age=3, start_percent=0.15, end_percent=0.95),
    "fast": RollingCacheConfig(threshold=0.25, max_age=5, start_percent=0.1, end_percent=0.97),
}

PRUNE_PRESETS = {
    "off": None,
    "quality": TokenPrunerConfig(keep_start=0.7, keep_end=0.5, start_percent=0.2),
    "balanced": TokenPrunerConfig(keep_start=0.5, keep_end=0.3, start_percent=0.1),
    "fast": TokenPrunerConfig(keep_start=0.35, keep_end=0.15, start_percent=0.1, max_age=8),
}

BYPASS_PRESETS = {
    "off": None,
    "quality": ChainBypassConfig(threshold=0.04, max_consecutive=1, start_percent=0.25),
    "balanced": ChainBypassConfig(threshold=0.08, max_consecutive=2, start_percent=0.2),
    "fast": ChainBypassConfig(threshold=0.15, max_consecutive=3, start_percent=0.15),
}

PRESETS = {"cache": CACHE_PRESETS, "prune": PRUNE_PRESETS, "bypass": BYPASS_PRESETS}
_APPLY = {"cache": apply_rolling_cache, "prune": apply_token_pruning, "bypass": apply_chain_bypass}

TURBO4D_PRESETS = {
    "off": {},
    "quality": {"cache": CACHE_PRESETS["quality"], "prune": PRUNE_PRESETS["quality"],
                "bypass": BYPASS_PRESETS["quality"]},
    "balanced": {"cache": RollingCacheConfig(threshold=0.12, max_age=3, start_percent=0.15),
                 "prune": PRUNE_PRESETS["balanced"],
                 "bypass": ChainBypassConfig(threshold=0.06, max_consecutive=2, start_percent=0.2)},
    "fast": {"cache": CACHE_PRESETS["balanced"], "prune": PRUNE_PRESETS["fast"],
             "bypass": BYPASS_PRESETS["fast"]},
}


def _check(name: str) -> None:
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}; pick one of {PRESET_NAMES}")


def preset_config(mechanism: str, name: str):
    """The config of one mechanism's preset (None for "off")."""
    if mechanism not in PRESETS:
        raise ValueError(f"unknown accelerator {mechanism!r}; pick one of {sorted(PRESETS)}")
    _check(name)
    return PRESETS[mechanism][name]


def apply_preset(specs, mechanism: str, name: str) -> list:
    """The spec list with `mechanism` at preset `name`; "off" removes it."""
    cfg = preset_config(mechanism, name)
    if cfg is None:
        return [(n, c) for n, c in (specs or []) if n != mechanism]
    return _APPLY[mechanism](specs, cfg)


def turbo4d_specs(name: str, specs: Optional[list] = None) -> list:
    """The spec list with all three mechanisms at the combined preset `name` ("off" removes them)."""
    _check(name)
    out = [(n, c) for n, c in (specs or []) if n not in PRESETS]
    for mech, cfg in TURBO4D_PRESETS[name].items():
        out = _APPLY[mech](out, cfg)
    return out
