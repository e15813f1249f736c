"""TrajectoryCrafter's transformer at full size (random weights, bf16) on a GPU: full compute, the
pack's accelerators, fewer steps, and diffusers' own cache hooks on its CogVideoX transformer.

    python -m bench.bench_trajectorycrafter --part ours  --device cuda:0 --out ours.json
    python -m bench.bench_trajectorycrafter --part peers --device cuda:1 --out peers.json
    python -m bench.bench_trajectorycrafter --merge ours.json peers.json --out bench/results/bench_trajectorycrafter_h200.json
    python -m bench.bench_trajectorycrafter --tiny --device cpu --out /tmp/tc.json   # CPU smoke test
    python -m bench.bench_trajectorycrafter --part split --devices cuda:0,cuda:1 --out split.json
    python -m bench.bench_trajectorycrafter --part split --tiny --devices cpu:2 --device cpu --out /tmp/s.json

The shape is the reference's: 49 frames at 384 x 672 (13 latent frames of 48 x 84, 13,104 video
tokens + 226 T5 tokens per sequence), 3 reference latent frames for the perceiver (3,024 tokens),
the reference's DDIM (v-prediction, zero terminal SNR, trailing timesteps) over 50 steps with
cfg 6, both CFG halves in one call of batch 2. The sampler is turbo_core's `sample_ddim`, which
tests/test_host_trajectorycrafter.py proves equal to the reference pipeline's loop.

--part ours: the pack's network (CrossTransformer3DModel with the perceiver):
- full compute: latency of the whole 50-step run, the per-step breakdown (self-attention = the
  joint attention `attn1` with its projections, q/k norms and RoPE; perceiver = the perceiver
  cross-attention's query/output projections and attention; MLP = the feed-forward `ff`; rest =
  the norms, modulations, gated residual sums, embeddings and the sampler), by CUDA events around
  the dispatch's sub-attentions and forward hooks on the feed-forwards; peak memory;
- every preset of the pack's accelerators that applies to this network (the Chain Bypass node's
  whole-step skip; block reuse and token reuse where the mechanism table has them), each in the
  same process: latency, speedup over full compute, PSNR against full compute, peak memory;
- fewer DDIM steps, at the model-call counts the presets ran (equal time) and a few more.

--part peers: diffusers' CogVideoXTransformer3DModel with the same weights (our network without
the perceiver, the twin tests/test_trajectorycrafter_faithful.py proves equal) at the same shape
and sampler; full compute, then each of diffusers' cache hooks that runs on it (FirstBlockCache,
TaylorSeerCache, PyramidAttentionBroadcast, FasterCache, MagCache with ratios calibrated on the
full run, which favours it) with its PSNR against its own full run. SeaCache needs a CogVideoX
adapter diffusers does not ship (its raw_vision_callback) and is left out.

--part split (turbo_core.parallel, the Turbo4D Multi-GPU node's engine): the same run on one GPU
and with every call's CFG halves on two (`--devices`), weights broadcast once, the perceiver's
reference keys/values computed once per run on each GPU, whole steps decided on the first GPU:
ms per call and the run's wall-clock, the split's result against one GPU's, the peak memory of
each GPU, the share of each GPU's time spent in collectives (a separate short run with every
collective timed between device syncs, which the timed runs do not pay for), and Chain Bypass
fast / balanced on one GPU and split.

PSNR is taken on the final latent (16 channels x 13 frames x 48 x 84, the sampler's output before
the VAE), with the full run's peak-to-peak value as the data range.

Random weights (torch's default initialisation, seeded): the timings are the network's cost, and
what the accelerators decide on random weights says how their mechanics behave on this shape, not
how the trained model's videos look.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from bench.bench_sv4d import timed_dispatch
from bench.device import EventTimer, peak_bytes, peak_gb, reset_peak, sync
from turbo_core.accel import mechanisms
from turbo_core.accel.registry import build_run
from turbo_core.diffusion import DenoisedSpace
from turbo_core.models.trajectorycrafter import CONFIGS, TrajectoryCrafterConfig, TrajectoryCrafterTransformer, rope_3d
from turbo_core.models.trajectorycrafter_sampling import (alphas_cumprod, sample_ddim, trailing_sigmas,
                                                          trailing_step_sigmas, trailing_timesteps, v_coefficients)

# ComfyUI's stand-in for alpha_bar 0 under zero terminal SNR (its rescale_zero_terminal_snr_sigmas):
# the first timestep gets a finite sigma, where sample_ddim takes the reference's alpha-0 step.
ZERO_SNR_ALPHA = 4.8973451890853435e-08

SHAPES = {
    # frames, latent height, width, text tokens, reference latent frames, steps
    "full": dict(config="full", frames=13, height=48, width=84, text=226, ref_frames=3, steps=50),
    "tiny": dict(config="tiny", frames=3, height=8, width=12, text=16, ref_frames=2, steps=10),
}
CATEGORIES = ("self_attention", "perceiver", "mlp", "rest")


# --- schedule and inputs ------------------------------------------------------------------------------
def sigma_table() -> torch.Tensor:
    a = alphas_cumprod(zero_snr=True).clone()
    a[-1] = ZERO_SNR_ALPHA
    return ((1 - a) / a).sqrt().float()


def schedule(steps: int):
    """(sigmas incl. the final 0, where each step moves its sample, {sigma: timestep}, zero-SNR sigma)."""
    table = sigma_table()
    sig = trailing_sigmas(table, steps)
    ts = trailing_timesteps(steps)
    return sig, trailing_step_sigmas(table, steps), dict(zip(sig[:-1].tolist(), ts)), float(table[-1])


@dataclass
class Inputs:
    noise: torch.Tensor      # (1, 16, T, h, w) float32
    inpaint: torch.Tensor    # (2, T, 17, h, w): mask + render latents, both CFG halves
    text: torch.Tensor       # (2, text, dim): [negative, positive]
    ref: torch.Tensor        # (1, F_ref, 16, h, w)


def make_inputs(cfg: TrajectoryCrafterConfig, shape: dict, device, dtype, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    t, h, w = shape["frames"], shape["height"], shape["width"]
    noise = torch.randn(1, 16, t, h, w, generator=g)
    mask = (torch.rand(1, t, 1, h, w, generator=g) > 0.3).float() * 0.7  # hole mask x the VAE scale
    render = torch.randn(1, t, cfg.in_channels - 17, h, w, generator=g) * mask.bool()
    inpaint = torch.cat([mask, render], dim=2).expand(2, -1, -1, -1, -1)
    text = torch.randn(2, shape["text"], cfg.text_embed_dim, generator=g) * 0.2
    ref = torch.randn(1, shape["ref_frames"], cfg.cross_attn_in_channels, h, w, generator=g)
    return Inputs(noise.to(device), inpaint.to(device, dtype).contiguous(), text.to(device, dtype), ref.to(device, dtype))


def random_net(config: str, device, dtype, perceiver: bool = True, seed: int = 0) -> TrajectoryCrafterTransformer:
    """torch's default initialisation, seeded, built on the device (a 6.1 B network in seconds)."""
    cfg = CONFIGS[config]
    if not perceiver:
        cfg = TrajectoryCrafterConfig.from_dict({**cfg.to_dict(), "is_train_cross": False})
    torch.manual_seed(seed)
    with torch.device(device):
        net = TrajectoryCrafterTransformer(cfg)
    return net.to(dtype).eval()


