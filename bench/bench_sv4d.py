"""Time the full-size SV4D / SV4D 2.0 UNet (random weights) per model call on a GPU.

    python -m bench.bench_sv4d [--versions sv4d2 sv4d] [--calls 5] [--accel fast]

Per call: the configs' grids at 576 px (72 x 72 latents): SV4D 2.0 12 frames x 4 views, SV4D 5 x 8,
with the CFG batch (b = 2) and without (b = 1). Random weights: the timings are the network's cost;
with --accel the accelerators' decisions on random weights say nothing about quality, only that the
mechanics run at full size and what they cost when they skip.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from turbo_core.accel.presets import turbo4d_specs
from turbo_core.accel.registry import build_run
from turbo_core.dispatch import FullCompute
from turbo_core.models.sv4d import SV4DConfig, build_sv4d
from turbo_core.train import broadcast_attention, chunked_sdpa

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


def timed(fn, calls):
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in ev]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", nargs="+", default=["sv4d2", "sv4d"])
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--side", type=int, default=72)
    ap.add_argument("--accel", default=None, help="a Turbo4D preset to run over a 10-step schedule")
    ap.add_argument("--backends", nargs="+", default=["sdpa", "chunked-sdpa"], choices=list(BACKENDS))
    args = ap.parse_args()
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
                torch.cuda.reset_peak_memory_stats()
                d = FullCompute(lay, backend=BACKENDS[backend])
                with torch.inference_mode():
                    for _ in range(2):
                        net(**inp, dispatch=d)
                    torch.cuda.synchronize()
                    ms = timed(lambda: net(**inp, dispatch=d), args.calls)
                row = {"version": version, "params": params, "batch": b, "frames": frames, "views": views,
                       "latent": args.side, "images": b * frames * views, "backend": backend,
                       "ms_per_call": round(sorted(ms)[len(ms) // 2], 1), "ms_all": [round(m, 1) for m in ms],
                       "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
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
                        torch.cuda.synchronize()
                        times.append((time.perf_counter() - t0) * 1000)
                stats = run.end(torch.cuda.max_memory_allocated())
                acc = {"version": version, "accel": args.accel, "backend": args.backends[-1],
                       "ms_per_step": [round(t, 1) for t in times], "accelerators": stats.accelerators,
                       "cache_mb": stats.summary()["cache_memory_peak_mb"]}
                print(json.dumps(acc, default=str), flush=True)
                results.append(acc)
            del inp
        del net
        torch.cuda.empty_cache()
    print(torch.cuda.get_device_name(), torch.__version__)
    return results


if __name__ == "__main__":
    main()
