"""Named settings for each accelerator and for the three together ("Turbo4D").

PROVISIONAL: chosen from one sweep (`python -m bench.bench_accel --sweep`) of the trained default
model as it was on 2026-11-22; re-tune when the model or the sampler changes (the lead will), and
use `python -m turbo_core.accel.calibrate` for a model-specific threshold.

In the combined presets each mechanism is set more gently than alone: their savings compound, and
so do their errors (a block the bypass skips is one the cache cannot refresh).
"""
from __future__ import annotations

from typing import Optional

from .bypass import ChainBypassConfig, apply_chain_bypass
from .cache import RollingCacheConfig, apply_rolling_cache
from .prune import TokenPrunerConfig, apply_token_pruning

PRESET_NAMES = ("off", "quality", "balanced", "fast")

# Figures in the comments: trained default model, 16 held-out scenes x 8 frames x 4 views, 20 Euler
# steps, one H100 GPU (bench/results/bench_accel.json): end-to-end speedup, PSNR against full
# compute, change of PSNR against ground truth. Targets: quality >= 45 dB and no loss against the
# ground truth, balanced >= 38 dB and < 0.5 dB loss, fast >= 30 dB.
CACHE_PRESETS = {
    "off": None,
    "quality": RollingCacheConfig(threshold=0.1, max_age=3, start_percent=0.15),    # 1.11x, 54.9 dB, +0.03
    "balanced": RollingCacheConfig(threshold=0.2, max_age=3, start_percent=0.15),   # 1.18x, 41.9 dB, -0.07
    "fast": RollingCacheConfig(threshold=0.3, max_age=5, start_percent=0.1),        # 1.39x, 34.1 dB, -1.3
}

PRUNE_PRESETS = {
    "off": None,
    "quality": TokenPrunerConfig(keep_start=0.75, keep_end=0.5, start_percent=0.1),  # 1.02x, 45.3 dB, 0.0
    "balanced": TokenPrunerConfig(keep_start=0.45, keep_end=0.3, start_percent=0.1),  # 1.23x, 38.1 dB, -0.37
    "fast": TokenPrunerConfig(keep_start=0.3, keep_end=0.15, start_percent=0.1),      # 1.38x, 32.4 dB, -1.6
}

BYPASS_PRESETS = {
    "off": None,
    "quality": ChainBypassConfig(threshold=0.05, max_consecutive=2, start_percent=0.2),  # 1.19x, 59.8 dB, +0.03
    "balanced": ChainBypassConfig(threshold=0.08, max_consecutive=2, start_percent=0.2),  # 1.27x, 44.8 dB, -0.49
    "fast": ChainBypassConfig(threshold=0.15, max_consecutive=3, start_percent=0.15),     # 1.65x, 32.0 dB, -3.2
}

PRESETS = {"cache": CACHE_PRESETS, "prune": PRUNE_PRESETS, "bypass": BYPASS_PRESETS}
_APPLY = {"cache": apply_rolling_cache, "prune": apply_token_pruning, "bypass": apply_chain_bypass}

# Measured the same way (bench/results/bench_accel.json; the final presets again in
# bench_accel_presets.json: 1.17x, 1.37x, 1.93x; timings vary ~10% between runs). Bypass + cache
# alone: b.05+c.1 1.17x, 55.0 dB, +0.04; b.08+c.2 1.38x, 40.7 dB, -0.58; b.12+c.3 1.74x, 31.4 dB,
# -2.7. With the pruner added (keep .8/.6, .6/.45, .45/.3): 1.07x 46.8 dB, 1.25x 36.1 dB, 1.71x
# 29.9 dB: on this model (4 views x 8 frames, 16 x 16 tokens) camera and motion attention are a
# small share of the time, so the pruner adds error for little speed. Quality and balanced
# therefore leave it out; fast keeps all three levels, at a small cost (1.5 dB, 2% speed) against
# bypass + cache alone, and is where a larger V x F grid gains from it.
TURBO4D_PRESETS = {
    "off": {},
    "quality": {"bypass": ChainBypassConfig(threshold=0.05),                          # 1.17x, 55.0 dB, +0.04
                "cache": RollingCacheConfig(threshold=0.1)},
    "balanced": {"bypass": ChainBypassConfig(threshold=0.08),                         # 1.38x, 40.7 dB, -0.58
                 "cache": RollingCacheConfig(threshold=0.2)},
    "fast": {"bypass": ChainBypassConfig(threshold=0.12, max_consecutive=3),          # 1.71-1.93x, 29.9 dB, -3.1
             "cache": RollingCacheConfig(threshold=0.3, max_age=5),
             "prune": TokenPrunerConfig(keep_start=0.45, keep_end=0.3, start_percent=0.1)},
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
