"""Turbo4D against ComfyUI's own EasyCache node, through real ComfyUI sampling, same model and seeds.

Both run in-process inside an unmodified ComfyUI tree: our loader's MODEL, ComfyUI's
`comfy.sample.sample`, and for the peer the EasyCache node's own `execute` (comfy_extras/
nodes_easycache.py), at several thresholds. Timing per configuration is the minimum of `--repeats`
runs after a warm-up, device-synchronised; speedups divide the full-compute time of the same
process. Quality: mean per-image PSNR against the full-compute result of the same noise and against
the ground truth of the held-out scenes.

    python bench/bench_peers.py --comfy .host/ComfyUI --device cpu --scenes 2 --out bench/results/peers_cpu.json
    python3 bench/bench_peers.py --comfy /tmp/ComfyUI --device cuda --scenes 16 --out $OUT/peers_cuda.json
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_comfy(comfy_dir: str, device: str):
    sys.path.insert(0, comfy_dir)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from comfy.cli_args import args
    args.cpu = device == "cpu"
    name = "turbo4d_pack_nodes"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "nodes", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(ROOT, "nodes")])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    return importlib.import_module(f"{name}.model"), importlib.import_module(f"{name}.sampling"), \
        importlib.import_module(f"{name}.accelerators")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy", default=os.path.join(ROOT, ".host", "ComfyUI"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "turbo4d_default.safetensors"))
    ap.add_argument("--scenes", type=int, default=2)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--easycache", default="0.05,0.1,0.2,0.3,0.5")
    ap.add_argument("--fewer-steps", default="", help="also full compute at these step counts (e.g. 10,5,3)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "peers.json"))
    a = ap.parse_args(argv)

    m, sampling, accel = load_comfy(a.comfy, a.device)
    import torch
    import comfy.model_management as mm
    import comfy.sample
    from comfy_extras.nodes_easycache import EasyCacheNode
    from turbo_core.data.synth4d import SceneConfig, make_scene
    from turbo_core.metrics import psnr
    from turbo_core.models.io import load_model

    dev = mm.get_torch_device()
    net = load_model(a.model)
    base = m.make_model_patcher(net)
    seeds = [1_000_000 + i for i in range(a.scenes)]
    scenes = [make_scene(s, SceneConfig(views=a.views, frames=a.frames)) for s in seeds]

    def variants():
        yield "full", base, a.steps
        for n in [int(x) for x in a.fewer_steps.split(",") if x]:
            yield f"fewer-steps-{n}", base, n  # the trivial accelerator
        for t in [float(x) for x in a.easycache.split(",") if x]:
            yield f"easycache-{t:g}", EasyCacheNode.execute(base, t, 0.15, 0.95, False)[0], a.steps
        for preset in ("quality", "balanced", "fast"):
            mp = base
            for node in (accel.ChainBypass, accel.Turbo4DCache, accel.SemanticPrune):
                args = {"ChainBypass": dict(threshold=0.08, max_consecutive=2, step_threshold=0.0, step_max_skips=3, kappa_prior=0.0),
                        "Turbo4DCache": dict(threshold=0.15, max_age=3),
                        "SemanticPrune": dict(keep_start=0.5, keep_end=0.3, saliency=0.5, max_age=6)}[node.__name__]
                mp = node.execute(mp, preset, start_percent=0.2, end_percent=0.95, storage="native", **args)[0]
            yield f"turbo4d-{preset}", mp, a.steps
        for preset in ("quality", "balanced", "fast"):
            mp = accel.ChainBypass.execute(base, preset, threshold=0.08, max_consecutive=2, step_threshold=0.0,
                                           step_max_skips=3, kappa_prior=0.0, start_percent=0.2, end_percent=0.95,
                                           storage="native")[0]
            yield f"chain-bypass-{preset}", mp, a.steps

    def run(mp, scene, seed, steps):
        data = {"video": scene["video"], "fps": 8.0, "source": "synth"}
        pos, neg, latent, _ = sampling.build_conditioning("bench", mp, data, a.views, a.frames, 20.0, 360.0)
        x = latent["samples"]
        noise = comfy.sample.prepare_noise(x, seed)
        with torch.inference_mode():
            out = comfy.sample.sample(mp, noise, steps, 1.0, "euler", "karras", pos, neg, x, denoise=1.0,
                                      disable_pbar=True, seed=seed)
        return out.float().cpu()

    def sync():
        if torch.cuda.is_available() and a.device != "cpu":
            torch.cuda.synchronize()

    rows, full_out = [], None
    run(base, scenes[0], seeds[0], a.steps)  # warm-up: loads the model to the device
    for name, mp, steps in variants():
        best, outs = float("inf"), None
        for _ in range(a.repeats):
            sync()
            t0 = time.perf_counter()
            outs = [run(mp, sc, s, steps) for sc, s in zip(scenes, seeds)]
            sync()
            best = min(best, time.perf_counter() - t0)
        if name == "full":
            full_out, full_t = outs, best
        gt = [sc["ground_truth"].flatten(0, 1) for sc in scenes]
        p_full = torch.cat([psnr(o, f) for o, f in zip(outs, full_out)])
        p_gt = torch.cat([psnr(o, g) for o, g in zip(outs, gt)])
        row = {"name": name, "seconds": best, "speedup": full_t / best,
               "psnr_vs_full": None if name == "full" else float(p_full[torch.isfinite(p_full)].mean())
               if torch.isfinite(p_full).any() else float("inf"),
               "psnr_vs_gt": float(p_gt.mean())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name() if a.device != "cpu" and torch.cuda.is_available() else
              f"CPU ({os.cpu_count()} cores)", "torch": torch.__version__, "steps": a.steps, "views": a.views,
              "frames": a.frames, "seeds": seeds, "command": " ".join(sys.argv), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
