"""`python -m turbo_core.train`: train, resume, export, compact or time training steps."""
from __future__ import annotations

import argparse
import json
import os

import torch

from ..models.scm_net import CONFIGS
from .config import TrainConfig
from .export import export
from .loop import bench, train
from .shards import compact

def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m turbo_core.train",
                                 description="Trains the shipped SCM networks (--config default, px64) on procedural 4D scenes.")
    ap.add_argument("--out", help="run folder (state*.safetensors, log.jsonl)")
    ap.add_argument("--config", help=f"model config: {sorted(CONFIGS)} (default: default; with --init-from: "
                                      f"the weights')")
    ap.add_argument("--steps", type=int, help="total steps of the schedule (with --resume: a new total; with "
                                              "--init-from: the new schedule's steps after the weights' own)")
    ap.add_argument("--minutes", type=float, help="stop and save before this many minutes of wall time")
    ap.add_argument("--batch", type=int, help=f"images per step (default {TrainConfig.images_per_step})")
    ap.add_argument("--lr", type=float, help=f"peak learning rate (default {TrainConfig.lr})")
    ap.add_argument("--warmup", type=int, help=f"warm-up steps (default {TrainConfig.warmup_steps})")
    ap.add_argument("--ema-decay", type=float,
                    help=f"EMA decay of the exported weights (default {TrainConfig.ema_decay}; a run of a few "
                         f"thousand steps wants a shorter horizon, e.g. 0.995)")
    ap.add_argument("--seed", type=int, help="seed of the weights and of every step's data (default 0)")
    ap.add_argument("--p-mean", type=float, help=f"log-sigma mean of training noise (default {TrainConfig.p_mean})")
    ap.add_argument("--p-std", type=float, help=f"log-sigma std of training noise (default {TrainConfig.p_std})")
    ap.add_argument("--default-camera-prob", type=float,
                    help=f"share of scenes on the default orbit (default {TrainConfig.default_camera_prob})")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its saved state")
    ap.add_argument("--init-from", metavar="WEIGHTS.safetensors",
                    help="start a new run in --out from exported weights (e.g. models/turbo4d_px64.safetensors): "
                         "their config and step count, fresh AdamW moments, warm-up and cosine restarted")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network (off by default)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--val-every-min", type=float, default=2.0)
    ap.add_argument("--ckpt-every-min", type=float, default=4.0)
    ap.add_argument("--no-val", action="store_true")
    ap.add_argument("--bench", metavar="B1,B2", help="time training steps at these images-per-step, then exit")
    ap.add_argument("--export", metavar="RUN", help="export RUN's EMA weights (fp16) instead of training")
    ap.add_argument("--to", help="with --export: the .safetensors to write; with --compact: the folder")
    ap.add_argument("--compact", metavar="RUN", help="write RUN's state in 16 bits to the folder --to, then exit")
    a = ap.parse_args(argv)
    if a.export:
        if not a.to:
            ap.error("--export needs --to PATH.safetensors")
        info = export(a.export, a.to)
        print(json.dumps({"exported": a.to, **{k: v for k, v in info.items() if k != "train_config"}}, indent=1))
        return 0
    if a.compact:
        if not a.to:
            ap.error("--compact needs --to FOLDER")
        print(json.dumps({"compact": compact(a.compact, a.to)}))
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible; use --device cpu")
    if a.bench:
        bench([int(t) for t in a.bench.split(",")], torch.device(a.device), a.config or "default")
        return 0
    if not a.out:
        ap.error("--out runs/NAME is required to train")
    if a.resume and a.init_from:
        ap.error("--resume continues the run in --out; --init-from starts a new one from weights: pick one")
    device = a.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: one process per device
        import torch.distributed as dist

        if a.device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    given = {"total_steps": a.steps, "images_per_step": a.batch, "lr": a.lr, "warmup_steps": a.warmup,
             "seed": a.seed, "ema_decay": a.ema_decay, "p_mean": a.p_mean, "p_std": a.p_std, "default_camera_prob": a.default_camera_prob}
    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        tcfg = TrainConfig(model=a.config) if a.config or not a.init_from else None
        train(a.out, tcfg, device, minutes=a.minutes, resume=a.resume, compile=a.compile,
              log_every=a.log_every, val_every_min=a.val_every_min, ckpt_every_min=a.ckpt_every_min,
              validate=not a.no_val, overrides=overrides, init_from=a.init_from)
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0
