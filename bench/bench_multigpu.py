"""Multi-GPU sampling (turbo_core.parallel): one GPU against two (or more), each split mode, at
full compute and with the Turbo4D presets.

    python -m bench.bench_multigpu --device cuda --out $OUT            # large config, 12 x 4, 50 steps
    python -m bench.bench_multigpu --device cuda --gpus 2 --presets off,fast --modes cfg,frames
    python -m bench.bench_multigpu --device cpu --tiny --out /tmp/b    # gloo, toy size: checks the path

The model: CONFIGS["large"] with random bf16 weights (SV4D 2.0's top level: 72 x 72 tokens per
image, width 320), one 12-frame x 4-view grid, Euler over 50 Karras steps, CFG 2.0 batched as
ComfyUI batches it (the conditional and unconditional halves in one call: batch 2). A cfg 1.0 run
(batch 1) is measured too, for the frame and view splits alone.

Per row (config, preset, GPUs, mode): wall-clock of the run after an untimed warm-up run (which
also sends the weights and compiles kernels on every process), the model calls that ran, time per
call that ran, peak memory per GPU (torch.cuda.max_memory_allocated since the run began), and the
PSNR of the result against the one-GPU result of the same preset (inf: identical; SV4D rows: the
latents' largest difference against their largest value, 20 log10, in dB). The
communication share comes from a separate short full-compute run per (GPUs, mode) with every
collective timed between device synchronisations (which serialise the overlap of compute and
communication that the timed runs have, so the share is an upper bound): time in collectives over
the time spent in calls, per rank. NVLink SHARP stays off (NCCL_NVLS_ENABLE=0), as on shared
machines it must.

--sv4d: SV4D 2.0 at full size with random bf16 weights, one 12-frame x 4-view pass (72 x 72
latents), CFG batched, 50 steps of its Euler EDM sampler: 1 GPU against the CFG halves on 2 (the
only split the UNet takes: its res blocks mix frames and its camera attention runs over pixel
groups). --sv4d --tiny: the reduced UNet on CPU processes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before any NCCL communicator exists

import torch

from bench.device import peak_bytes, sync
from turbo_core import parallel
from turbo_core.accel.presets import turbo4d_specs
from turbo_core.diffusion import EDM, karras_sigmas
from turbo_core.metrics import psnr
from turbo_core.models import CONFIGS, SCMNet

PRESETS = ("off", "quality", "balanced", "fast")


def random_net(config: str, seed: int = 0, std: float = 0.02) -> SCMNet:
    """Stock init plus small random output projections (the stock init zeroes them, which would make
    every block an identity and every accelerator free); seeded, so every run benchmarks one network."""
    torch.manual_seed(seed)
    net = SCMNet(CONFIGS[config])
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 1 and torch.count_nonzero(p) == 0:
                p.normal_(0, std)
    return net


def inputs(net: SCMNet, views: int, frames: int, device, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    n, s = views * frames, net.cfg.image_size
    cams = torch.stack([torch.arange(views).float() * (6.2832 / views), torch.full((views,), 0.35)], -1)
    return {"noise": torch.randn(n, 3, s, s, generator=g).to(device),
            "cond": torch.rand(n, 3, s, s, generator=g).mul(2).sub(1).to(device),
            "camera": cams.repeat(frames, 1).to(device)}


def one_run(net, data, steps, views, frames, cfg, specs, group, mode, device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    x, stats = parallel.sample_grid(net, EDM(), data["noise"], karras_sigmas(steps, device=device), data["cond"],
                                    data["camera"], views, frames, specs=specs, cfg=cfg, group=group, mode=mode)
    sync(device)
    return x, stats, time.perf_counter() - t0


def bench(args, log=print) -> dict:
    device = torch.device(args.device)
    config = "tiny" if args.tiny else args.config
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    net = random_net(config).to(device=device, dtype=dtype).eval()
    views, frames = args.views, args.frames
    data = inputs(net, views, frames, device)
    world = args.gpus
    devices = f"cpu:{world}" if device.type == "cpu" else ",".join(str(i) for i in range(world))  # rank 0: cuda:0
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n < world:
            raise SystemExit(f"--gpus {world}: this machine has {n} CUDA devices")
    rows, comm = [], []
    group = parallel.acquire(devices) if world > 1 else None
    try:
        for cfg in args.cfgs:
            # The communication share per (mode): a short full-compute run, every collective timed.
            if group is not None:
                parallel.set_sync_timing(group, True)
                for mode in args.modes:
                    if mode == "cfg" and cfg == 1.0:
                        continue
                    one_run(net, data, 2, views, frames, cfg, [], group, mode, device)  # warm-up
                    _, st, wall = one_run(net, data, args.profile_steps, views, frames, cfg, [], group, mode, device)
                    comm.append(_comm_row(cfg, mode, st, wall))
                    log(f"comm  cfg {cfg} {mode:7s} share per rank {comm[-1]['comm_share_per_rank']}, "
                        f"{comm[-1]['comm_mb_per_call_rank0']} MB per call on rank 0")
                parallel.set_sync_timing(group, False)
            for preset in args.presets:
                specs = turbo4d_specs(preset)
                one_run(net, data, 2, views, frames, cfg, specs, None, "auto", device)  # warm-up
                steps = _steps(args, preset)
                ref, st1, wall1 = one_run(net, data, steps, views, frames, cfg, specs, None, "auto", device)
                calls1 = st1.summary()["model_calls_run"]
                rows.append(_row(config, preset, cfg, 1, "-", wall1, calls1, [st1.peak_memory_bytes], float("inf"),
                                 None))
                log(_fmt_row(rows[-1]))
                if group is None:
                    continue
                for mode in args.modes:
                    if mode == "cfg" and cfg == 1.0:
                        continue  # one batch: nothing for the CFG split to split
                    one_run(net, data, 2, views, frames, cfg, specs, group, mode, device)
                    x, st, wall = one_run(net, data, steps, views, frames, cfg, specs, group, mode, device)
                    par = st.parallel
                    peaks = [st.peak_memory_bytes] + [None if r["peak_memory_mb"] is None else r["peak_memory_mb"] * 2**20
                                                      for r in par["ranks"][1:]]
                    q = psnr(x.float().clamp(-1, 1), ref.float().clamp(-1, 1)).min().item()  # the worst image
                    rows.append(_row(config, preset, cfg, world, "/".join(par["calls_by_mode"]) or "none", wall,
                                     st.summary()["model_calls_run"], peaks, q, wall1 / wall))
                    log(_fmt_row(rows[-1]))
    finally:
        parallel.shutdown()
    return {"rows": rows, "comm": comm}


def sv4d_run(net, model, cond, noise, steps, views, frames, specs, group, device, scale=2.0):
    """One SV4D pass sampled as bench_sv4d.euler_cfg_run does (V-prediction EDM, CFG batched, whole
    steps decided on the combined image), with `model` (the net, or its ParallelNet) in each call.
    Returns (x, RunStats, seconds)."""
    import math

    from turbo_core.accel.registry import build_run
    from turbo_core.sampling_plans import edm_sigmas

    n = frames * views
    dtype = next(net.parameters()).dtype
    sigmas = edm_sigmas(steps).tolist()
    side = noise.shape[-1]
    lay = net.token_layout(2 * n, views, frames, side, side)
    work = net.block_work(lay)
    run = build_run(specs)
    run.begin()
    if group is not None:
        parallel.begin_run(group, specs, run.backend)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    x = noise * sigmas[0]
    try:
        with torch.inference_mode():
            for i in range(steps):
                s, s_next = sigmas[i], sigmas[i + 1]
                c_in, c_skip, c_out = (s * s + 1) ** -0.5, 1 / (s * s + 1), -s * (s * s + 1) ** -0.5

                def denoise():
                    d = run.dispatch(lay, s, sigmas, stream="(1, 0)", blocks=net.blocks, dtype=dtype, device=device,
                                     work=work)
                    xin = torch.cat([torch.cat([(x * c_in).to(dtype)] * 2), cond["concat"]], 1)
                    t = torch.full((2 * n,), 0.25 * math.log(s), device=device)
                    f = run.model_call(d, xin, lambda: model(xin, t, cond["context"], cond["y"], cond["cond_view"],
                                                             views, frames, dispatch=d))
                    run.end_call(d)
                    u, c = (c_skip * torch.cat([x, x]) + c_out * f.float()).chunk(2)
                    return u + scale * (c - u)

                den = run.step(x, s, sigmas, denoise, 1.0)
                x = x + (x - den) / s * (s_next - s)
    finally:
        stats = run.end(peak_bytes(device))
        if group is not None and group.alive:
            parallel.end_run(group, stats)
    sync(device)
    return x, stats, time.perf_counter() - t0


def bench_sv4d(args, log=print) -> dict:
    from bench.bench_sv4d import sv4d_conditioning
    from turbo_core.models.sv4d import SV4DConfig, build_sv4d

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = SV4DConfig.reduced("sv4d2") if args.tiny else SV4DConfig(version="sv4d2")
    torch.manual_seed(0)
    net = build_sv4d(cfg, device).to(dtype).eval()
    views, frames = args.views, args.frames
    side = 16 if args.tiny else 72
    cond = sv4d_conditioning(frames, views, side, device, dtype)
    # sv4d_conditioning's context is per batch item (b, frames, 1024): one row per image instead,
    # as ComfyUI hands it over, so every tensor argument holds whole batch items of images.
    cond["context"] = cond["context"].repeat_interleave(views, dim=1).reshape(-1, 1, cond["context"].shape[-1])
    noise = torch.randn(frames * views, 4, side, side, generator=torch.Generator().manual_seed(1)).to(device)
    world = args.gpus
    devices = f"cpu:{world}" if device.type == "cpu" else ",".join(str(i) for i in range(world))
    group = parallel.acquire(devices) if world > 1 else None
    split = parallel.ParallelNet(net, group, "cfg") if group is not None else None
    rows, comm = [], []
    try:
        if split is not None:  # the communication share: a short full-compute run, every collective timed
            parallel.set_sync_timing(group, True)
            sv4d_run(net, split, cond, noise, 2, views, frames, [], group, device)  # warm-up, sends the weights
            _, st, wall = sv4d_run(net, split, cond, noise, args.profile_steps, views, frames, [], group, device)
            comm.append(_comm_row(2.0, "cfg", st, wall))
            log(f"comm  cfg 2.0 cfg     share per rank {comm[-1]['comm_share_per_rank']}, "
                f"{comm[-1]['comm_mb_per_call_rank0']} MB per call on rank 0")
            parallel.set_sync_timing(group, False)
        for preset in args.presets:
            specs = turbo4d_specs(preset)
            steps = _steps(args, preset)
            sv4d_run(net, net, cond, noise, 2, views, frames, specs, None, device)  # warm-up
            ref, st1, wall1 = sv4d_run(net, net, cond, noise, steps, views, frames, specs, None, device)
            calls1 = st1.summary()["model_calls_run"]
            rows.append(_row("sv4d2", preset, 2.0, 1, "-", wall1, calls1, [st1.peak_memory_bytes], float("inf"), None))
            log(_fmt_row(rows[-1]))
            if split is None:
                continue
            sv4d_run(net, split, cond, noise, 2, views, frames, specs, group, device)
            x, st, wall = sv4d_run(net, split, cond, noise, steps, views, frames, specs, group, device)
            par = st.parallel
            peaks = [st.peak_memory_bytes] + [None if r["peak_memory_mb"] is None else r["peak_memory_mb"] * 2**20
                                              for r in par["ranks"][1:]]
            err = ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            q = float("inf") if err == 0 else -20 * math.log10(err)  # relative peak error, in dB
            rows.append(_row("sv4d2", preset, 2.0, world, "/".join(par["calls_by_mode"]) or "none", wall,
                             st.summary()["model_calls_run"], peaks, q, wall1 / wall))
            log(_fmt_row(rows[-1]))
    finally:
        parallel.shutdown()
    return {"rows": rows, "comm": comm}


def _comm_row(cfg, mode, st, wall) -> dict:
    par = st.parallel
    shares = [r["comm_seconds"] / r["busy_seconds"] if r["busy_seconds"] else None for r in par["ranks"]]
    return {"cfg": cfg, "mode": mode, "calls_by_mode": par["calls_by_mode"],
            "comm_share_per_rank": [None if s is None else round(s, 4) for s in shares],
            "comm_seconds_per_rank": [r["comm_seconds"] for r in par["ranks"]],
            "comm_mb_per_call_rank0": round(par["ranks"][0]["comm_bytes"] / 2**20 / max(st.calls, 1), 2),
            "seconds_per_call_synced": round(wall / max(st.calls, 1), 4)}


def _steps(args, preset: str) -> int:
    """Steps of a preset's runs: --full-steps for full compute (every call the same work, so a
    shorter schedule gives its time per call), else --steps."""
    return args.full_steps if preset == "off" and args.full_steps else args.steps


def _row(config, preset, cfg, gpus, mode, wall, calls, peaks, q, speedup) -> dict:
    return {"config": config, "preset": preset, "cfg": cfg, "gpus": gpus, "mode": mode,
            "seconds": round(wall, 4), "calls_run": calls, "seconds_per_call": round(wall / max(calls, 1), 4),
            "speedup_vs_1": None if speedup is None else round(speedup, 3),
            "peak_memory_gb": [None if p is None else round(p / 2**30, 2) for p in peaks],
            "psnr_vs_1_db": None if q is None else (q if q != float("inf") else "inf")}


def _fmt_row(r) -> str:
    sp = "" if r["speedup_vs_1"] is None else f"{r['speedup_vs_1']:.2f}x"
    q = r["psnr_vs_1_db"]
    q = q if isinstance(q, str) else f"{q:.1f}"
    mem = "/".join("-" if p is None else f"{p:.1f}" for p in r["peak_memory_gb"])
    return (f"| {r['config']} | {r['preset']} | {r['cfg']} | {r['gpus']} | {r['mode']} | {r['seconds']:.2f} | "
            f"{r['calls_run']} | {r['seconds_per_call'] * 1000:.0f} | {sp} | {mem} | {q} |")


HEADER = ("| config | preset | cfg | GPUs | mode | run s | calls run | ms per call | speedup vs 1 | "
          "peak GB per GPU | PSNR vs 1 GPU dB |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--gpus", type=int, default=2, help="processes of the split runs (GPUs; CPU processes on cpu)")
    ap.add_argument("--config", default="large", choices=sorted(CONFIGS))
    ap.add_argument("--tiny", action="store_true", help="toy size (CONFIGS['tiny'], 4 x 4, 4 steps): checks the path")
    ap.add_argument("--sv4d", action="store_true", help="SV4D 2.0 at full size (random bf16 weights), CFG halves")
    ap.add_argument("--views", type=int, default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--full-steps", type=int, default=None,
                    help="steps of the full-compute runs (default --steps): its time per call is what scales")
    ap.add_argument("--profile-steps", type=int, default=None, help="steps of the communication-share runs")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--modes", default="cfg,frames,views")
    ap.add_argument("--cfgs", default="2.0,1.0", help="guidance scales: 2.0 batches the CFG halves, 1.0 does not")
    ap.add_argument("--out", default=None, help="folder for bench_multigpu.json")
    args = ap.parse_args(argv)
    args.views = args.views or 4
    args.frames = args.frames or ((2 if args.sv4d else 4) if args.tiny else 12)
    args.steps = args.steps or ((2 if args.sv4d else 4) if args.tiny else 50)
    args.profile_steps = args.profile_steps or (3 if args.tiny else 6)
    args.presets = [p for p in args.presets.split(",") if p]
    args.modes = [m for m in args.modes.split(",") if m]
    args.cfgs = [float(c) for c in args.cfgs.split(",") if c]
    bad = [p for p in args.presets if p not in PRESETS] + [m for m in args.modes if m not in parallel.MODES[1:]]
    if bad:
        raise SystemExit(f"unknown presets/modes {bad}; presets {PRESETS}, modes {parallel.MODES[1:]}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available (use --device cpu --tiny to check the path)")
    dev = "cuda:0" if args.device == "cuda" else "cpu"
    args.device = dev
    header = (f"{_device_name(dev)} x {args.gpus if args.device != 'cpu' else 1}, torch {torch.__version__}, "
              f"config {('sv4d2 reduced' if args.tiny else 'sv4d2') if args.sv4d else 'tiny' if args.tiny else args.config}, "
              f"{args.views} views x {args.frames} frames, "
              f"{args.steps} steps")
    print(header)
    print(HEADER)
    result = bench_sv4d(args) if args.sv4d else bench(args)
    print("\ncommunication share (collectives timed between device syncs, short full-compute runs):")
    print("| cfg | mode | time in collectives per rank | MB sent+received per call (rank 0) | ms per call (synced) |")
    print("|---|---|---|---|---|")
    for c in result["comm"]:
        shares = " / ".join("-" if s is None else f"{s * 100:.1f}%" for s in c["comm_share_per_rank"])
        print(f"| {c['cfg']} | {c['mode']} | {shares} | {c['comm_mb_per_call_rank0']} | "
              f"{c['seconds_per_call_synced'] * 1000:.0f} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "bench_multigpu.json")
        with open(path, "w") as f:
            json.dump({"header": header, "argv": vars(args), **result}, f, indent=1)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
