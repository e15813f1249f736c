"""Where the time of an accelerated run goes: the accelerators' own overhead (each mechanism set so
that it never skips anything: every cost it adds, none of its savings) and a kernel profile of full
compute and of a combined preset.

    python -m bench.profile_accel --device cuda [--large] [--steps 10]
    python -m bench.profile_accel --device cuda --steps 6 --per-call --token-only

With --per-call it also prints, per profiled configuration, the host's busy time (its own work:
the profiler's CPU time less the time spent waiting in the CUDA runtime's synchronising calls)
against the GPU's: where the host is far below the GPU, the launches hide behind the kernels and
CUDA graphs cannot pay.
"""
from __future__ import annotations

import argparse
import os

import torch

from bench.bench_accel import DEFAULT_MODEL, HELD_OUT_SEED, load_net, make_batch
from turbo_core.accel.block_reuse import BlockReuseConfig
from turbo_core.accel.bypass import ChainBypassConfig
from turbo_core.accel.cache import RollingCacheConfig
from turbo_core.accel.presets import turbo4d_specs
from turbo_core.accel.prune import TokenPrunerConfig
from turbo_core.accel.script import sample_accelerated
from turbo_core.accel.token_reuse import TokenReuseConfig
from turbo_core.diffusion import EDM, karras_sigmas
from turbo_core.metrics import measure

NEVER_SKIP = {
    "cache (never reuses)": [("cache", RollingCacheConfig(threshold=1e-12, start_percent=0.0))],
    "prune (keeps all)": [("prune", TokenPrunerConfig(keep_start=1.0, keep_end=1.0, adapt=0.0, start_percent=0.0))],
    "bypass (never bypasses)": [("bypass", ChainBypassConfig(threshold=1e-12, start_percent=0.0))],
    "block_reuse (never reuses)": [("block_reuse", BlockReuseConfig(threshold=0.0))],
    "token_reuse (keeps all)": [("token_reuse", TokenReuseConfig(keep_min=1.0))],
}
PER_CALL = {"block-reuse": [("block_reuse", BlockReuseConfig())],
            "token-reuse": [("token_reuse", TokenReuseConfig())]}
UNFUSED = {"TURBO4D_TOKEN_FUSE": "torch"}  # token reuse through the operations its kernels replace
WAITING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--large", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--scenes", type=int, default=None)
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--rows", type=int, default=18)
    ap.add_argument("--per-call", action="store_true", help="profile block and token reuse, not a preset")
    ap.add_argument("--token-only", action="store_true",
                    help="with --per-call: full compute and token reuse, fused and unfused, only")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.large:
        net, source = load_net(None, "large", device, torch.bfloat16)
        views, frames, scenes = 4, 12, args.scenes or 1
    else:
        net, source = load_net(DEFAULT_MODEL, "default", device)
        views, frames, scenes = 4, 8, args.scenes or 16
    edm = EDM(sigma_data=net.cfg.sigma_data)
    batch = make_batch(list(range(HELD_OUT_SEED, HELD_OUT_SEED + scenes)), views, frames, net.cfg.image_size, device)
    dtype = next(net.parameters()).dtype
    noise, cond = batch["noise"].to(dtype), batch["cond"].to(dtype)
    sigmas = karras_sigmas(args.steps, device=device)
    print(f"{source}, {scenes * frames * views} images, {args.steps} steps, {dtype}")

    envs, best = {}, {}

    def run(specs, name=None):
        saved = {k: os.environ.get(k) for k in envs.get(name, {})}
        os.environ.update(envs.get(name, {}))
        try:
            return sample_accelerated(net, edm, specs, noise, sigmas, cond, batch["camera"], views, frames)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    configs = {"full": [], **NEVER_SKIP}
    profiled = list(PER_CALL) if args.per_call else [f"turbo4d-{args.preset}"]
    configs.update(PER_CALL if args.per_call else {profiled[0]: turbo4d_specs(args.preset)})
    if args.per_call and args.token_only:
        configs = {"full": [], "token_reuse (keeps all)": NEVER_SKIP["token_reuse (keeps all)"],
                   "token-reuse": PER_CALL["token-reuse"], "token-reuse-unfused": PER_CALL["token-reuse"]}
        envs["token-reuse-unfused"] = UNFUSED
        profiled = ["token-reuse", "token-reuse-unfused"]
    for name, specs in configs.items():
        run(specs, name)
        times = []
        for _ in range(3):
            with measure(device) as m:
                _, st = run(specs, name)
            times.append(m.seconds)
        t = best[name] = min(times)
        print(f"{name:<28} {t * 1000 / args.steps:8.2f} ms/call  compute {st.compute_fraction:.3f}")
    from torch.profiler import ProfilerActivity, profile

    for name in ["full"] + profiled:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            run(configs[name], name)
            if device.type == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n=== {name}: top ops by {key} ===")
        avg = prof.key_averages()
        print(avg.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
        if args.per_call and device.type == "cuda":
            cpu = sum(e.self_cpu_time_total for e in avg)
            waiting = sum(e.self_cpu_time_total for e in avg if e.key in WAITING)
            print(f"host busy {(cpu - waiting) / 1000 / args.steps:.2f} ms/call (of {cpu / 1000 / args.steps:.2f} ms "
                  f"under the profiler, {waiting / 1000 / args.steps:.2f} waiting), against "
                  f"{best[name] * 1000 / args.steps:.2f} ms/call of wall time unprofiled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