def latent_psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of a final latent against the full run's, data range = the full run's peak-to-peak."""
    rng = float(ref.max() - ref.min())
    mse = float((x.double() - ref.double()).square().mean())
    return float("inf") if mse == 0 else 10 * math.log10(rng * rng / mse)


# --- timing -------------------------------------------------------------------------------------------
class Timer(EventTimer):
    """Intervals per category (bench.device.EventTimer). The dispatch's sub-attentions time
    self-attention and the perceiver (timed_dispatch); forward hooks time the feed-forwards."""

    categories = CATEGORIES

    def __init__(self, net, device):
        super().__init__(device)
        for blk in net.transformer_blocks:
            self.handles.append(blk.ff.register_forward_pre_hook(lambda m, a: self._open_at.__setitem__(id(m), self.now())))
            self.handles.append(blk.ff.register_forward_hook(
                lambda m, a, o: self.marks.append(("mlp", self._open_at.pop(id(m)), self.now()))))

    def span(self, axis, start, end):
        super().span({"joint": "self_attention"}.get(axis, axis), start, end)


def sample_ours(net, inp: Inputs, steps: int, specs=(), cfg_scale: float = 6.0, timer: Timer = None,
                stats_out: dict = None, group=None):
    """One sampling run through a Turbo4DRun as the ComfyUI adapter drives it (whole steps decided
    per step through run.step, every call through run.model_call and the run's dispatch).
    Returns (final latent, seconds, calls run, stats summary, per-step breakdowns); `stats_out`
    gets the run's RunStats as "stats". `group` (rank 0 of a turbo_core.parallel group): every
    call's CFG halves split over its processes, as the Turbo4D Multi-GPU node runs it."""
    from turbo_core import parallel

    forward = net if group is None else parallel.ParallelNet(net, group, "cfg")
    device = inp.noise.device
    dtype = net.proj_out.weight.dtype
    sig, step_sig, t_of, zsig = schedule(steps)
    sig_list = sig.tolist()
    _, _, t, h, w = inp.noise.shape
    run = build_run(list(specs))
    calls, parts = [0], []
    sync(device)
    t0 = time.perf_counter()
    run.begin()
    if group is not None:
        parallel.begin_run(group, list(specs), run.backend)
    try:
        ref = net.reference(inp.ref)  # the perceiver's keys/values: once per run (on each process)
        layout = net.token_layout(2, inp.text.shape[1], t, h, w, ref.tokens)
        work = net.block_work(layout)

        def model(x, sigma):
            s = float(sigma[0])
            start = timer.now() if timer else None

            def denoise():
                d = run.dispatch(layout, s, sig_list, blocks=net.depth, dtype=dtype, device=device, work=work)
                c_skip, c_out = v_coefficients(torch.tensor([s]), zsig)
                c_skip, c_out = float(c_skip), float(c_out)
                x2 = torch.cat([x, x])
                lat = (x2 / math.sqrt(1 + s * s)).to(dtype).permute(0, 2, 1, 3, 4)
                space = DenoisedSpace(x2, c_skip, c_out, 1.0)

                def network():
                    calls[0] += 1
                    ts = torch.full((2,), t_of[s], device=device)
                    return forward(lat, inp.text, ts, inpaint=inp.inpaint, reference=ref,
                                   dispatch=timed_dispatch(d, timer) if timer else d).permute(0, 2, 1, 3, 4)

                v = run.model_call(d, x2, network, space)
                run.end_call(d)
                u, c = (c_skip * x2 + c_out * v.float()).chunk(2)
                return u + cfg_scale * (c - u)

            out = run.step(x, s, sig_list, denoise, 1.0)
            if timer:
                parts.append(timer.collect(start, timer.now()))
            return out

        with torch.inference_mode():
            x = inp.noise * math.sqrt(1 + sig_list[0] ** 2)
            x = sample_ddim(model, x, sig, zero_snr_sigma=zsig, step_sigmas=step_sig)
        sync(device)
        seconds = time.perf_counter() - t0
    finally:
        stats = run.end(peak_bytes(device))
        if group is not None and group.alive:
            parallel.end_run(group, stats)
        if stats_out is not None:
            stats_out["stats"] = stats
    if not torch.isfinite(x).all():
        raise RuntimeError("the sample is not finite")
    return x.float(), seconds, calls[0], stats.summary(), parts


def mean_parts(parts) -> dict:
    if not parts:
        return {}
    ran = [p for p in parts if p["total"] > 0]
    return {c: round(sum(p[c] for p in ran) / len(ran), 1) for c in CATEGORIES + ("total",)}


def accelerator_rows() -> list[tuple[str, list]]:
    """(label, specs) of the presets of the pack's accelerators that apply to a joint-attention DiT:
    the whole-step skip (the Chain Bypass node) at each preset, block reuse at each preset, token
    reuse at balanced, and each reuse at balanced under Chain Bypass balanced. The rolling cache and
    the sequence pruner act on SV4D's camera/motion axes, which this network does not have."""
    names = mechanisms.names()
    node = "Turbo4DChainBypass"

    def bypass(preset):
        return [(n, c) for n, c in mechanisms.node_configs(node, preset).items() if c is not None]

    rows = [(f"Chain Bypass {p}", bypass(p)) for p in ("quality", "balanced", "fast")]
    for name, presets in (("block_reuse", ("quality", "balanced", "fast")), ("token_reuse", ("balanced",))):
        if name not in names:
            continue
        m = mechanisms.mechanism(name)
        rows += [(f"{name} {p}", [(name, m.presets[p])]) for p in presets]
        rows.append((f"{name} balanced + Chain Bypass balanced", bypass("balanced") + [(name, m.presets["balanced"])]))
    return rows


def bench_ours(args, emit):
    dev, dtype, shape = args.device, args.dtype, SHAPES[args.shape]
    steps = args.steps or shape["steps"]
    net = random_net(shape["config"], dev, dtype)
    inp = make_inputs(net.cfg, shape, dev, dtype)
    params = sum(p.numel() for p in net.parameters())
    sample_ours(net, inp, 1)  # warm-up: kernel choice
    reset_peak(dev)
    timer = Timer(net, dev)
    full, secs, calls, summ, parts = sample_ours(net, inp, steps, timer=timer)
    timer.close()
    emit({"what": "ours", "name": "full compute", "steps": steps, "calls_run": calls, "latency_s": round(secs, 2),
          "ms_per_call": round(secs * 1000 / calls, 1), "speedup": 1.0, "psnr_vs_full": None,
          "peak_gb": peak_gb(dev), "breakdown_ms_per_step": mean_parts(parts), "parameters": params,
          "tokens_per_sequence": shape["text"] + shape["frames"] * shape["height"] * shape["width"] // 4})
    full_s = secs
    counts = set(args.equal_calls)
    for label, specs in (accelerator_rows() if args.rows == "all" else []):
        if time.perf_counter() > args.deadline:
            emit({"what": "ours", "name": label, "skipped": "deadline"})
            continue
        reset_peak(dev)
        row = {"what": "ours", "name": label, "steps": steps, "settings": {n: c.to_dict() for n, c in specs}}
        try:
            x, secs, calls, summ, _ = sample_ours(net, inp, steps, specs)
        except Exception as e:  # one row failing (memory, say) must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            emit(row)
            continue
        counts.add(calls)
        row.update(calls_run=calls, latency_s=round(secs, 2), speedup=round(full_s / secs, 2),
                   psnr_vs_full=round(latent_psnr(x, full), 2), peak_gb=peak_gb(dev),
                   cache_mb=summ["cache_memory_peak_mb"], compute_fraction=summ["compute_fraction"],
                   chains_bypassed=f"{summ['chains_bypassed']}/{summ['chains_total']}",
                   **{k: summ[k] for k in ("blocks_reused", "spans_reused", "spans_run", "cache_bound_mb",
                                           "tokens_computed", "tokens_offered") if summ.get(k)})
        emit(row)
    for n in sorted(counts | set(args.fewer_steps)):
        if n >= steps or n < 1:
            continue
        if time.perf_counter() > args.deadline:
            emit({"what": "ours", "name": f"{n} DDIM steps", "skipped": "deadline"})
            continue
        reset_peak(dev)
        x, secs, calls, _, _ = sample_ours(net, inp, n)
        emit({"what": "ours", "name": f"{n} DDIM steps", "steps": n, "calls_run": calls, "latency_s": round(secs, 2),
              "speedup": round(full_s / secs, 2), "psnr_vs_full": round(latent_psnr(x, full), 2),
              "peak_gb": peak_gb(dev)})


# --- CFG halves on two GPUs ------------------------------------------------------------------------------
def split_figures(stats, secs: float, calls: int) -> dict:
    """What a split run's statistics say per process: peak memory, and (when its collectives were
    timed) the share of its time in them."""
    par = stats.parallel or {}
    ranks = par.get("ranks", [])
    out = {"peak_gb_per_gpu": [None if r.get("peak_memory_mb") is None else round(r["peak_memory_mb"] / 1024, 2)
                               for r in ranks],
           "calls_by_mode": par.get("calls_by_mode")}
    if par.get("comm_timed"):
        out["comm_share_per_gpu"] = [round(r["comm_seconds"] / r["busy_seconds"], 4) if r.get("busy_seconds") else None
                                     for r in ranks]
        out["comm_ms_per_call_per_gpu"] = [round(r["comm_seconds"] * 1000 / max(calls, 1), 2) for r in ranks]
        out["comm_mb_per_call_per_gpu"] = [round(r["comm_bytes"] / 2**20 / max(calls, 1), 2) for r in ranks]
    return out


def bench_split(args, emit):
    """One GPU against every call's CFG halves on `args.devices` (the first is this process's)."""
    from turbo_core import parallel

    dev, dtype, shape = args.device, args.dtype, SHAPES[args.shape]
    steps = args.steps or shape["steps"]
    net = random_net(shape["config"], dev, dtype)
    inp = make_inputs(net.cfg, shape, dev, dtype)
    t0 = time.perf_counter()
    group = parallel.acquire(args.devices)
    started = time.perf_counter() - t0
    try:
        sample_ours(net, inp, 1)  # warm-up: kernel choice
        t0 = time.perf_counter()
        sample_ours(net, inp, 1, group=group)  # also sends the weights, once
        emit({"what": "split", "name": "setup", "devices": [str(d) for d in group.devices], "world": group.world,
              "backend": group.backend, "workers_started_s": round(started, 2),
              "weights_sent_and_first_call_s": round(time.perf_counter() - t0, 2)})
        full_steps = args.split_full_steps or steps
        rows = [("full compute", [], full_steps)]
        rows += [(f"Chain Bypass {p}", accelerator_specs(p), steps) for p in args.split_presets]
        full = {}
        for label, specs, steps in rows:
            unit = "GPU" if group.backend == "nccl" else "process"
            for g, where in ((None, f"one {unit}"), (group, f"{group.world} {unit}es (cfg)" if unit == "process"
                                                     else f"{group.world} GPUs (cfg)")):
                if time.perf_counter() > args.deadline:
                    emit({"what": "split", "name": f"{label}, {where}", "skipped": "deadline"})
                    continue
                reset_peak(dev)
                box = {}
                x, secs, calls, summ, _ = sample_ours(net, inp, steps, specs, stats_out=box, group=g)
                row = {"what": "split", "name": f"{label}, {where}", "steps": steps, "calls_run": calls,
                       "latency_s": round(secs, 2), "ms_per_call": round(secs * 1000 / max(calls, 1), 1),
                       "latency_50_steps_s": round(secs * 50 / steps, 2) if steps != 50 else round(secs, 2),
                       "peak_gb": peak_gb(dev), "compute_fraction": summ["compute_fraction"]}
                if g is not None:
                    row.update(split_figures(box["stats"], secs, calls))
                full[(label, g is None)] = (x, secs)
                one = full.get((label, True))
                if g is not None and one is not None:
                    row.update(speedup_vs_one_gpu=round(one[1] / secs, 2), psnr_vs_one_gpu_same=round(latent_psnr(x, one[0]), 2),
                               max_abs_diff_vs_one_gpu_same=round(float((x - one[0]).abs().max()), 5))
                ref = full.get(("full compute", True))
                if ref is not None and label != "full compute" and steps == full_steps:
                    row.update(speedup_vs_one_gpu_full=round(ref[1] / secs, 2), psnr_vs_full=round(latent_psnr(x, ref[0]), 2))
                emit(row)
        if time.perf_counter() < args.deadline and args.comm_steps:
            # Every collective timed between device syncs on every process: the communication
            # share; these syncs cost time, so this run is not one of the timed ones above.
            parallel.set_sync_timing(group, True)
            box = {}
            _, secs, calls, _, _ = sample_ours(net, inp, args.comm_steps, stats_out=box, group=group)
            parallel.set_sync_timing(group, False)
            emit({"what": "split", "name": f"full compute, {group.world} processes (cfg), collectives timed",
                  "steps": args.comm_steps, "calls_run": calls, "latency_s": round(secs, 2),
                  "ms_per_call": round(secs * 1000 / max(calls, 1), 1), **split_figures(box["stats"], secs, calls)})
    finally:
        parallel.shutdown()
    del net
    reset_peak(dev)


def accelerator_specs(preset: str) -> list:
    """The Chain Bypass node's specs at `preset` (the rows accelerator_rows names so)."""
    return dict(accelerator_rows())[f"Chain Bypass {preset}"]


# --- diffusers' CogVideoX and its cache hooks ----------------------------------------------------------
def diffusers_twin(net: TrajectoryCrafterTransformer):
    """diffusers' CogVideoXTransformer3DModel with `net`'s weights (net without a perceiver)."""
    from diffusers import CogVideoXTransformer3DModel

    c = net.cfg
    dev = net.proj_out.weight.device
    with torch.device("meta"):
        twin = CogVideoXTransformer3DModel(
            num_attention_heads=c.num_attention_heads, attention_head_dim=c.attention_head_dim,
            in_channels=c.in_channels, out_channels=c.out_channels, time_embed_dim=c.time_embed_dim,
            text_embed_dim=c.text_embed_dim, num_layers=c.num_layers, patch_size=c.patch_size, norm_eps=c.norm_eps,
            use_rotary_positional_embeddings=True)
    twin.load_state_dict({k: v.to(dev) for k, v in net.state_dict().items()}, strict=True, assign=True)
    return twin.eval()


def sample_peer(model, inp: Inputs, steps: int, rope, cfg_scale: float = 6.0, box=None):
    """The same DDIM on diffusers' transformer; `box[0]` holds the current timestep (the hooks' callback)."""
    device = inp.noise.device
    dtype = next(model.parameters()).dtype
    sig, step_sig, t_of, zsig = schedule(steps)
    sig_list = sig.tolist()
    video = None
    calls = [0]

    def fn(x, sigma):
        s = float(sigma[0])
        t = t_of[s]
        if box is not None:
            box[0] = t
        c_skip, c_out = v_coefficients(torch.tensor([s]), zsig)
        c_skip, c_out = float(c_skip), float(c_out)
        x2 = torch.cat([x, x])
        lat = (x2 / math.sqrt(1 + s * s)).to(dtype).permute(0, 2, 1, 3, 4)
        with model.cache_context("cond_uncond", step_index=calls[0], num_inference_steps=steps, timestep=t, sigma=s):
            v = model(hidden_states=torch.cat([lat, inp.inpaint], dim=2), encoder_hidden_states=inp.text,
                      timestep=torch.full((2,), t, device=device), image_rotary_emb=rope, return_dict=False)[0]
        calls[0] += 1
        u, c = (c_skip * x2 + c_out * v.permute(0, 2, 1, 3, 4).float()).chunk(2)
        return u + cfg_scale * (c - u)

    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = inp.noise * math.sqrt(1 + sig_list[0] ** 2)
        video = sample_ddim(fn, x, sig, zero_snr_sigma=zsig, step_sigmas=step_sig)
    sync(device)
    return video.float(), time.perf_counter() - t0


def peer_configs(steps: int, box, mag_ratios):
    """(label, config) of diffusers' hooks: each at the setting its docs give for CogVideoX (or its
    default), and a faster one where it has a single knob."""
    from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                           TaylorSeerCacheConfig)

    # TaylorSeer's default patterns ("^transformer_blocks.*attn", matched whole) name no CogVideoX
    # module (its attentions are "attn1"): by default it hooks nothing there, so it is given the
    # blocks' attention and feed-forward by name, and its lite mode (every block skipped, the output
    # projection forecast) as the whole-model variant.
    blocks = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]
    out = [("FirstBlockCache threshold 0.1", FirstBlockCacheConfig(threshold=0.1)),
           ("FirstBlockCache threshold 0.3", FirstBlockCacheConfig(threshold=0.3)),
           ("FirstBlockCache threshold 0.5", FirstBlockCacheConfig(threshold=0.5)),
           ("FirstBlockCache threshold 0.8", FirstBlockCacheConfig(threshold=0.8)),
           ("FirstBlockCache threshold 1.0", FirstBlockCacheConfig(threshold=1.0)),
           ("TaylorSeerCache interval 5, attn1 + ff", TaylorSeerCacheConfig(cache_identifiers=blocks)),
           ("TaylorSeerCache interval 5, lite (output forecast)", TaylorSeerCacheConfig(use_lite_mode=True)),
           ("PyramidAttentionBroadcast (docs' CogVideoX setting)", PyramidAttentionBroadcastConfig(
               spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
               current_timestep_callback=lambda: box[0])),
           ("FasterCache (docs' CogVideoX setting)", FasterCacheConfig(
               spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
               current_timestep_callback=lambda: box[0], attention_weight_callback=lambda _: 0.3,
               unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 781),
               tensor_format="BFCHW"))]
    if mag_ratios is not None:
        for thr in (0.06,):
            out.append((f"MagCache threshold {thr} (ratios from the full run)",
                        MagCacheConfig(threshold=thr, num_inference_steps=steps, mag_ratios=list(mag_ratios))))
    return out


