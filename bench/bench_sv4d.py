"""Time the full-size SV4D / SV4D 2.0 UNet (random weights) on a GPU.

    python -m bench.bench_sv4d [--versions sv4d2 sv4d] [--calls 5] [--accel fast]
    python -m bench.bench_sv4d --breakdown [--out bench/results/sv4d_breakdown.json]
    python -m bench.bench_sv4d --memory [--out bench/results/sv4d_memory.json]

Per call (default): the configs' grids at 576 px (72 x 72 latents): SV4D 2.0 12 frames x 4 views,
SV4D 5 x 8, with the CFG batch (b = 2) and without (b = 1).

--breakdown: whole sampling runs, Euler EDM with CFG batched (b = 2) as the reference samples
(SV4D 2.0 12 x 4 at 50 steps, SV4D 5 x 8 at 20), full compute and each Turbo4D preset: latency,
per-step time split into spatial / camera / motion attention, convolutions (res blocks, up/down
sampling, input and output convolutions) and the rest, by CUDA events around the dispatch's
sub-attentions and the convolution modules (attention time includes the accelerators' own work on
it; a bypassed block's time is in "rest"), peak memory, and RunStats' per-level work.

--percall: block reuse on the UNet's nested spans (SV4DUNet.spans) alone, with the step skip and
in the presets, SV4D 2.0 12 x 4 at 6 and 50 steps; speedup against full compute in the same
process, PSNR of the final latent against full compute, peak memory.

--memory: SV4D's 21 frames x 9 views at 576 in one pass (with CFG: 378 images) without Turbo4D's
memory pieces, with them, and with the fast preset's caches under a CacheBudget; then the most
frames that fit at 9 and at 4 views, with and without the pieces.

Random weights: the timings are the network's cost; the accelerators' decisions on random weights
say nothing about quality, only that the mechanics run at full size and what they cost when they
skip. --reduced runs the same code on a reduced-width model (CPU smoke test).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time

import torch

from bench.device import EventTimer, allocated_gb, call_ms, is_cuda, peak_bytes, peak_gb, reset_peak, sync
from turbo_core.accel.presets import turbo4d_specs
from turbo_core.accel.registry import build_run
from turbo_core.dispatch import FullCompute, chunked_sdpa
from turbo_core.models.sv4d import SV4DConfig, build_sv4d
from turbo_core.models.sv4d_blocks import Downsample, Upsample, VideoResBlock
from turbo_core.train.attention import broadcast_attention

GRIDS = {"sv4d2": (12, 4), "sv4d": (5, 8)}


def inputs(b, frames, views, side, device, dtype):
    n = b * frames * views
    g = torch.Generator(device=device).manual_seed(0)
    return dict(x=torch.randn(n, 8, side, side, device=device, dtype=dtype, generator=g),
                timesteps=torch.full((n,), 0.25 * torch.tensor(5.0).log().item(), device=device),
                context=torch.randn(b, frames, 1024, device=device, dtype=dtype, generator=g),
                y=torch.randn(n, 1280, device=device, dtype=dtype, generator=g),
                cond_view=torch.randn(b * views, 4, side, side, device=device, dtype=dtype, generator=g),
                views=views, frames=frames)


def short_broadcast(q, k, v):
    """Elementwise attention for the camera/motion axes' short sequences, chunked sdpa otherwise."""
    return broadcast_attention(q, k, v) if q.shape[2] <= 16 else chunked_sdpa(q, k, v)


# The camera/motion axes hold b*T*h*w sequences (124416 at the top level of SV4D 2.0 with CFG);
# plain sdpa ran them in one launch in inference on an H100 (torch 2.11), chunked sdpa is the
# training code's guard against the 65535 grid limit some kernels have.
BACKENDS = {"sdpa": "sdpa", "chunked-sdpa": chunked_sdpa, "short-broadcast": short_broadcast}


# --- whole runs with a per-step breakdown ---------------------------------------------------------
CATEGORIES = ("spatial", "camera", "motion", "convolutions", "rest")


