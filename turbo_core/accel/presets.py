"""Named settings for each accelerator and for the three together ("Turbo4D").

Chosen from the sweeps of `python -m bench.bench_accel --sweep` on the trained default model
(bench/results/bench_accel.json); re-tune when the model or the sampler changes, and use
`python -m turbo_core.accel.calibrate` for a model-specific threshold.

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

# Whole steps carry the saving: measured on the embedded model, a block-level threshold on top
# cost up to 5 dB for about 10% less compute, so the presets leave it at 0 (custom can set it).
# kappa_prior 0.4 is the forecast-error rate the width-128 embedded model measured at step 9,503
# (`kappa_measured` in a run's summary); its step-16,140 weights measured 0.24 and the width-192
# default 0.19 (4 x 4, calibrate's probe: `python -m turbo_core.accel.calibrate --field
# step_threshold --views 4 --frames 4 --seeds 1000000`), so 0.4 is on the careful side: it only
# shortens the first jump. The presets bound the skips by the error estimate alone (no count
# limit, and the end of the schedule may be skipped too): a count limit or an always-run tail
# spends calls at the lowest noise levels, where the denoised image no longer moves. The number of calls then follows the error budget, not the step
# count. 2-core CPU, 2 held-out scenes, 4 x 8, PSNR vs full compute (fewer Karras steps at the
# same calls in brackets); width-192 default (bench/results/bench_accel_cpu_default.json):
#   20 steps: quality 7 calls 45.4 dB, balanced 3 calls 37.2 dB (33.6), fast 2 calls 34.5 dB (30.7)
# width-128 default:
#   20 steps: quality 8 calls 45.8 dB (41.5), balanced 3 calls 35.5 dB (32.5), fast 2 calls 33.2 dB (29.2)
#   50 steps: quality 9 calls 41.8 dB, balanced 4 calls 35.9 dB (33.0), fast 2 calls 32.0 dB (28.4)
_STEPS = dict(threshold=0.0, start_percent=0.0, end_percent=1.0, kappa_prior=0.4, step_max_skips=10_000)
BYPASS_PRESETS = {
    "off": None,
    "quality": ChainBypassConfig(step_threshold=0.03, **_STEPS),
    "balanced": ChainBypassConfig(step_threshold=0.1, **_STEPS),
    "fast": ChainBypassConfig(step_threshold=0.2, **_STEPS),
}

PRESETS = {"cache": CACHE_PRESETS, "prune": PRUNE_PRESETS, "bypass": BYPASS_PRESETS}
_APPLY = {"cache": apply_rolling_cache, "prune": apply_token_pruning, "bypass": apply_chain_bypass}

# The combined presets: the bypass with whole steps, plus the cache (and at fast the pruner) on the
# calls that run. Measured rows: BENCHMARKS.md ("Accelerators on the embedded model").
TURBO4D_PRESETS = {
    "off": {},
    "quality": {"bypass": BYPASS_PRESETS["quality"],
                "cache": RollingCacheConfig(threshold=0.1)},
    "balanced": {"bypass": BYPASS_PRESETS["balanced"],
                 "cache": RollingCacheConfig(threshold=0.2)},
    "fast": {"bypass": BYPASS_PRESETS["fast"],
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