def calibrated_ratios(model):
    """MagCache's ratios its calibration hook measured on the run just made."""
    for name, m in model.named_modules():
        reg = getattr(m, "_diffusers_hook", None)
        if reg is None:
            continue
        for hook in reg.hooks.values():
            mgr = getattr(hook, "state_manager", None)
            if mgr is None:
                continue
            for st in mgr._state_cache.values():
                r = getattr(st, "calibration_ratios", None)
                if r:
                    return list(r)
    return None


def bench_peers(args, emit):
    import diffusers
    from diffusers import MagCacheConfig

    dev, dtype, shape = args.device, args.dtype, SHAPES[args.shape]
    steps = args.steps or shape["steps"]
    twin = diffusers_twin(random_net(shape["config"], dev, dtype, perceiver=False))
    inp = make_inputs(CONFIGS[shape["config"]], shape, dev, dtype)
    rope = rope_3d(shape["frames"], shape["height"] // 2, shape["width"] // 2, twin.config.attention_head_dim, device=dev)
    box = [999]
    sample_peer(twin, inp, 1, rope, box=box)  # warm-up
    # The full run carries MagCache's calibration hooks (they never skip, so the run is full
    # compute; they measure a residual-norm ratio per call): its ratios come from this run.
    # (num_inference_steps one over the run's: at its count the hook clears what it measured.)
    twin.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps + 1))
    reset_peak(dev)
    full, full_s = sample_peer(twin, inp, steps, rope, box=box)
    ratios = calibrated_ratios(twin)
    twin.disable_cache()
    emit({"what": "peer", "name": "diffusers CogVideoXTransformer3DModel, full compute", "diffusers": diffusers.__version__,
          "steps": steps, "calls_run": steps, "latency_s": round(full_s, 2), "ms_per_call": round(full_s * 1000 / steps, 1),
          "speedup": 1.0, "psnr_vs_full": None, "peak_gb": peak_gb(dev),
          "note": "MagCache's calibration hooks on (no skipping); its ratios come from this run",
          "mag_ratios": None if ratios is None else [round(r, 4) for r in ratios]})
    configs = peer_configs(steps, box, ratios)
    if args.peers:  # those named, in the order named
        configs = [(label, c) for p in args.peers for label, c in configs if label.startswith(p)]
    for label, config in configs:
        if time.perf_counter() > args.deadline:
            emit({"what": "peer", "name": label, "skipped": "deadline"})
            continue
        row = {"what": "peer", "name": label, "steps": steps}
        reset_peak(dev)
        try:
            twin.enable_cache(config)
            x, secs = sample_peer(twin, inp, steps, rope, box=box)
            row.update(latency_s=round(secs, 2), speedup=round(full_s / secs, 2),
                       psnr_vs_full=round(latent_psnr(x, full), 2), peak_gb=peak_gb(dev))
        except Exception as e:  # a hook that cannot run on this model: say so, go on with the others
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        finally:
            try:
                twin.disable_cache()
            except Exception:
                pass
        emit(row)
    for n in args.peer_steps:
        if 1 <= n < steps and time.perf_counter() < args.deadline:
            reset_peak(dev)
            x, secs = sample_peer(twin, inp, n, rope, box=box)
            emit({"what": "peer", "name": f"diffusers CogVideoX, {n} DDIM steps", "steps": n, "calls_run": n,
                  "latency_s": round(secs, 2), "speedup": round(full_s / secs, 2),
                  "psnr_vs_full": round(latent_psnr(x, full), 2), "peak_gb": peak_gb(dev)})