class Timer(EventTimer):
    """Intervals per category (bench.device.EventTimer): forward hooks time the convolution
    modules; `timed_dispatch` the sub-attentions."""

    categories = CATEGORIES

    def __init__(self, net, device):
        super().__init__(device)
        conv = (VideoResBlock, Downsample, Upsample)
        mods = [m for m in net.modules() if isinstance(m, conv)] + [net.input_blocks[0][0], net.out]
        for m in mods:
            self.handles.append(m.register_forward_pre_hook(lambda mod, args: self._open(mod)))
            self.handles.append(m.register_forward_hook(lambda mod, args, out: self._close(mod)))

    def _open(self, mod):
        self._open_at[id(mod)] = self.now()

    def _close(self, mod):
        self.marks.append(("convolutions", self._open_at.pop(id(mod)), self.now()))


def timed_dispatch(d, timer):
    """A view of dispatch d whose sub-attentions (sequence and grid paths) are timed."""
    cls = type(d)
    if cls in timer.classes:
        view = copy.copy(d)
        view.__class__ = timer.classes[cls]
        return view

    class Timed(cls):
        def attend(self, block, axis, seqs, compute):
            a = timer.now()
            out = super().attend(block, axis, seqs, compute)
            timer.span(axis, a, timer.now())
            return out

        if hasattr(cls, "attend_grid"):
            def attend_grid(self, block, axis, x, compute, grid=None, to_axis=None, from_axis=None):
                # The sequence path inside times itself through attend; time only the grid path.
                ran = []

                def grid_timed(t):
                    ran.append(timer.now())
                    return grid(t)

                out = super().attend_grid(block, axis, x, compute, None if grid is None else grid_timed,
                                          to_axis, from_axis)
                if ran:
                    timer.span(axis, ran[0], timer.now())
                return out

    timer.classes[cls] = Timed
    view = copy.copy(d)
    view.__class__ = Timed
    return view


