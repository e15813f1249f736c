"""Speed and quality of the Turbo4D accelerators, alone and together, against full compute and a
fixed-interval cache baseline, on held-out procedural scenes.

    python -m bench.bench_accel --device cuda [--sweep] [--out bench/results]
    python -m bench.bench_accel --device cuda --large [--calibrated bench/calibrated.json]
    python -m bench.bench_accel --device cpu --tiny            # toy size, for CI

Default mode: the trained embedded model (models/turbo4d_default.safetensors; random weights with
a warning if it is missing), all scenes of the batch in one sampling run (the layout's batch
axis), the same noise for every configuration. Every configuration is timed end to end,
device-synchronised, after an untimed warm-up of each, in the same process as the full-compute
reference it is divided by; quality is PSNR/SSIM (per image, mean) against the full-compute result
of the same noise and against the ground-truth renders. Writes bench_accel.json and
speed_quality.png (speedup vs PSNR against full compute).

--large: SV4D 2.0 scale with random weights in bf16 (CONFIGS["large"], 12 frames x 4 views = 48
images of 72 x 72 tokens, 50 steps): latency and peak memory with and without the accelerators,
using saved calibrated settings if given. Quality there is only agreement with full compute; a
random network says nothing about image quality.

Baselines implemented here (not in the product): "fewer-steps-N" samples the same way with N
steps instead of the run's (the trivial accelerator: any setting slower or worse than it is not
worth having), "fixed-attn-kN" broadcasts every sub-attention's
output for N-1 calls after computing it (PAB-like), "fixed-chain-kN" reuses every block's residual
but the first for N-1 calls (DeepCache-like, the shallow block always runs); both inside the same
percent window as the accelerators; "fbcache-tX" skips every block but the first while the first
block's residual differs from the last full call's by less than X (FBCache-like).

Every row's first warm-up run has each model call under torch.cuda.set_sync_debug_mode("error"):
"syncs-in-call none" in the log (host_sync_in_call in the JSON) proves no call synced with the host;
otherwise it names where the first sync was.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from typing import Optional

import torch

from turbo_core.accel.base import Accelerator
from turbo_core.accel.block_reuse import BlockReuseConfig
from turbo_core.accel.bypass import ChainBypassConfig
from turbo_core.accel.cache import RollingCacheConfig
from turbo_core.accel.presets import apply_preset, turbo4d_specs
from turbo_core.accel.prune import TokenPrunerConfig
from turbo_core.accel.registry import build_run
from turbo_core.accel.run import Turbo4DRun
from turbo_core.accel.step_skip import PRESETS as STEP_PRESETS, StepSkipConfig
from turbo_core.accel.script import sample_accelerated
from turbo_core.accel.token_reuse import TokenReuseConfig
from turbo_core.data.scenes import EVAL_SEED_START, scene_samples
from turbo_core.diffusion import EDM, karras_sigmas
from turbo_core.metrics import finite_mean, measure, psnr, ssim
from turbo_core.models import CONFIGS, SCMNet

DEFAULT_MODEL = "models/turbo4d_default.safetensors"
HELD_OUT_SEED = EVAL_SEED_START


# --- baselines ------------------------------------------------------------------------------------

class _FixedState:
    def __init__(self):
        self.entries = {}

    def reset(self):
        self.entries.clear()

    def nbytes(self):
        return sum(v.numel() * v.element_size() for _, v in self.entries.values())


class FixedIntervalAttention(Accelerator):
    """PAB-like: a sub-attention computed at call c is broadcast unchanged to calls c+1..c+k-1."""

    name = "fixed-attn"
    state_class = _FixedState

    def __init__(self, interval: int, start: float = 0.15, end: float = 0.95):
        super().__init__()
        self.k, self.start, self.end = interval, start, end

    def attend(self, d, block, axis, seqs, index, nxt):
        step = d.step
        st = self.state(d)
        e = st.entries.get((block, axis))
        if (e is not None and self.start <= step.percent <= self.end and step.index - e[0] < self.k
                and e[1].shape == seqs.shape and index is None):
            if d.stats is not None:
                d.stats.attention_reused(block, axis, seqs.shape[0], source="cache")
            return e[1].clone()
        out = nxt(seqs, index)
        if index is None and step.percent <= self.end:
            st.entries[(block, axis)] = (step.index, out.detach().clone())
        return out


class FixedIntervalChain(Accelerator):
    """DeepCache-like: every block but the first reuses its residual for k-1 calls after running."""

    name = "fixed-chain"
    state_class = _FixedState

    def __init__(self, interval: int, start: float = 0.15, end: float = 0.95):
        super().__init__()
        self.k, self.start, self.end = interval, start, end

    def chain(self, d, block, x, nxt):
        step = d.step
        st = self.state(d)
        e = st.entries.get(block)
        if (block > 0 and e is not None and self.start <= step.percent <= self.end
                and step.index - e[0] < self.k and e[1].shape == x.shape):
            if d.stats is not None:
                d.stats.chain_bypassed(block)
            return x + e[1]
        x_in = x.clone()
        y = nxt(x)
        if block > 0 and step.percent <= self.end:
            st.entries[block] = (step.index, (y - x_in).detach())
        return y


class _FirstBlockState:
    def __init__(self):
        self.r0 = self.rest = self.x_in = None
        self.skip = False

    def reset(self):
        self.__init__()

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.r0, self.rest) if t is not None)


class FirstBlockCache(Accelerator):
    """FBCache-like (ParaAttention's first-block cache): the first block always runs; when its
    residual differs from the one of the last call that ran every block by less than `threshold`
    (relative L1), the other blocks are skipped and their cached residual added. The comparison is
    read on the host inside the call (one sync per call: this baseline's design, not ours)."""

    name = "fbcache"
    state_class = _FirstBlockState

    def __init__(self, threshold: float, start: float = 0.0, end: float = 1.0):
        super().__init__()
        self.threshold, self.start, self.end = threshold, start, end

    def chain(self, d, block, x, nxt):
        st, step = self.state(d), d.step
        if block == 0:
            x_in = x.clone()
            y = nxt(x)
            r0 = (y - x_in).detach()
            st.skip = False
            if st.r0 is not None and st.rest is not None and self.start <= step.percent <= self.end:
                diff = float((r0 - st.r0).abs().mean() / st.r0.abs().mean().clamp_min(1e-12))  # the sync
                st.skip = diff < self.threshold
            if not st.skip:
                st.r0 = r0
            return y
        if st.skip:
            if d.stats is not None:
                d.stats.block_reused(block, block == 1)
            return x + st.rest if block == 1 else x
        if block == 1:
            st.x_in = x
        y = nxt(x)
        if block == d.stats.blocks - 1 and st.x_in is not None:
            st.rest, st.x_in = (y - st.x_in).detach(), None
        return y


class SyncChecked:
    """The network with torch.cuda.set_sync_debug_mode("error") around each of its calls: a host
    sync inside a model call (a .item(), a blocking copy, a data-dependent shape) raises there.
    The accelerators' per-call hooks outside the network (the step decisions, end_call's one read)
    are not inside it."""

    def __init__(self, net):
        self.net = net

    def __getattr__(self, name):
        return getattr(self.net, name)

    def __call__(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return self.net(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)


# --- model and data -------------------------------------------------------------------------------

def random_net(config: str, seed: int = 0, std: float = 0.02) -> SCMNet:
    """Stock init plus small random output projections: the stock init zeroes them, and a network
    whose blocks are identities would make every accelerator look free. Seeded: every process
    benchmarks the same network."""
    torch.manual_seed(seed)
    net = SCMNet(CONFIGS[config])
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 1 and torch.count_nonzero(p) == 0:
                p.normal_(0, std)
    return net


def load_net(path: Optional[str], config: str, device, dtype=None) -> tuple[SCMNet, str]:
    if path and os.path.isfile(path):
        from turbo_core.models.io import load_model

        net = load_model(path, device="cpu")
        source = f"trained: {os.path.basename(path)}"
    else:
        if path:
            warnings.warn(f"{path} not found: benchmarking RANDOM weights ({config} config). Speed figures hold; "
                          f"quality figures say nothing about a trained model.")
        net = random_net(config)
        source = f"random weights ({config})"
    net = net.to(device=device, dtype=dtype or next(net.parameters()).dtype).eval()
    return net, source


def make_batch(seeds, views, frames, size, device) -> dict:
    """All scenes stacked on the layout's batch axis, (batch, frame, view) order."""
    samples = scene_samples(seeds, views, frames, size, device)
    return {k: torch.cat([s[k] for s in samples]) for k in ("noise", "cond", "camera", "gt")}


# --- configurations -------------------------------------------------------------------------------

def configurations(args, calibration=None) -> list[dict]:
    """name, family, and either specs or a factory of a prebuilt run (baselines)."""
    rows = [{"name": "full", "family": "full", "specs": []}]
    levels = ("balanced",) if args.tiny else ("quality", "balanced", "fast")
    for mech in ("cache", "prune", "bypass"):  # bypass: the Chain Bypass node's presets (whole steps)
        for lv in levels:
            rows.append({"name": f"{mech}-{lv}", "family": mech,
                         "specs": apply_preset([], "step" if mech == "bypass" else mech, lv)})
    for lv in levels:
        rows.append({"name": f"turbo4d-{lv}", "family": "turbo4d", "specs": turbo4d_specs(lv)})
    for k in ((2,) if args.tiny else (2, 3)):
        rows.append({"name": f"fixed-attn-k{k}", "family": "fixed",
                     "run": lambda k=k: Turbo4DRun([FixedIntervalAttention(k)])})
        rows.append({"name": f"fixed-chain-k{k}", "family": "fixed",
                     "run": lambda k=k: Turbo4DRun([FixedIntervalChain(k)])})
    rows += per_call_rows(args)
    # The baseline every accelerator must beat: simply sampling with fewer steps.
    for n in ((3,) if args.tiny else (10, 7, 5, 4, 3, 2)):
        rows.append({"name": f"fewer-steps-{n}", "family": "fewer-steps", "steps": n, "specs": []})
    for name in (args.only or "").split(","):  # any other length named in --only (fewer-steps-11)
        if name.startswith("fewer-steps-") and name[12:].isdigit() and all(r["name"] != name for r in rows):
            rows.append({"name": name, "family": "fewer-steps", "steps": int(name[12:]), "specs": []})
    if calibration is not None:
        specs = calibration.specs(turbo4d_specs("balanced"))
        rows.append({"name": f"turbo4d-calibrated({calibration.mechanism}.{calibration.field}={calibration.value})",
                     "family": "turbo4d", "specs": specs})
    if args.sweep:
        for t in (0.05, 0.1, 0.2, 0.3, 0.5):
            rows.append({"name": f"sweep-cache-t{t}", "family": "sweep-cache",
                         "specs": [("cache", RollingCacheConfig(threshold=t))]})
        for age in (1, 2, 5, 8):
            rows.append({"name": f"sweep-cache-age{age}", "family": "sweep-cache",
                         "specs": [("cache", RollingCacheConfig(threshold=0.3, max_age=age))]})
        for keep in (0.7, 0.5, 0.3, 0.15, 0.05):
            rows.append({"name": f"sweep-prune-keep{keep}", "family": "sweep-prune",
                         "specs": [("prune", TokenPrunerConfig(keep_start=min(1.0, keep * 1.5), keep_end=keep))]})
        for sal in (0.0, 0.25, 1.0, 2.0):
            rows.append({"name": f"sweep-prune-sal{sal}", "family": "sweep-prune",
                         "specs": [("prune", TokenPrunerConfig(keep_start=0.3, keep_end=0.15, saliency=sal))]})
        for adapt in (0.0, 1.0):
            rows.append({"name": f"sweep-prune-adapt{adapt}", "family": "sweep-prune",
                         "specs": [("prune", TokenPrunerConfig(keep_start=0.3, keep_end=0.15, adapt=adapt))]})
        for t in (0.02, 0.05, 0.1, 0.2, 0.4):
            rows.append({"name": f"sweep-bypass-t{t}", "family": "sweep-bypass",
                         "specs": [("bypass", ChainBypassConfig(threshold=t, max_consecutive=3))]})
        for mc in (1, 6):
            rows.append({"name": f"sweep-bypass-mc{mc}", "family": "sweep-bypass",
                         "specs": [("bypass", ChainBypassConfig(threshold=0.1, max_consecutive=mc))]})
        # Combinations: the bypass carries most of the saving, the cache and the pruner add theirs
        # on the calls the bypass runs.
        combos = {"b.05+c.1": [("bypass", ChainBypassConfig(threshold=0.05)), ("cache", RollingCacheConfig(threshold=0.1))],
                  "b.05+c.15+p.4": [("bypass", ChainBypassConfig(threshold=0.05)),
                                    ("cache", RollingCacheConfig(threshold=0.15)),
                                    ("prune", TokenPrunerConfig(keep_start=0.5, keep_end=0.4))],
                  "b.08+c.2": [("bypass", ChainBypassConfig(threshold=0.08)), ("cache", RollingCacheConfig(threshold=0.2))],
                  "b.08+c.2+p.3": [("bypass", ChainBypassConfig(threshold=0.08)),
                                   ("cache", RollingCacheConfig(threshold=0.2)),
                                   ("prune", TokenPrunerConfig(keep_start=0.45, keep_end=0.3, saliency=0.0))],
                  "b.12+c.3": [("bypass", ChainBypassConfig(threshold=0.12, max_consecutive=3)),
                               ("cache", RollingCacheConfig(threshold=0.3, max_age=5))]}
        # Whole steps: forecast denoised images in place of model calls.
        for order in (1, 0):
            for t in ((0.01, 0.03, 0.1, 0.3) if order else (0.03, 0.1, 0.3)):
                for mx in (3, 6, 12):
                    rows.append({"name": f"sweep-step-o{order}-t{t}-m{mx}", "family": "sweep-step",
                                 "specs": [("step", StepSkipConfig(step_threshold=t, step_max_skips=mx,
                                                                   forecast_order=order, start_percent=0.0))]})
        for t, mx in ((0.03, 6), (0.1, 6), (0.3, 12)):
            combos[f"s{t}m{mx}+b.08+c.2"] = [("step", StepSkipConfig(step_threshold=t, step_max_skips=mx,
                                                                     start_percent=0.0)),
                                             ("bypass", ChainBypassConfig(threshold=0.08, start_percent=0.0)),
                                             ("cache", RollingCacheConfig(threshold=0.2))]
            combos[f"s{t}m{mx}+b.12+c.3+p.3"] = [
                ("step", StepSkipConfig(step_threshold=t, step_max_skips=mx, start_percent=0.0)),
                ("bypass", ChainBypassConfig(threshold=0.12, max_consecutive=3, start_percent=0.0)),
                ("cache", RollingCacheConfig(threshold=0.3, max_age=5)),
                ("prune", TokenPrunerConfig(keep_start=0.45, keep_end=0.3, start_percent=0.1))]
        for name, specs in combos.items():
            rows.append({"name": f"sweep-turbo4d-{name}", "family": "sweep-turbo4d", "specs": specs})
    if args.only:
        keep = set(args.only.split(","))
        rows = [r for r in rows if r["name"] in keep or r["name"] == "full"]
    return rows


def per_call_rows(args) -> list[dict]:
    """The per-call levels (block reuse, token reuse): their node presets, block reuse as-is
    ("block-reuse-asis") beside the forecast (its default), both together (the bound split), each
    with the step skip (Chain Bypass balanced's whole steps); the FBCache-like baseline beside the
    DeepCache-like fixed chain."""
    step = apply_preset([], "step", "balanced")
    rows = []
    for lv in ("quality", "balanced", "fast"):
        for mech, short in (("block_reuse", "block-reuse"), ("token_reuse", "token-reuse")):
            rows.append({"name": f"{short}-{lv}", "family": "per-call", "specs": apply_preset([], mech, lv)})
    rows.append({"name": "block-reuse-asis", "family": "per-call",
                 "specs": [("block_reuse", BlockReuseConfig(forecast=0))]})
    # Together they share the default bound: half of it each.
    rows.append({"name": "per-call", "family": "per-call",
                 "specs": [("block_reuse", BlockReuseConfig(memory_fraction=0.05)),
                           ("token_reuse", TokenReuseConfig(memory_fraction=0.05))]})
    for mech, short in (("block_reuse", "block-reuse"), ("token_reuse", "token-reuse")):
        rows.append({"name": f"{short}+step", "family": "per-call", "specs": step + apply_preset([], mech, "balanced")})
    # Token reuse through the PyTorch operations its fused kernels replace (turbo_core/kernels/
    # token_fuse.py), beside the default rows in the same process.
    for lv in ("balanced", "fast"):
        rows.append({"name": f"token-reuse-{lv}-unfused", "family": "per-call",
                     "specs": apply_preset([], "token_reuse", lv), "env": {"TURBO4D_TOKEN_FUSE": "torch"}})
    # Measured first (drift_prior 0: a span is reused only once it has run twice), alone and with
    # the step skip's presets.
    for t in (0.12, 0.25, 0.4):
        rows.append({"name": f"block-reuse-m-t{t}", "family": "per-call",
                     "specs": [("block_reuse", BlockReuseConfig(threshold=t, drift_prior=0.0))]})
    for lv, t in (("quality", 0.12), ("balanced", 0.25), ("fast", 0.4)):
        rows.append({"name": f"step-{lv}+block-reuse-m-t{t}", "family": "per-call",
                     "specs": apply_preset([], "step", lv) + [("block_reuse", BlockReuseConfig(threshold=t, drift_prior=0.0))]})
    for t in (0.05, 0.1, 0.2):
        rows.append({"name": f"fbcache-t{t}", "family": "fixed", "run": lambda t=t: Turbo4DRun([FirstBlockCache(t)])})
    # Full compute through PyTorch's LayerNorm (full compute takes the fused norm by default,
    # turbo_core/kernels/token_fuse.py): the baseline before the kernels reached the full path.
    rows.append({"name": "full-unfused", "family": "full", "specs": [], "env": {"TURBO4D_TOKEN_FUSE": "torch"}})
    if getattr(args, "percall_sweep", False):
        rows += percall_sweep_rows()
    if getattr(args, "compose_sweep", False):
        rows += compose_sweep_rows()
    rows += token_sweep_rows(getattr(args, "only", ""))
    return rows


def _step_at(t: float):
    """The step skip's balanced preset at step_threshold t."""
    return [("step", dataclasses.replace(STEP_PRESETS["balanced"], step_threshold=t))]


def compose_sweep_rows() -> list[dict]:
    """Candidates for Turbo4D balanced ("cb-..." rows, --compose-sweep): a more careful step skip
    (step_threshold s, so more calls run and closer together) with block reuse on the calls it runs,
    kept across up to 5 skipped calls (max_age 6), measured first "m" or on the prior "p"; "-wW"
    weighs the estimate by 1 + W per call skipped just before (skip_weight: reuse across short gaps
    only). "step-sS" is the step skip alone at that threshold (its own frontier), "sw-br-m-t0.25-s1"
    and "-s5" the earlier sweep's rows again, for their call patterns."""
    rows = []
    for s in (0.03, 0.05, 0.07):
        rows.append({"name": f"step-s{s}", "family": "sweep-compose", "specs": _step_at(s)})
        for prior, dp, ts in (("m", 0.0, (0.25, 0.4, 0.6)), ("p", 0.08, (0.25, 0.4))):
            for t in ts:
                rows.append({"name": f"cb-s{s}-{prior}-t{t}", "family": "sweep-compose",
                             "specs": _step_at(s) + [("block_reuse", BlockReuseConfig(
                                 threshold=t, max_age=6, max_skipped=5, drift_prior=dp))]})
    # Around the best point of the grid on the large configuration (s0.05, m, t0.4).
    for s, t in ((0.04, 0.4), (0.06, 0.4), (0.05, 0.35), (0.05, 0.5), (0.04, 0.5), (0.06, 0.5)):
        rows.append({"name": f"cb-s{s}-m-t{t}", "family": "sweep-compose",
                     "specs": _step_at(s) + [("block_reuse", BlockReuseConfig(
                         threshold=t, max_age=6, max_skipped=5, drift_prior=0.0))]})
    for s, prior, dp, t in ((0.05, "p", 0.08, 0.4), (0.07, "p", 0.08, 0.4), (0.1, "p", 0.08, 0.4), (0.1, "m", 0.0, 0.4)):
        for w in (0.5, 2.0):
            rows.append({"name": f"cb-s{s}-{prior}-t{t}-w{w}", "family": "sweep-compose",
                         "specs": _step_at(s) + [("block_reuse", BlockReuseConfig(
                             threshold=t, max_age=6, max_skipped=5, drift_prior=dp, skip_weight=w))]})
    return rows


TOKEN_SWEEP = re.compile(r"token-reuse-t(\d*\.?\d+)((?:-[bahkw]\d*\.?\d+)*)")
TOKEN_SWEEP_FIELDS = {"b": ("buckets", int), "a": ("max_age", int), "h": ("head", int), "k": ("keep_min", float),
                      "w": ("weigh_final", lambda v: bool(int(v)))}


def token_sweep_rows(only: str) -> list[dict]:
    """Token reuse at the settings a row's name in --only spells: "token-reuse-t0.35" (threshold),
    then any of -b<buckets>, -a<max_age>, -h<head blocks>, -k<keep_min>, -w0 (weighed by the call's
    denoised image only: the planning rule before weigh_final), e.g. "token-reuse-t0.3-b8-a3"."""
    rows = []
    for name in (only or "").split(","):
        m = TOKEN_SWEEP.fullmatch(name)
        if m is None:
            continue
        kw = {"threshold": float(m.group(1))}
        for part in filter(None, m.group(2).split("-")):
            field, cast = TOKEN_SWEEP_FIELDS[part[0]]
            kw[field] = cast(part[1:])
        rows.append({"name": name, "family": "per-call", "specs": [("token_reuse", TokenReuseConfig(**kw))]})
    return rows


def percall_sweep_rows() -> list[dict]:
    """The step skip's balanced preset with the per-call levels kept across the calls it skips
    (max_skipped, up to max_age 6 calls apart; measured first "m" or on the prior "p"), and with
    token reuse: candidates for Turbo4D balanced ("sw-..." rows, --percall-sweep)."""
    step = apply_preset([], "step", "balanced")
    rows = []
    for t in (0.25, 0.4):
        for prior, dp in (("m", 0.0), ("p", 0.08)):
            for ms in (1, 2, 3, 4, 5):
                rows.append({"name": f"sw-br-{prior}-t{t}-s{ms}", "family": "sweep-percall",
                             "specs": step + [("block_reuse", BlockReuseConfig(threshold=t, max_age=6, max_skipped=ms,
                                                                               drift_prior=dp))]})
    for t in (0.25, 0.4):
        rows.append({"name": f"sw-tr-t{t}-s5", "family": "sweep-percall",
                     "specs": step + [("token_reuse", TokenReuseConfig(threshold=t, max_age=6, max_skipped=5))]})
        for prior, dp in (("m", 0.0), ("p", 0.08)):  # both levels, the bound split
            rows.append({"name": f"sw-br-{prior}-t{t}-s5+tr", "family": "sweep-percall",
                         "specs": step + [("block_reuse", BlockReuseConfig(threshold=t, max_age=6, max_skipped=5,
                                                                           drift_prior=dp, memory_fraction=0.05)),
                                          ("token_reuse", TokenReuseConfig(threshold=t, max_age=6, max_skipped=5,
                                                                           memory_fraction=0.05))]})
    return rows


def _spec_data(specs) -> list:
    return [[n, c.to_dict() if hasattr(c, "to_dict") else c] for n, c in specs]


# --- running --------------------------------------------------------------------------------------

def run_once(net, edm, batch, sigmas, views, frames, row, device, sync_check=False):
    if "steps" in row:  # the fewer-steps baseline: the same sampler on a shorter schedule
        sigmas = karras_sigmas(row["steps"], edm.sigma_min, edm.sigma_max, device=sigmas.device)
    run = row["run"]() if "run" in row else build_run(row["specs"])
    model = SyncChecked(net) if sync_check else net
    saved = {k: os.environ.get(k) for k in row.get("env", {})}
    os.environ.update(row.get("env", {}))
    try:
        with measure(device) as m:
            x, stats = sample_accelerated(model, edm, None, batch["noise"], sigmas, batch["cond"], batch["camera"],
                                          views, frames, run=run)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return x.float().clamp(-1, 1), stats, m


def sync_checked_warmup(net, edm, batch, sigmas, views, frames, row, device) -> str:
    """One untimed run with every model call under torch.cuda.set_sync_debug_mode("error"): "none"
    when no call synced, else where the first one did (the run is then repeated unchecked)."""
    if torch.device(device).type != "cuda":
        run_once(net, edm, batch, sigmas, views, frames, row, device)
        return "not checked (CPU)"
    try:
        run_once(net, edm, batch, sigmas, views, frames, row, device, sync_check=True)
        return "none"
    except RuntimeError as e:
        import traceback

        torch.cuda.set_sync_debug_mode(0)
        where = [f for f in traceback.extract_tb(e.__traceback__) if "turbo_core" in f.filename or "bench" in f.filename]
        site = f"{where[-1].filename.split('/')[-1]}:{where[-1].lineno} {where[-1].line}" if where else "?"
        print(f"  host sync inside a model call ({row['name']}): {str(e).splitlines()[0][:100]} at {site}", flush=True)
    # Out of the except clause: the exception's frames (and the activations they hold) can go.
    gc.collect()
    run_once(net, edm, batch, sigmas, views, frames, row, device)
    return site


def bench(args, net, edm, batch, views, frames, steps, device, rows, log, on_row=None) -> list[dict]:
    sigmas = karras_sigmas(steps, edm.sigma_min, edm.sigma_max, device=device)
    dtype = next(net.parameters()).dtype
    batch = {k: (v.to(dtype) if k in ("noise", "cond") else v) for k, v in batch.items()}
    results, ref = [], None
    for row in rows:
        # What a previous row left (an exception's frames hold its activations until collected)
        # must not count in this row's peak memory.
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        # Kernels for this configuration's shapes, allocator pools; the first warm-up run checks
        # that no model call syncs with the host.
        syncs = sync_checked_warmup(net, edm, batch, sigmas, views, frames, row, device)
        for _ in range(args.warmup - 1):
            run_once(net, edm, batch, sigmas, views, frames, row, device)
        times, peaks = [], []
        for _ in range(args.repeats):
            x, stats, m = run_once(net, edm, batch, sigmas, views, frames, row, device)
            times.append(m.seconds)
            peaks.append(m.peak_bytes)
        if ref is None:
            ref = x
        seconds = min(times)
        pf, sf = psnr(x, ref), ssim(x, ref) if x.shape[-1] >= 11 else None
        gt = batch["gt"].float()
        s = stats.summary()
        res = {
            "name": row["name"], "family": row["family"], "specs": _spec_data(row.get("specs", [])),
            "seconds": seconds, "seconds_each": times,
            "speedup": None,  # filled below against full
            "peak_memory_mb": None if peaks[0] is None else max(peaks) / 2 ** 20,
            "psnr_vs_full": None if row["name"] == "full" else finite_mean(pf) if torch.isfinite(pf).any() else float("inf"),
            "ssim_vs_full": None if sf is None or row["name"] == "full" else float(sf.mean()),
            "psnr_vs_gt": float(psnr(x, gt).mean()),
            "ssim_vs_gt": float(ssim(x, gt).mean()) if x.shape[-1] >= 11 else None,
            "compute_fraction": stats.compute_fraction,
            "chains_bypassed": s["chains_bypassed"], "chains_total": s["chains_total"],
            "cache_hits": s["cache_hits"], "cache_misses": s["cache_misses"],
            "sequences_computed": s["sequences_computed"], "sequences_total": s["sequences_total"],
            "cache_memory_peak_mb": s["cache_memory_peak_mb"], "cache_bound_mb": s["cache_bound_mb"],
            "model_calls_run": s["model_calls_run"], "model_calls": s["model_calls"],
            "tokens_computed": s["tokens_computed"], "tokens_offered": s["tokens_offered"],
            "blocks_reused": s["blocks_reused"], "spans_reused": s["spans_reused"],
            "host_sync_in_call": syncs, "env": row.get("env", {}),
            # One character a call: "#" ran whole, "r" some span reused, "." skipped whole.
            "pattern": "".join("." if t["cells"] and all(v == "bypassed" for v in t["cells"].values())
                               else "r" if any(v != "ran" for v in t["cells"].values()) else "#"
                               for t in stats.timeline),
        }
        results.append(res)
        log(f"{row['name']:<44} {seconds:8.3f}s  compute {stats.compute_fraction:6.3f}  "
            f"PSNR/full {_fmt(res['psnr_vs_full'])}  PSNR/gt {res['psnr_vs_gt']:.2f}  "
            f"peak {_fmt(res['peak_memory_mb'], 0)} MB  cache {s['cache_memory_peak_mb']:.1f} MB  "
            f"calls {s['model_calls_run']}/{s['model_calls']}  syncs-in-call {syncs}")
        t_full = results[0]["seconds"]
        for r in results:
            r["speedup"] = t_full / r["seconds"] if r["seconds"] > 0 else None
        if on_row is not None:  # a run stopped by a time limit keeps the rows it finished
            on_row(results)
    return results


def _fmt(v, nd=2):
    return "   -  " if v is None else ("  inf " if v == float("inf") else f"{v:6.{nd}f}")


# --- plot (matplotlib is not a dependency: drawn with OpenCV) -------------------------------------

COLORS = {"full": (0, 0, 0), "cache": (200, 90, 20), "prune": (40, 160, 40), "bypass": (30, 30, 210),
          "turbo4d": (150, 30, 150), "fixed": (120, 120, 120), "fewer-steps": (0, 140, 200),
          "per-call": (0, 170, 170),
          "sweep-step": (100, 100, 255), "sweep-cache": (230, 170, 120),
          "sweep-prune": (140, 210, 140), "sweep-bypass": (140, 140, 240), "sweep-turbo4d": (210, 140, 210)}


def plot(rows: list[dict], path: str, title: str) -> None:
    try:
        import cv2
        import numpy as np
    except ImportError:
        print(f"OpenCV is not installed here: no plot. Draw it elsewhere with --plot-from {path[:-4]}.json")
        return

    W, H, L, R, T, B = 1000, 700, 80, 260, 70, 60
    img = np.full((H, W, 3), 255, np.uint8)
    pts = [(r["speedup"], r["psnr_vs_full"], r) for r in rows if r["speedup"]]
    finite = [p for _, p, _ in pts if p is not None and math.isfinite(p)]
    y_top = (max(finite) + 5) if finite else 60.0
    y_bot = (min(finite) - 3) if finite else 0.0
    xs = [s for s, _, _ in pts]
    x_lo, x_hi = min(0.9, min(xs)), max(xs) * 1.08

    def X(v):
        return int(L + (v - x_lo) / (x_hi - x_lo) * (W - L - R))

    def Y(v):
        v = y_top if v is None or not math.isfinite(v) else v
        return int(H - B - (v - y_bot) / (y_top - y_bot) * (H - T - B))

    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.rectangle(img, (L, T), (W - R, H - B), (0, 0, 0), 1)
    for i in range(6):
        xv = x_lo + (x_hi - x_lo) * i / 5
        yv = y_bot + (y_top - y_bot) * i / 5
        cv2.line(img, (X(xv), H - B), (X(xv), H - B + 5), (0, 0, 0), 1)
        cv2.putText(img, f"{xv:.2f}x", (X(xv) - 18, H - B + 20), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.line(img, (L - 5, Y(yv)), (L, Y(yv)), (0, 0, 0), 1)
        cv2.putText(img, f"{yv:.1f}", (L - 45, Y(yv) + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.line(img, (X(1.0), T), (X(1.0), H - B), (210, 210, 210), 1)
    cv2.putText(img, "end-to-end speedup vs full compute (same run)", (L + 150, H - 15), font, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(img, title[:130], (10, 22), font, 0.42, (60, 60, 60), 1, cv2.LINE_AA)
    cv2.putText(img, "PSNR vs full compute, dB (top edge: exact)", (10, 52), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for s, p, r in pts:
        c = COLORS.get(r["family"], (0, 0, 0))
        sweep = r["family"].startswith("sweep")
        cv2.circle(img, (X(s), Y(p)), 3 if sweep else 6, c, -1, cv2.LINE_AA)
        if not sweep:
            cv2.putText(img, r["name"][:28], (X(s) + 7, Y(p) - 5), font, 0.38, c, 1, cv2.LINE_AA)
    for i, (fam, c) in enumerate(COLORS.items()):
        y = T + 20 + 22 * i
        cv2.circle(img, (W - R + 20, y - 4), 6, c, -1, cv2.LINE_AA)
        cv2.putText(img, fam, (W - R + 32, y), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(path, img)


# --- modes ----------------------------------------------------------------------------------------

def _device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="toy size (CONFIGS['tiny'], random weights) for CI")
    ap.add_argument("--large", action="store_true", help="SV4D 2.0 scale, random bf16 weights: latency and memory")
    ap.add_argument("--sweep", action="store_true", help="also sweep each mechanism's main settings")
    ap.add_argument("--percall-sweep", action="store_true",
                    help="also the step skip balanced with block/token reuse across skipped calls (sw-* rows)")
    ap.add_argument("--compose-sweep", action="store_true",
                    help="also a more careful step skip with block reuse on the calls it runs (cb-* rows)")
    ap.add_argument("--only", default="", help="comma-separated configuration names to run (plus full)")
    ap.add_argument("--scenes", type=int, default=None, help="held-out scenes, batched into one run")
    ap.add_argument("--views", type=int, default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (the minimum is kept)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration first")
    ap.add_argument("--calibrated", default=None, help="a calibration JSON (turbo_core.accel.calibrate)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--no-plot", action="store_true", help="write the JSON only (no speed_quality png)")
    ap.add_argument("--plot-from", default=None, help="only redraw the plot of a saved results JSON")
    args = ap.parse_args(argv)
    if args.plot_from:
        with open(args.plot_from) as f:
            rep = json.load(f)
        png = os.path.join(os.path.dirname(args.plot_from), "speed_quality_large.png" if rep["mode"] == "large"
                           else "speed_quality.png")
        plot(rep["rows"], png, rep.get("title", rep["model"]))
        print(f"wrote {png}")
        return 0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu (with --tiny for a quick run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    calibration = None
    if args.calibrated:
        from turbo_core.accel.calibrate import load_calibration

        calibration = load_calibration(args.calibrated)

    if args.large:
        config, dtype, path = "large", torch.bfloat16, None
        views, frames = args.views or 4, args.frames or 12
        steps, scenes = args.steps or 50, args.scenes or 1
        repeats = args.repeats or 2
    elif args.tiny:
        config, dtype, path = "tiny", None, None
        views, frames = args.views or 3, args.frames or 4
        steps, scenes = args.steps or 6, args.scenes or 2
        repeats = args.repeats or 1
    else:
        config, dtype, path = "default", None, args.model
        views, frames = args.views or 4, args.frames or 8
        steps, scenes = args.steps or 20, args.scenes or 16
        repeats = args.repeats or 2
    args.repeats = repeats
    net, source = load_net(path, config, device, dtype)
    edm = EDM(sigma_data=net.cfg.sigma_data)
    seeds = list(range(HELD_OUT_SEED, HELD_OUT_SEED + scenes))
    batch = make_batch(seeds, views, frames, net.cfg.image_size, device)

    if args.large:
        rows = [{"name": "full", "family": "full", "specs": []}]
        for mech in ("cache", "prune"):
            rows.append({"name": f"{mech}-balanced", "family": mech, "specs": apply_preset([], mech, "balanced")})
        for lv in ("quality", "balanced", "fast"):  # presets set on the embedded model, as they ship
            rows.append({"name": f"bypass-{lv}", "family": "bypass", "specs": apply_preset([], "step", lv)})
            rows.append({"name": f"turbo4d-{lv}", "family": "turbo4d", "specs": turbo4d_specs(lv)})
        rows += per_call_rows(args)
        for k in (2, 3):
            rows.append({"name": f"fixed-chain-k{k}", "family": "fixed",
                         "run": lambda k=k: Turbo4DRun([FixedIntervalChain(k)])})
        for n in (25, 10, 5, 3):
            rows.append({"name": f"fewer-steps-{n}", "family": "fewer-steps", "steps": n, "specs": []})
        if calibration is not None:
            rows.append({"name": "turbo4d-calibrated", "family": "turbo4d",
                         "specs": calibration.specs(turbo4d_specs("balanced"))})
        if args.only:
            keep = set(args.only.split(","))
            rows = [r for r in rows if r["name"] in keep or r["name"] == "full"]
    else:
        rows = configurations(args, calibration)

    header = (f"{source}, {net.cfg.depth} blocks x width {net.cfg.width}, {scenes} scene(s) x {frames} frames x "
              f"{views} views = {scenes * frames * views} images of {net.cfg.grid}x{net.cfg.grid} tokens, "
              f"{steps} Euler steps, {next(net.parameters()).dtype}, {_device_name(device)}")
    print(header, flush=True)
    t0 = time.time()
    name = "bench_accel_large" if args.large else "bench_accel"

    def report_of(results):
        return {
            "mode": "large" if args.large else "tiny" if args.tiny else "default",
            "model": source, "config": net.cfg.to_dict(), "device": _device_name(device),
            "torch": torch.__version__, "dtype": str(next(net.parameters()).dtype),
            "views": views, "frames": frames, "scenes": scenes, "seeds": seeds, "steps": steps,
            "repeats": repeats, "warmup": args.warmup, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "calibration": None if calibration is None else {"mechanism": calibration.mechanism,
                                                             "field": calibration.field, "value": calibration.value},
            "title": header, "wall_seconds": time.time() - t0, "rows": results,
        }

    def save(results):
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(report_of(results), f, indent=2)

    results = bench(args, net, edm, batch, views, frames, steps, device, rows, lambda s: print(s, flush=True),
                    on_row=save)
    if not args.no_plot:
        plot(results, os.path.join(args.out, "speed_quality_large.png" if args.large else "speed_quality.png"), header)
    print(f"wrote {os.path.join(args.out, name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