# --- driver ---------------------------------------------------------------------------------------------
def device_name(dev) -> str:
    if torch.device(dev).type == "cuda":
        return torch.cuda.get_device_name(torch.device(dev))
    return "cpu"


def merge(paths, out):
    rows, meta = [], {}
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        part = len(meta.get("parts", []))
        rows += [{**r, "part": part} for r in d["rows"]]  # a part's rows compare with its own full run
        meta.setdefault("parts", []).append({k: v for k, v in d.items() if k != "rows"})
    with open(out, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("ours", "peers", "all", "split", "split+peers"), default="all",
                    help="split+peers: the split rows, then the peers (named by --peers) on --device")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--devices", default="cuda:0,cuda:1",
                    help="split: the processes, --device's first ('cuda:0,cuda:1', or 'cpu:2' on the CPU)")
    ap.add_argument("--split-presets", nargs="*", default=["fast", "balanced"],
                    help="split: the Chain Bypass presets run on one GPU and split")
    ap.add_argument("--split-full-steps", type=int, default=0,
                    help="split: steps of the full-compute rows (default: the shape's; its 50-step time is scaled)")
    ap.add_argument("--comm-steps", type=int, default=5,
                    help="split: steps of the run whose collectives are timed (0: none)")
    ap.add_argument("--tiny", action="store_true", help="the reduced-width network at a small grid (CPU smoke test)")
    ap.add_argument("--steps", type=int, default=0, help="override the shape's step count")
    ap.add_argument("--fewer-steps", type=int, nargs="*", default=[10],
                    help="DDIM step counts run besides the presets' model-call counts")
    ap.add_argument("--rows", choices=("all", "fewer"), default="all",
                    help="ours: every accelerator row, or full compute and fewer steps only")
    ap.add_argument("--equal-calls", type=int, nargs="*", default=[],
                    help="DDIM step counts to run as well (model-call counts of presets measured elsewhere)")
    ap.add_argument("--peers", nargs="*", default=[], help="peers: only the hooks whose label starts so")
    ap.add_argument("--peer-steps", type=int, nargs="*", default=[],
                    help="DDIM step counts run on the peer's network (ours has the same schedule)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new row after this many seconds")
    ap.add_argument("--merge", nargs="+", default=None, help="merge these result files into --out")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return 0
    args.shape = "tiny" if args.tiny else "full"
    args.dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    args.deadline = time.perf_counter() + args.budget_s
    if torch.device(args.device).type == "cuda":
        torch.cuda.set_device(torch.device(args.device))
    rows = []
    meta = {"device": device_name(args.device), "torch": torch.__version__, "dtype": str(args.dtype),
            "shape": SHAPES[args.shape], "cfg": 6.0, "psnr": "final latent, data range = full run's peak-to-peak",
            "weights": "random (torch default init, seed 0)",
            "command": "python -m bench.bench_trajectorycrafter " + " ".join(sys.argv[1:] if argv is None else argv)}

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)

    if args.part in ("ours", "all"):
        bench_ours(args, emit)
    if args.part in ("split", "split+peers"):
        bench_split(args, emit)
    if args.part in ("peers", "all", "split+peers"):
        bench_peers(args, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