def sv4d_conditioning(frames, views, side, device, dtype, seed=0):
    """CFG-batched SV4D conditioning, [uncond, cond] (b = 2): random CLIP tokens, input-frame
    latents, camera vector and reference views for cond, zeros for uncond (as the guiders do)."""
    g = torch.Generator(device=device).manual_seed(seed)
    n = frames * views

    def r(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    ctx, concat, y, cv = r(1, frames, 1024), r(n, 4, side, side), r(n, 1280), r(views, 4, side, side)
    y_u = y.clone()
    y_u[:, :256] = 0
    return dict(context=torch.cat([torch.zeros_like(ctx), ctx]), concat=torch.cat([torch.zeros_like(concat), concat]),
                y=torch.cat([y_u, y]), cond_view=torch.cat([torch.zeros_like(cv), cv]))


def euler_cfg_run(net, frames, views, side, steps, specs, device, dtype, scale=2.0, timer=None, memory=None,
                  calls=None, seed=0, progress=False, sample_out=None, sync_check=None):
    """Euler EDM sampling of one pass with CFG batched (b = 2), SV4D's V-prediction EDM denoiser
    (c_in = 1/sqrt(s^2+1), c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1), c_noise = ln(s)/4).
    `calls` stops after that many steps (per-call timing). Returns (per-step ms, breakdowns,
    RunStats); the final sample is appended to `sample_out` when given. `sync_check` (a list): the
    run's model calls run under torch.cuda.set_sync_debug_mode("error"), what each raised (or that
    it did not) appended; the first that raises ends the run."""
    from turbo_core.diffusion import v_prediction_space
    from turbo_core.sampling_plans import edm_sigmas

    cond = sv4d_conditioning(frames, views, side, device, dtype, seed)
    n = frames * views
    sigmas = edm_sigmas(steps).tolist()
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(n, 4, side, side, device=device, generator=g, dtype=torch.float32) * sigmas[0]
    lay = net.token_layout(2 * n, views, frames, side, side)
    work = net.block_work(lay)
    run = build_run(specs)
    run.begin()
    step_ms, parts = [], []
    if timer:
        timer.marks.clear()
    cuda = is_cuda(device)
    try:
        with torch.inference_mode():
            for i in range(steps if calls is None else min(calls, steps)):
                s, s_next = sigmas[i], sigmas[i + 1]
                c_in, c_skip, c_out = (s * s + 1) ** -0.5, 1 / (s * s + 1), -s * (s * s + 1) ** -0.5
                start = timer.now() if timer else None
                t0 = time.perf_counter()

                def denoise():  # one sampler step: the CFG-batched call, combined
                    d = run.dispatch(lay, s, sigmas, blocks=net.blocks, dtype=dtype, device=device, work=work)
                    xin = torch.cat([torch.cat([(x * c_in).to(dtype)] * 2), cond["concat"]], 1)
                    # Through the accelerators' call hooks, as the ComfyUI adapter calls it (block
                    # reuse plans its spans there), with the call's v-prediction output space.
                    space = v_prediction_space(xin, torch.full((2 * n,), s, device=device), 4)
                    def network():
                        return net(xin, torch.full((2 * n,), 0.25 * math.log(s), device=device),
                                   cond["context"], cond["y"], cond["cond_view"], views, frames,
                                   dispatch=timed_dispatch(d, timer) if timer else d, memory=memory)

                    if sync_check is not None and cuda:
                        torch.cuda.set_sync_debug_mode("error")
                        try:
                            f = run.model_call(d, xin, network, space)
                            sync_check.append(f"call {i}: no host sync")
                        except RuntimeError as e:
                            sync_check.append(f"call {i}: {str(e)[:300]}")
                            raise
                        finally:
                            torch.cuda.set_sync_debug_mode(0)
                    else:
                        f = run.model_call(d, xin, network, space)
                    run.end_call(d)
                    u, c = (c_skip * torch.cat([x, x]) + c_out * f.float()).chunk(2)
                    return u + scale * (c - u)

                # Whole steps (Chain Bypass) are decided per step, as the ComfyUI adapter does;
                # SV4D's V-prediction EDM has sigma_data 1.
                den = run.step(x, s, sigmas, denoise, 1.0)
                x = x + (x - den) / s * (s_next - s)
                if timer:
                    parts.append(timer.collect(start, timer.now()))
                    step_ms.append(parts[-1]["total"])
                else:
                    sync(device)
                    step_ms.append((time.perf_counter() - t0) * 1000)
                if progress:
                    print(json.dumps({"step": i, "ms": round(step_ms[-1], 1), "allocated_gb": allocated_gb(device)}),
                          flush=True)
    finally:
        stats = run.end(peak_bytes(device))
    assert torch.isfinite(x).all(), "the sample is not finite"
    if sample_out is not None:
        sample_out.append(x)
    return step_ms, parts, stats


def mean_parts(parts):
    return {c: round(sum(p[c] for p in parts) / len(parts), 1) for c in CATEGORIES + ("total",)} if parts else {}


def level_summary(net, stats):
    """Sequences computed / total per axis and token grid (level), from RunStats' per-block counts."""
    grid = {b: ds for b, (ds, _) in enumerate(net.attention_levels())}
    out = {}
    for axis, blocks in stats.block_counts().items():
        for b, c in blocks.items():
            row = out.setdefault(f"1/{grid[b]}", {}).setdefault(axis, [0, 0])
            row[0] += c["computed"]
            row[1] += c["total"]
    return out


def breakdown(args, dev, dtype, emit):
    plans = {"sv4d2": (12, 4, 50), "sv4d": (5, 8, 20)}
    for version in args.versions:
        frames, views, steps = plans[version]
        if args.steps:
            steps = args.steps
        torch.manual_seed(0)
        net = make_net(version, args, dev, dtype)
        timer = Timer(net, dev)
        # warm-up (kernel choice, Triton compiles) and the full-compute reference per call
        euler_cfg_run(net, frames, views, args.side, steps, [], dev, dtype, calls=2)
        for preset in ["off"] + list(args.presets):
            if time.perf_counter() > args.deadline:
                emit({"version": version, "preset": preset, "skipped": "deadline"})
                continue
            reset_peak(dev)
            held = allocated_gb(dev)
            specs = turbo4d_specs(preset) if preset != "off" else []
            calls = args.baseline_calls if preset == "off" else None
            ms, parts, stats = euler_cfg_run(net, frames, views, args.side, steps, specs, dev, dtype, timer=timer,
                                             calls=calls)
            summ = stats.summary()
            measured = sum(ms)
            row = {"version": version, "frames": frames, "views": views, "batch": 2, "latent": args.side,
                   "steps": steps, "preset": preset, "calls_run": len(ms),
                   "latency_s": round(measured / 1000 * (steps / len(ms)), 2),
                   "latency_note": ("per-call mean x steps (full compute costs the same every step)"
                                    if len(ms) < steps else "measured, whole schedule"),
                   "ms_per_step_mean": round(measured / len(ms), 1), "ms_per_step": [round(m, 1) for m in ms],
                   "breakdown_ms_per_step": mean_parts(parts),
                   "peak_gb": peak_gb(dev), "held_at_start_gb": held,
                   "cache_mb": summ["cache_memory_peak_mb"], "compute_fraction": summ["compute_fraction"],
                   "chains_bypassed": f"{summ['chains_bypassed']}/{summ['chains_total']}",
                   "camera_motion_sequences_skipped": f"{summ['tokens_pruned_camera_motion']}/{summ['tokens_total_camera_motion']}",
                   "per_level": level_summary(net, stats)}
            emit(row)
        timer.close()
        del net
        reset_peak(dev)


# --- the per-call levels (block reuse on the UNet's spans) ---------------------------------------
def latent_psnr(x, ref) -> float:
    """PSNR of a final latent against the full-compute one, per image, the peak being the full
    compute latent's range (max - min): there is no VAE in this benchmark, and random weights give
    latents of no fixed range."""
    from turbo_core.metrics import finite_mean, psnr

    rng = float(ref.max() - ref.min())
    return round(finite_mean(psnr(x.float(), ref.float(), data_range=rng)), 2)


def percall_rows(steps):
    """(label, specs, timed breakdown) rows of --percall at `steps`, the most wanted first."""
    from turbo_core.accel.block_reuse import PRESETS as BR, BlockReuseConfig
    from turbo_core.accel.step_skip import PRESETS as STEP
    from turbo_core.accel.token_reuse import PRESETS as TR

    def br(**kw):
        return ("block_reuse", BlockReuseConfig(**kw))

    # Composing with the step skip: reuse across the calls it skips (max_skipped), further apart.
    def across(age):
        return ("block_reuse", BlockReuseConfig(threshold=0.4, max_age=age, max_skipped=age - 1))

    few = steps <= 10  # the variants and the timed breakdowns only where a row is cheap
    rows = [("full", [], few), ("block reuse balanced", [("block_reuse", BR["balanced"])], few),
            ("step skip fast", [("step", STEP["fast"])], False),
            ("Turbo4D fast", turbo4d_specs("fast"), False),
            ("step skip fast + block reuse across skips (max_age 6)", [("step", STEP["fast"]), across(6)], False),
            ("step skip fast + block reuse across skips (max_age 20)", [("step", STEP["fast"]), across(20)], False),
            ("step skip balanced + block reuse across skips (max_age 20)",
             [("step", STEP["balanced"]), across(20)], False),
            ("step skip fast + block reuse balanced", [("step", STEP["fast"]), ("block_reuse", BR["balanced"])], False),
            ("step skip balanced", [("step", STEP["balanced"])], False)]
    rows += [(f"Turbo4D {p}", turbo4d_specs(p), False) for p in ("balanced", "quality")]
    # The presets' SV4D variants (presets.model_family of the UNet: "sv4d"), and token reuse on the
    # UNet's attention layers (SV4DUNet.token_spans).
    rows += [(f"Turbo4D {p} (SV4D variant)", turbo4d_specs(p, family="sv4d"), False) for p in ("fast", "balanced")]
    # Quality has no SV4D variant: the balanced variant's block reuse on the quality step skip.
    rows += [("step skip quality + block reuse across skips (t0.25, max_age 6, max_skipped 5)",
              [("step", STEP["quality"]), br(threshold=0.25, max_age=6, max_skipped=5)], False)]
    rows += [(f"token reuse {p}", [("token_reuse", TR[p])], False) for p in ("balanced", "fast")]
    rows += [("token reuse balanced, bound 0.3", [("token_reuse", dataclasses.replace(TR["balanced"], memory_fraction=0.3))],
              False)]
    if few:
        rows += [("block reuse fast", [("block_reuse", BR["fast"])], False),
                 ("block reuse as-is, bound 0.25", [br(threshold=0.25, forecast=0, memory_fraction=0.25)], False),
                 ("block reuse forecast, bound 0.25", [br(threshold=0.25, forecast=1, memory_fraction=0.25)], False)]
    return rows


def percall(args, dev, dtype, emit):
    """Whole SV4D 2.0 12 x 4 runs (CFG batched) at each of --percall-steps: full compute, block
    reuse on the UNet's spans alone, with the step skip, the presets: latency and speedup against
    full compute in the same process, PSNR of the final latent vs full, peak memory, cache memory,
    spans reused; a CUDA-event breakdown per step for the rows marked so. Each row's peak starts
    afresh (bench.device.reset_peak) with what the row starts on reported beside it."""
    frames, views = GRIDS["sv4d2"]
    torch.manual_seed(0)
    net = make_net("sv4d2", args, dev, dtype)
    timer = Timer(net, dev)
    cuda = is_cuda(dev)
    euler_cfg_run(net, frames, views, args.side, 6, [], dev, dtype, calls=2)  # warm-up
    for steps in args.percall_steps:
        ref, full_s = None, None
        rows = percall_rows(steps)
        if args.percall_rows:  # the full row first, always: it is the reference
            rows = [r for r in rows if r[0] == "full" or r[0] in args.percall_rows]
        for label, specs, timed_row in rows:
            if time.perf_counter() > args.deadline:
                emit({"steps": steps, "row": label, "skipped": "deadline"})
                continue
            reset_peak(dev)
            sync_log = None
            if cuda and label in ("block reuse balanced", "token reuse balanced") and steps == min(args.percall_steps):
                # Three calls (a store, then reuses) under set_sync_debug_mode("error"), apart from
                # the timed run: a sync raises there, and the row records it instead of failing.
                sync_log = []
                try:
                    euler_cfg_run(net, frames, views, args.side, steps, specs, dev, dtype, calls=3, sync_check=sync_log)
                except RuntimeError as e:
                    if not sync_log:
                        sync_log.append(str(e)[:300])
                reset_peak(dev)
            held = allocated_gb(dev)
            out = []
            ms, _, stats = euler_cfg_run(net, frames, views, args.side, steps, specs, dev, dtype, sample_out=out)
            peak = peak_gb(dev)
            parts = None
            if timed_row:  # the same run again, timed per category (the events cost a little)
                _, parts, _ = euler_cfg_run(net, frames, views, args.side, steps, specs, dev, dtype, timer=timer)
            total = sum(ms) / 1000
            if ref is None:
                ref, full_s = out[0], total
            summ = stats.summary()
            row = {"steps": steps, "row": label, "latency_s": round(total, 3),
                   "speedup": round(full_s / total, 2), "psnr_vs_full": None if label == "full" else latent_psnr(out[0], ref),
                   "peak_gb": peak, "held_at_start_gb": held,
                   "model_calls_run": summ["model_calls_run"], "compute_fraction": summ["compute_fraction"],
                   "spans_reused": stats.spans_reused, "spans_run": stats.spans_run,
                   "blocks_reused": stats.blocks_reused, "calls_aside": dict(stats.calls_aside),
                   "notes": list(stats.notes),
                   "cache_mb": summ["cache_memory_peak_mb"], "cache_bound_mb": summ.get("cache_bound_mb"),
                   "ms_per_step": [round(m, 1) for m in ms], "sync_check": sync_log,
                   "specs": [(n, c.to_dict() if hasattr(c, "to_dict") else c) for n, c in specs]}
            if parts:
                row["breakdown_ms_per_step"] = mean_parts(parts)
            emit(row)
    timer.close()


# --- memory ------------------------------------------------------------------------------------
def one_pass(net, frames, views, side, dev, dtype, memory=None, specs=(), calls=1, budget=None, steps=20,
             progress=False):
    """Peak memory and ms per call of `calls` CFG-batched calls; None when out of memory."""
    from turbo_core.memory import cache_budget

    reset_peak(dev)
    failed, row = False, None
    try:
        with cache_budget(budget):
            ms, _, stats = euler_cfg_run(net, frames, views, side, steps, list(specs), dev, dtype, memory=memory,
                                         calls=calls, progress=progress)
        row = {"ms_per_call": [round(m, 1) for m in ms],
               "peak_gb": peak_gb(dev), "cache_mb": stats.summary()["cache_memory_peak_mb"]}
        if budget is not None:
            row["cache_budget"] = budget.summary()
        if memory is not None:
            row["retries"] = memory.retries
    except torch.cuda.OutOfMemoryError:
        failed = True
    if failed:
        reset_peak(dev)  # frees what the failed pass left (outside the except clause: its traceback held it)
        return None
    return row


def memory_bench(args, dev, dtype, emit):
    from turbo_core.memory import MemoryConfig, plan

    net = make_net("sv4d", args, dev, dtype)
    side = args.side
    total = torch.cuda.get_device_properties(0).total_memory if dev == "cuda" else None
    frames, views = args.grid
    parts = args.parts
    if "one-pass" in parts:
        for label, memory in (("plain", None), ("pieces", "pieces")):
            cfg = MemoryConfig() if memory else None
            r = one_pass(net, frames, views, side, dev, dtype, memory=cfg, calls=2)
            emit({"what": "one pass", "frames": frames, "views": views, "images_with_cfg": 2 * frames * views,
                  "mode": label, "fits": r is not None, **(r or {})})
    if "search" in parts:
        for v in args.search_views:
            plain = search_frames(net, v, side, dev, dtype, "plain", total, args)
            emit({"what": "most frames in one pass", "views": v, "mode": "plain", **plain})
            res = search_frames(net, v, side, dev, dtype, "pieces", total, args, at_least=plain["largest_fits"] or 0)
            emit({"what": "most frames in one pass", "views": v, "mode": "pieces", **res})
    if "accel" in parts and time.perf_counter() < args.deadline:
        cfg = MemoryConfig()
        limit = int(args.cache_limit_gb * 2**30) if args.cache_limit_gb > 0 else None  # 0 = no user limit
        _, budget = plan(dev, net.activation_bytes(2 * frames * views, side, side), limit, dtype)
        print(json.dumps({"cache_budget_planned": None if budget is None else budget.summary()}), flush=True)
        r = one_pass(net, frames, views, side, dev, dtype, memory=cfg, specs=turbo4d_specs("fast"),
                     calls=args.accel_calls, budget=budget, progress=True)
        emit({"what": "one pass, Turbo4D fast, cache under a budget", "frames": frames, "views": views,
              "images_with_cfg": 2 * frames * views, "mode": "pieces+fast+budget", "fits": r is not None, **(r or {})})


def search_frames(net, views, side, dev, dtype, label, total, args, at_least=0):
    """Largest frame count that fits (CFG batch), by a prediction from the memory of two small
    grids (plain) or the activation estimate (pieces), then bisection within the deadline."""
    from turbo_core.memory import MemoryConfig

    def fits(f):
        cfg = MemoryConfig() if label == "pieces" else None
        r = one_pass(net, f, views, side, dev, dtype, memory=cfg, calls=1)
        probes.append({"frames": f, "fits": r is not None, **(r or {})})
        return r

    probes = []
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    f0, f1 = args.search_start
    lo, hi = 0, None
    if label == "plain":
        r0, r1 = fits(f0), fits(f1)
        if r0 is None:
            return {"largest_fits": None, "smallest_fails": f0, "probes": probes}
        if r1 is None:
            hi = f1
            lo = f0
            guess = (f0 + f1) // 2
        else:
            lo = f1
            per_frame = max((r1["peak_gb"] - r0["peak_gb"]) * 2**30 / (f1 - f0), 1) if total else 1
            guess = int(f1 + (0.97 * total - r1["peak_gb"] * 2**30) / per_frame) if total else f1 * 2
    else:
        per_frame = net.activation_bytes(2 * views, side, side, dtype.itemsize)
        guess = int((0.95 * total - weights - 2 * 2**30) / per_frame) if total else f1 * 2
        lo = at_least
    guess = max(guess, lo + 1)
    while time.perf_counter() < args.deadline and len(probes) < args.max_probes:
        if hi is not None and hi - lo <= max(1, lo // 25):
            break
        if fits(guess) is not None:
            lo = guess
            guess = (lo + hi) // 2 if hi is not None else int(guess * 1.15) + 1
        else:
            hi = guess
            guess = (lo + hi) // 2
        if guess <= lo or (hi is not None and guess >= hi):
            break
    return {"largest_fits": lo or None, "smallest_fails": hi, "images_with_cfg_at_largest": 2 * views * lo,
            "probes": probes}


def make_net(version, args, dev, dtype):
    cfg = SV4DConfig.reduced(version) if args.reduced else SV4DConfig(version=version)
    return build_sv4d(cfg, dev).to(dtype).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", nargs="+", default=["sv4d2", "sv4d"])
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--side", type=int, default=72)
    ap.add_argument("--accel", default=None, help="a Turbo4D preset to run over a 10-step schedule")
    ap.add_argument("--backends", nargs="+", default=["sdpa", "chunked-sdpa"], choices=list(BACKENDS))
    ap.add_argument("--breakdown", action="store_true", help="whole runs, per-step breakdown, presets")
    ap.add_argument("--memory", action="store_true", help="one-pass memory of 21 x 9 and the largest grids")
    ap.add_argument("--percall", action="store_true", help="block reuse on the UNet's spans, alone, with the step "
                                                           "skip and in the presets (SV4D 2.0 12 x 4)")
    ap.add_argument("--percall-steps", type=int, nargs="+", default=[6, 50])
    ap.add_argument("--percall-rows", nargs="*", default=[], help="only these rows (by label) and full")
    ap.add_argument("--presets", nargs="+", default=["quality", "balanced", "fast"])
    ap.add_argument("--steps", type=int, default=0, help="override the reference step counts (smoke tests)")
    ap.add_argument("--baseline-calls", type=int, default=5, help="full-compute calls timed (x steps)")
    ap.add_argument("--grid", type=int, nargs=2, default=[21, 9], metavar=("FRAMES", "VIEWS"))
    ap.add_argument("--accel-calls", type=int, default=6)
    ap.add_argument("--cache-limit-gb", type=float, default=0.0, help="0 = from the free memory")
    ap.add_argument("--search-views", type=int, nargs="*", default=[9, 4])
    ap.add_argument("--search-start", type=int, nargs=2, default=[4, 12])
    ap.add_argument("--max-probes", type=int, default=7)
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new measurements after this")
    ap.add_argument("--parts", nargs="+", default=["one-pass", "search", "accel"], help="--memory sections")
    ap.add_argument("--reduced", action="store_true", help="reduced-width model (CPU smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.breakdown or args.memory or args.percall:
        args.deadline = time.perf_counter() + args.budget_s
        dev = args.device
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        rows = []
        kind = "breakdown" if args.breakdown else "memory" if args.memory else "percall"
        out = args.out or f"bench/results/sv4d_{kind}.json"

        def emit(row):
            rows.append(row)
            print(json.dumps(row), flush=True)
            meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
                    "dtype": str(dtype), "command": "python -m bench.bench_sv4d " + " ".join(sys.argv[1:])}
            with open(out, "w") as f:
                json.dump({**meta, "rows": rows}, f, indent=1)

        (breakdown if args.breakdown else memory_bench if args.memory else percall)(args, dev, dtype, emit)
        return rows
    dev, dtype = "cuda", torch.bfloat16
    results = []
    for version in args.versions:
        torch.manual_seed(0)
        net = build_sv4d(SV4DConfig(version=version), dev).to(dtype).eval()
        params = sum(p.numel() for p in net.parameters())
        frames, views = GRIDS[version]
        for b in (2, 1):
            inp = inputs(b, frames, views, args.side, dev, dtype)
            lay = net.token_layout(inp["x"].shape[0], views, frames, args.side, args.side)
            for backend in args.backends:
                reset_peak(dev)
                d = FullCompute(lay, backend=BACKENDS[backend])
                with torch.inference_mode():
                    for _ in range(2):
                        net(**inp, dispatch=d)
                    sync(dev)
                    ms = call_ms(lambda: net(**inp, dispatch=d), args.calls, dev)
                row = {"version": version, "params": params, "batch": b, "frames": frames, "views": views,
                       "latent": args.side, "images": b * frames * views, "backend": backend,
                       "ms_per_call": round(sorted(ms)[len(ms) // 2], 1), "ms_all": [round(m, 1) for m in ms],
                       "peak_gb": peak_gb(dev)}
                print(json.dumps(row), flush=True)
                results.append(row)
            if args.accel and b == 2:
                run = build_run(turbo4d_specs(args.accel), backend=BACKENDS[args.backends[-1]])
                run.begin()
                sigmas = torch.cat([torch.logspace(2.0, -2.0, 10), torch.zeros(1)]).tolist()
                times = []
                with torch.inference_mode():
                    for s in sigmas[:-1]:
                        d = run.dispatch(lay, s, sigmas, blocks=net.blocks, dtype=dtype, device=dev)
                        t0 = time.perf_counter()
                        net(**inp, dispatch=d)
                        run.end_call(d)
                        sync(dev)
                        times.append((time.perf_counter() - t0) * 1000)
                stats = run.end(peak_bytes(dev))
                acc = {"version": version, "accel": args.accel, "backend": args.backends[-1],
                       "ms_per_step": [round(t, 1) for t in times], "accelerators": stats.configs,
                       "cache_mb": stats.summary()["cache_memory_peak_mb"]}
                print(json.dumps(acc, default=str), flush=True)
                results.append(acc)
            del inp
        del net
        reset_peak(dev)
    print(torch.cuda.get_device_name(), torch.__version__)
    return results


if __name__ == "__main__":
    main()
