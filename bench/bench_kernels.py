"""Short-axis attention kernels against SDPA and against the memory floor, at SV4D / SV4D 2.0 shapes.

    python -m bench.bench_kernels                 # per level and axis -> bench/results/kernels.json
    python -m bench.bench_kernels --unet [--compile] [--fp32-ref]
                                                  # whole SV4D 2.0 UNet calls: sequence path, grid path,
                                                  # kernel, CUDA graph, torch.compile -> kernels_unet.json

Per (model, level, axis), batch 2 (CFG), bf16, q/k/v/o in the image-major layout (b, t, v, h*w, C):
- sdpa: PyTorch SDPA on (sequences, heads, L, d) tensors already in sequence order (the call alone);
- sdpa_path: the same from image-major q, k, v to an image-major output, with the transposes
  (`short_axis_attention(impl="torch")`, what the grid path does without Triton);
- compiled: torch.compile of sdpa_path (the first model's top level only: compile time);
- kernel: the Triton kernel through strided views, each variant's best tile of a small sweep;
- floor: the bytes the attention must move (read q, k, v, write o) over a device-to-device copy
  of the same bytes, timed here; ratio = kernel / floor.
- errors: max |kernel - sdpa_path| in bf16, and each one's max error against an fp32 reference.

SV4D 2.0: 12 frames x 4 views, camera over 4 consecutive pixels of a view (use_3d_attention);
SV4D: 5 frames x 8 views, camera over the views. Levels at 576 px: 72, 36, 18 and 9 latent pixels a
side with 320, 640, 1280 and 1280 channels (head size 64).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from bench.device import call_ms
from turbo_core.kernels import short_axis as sa
from turbo_core.layout import SCMLayout
from turbo_core.models.sv4d_blocks import CameraAxis

MODELS = {"sv4d2": dict(frames=12, views=4, pixel_groups=True), "sv4d": dict(frames=5, views=8, pixel_groups=False)}
LEVELS = ((72, 320), (36, 640), (18, 1280), (9, 1280))
HEAD_DIM = 64


DEVICE = "cuda"


def bench_ms(fn, warmup=10, rep=60) -> float:
    if DEVICE != "cuda":  # a CPU smoke run (TRITON_INTERPRET=1): checks the script, times nothing useful
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def axis_setup(model: str, side: int, axis: str, batch: int = 2):
    m = MODELS[model]
    lay = SCMLayout(batch, m["views"], m["frames"], side, side)
    if axis == "camera":
        return lay, CameraAxis(lay, m["pixel_groups"]).axis_view
    return lay, (lambda t: lay.axis_view(t, "motion"))


def candidates(variant: str, length: int, d: int):
    bl = sa._pow2(length)
    if variant == "fma":
        base = max(1, 4096 // (bl * d))
        return [dict(variant="fma", BLOCK_L=bl, BLOCK_R=r, num_warps=w)
                for r, w in ((max(1, base // 2), 2), (base, 4), (base * 2, 4), (base * 2, 8), (base * 4, 8))]
    bl = max(16, bl)
    return [dict(variant="dot", BLOCK_L=bl, BLOCK_R=r, num_warps=w) for r, w in ((2, 4), (4, 4), (8, 4), (16, 8))]


def one_shape(model, side, channels, axis, dtype, compile_sdpa: bool, sweep: bool = True):
    dev = DEVICE
    heads = channels // HEAD_DIM
    lay, view = axis_setup(model, side, axis)
    n_img, n_tok = lay.images, lay.tokens
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(n_img, n_tok, channels, device=dev, dtype=dtype, generator=gen) for _ in range(3))
    o = torch.empty_like(q)
    qv, kv, vv, ov = view(q), view(k), view(v), view(o)
    g, length, r, _ = qv.shape
    rec = dict(model=model, side=side, axis=axis, channels=channels, heads=heads, length=length,
               sequences=g * r, dtype=str(dtype).replace("torch.", ""))
    nbytes = 4 * q.numel() * q.element_size()
    rec["bytes"] = nbytes
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t_copy = bench_ms(lambda: dst.copy_(src))  # reads nbytes/2, writes nbytes/2: the same bytes moved
    rec["copy_GBps"] = nbytes / t_copy / 1e6
    rec["floor_ms"] = t_copy
    del src, dst

    # SDPA alone, on sequence-ordered tensors as the sequence path's projections give them.
    seq = [t.permute(0, 2, 1, 3).reshape(g * r, length, channels).view(g * r, length, heads, HEAD_DIM).transpose(1, 2)
           for t in (qv, kv, vv)]
    try:
        rec["sdpa_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(*seq))
    except RuntimeError as e:
        rec["sdpa_error"] = str(e)[:200]
    del seq
    o_ref = torch.empty_like(q)
    path = lambda: sa.short_axis_attention(qv, kv, vv, heads, out=view(o_ref), impl="torch")  # noqa: E731
    rec["sdpa_path_ms"] = bench_ms(path)
    if compile_sdpa:
        t0 = time.perf_counter()
        try:
            cfn = torch.compile(lambda a, b, c: sa._torch_path(a, b, c, heads, None, F.scaled_dot_product_attention),
                                dynamic=False)
            cfn(qv, kv, vv)
            _sync()
            rec["compile_s"] = time.perf_counter() - t0
            rec["compiled_ms"] = bench_ms(lambda: cfn(qv, kv, vv))
        except Exception as e:  # noqa: BLE001 - a comparison point, not the product
            rec["compiled_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    path()

    # fp32 reference (SDPA math on upcast inputs) for both bf16 results.
    ref32 = sa._torch_path(qv.float(), kv.float(), vv.float(), heads, None, F.scaled_dot_product_attention)
    rec["sdpa_err_vs_fp32"] = float((view(o_ref).float() - ref32).abs().max())

    best = {}
    for variant in sa.VARIANTS if sweep else ():
        if variant == "dot" and dtype == torch.float32:
            continue
        for cfg in candidates(variant, length, HEAD_DIM):
            key = f"{variant}_r{cfg['BLOCK_R']}_w{cfg['num_warps']}"
            try:
                sa._launch(qv, kv, vv, ov, heads, cfg)
                _sync()
                t = bench_ms(lambda: sa._launch(qv, kv, vv, ov, heads, cfg))
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: that tile is not a candidate
                rec.setdefault("failed", {})[key] = f"{type(e).__name__}: {str(e)[:160]}"
                continue
            err = float((ov.float() - view(o_ref).float()).abs().max())
            rec.setdefault("sweep", {})[key] = dict(ms=t, max_err_vs_sdpa=err)
            if variant not in best or t < best[variant]["ms"]:
                best[variant] = dict(ms=t, config=cfg, max_err_vs_sdpa=err,
                                     err_vs_fp32=float((ov.float() - ref32).abs().max()))
    rec["best"] = best
    # The default choice (what the model runs), timed as the model calls it.
    default = sa._choose(length, HEAD_DIM, dtype, None)
    rec["default_config"] = default
    rec["kernel_ms"] = bench_ms(lambda: sa.short_axis_attention(qv, kv, vv, heads, out=ov, impl="triton"))
    rec["kernel_max_err_vs_sdpa"] = float((ov.float() - view(o_ref).float()).abs().max())
    rec["kernel_err_vs_fp32"] = float((ov.float() - ref32).abs().max())
    rec["ratio_to_floor"] = rec["kernel_ms"] / rec["floor_ms"]
    fastest = min(best.values(), key=lambda b: b["ms"]) if best else None
    if fastest:
        rec["best_ms"] = fastest["ms"]
        rec["best_ratio_to_floor"] = fastest["ms"] / rec["floor_ms"]
    return rec


def kernel_table(args):
    dtype = getattr(torch, args.dtype)
    out = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, torch=torch.__version__,
               triton=__import__("triton").__version__, shapes=[])
    for model in args.models:
        for side, channels in LEVELS:
            if side not in args.sides:
                continue
            for axis in ("camera", "motion"):
                rec = one_shape(model, side, channels, axis, dtype, compile_sdpa=args.compile and side == max(args.sides) and model == args.models[0],
                               sweep=not args.no_sweep)
                out["shapes"].append(rec)
                print(f"{model:5s} {side:2d} {axis:6s} L={rec['length']:2d} S={rec['sequences']:6d} "
                      f"sdpa {rec.get('sdpa_ms', float('nan')):.3f} path {rec['sdpa_path_ms']:.3f} "
                      f"compiled {rec.get('compiled_ms', float('nan')):.3f} kernel {rec['kernel_ms']:.3f} "
                      f"best {rec.get('best_ms', float('nan')):.3f} floor {rec['floor_ms']:.3f} "
                      f"ratio {rec['ratio_to_floor']:.2f} err {rec['kernel_max_err_vs_sdpa']:.4f} "
                      f"(sdpa vs fp32 {rec['sdpa_err_vs_fp32']:.4f}, kernel vs fp32 {rec['kernel_err_vs_fp32']:.4f}) "
                      f"best by variant {({k: round(b['ms'], 3) for k, b in rec['best'].items()})}", flush=True)
                _dump(out, args.out)
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
    return out


# --- whole UNet calls ---------------------------------------------------------------------------
def unet_inputs(b, frames, views, side, device, dtype):
    n = b * frames * views
    g = torch.Generator(device=device).manual_seed(0)
    return dict(x=torch.randn(n, 8, side, side, device=device, dtype=dtype, generator=g),
                timesteps=torch.full((n,), 0.4, device=device),
                context=torch.randn(b, frames, 1024, device=device, dtype=dtype, generator=g),
                y=torch.randn(n, 1280, device=device, dtype=dtype, generator=g),
                cond_view=torch.randn(b * views, 4, side, side, device=device, dtype=dtype, generator=g),
                views=views, frames=frames)


def cuda_ms(fn, calls):
    return sorted(call_ms(fn, calls, DEVICE))


def unet_table(args):
    from turbo_core.dispatch import FullCompute
    from turbo_core.models.sv4d import SV4DConfig, build_sv4d

    dev, dtype = DEVICE, torch.bfloat16 if DEVICE == "cuda" else torch.float32
    out = dict(device=torch.cuda.get_device_name() if dev == "cuda" else dev, torch=torch.__version__,
               batch=args.batch, side=args.side, unet=[])
    torch.manual_seed(0)
    cfg = SV4DConfig.reduced() if args.reduced else SV4DConfig(version="sv4d2")
    m = MODELS["sv4d2"]
    ref32 = None
    if args.fp32_ref:  # the same weights in fp32 (no TF32), sequence path: what bf16 is held to
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        net32 = build_sv4d(cfg, dev).eval()
        inp32 = unet_inputs(args.batch, m["frames"], m["views"], args.side, dev, torch.float32)
        lay32 = net32.token_layout(inp32["x"].shape[0], m["views"], m["frames"], args.side, args.side)
        with torch.no_grad():
            ref32 = net32(**inp32, dispatch=FullCompute(lay32, grid=False)).float()
        del net32, inp32
        torch.manual_seed(0)
    net = build_sv4d(cfg, dev).to(dtype).eval()
    inp = unet_inputs(args.batch, m["frames"], m["views"], args.side, dev, dtype)
    lay = net.token_layout(inp["x"].shape[0], m["views"], m["frames"], args.side, args.side)
    ref = None

    def record(name, fn, **extra):
        nonlocal ref
        with torch.no_grad():
            y = fn()
            _sync()
            times = cuda_ms(fn, args.calls)
        rec = dict(name=name, ms_median=times[len(times) // 2], ms=times, **extra)
        if ref is None:
            ref = y.float().clone()
        rec["max_abs_diff_vs_first"] = float((y.float() - ref).abs().max())
        rec["rel_diff_vs_first"] = float((y.float() - ref).norm() / ref.norm())
        if ref32 is not None:
            rec["max_abs_err_vs_fp32"] = float((y.float() - ref32).abs().max())
            rec["rel_err_vs_fp32"] = float((y.float() - ref32).norm() / ref32.norm())
        out["unet"].append(rec)
        print(f"unet {name:34s} {rec['ms_median']:8.1f} ms  max|diff| {rec['max_abs_diff_vs_first']:.4f} "
              f"rel {rec['rel_diff_vs_first']:.2e} vs fp32: rel {rec.get('rel_err_vs_fp32', float('nan')):.2e} "
              f"max {rec.get('max_abs_err_vs_fp32', float('nan')):.4f} {extra}", flush=True)
        _dump(out, args.out)

    def plain_sdpa(q, k, v):  # a backend of its own: the grid path then keeps SDPA (and its transposes)
        return F.scaled_dot_product_attention(q, k, v)

    def call(grid, impl, backend="sdpa"):
        def fn():
            os.environ[sa.ENV] = impl
            return net(**inp, dispatch=FullCompute(lay, backend=backend, grid=grid))
        return fn

    record("sequence path, SDPA", call(False, "torch"))
    if not args.no_grid_sdpa:
        record("grid path, SDPA", call(True, "auto", plain_sdpa))
    record("grid path, kernel", call(True, "auto"))
    os.environ[sa.ENV] = "auto"

    if dev != "cuda" or args.no_graph:
        return out
    # CUDA graph of the whole call (full compute; static inputs).
    try:
        with torch.no_grad():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    net(**inp)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            t0 = time.perf_counter()
            with torch.cuda.graph(graph):
                static_out = net(**inp)
            capture = time.perf_counter() - t0

        def replay():
            graph.replay()
            return static_out

        record("grid path, kernel, CUDA graph", replay, capture_s=capture)
        del graph, static_out
    except Exception as e:  # noqa: BLE001
        out["cuda_graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print("cuda graph failed:", out["cuda_graph_error"], flush=True)
    torch.cuda.empty_cache()

    if args.compile:
        for impl in ("auto", "torch"):
            os.environ[sa.ENV] = impl
            try:
                torch._dynamo.reset()
                cnet = torch.compile(net)
                t0 = time.perf_counter()
                with torch.no_grad():
                    cnet(**inp)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                record(f"torch.compile, {'kernel' if impl == 'auto' else 'SDPA'}", lambda: cnet(**inp),
                       compile_s=compile_s)
                break
            except Exception as e:  # noqa: BLE001
                out.setdefault("compile_errors", {})[impl] = f"{type(e).__name__}: {str(e)[:300]}"
                print("compile failed:", impl, out["compile_errors"][impl], flush=True)
        os.environ[sa.ENV] = "auto"
    return out


def _dump(obj, path):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--sides", nargs="+", type=int, default=[s for s, _ in LEVELS])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--compile", action="store_true", help="also torch.compile (sdpa path / whole UNet)")
    ap.add_argument("--unet", action="store_true", help="whole SV4D 2.0 UNet calls instead of the kernel table")
    ap.add_argument("--no-sweep", action="store_true", help="time only the default tile of each shape")
    ap.add_argument("--fp32-ref", action="store_true", help="--unet: errors against the fp32 sequence path")
    ap.add_argument("--no-graph", action="store_true", help="--unet: skip the CUDA graph")
    ap.add_argument("--no-grid-sdpa", action="store_true", help="--unet: skip the grid path without the kernel")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--side", type=int, default=72)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--reduced", action="store_true", help=argparse.SUPPRESS)  # smoke: SV4DConfig.reduced()
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke run under TRITON_INTERPRET=1
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_kernels times CUDA kernels; run it on a machine with a CUDA GPU")
    if sa.triton is None:
        raise SystemExit("bench_kernels needs Triton (pip install triton)")
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                        "kernels_unet.json" if args.unet else "kernels.json")
    (unet_table if args.unet else kernel_table)(args)


if __name__ == "__main__":
    main()
