"""Trains the embedded default SCM network as EDM's F_theta on procedural 4D scenes.

    python -m turbo_core.train --out runs/NAME [--config default] [--steps N] [--minutes M]
                               [--batch IMAGES] [--device cuda|cpu] [--resume] [--compile]
    python -m turbo_core.train --export runs/NAME --to models/turbo4d_default.safetensors

Every step renders fresh scenes on the training device (`data.synth4d.render_batch`) from seeds
drawn in [0, 1_000_000); held-out seeds (evaluation, validation, the mean-image baseline) start at
1_000_000 and are never drawn here. A sample is one scene of V views x F frames, stacked
frame-major; each image is conditioned on the reference view's (view 0's) frame of the same
time, and the reference view is itself among the views to generate, with its input as target.
The net sees cameras relative to the reference: azimuth of view v minus azimuth of view 0, and
the absolute elevation. V and F change from step to step so one set of weights serves several
grids. 10% of scenes get a zeroed reference video, the negative condition of classifier-free
guidance.

All randomness of step k comes from generators seeded with (seed, k), so `--resume` repeats the
uninterrupted run exactly; the resumable state is safetensors only (model, EMA, AdamW moments
under parameter names, counters and configs as JSON metadata), split into shards of at most
15 MiB so each file fits where files are size-limited.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch

from .data.scenes import EVAL_SEED_START, MEAN_SEED_START, TRAIN_SEEDS, VAL_SEED_START, relative_cameras
from .data.synth4d import SceneConfig, render_batch
from .diffusion import EDM
from .dispatch import FullCompute, chunked_sdpa
from .models.scm_net import CONFIGS, SCMNet, SCMNetConfig

STATE_FORMAT = "turbo4d-train-state"
STATE_FILE = "state.safetensors"
SHARD_BYTES = 15 * 2 ** 20
EXPORT_LIMIT_BYTES = 16 * 10 ** 6

DATA_DESCRIPTION = (
    "turbo_core.data.synth4d procedural scenes (floor disc, sky gradient, 1-3 moving textured "
    "spheres/ellipsoids/boxes), rendered on the fly; training seeds 0..999999; V in {views}, "
    "F in {frames}; reference view 0, cameras relative to it; {p:.0%} of scenes on the default orbit "
    "(elevation 20 deg, azimuth 360*v/V), the rest with random elevation {el} deg, start azimuth and span")


@dataclass(frozen=True)
class TrainConfig:
    model: str = "default"            # key of models.scm_net.CONFIGS
    images_per_step: int = 512        # scenes per step = images_per_step // (V * F), at least 1
    total_steps: int = 20_000         # length of the learning-rate schedule; training stops there
    lr: float = 6e-4
    min_lr_ratio: float = 0.05        # cosine decays to lr * this
    warmup_steps: int = 300
    weight_decay: float = 0.01        # on matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_mean: float = -1.0              # training noise levels: log sigma ~ N(p_mean, p_std^2)
    p_std: float = 1.4
    cond_dropout: float = 0.1
    views: tuple = (2, 3, 4, 6)
    frames: tuple = (4, 6, 8, 12)
    default_camera_prob: float = 0.6  # otherwise random elevation, start azimuth and span
    elevation_range: tuple = (0.0, 40.0)
    seed: int = 0

    def __post_init__(self):
        if self.model not in CONFIGS:
            raise ValueError(f"unknown model config {self.model!r}; pick one of {sorted(CONFIGS)}")
        if self.images_per_step < 1 or self.total_steps < 1:
            raise ValueError("images_per_step (--batch) and total_steps (--steps) must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def describe_data(self) -> str:
        return DATA_DESCRIPTION.format(views=list(self.views), frames=list(self.frames),
                                       p=self.default_camera_prob, el=list(self.elevation_range))


# --- data -----------------------------------------------------------------------------------------

def grid_choices(tcfg: TrainConfig, mcfg: SCMNetConfig):
    views = [v for v in tcfg.views if 1 <= v <= mcfg.max_views]
    frames = [f for f in tcfg.frames if 1 <= f <= mcfg.max_frames]
    if not views or not frames:
        raise ValueError(f"no V x F grid of views {tcfg.views} x frames {tcfg.frames} fits the model's "
                         f"max_views={mcfg.max_views}, max_frames={mcfg.max_frames}")
    return views, frames


def _step_generators(tcfg: TrainConfig, step: int, device):
    key = (tcfg.seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF
    g = torch.Generator().manual_seed(key)
    gd = torch.Generator(device=device).manual_seed(key ^ 0x5DEECE66D)
    return g, gd


def make_batch(step: int, tcfg: TrainConfig, mcfg: SCMNetConfig, device, edm: EDM = EDM()) -> dict:
    """The training batch of `step`: a function of (seed, step) alone."""
    device = torch.device(device)
    g, gd = _step_generators(tcfg, step, device)
    views, frames = grid_choices(tcfg, mcfg)
    V = views[int(torch.randint(len(views), (1,), generator=g))]
    F = frames[int(torch.randint(len(frames), (1,), generator=g))]
    S = max(1, tcfg.images_per_step // (V * F))
    seeds = torch.randint(0, TRAIN_SEEDS, (S,), generator=g).tolist()
    u = torch.rand(5, generator=g).tolist()
    if u[0] < tcfg.default_camera_prob:
        scene = SceneConfig(size=mcfg.image_size, views=V, frames=F)
    else:
        lo, hi = tcfg.elevation_range
        span = 360.0 if u[3] < 0.5 else 90.0 + 270.0 * u[4]
        scene = SceneConfig(size=mcfg.image_size, views=V, frames=F, elevation_deg=lo + (hi - lo) * u[1],
                            azimuth_start_deg=360.0 * u[2], azimuth_span_deg=span)
    data = render_batch(seeds, scene, device)
    images = data["images"]                                   # (S, F, V, 3, H, W)
    H = images.shape[-1]
    x = images.reshape(-1, 3, H, H)
    cond = images[:, :, 0:1].expand(-1, -1, V, -1, -1, -1)
    keep = (torch.rand(S, generator=g) >= tcfg.cond_dropout).float().to(device)
    cond = (cond * keep.view(S, 1, 1, 1, 1, 1)).reshape(-1, 3, H, H)
    camera = relative_cameras(data["cameras"]).repeat(S * F, 1)  # frame-major: image i is view i % V
    sigma = edm.sample_sigma(S, generator=g).to(device).repeat_interleave(F * V)
    noise = torch.randn(x.shape, device=device, generator=gd)
    return {"x": x, "cond": cond, "camera": camera, "sigma": sigma, "noise": noise, "views": V,
            "frames": F, "scenes": S, "seeds": seeds}


def matmul_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v with batched matmuls, softmax in fp32."""
    w = (torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5).float().softmax(-1)
    return torch.matmul(w.to(v.dtype), v)


def broadcast_attention(q, k, v):
    """The same with elementwise products and sums: no matmul kernel at all, which can win for the
    camera and motion axes' sequences of 2..12 tokens, where fused kernels pad each one to a
    64- or 128-row tile."""
    s = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * q.shape[-1] ** -0.5      # (S, h, L, L)
    w = s.float().softmax(-1).to(v.dtype)
    return (w.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)                            # (S, h, L, d)


ATTENTION_CANDIDATES = {"sdpa": chunked_sdpa, "matmul": matmul_attention, "broadcast": broadcast_attention}


class TrainingAttention:
    """Attention for training steps: per sequence length, the fastest of ATTENTION_CANDIDATES as timed
    on this device at the start (forward + backward at a step's real shapes); sdpa where untimed.
    All candidates compute the same function, so the choice changes speed, not the model."""

    def __init__(self):
        self.choice: dict[int, str] = {}
        self.timings: dict[int, dict] = {}

    def __call__(self, q, k, v):
        return ATTENTION_CANDIDATES[self.choice.get(q.shape[2], "sdpa")](q, k, v)

    def tune(self, lengths, images: int, tokens: int, heads: int, dim: int, device, dtype, repeats: int = 3):
        from .metrics import measure

        for L in sorted(set(lengths)):
            S = max(1, images * tokens // L)
            q, k, v = (torch.randn(S, heads, L, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            g = torch.randn(S, heads, L, dim, device=device, dtype=dtype)
            times = {}
            for name, fn in ATTENTION_CANDIDATES.items():
                try:
                    fn(q, k, v).backward(g)  # warm-up
                    with measure(device) as m:
                        for _ in range(repeats):
                            fn(q, k, v).backward(g)
                    times[name] = m.seconds / repeats
                except RuntimeError as e:  # a backend that refuses these shapes is just not chosen
                    times[name] = float("inf")
                    print(f"attention candidate {name} failed at L={L}: {e}", flush=True)
            self.timings[L] = {n: round(t * 1e3, 3) for n, t in times.items()}
            self.choice[L] = min(times, key=times.get)
            del q, k, v, g
        return self.choice


def training_dispatch(net, n_images: int, views: int, frames: int, attention=None) -> FullCompute:
    return FullCompute(net.token_layout(n_images, views, frames), backend=attention or chunked_sdpa)


def edm_loss(net, batch: dict, edm: EDM = EDM(), autocast: bool = False, attention=None) -> torch.Tensor:
    """EDM's weighted denoising loss: lambda(sigma) * |D(x + sigma n; sigma) - x|^2, mean over pixels."""
    x, sigma = batch["x"], batch["sigma"]
    noisy = x + sigma.view(-1, 1, 1, 1) * batch["noise"]
    base = getattr(net, "_orig_mod", net)  # under torch.compile
    d = training_dispatch(base, x.shape[0], batch["views"], batch["frames"], attention)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        den = edm.denoise(net, noisy, sigma, batch["cond"], batch["camera"], batch["views"], batch["frames"],
                          dispatch=d)
    w = edm.loss_weight(sigma).view(-1, 1, 1, 1)
    return (w * (den.float() - x).square()).mean()


# --- training state -------------------------------------------------------------------------------

class Trainer:
    def __init__(self, tcfg: TrainConfig, device="cpu", compile: bool = False):
        self.tcfg = tcfg
        self.device = torch.device(device)
        self.mcfg = CONFIGS[tcfg.model]
        self.edm = EDM(sigma_data=self.mcfg.sigma_data, p_mean=tcfg.p_mean, p_std=tcfg.p_std)
        torch.manual_seed(tcfg.seed)  # the initial weights
        self.net = SCMNet(self.mcfg).to(self.device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.names = [n for n, _ in self.net.named_parameters()]
        decay = [p for p in self.net.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.net.parameters() if p.dim() < 2]
        cuda = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), fused=cuda or None)
        # optimizer state index -> parameter name, in param-group order (how AdamW numbers them)
        by_id = {id(p): n for n, p in self.net.named_parameters()}
        self.opt_names = [by_id[id(p)] for grp in self.opt.param_groups for p in grp["params"]]
        self.step = 0
        self.train_seconds = 0.0   # optimisation steps only, summed over resumed chunks
        self.wall_seconds = 0.0    # whole runs (data, validation, saves included), summed likewise
        self.history: list = []    # config changes made on resume: [{"step": s, "changes": {...}}]
        self.autocast = cuda
        self.forward = torch.compile(self.net) if compile else self.net
        self.attention = TrainingAttention()
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            views, frames = grid_choices(tcfg, self.mcfg)
            self.attention.tune(views + frames, tcfg.images_per_step, self.mcfg.grid ** 2, self.mcfg.heads,
                                self.mcfg.width // self.mcfg.heads, self.device, torch.bfloat16)

    def lr_at(self, step: int) -> float:
        t = self.tcfg
        if step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        p = min(1.0, (step - t.warmup_steps) / max(1, t.total_steps - t.warmup_steps))
        return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    def train_step(self, batch: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on `batch` (default: the step's own batch). Returns (loss, grad norm)
        as device tensors, so a caller that does not read them does not wait for the GPU."""
        if batch is None:
            batch = make_batch(self.step, self.tcfg, self.mcfg, self.device, self.edm)
        self.net.train()
        loss = edm_loss(self.forward, batch, self.edm, self.autocast, self.attention)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.tcfg.grad_clip)
        lr = self.lr_at(self.step)
        for grp in self.opt.param_groups:
            grp["lr"] = lr
        self.opt.step()
        self._ema_update()
        self.step += 1
        return loss.detach(), gnorm.detach()

    @torch.no_grad()
    def _ema_update(self):
        # a short effective horizon at the start, so the EMA is not stuck on the random init
        decay = min(self.tcfg.ema_decay, (1 + self.step) / (10 + self.step))
        ema = list(self.ema.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in self.net.parameters()], 1 - decay)

    @torch.no_grad()
    def batch_loss(self, batch: dict, ema: bool = False) -> float:
        net = self.ema if ema else self.net
        was = net.training
        net.eval()
        out = float(edm_loss(net, batch, self.edm, self.autocast, self.attention))
        net.train(was)
        return out

    # --- checkpoint ---
    def state_tensors(self) -> dict:
        t = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        t.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        osd = self.opt.state_dict()
        for idx, st in osd["state"].items():
            for key, val in st.items():
                t[f"optim.{self.opt_names[idx]}.{key}"] = torch.as_tensor(val)
        return t

    def state_metadata(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.state_dict()["param_groups"]]
        return {"format": STATE_FORMAT, "step": str(self.step), "train_seconds": repr(self.train_seconds),
                "wall_seconds": repr(self.wall_seconds), "config_history": json.dumps(self.history),
                "train_config": json.dumps(self.tcfg.to_dict()), "model_config": json.dumps(self.mcfg.to_dict()),
                "param_groups": json.dumps(groups), "opt_names": json.dumps(self.opt_names),
                "device": device_name(self.device)}

    def save(self, run_dir: str, extra_meta: Optional[dict] = None) -> list[str]:
        meta = self.state_metadata()
        meta.update(extra_meta or {})
        return save_sharded(self.state_tensors(), run_dir, meta)

    def load(self, run_dir: str) -> dict:
        tensors, meta = load_sharded(run_dir)
        if json.loads(meta["model_config"]) != self.mcfg.to_dict():
            raise ValueError(f"{run_dir}: the saved model config differs from {self.tcfg.model!r}; "
                             f"resume with the config the run was started with")
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        self.net.load_state_dict(model)
        self.ema.load_state_dict(ema)
        names = json.loads(meta["opt_names"])
        if names != self.opt_names:
            raise ValueError(f"{run_dir}: optimizer parameter order differs from this network's; "
                             f"the state was written by another version of SCMNet")
        state = {}
        for idx, name in enumerate(names):
            prefix = f"optim.{name}."
            st = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if st:
                state[idx] = st
        groups = json.loads(meta["param_groups"])
        for g, live in zip(groups, self.opt.state_dict()["param_groups"]):
            g["params"] = live["params"]
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        self.step = int(meta["step"])
        self.train_seconds = float(meta.get("train_seconds", "0"))
        self.wall_seconds = float(meta.get("wall_seconds", "0"))
        self.history = json.loads(meta.get("config_history", "[]"))
        return meta


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def save_sharded(tensors: dict, run_dir: str, metadata: dict, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Writes state.safetensors (+ state-1.safetensors, ...) with no file over shard_bytes of tensor
    data; the first file's metadata lists the others and a save id that every shard repeats, so a
    shard left from another save is detected. Files are written under temporary names and renamed."""
    from safetensors.torch import save_file

    os.makedirs(run_dir, exist_ok=True)
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        nb = v.numel() * v.element_size()
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nb
    shards.append(cur)
    names = [STATE_FILE] + [f"state-{i}.safetensors" for i in range(1, len(shards))]
    save_id = uuid.uuid4().hex
    tmp = []
    for i, (name, part) in enumerate(zip(names, shards)):
        meta = {"format": STATE_FORMAT, "save_id": save_id, "part": str(i)}
        if i == 0:
            meta.update(metadata)
            meta["format"], meta["save_id"] = STATE_FORMAT, save_id
            meta["shards"] = json.dumps(names[1:])
        path = os.path.join(run_dir, name + ".tmp")
        save_file(part, path, metadata=meta)
        tmp.append(path)
    for name, path in reversed(list(zip(names, tmp))):  # the index file last: a crash keeps the old one
        os.replace(path, os.path.join(run_dir, name))
    for f in os.listdir(run_dir):  # shards of an earlier, larger save
        if f.startswith("state-") and f.endswith(".safetensors") and f not in names:
            os.remove(os.path.join(run_dir, f))
    return [os.path.join(run_dir, n) for n in names]


def load_sharded(run_dir: str) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    index = os.path.join(run_dir, STATE_FILE)
    if not os.path.isfile(index):
        raise FileNotFoundError(f"no training state at {index}; start the run without --resume, "
                                f"or copy the run's state*.safetensors files there")
    with safe_open(index, framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{index} is not a Turbo4D training state (format {meta.get('format')!r})")
    tensors = load_file(index)
    for name in json.loads(meta["shards"]):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"training state shard {path} is missing; copy every state*.safetensors "
                                    f"file of the run together")
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("save_id") != meta["save_id"]:
                raise ValueError(f"{path} belongs to another save than {index}; copy the files of one save together")
        tensors.update(load_file(path))
    return tensors, meta


# --- validation -----------------------------------------------------------------------------------

class Validator:
    """PSNR of the EMA net's samples on held-out scenes (novel views only), beside the two baselines
    of evaluate.py computed on the same scenes: the input view copied, and the per-view mean image."""

    def __init__(self, mcfg: SCMNetConfig, device, scenes: int = 8, steps: int = 16, mean_scenes: int = 128):
        from .metrics import psnr

        self.device = device
        self.steps = steps
        self.scene = SceneConfig(size=mcfg.image_size, views=4, frames=8)
        self.seeds = list(range(VAL_SEED_START, VAL_SEED_START + scenes))
        data = render_batch(self.seeds, self.scene, device)
        self.gt, self.cameras = data["images"], data["cameras"]
        mean = render_batch(range(MEAN_SEED_START, MEAN_SEED_START + mean_scenes), self.scene, device)["images"]
        mean_img = mean.mean(dim=(0, 1), keepdim=True)  # per view and pixel
        novel = self.gt[:, :, 1:]
        self.copy_psnr = float(psnr(self.gt[:, :, :1].expand_as(novel), novel).mean())
        self.mean_psnr = float(psnr(mean_img[:, :, 1:].expand_as(novel), novel).mean())

    def __call__(self, net, autocast: bool) -> dict:
        from .evaluate import generate
        from .metrics import psnr

        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = generate(net, self.gt[:, :, 0], self.cameras, steps=self.steps, seeds=self.seeds)
        novel = self.gt[:, :, 1:]
        return {"val_psnr_novel": float(psnr(out[:, :, 1:], novel).mean()),
                "val_psnr_ref": float(psnr(out[:, :, :1], self.gt[:, :, :1]).mean()),
                "val_copy_psnr": self.copy_psnr, "val_mean_psnr": self.mean_psnr}


# --- loop -----------------------------------------------------------------------------------------

def _log(run_dir: str, rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def train(run_dir: str, tcfg: Optional[TrainConfig] = None, device="cpu", minutes: Optional[float] = None,
          resume: bool = False, compile: bool = False, log_every: int = 50, val_every_min: float = 2.0,
          ckpt_every_min: float = 4.0, validate: bool = True, steps: Optional[int] = None,
          overrides: Optional[dict] = None) -> Trainer:
    """Trains until tcfg.total_steps (or `steps` more steps) or until `minutes` are nearly spent,
    then saves. Time reserved at the end covers the final save.

    resume=True takes the config saved in run_dir; `overrides` then changes fields of it (a longer
    schedule, or a fine-tune of the data or noise distribution), and the change is recorded in the
    state's config_history. With no overrides a resumed run repeats the uninterrupted one exactly."""
    t_start = time.time()
    device = torch.device(device)
    overrides = dict(overrides or {})
    if overrides.get("model") not in (None, (tcfg or TrainConfig()).model) and resume:
        raise ValueError("a resumed run keeps its model config; start a new run for another one")
    changes = {}
    if resume:
        _, meta = load_sharded(run_dir)
        saved = TrainConfig.from_dict(json.loads(meta["train_config"]))
        changes = {k: v for k, v in overrides.items() if getattr(saved, k) != (tuple(v) if isinstance(v, list) else v)}
        tcfg = TrainConfig.from_dict({**saved.to_dict(), **changes})
    else:
        tcfg = TrainConfig.from_dict({**(tcfg or TrainConfig()).to_dict(), **overrides})
    trainer = Trainer(tcfg, device, compile=compile)
    if resume:
        trainer.load(run_dir)
        if changes:
            trainer.history.append({"step": trainer.step, "changes": changes})
    wall0 = trainer.wall_seconds
    os.makedirs(run_dir, exist_ok=True)
    stop_step = tcfg.total_steps if steps is None else min(tcfg.total_steps, trainer.step + steps)
    _log(run_dir, {"event": "start", "step": trainer.step, "stop_step": stop_step, "device": device_name(device),
                   "attention_choice": trainer.attention.choice, "attention_ms": trainer.attention.timings,
                   "params": sum(p.numel() for p in trainer.net.parameters()), "train_config": tcfg.to_dict(),
                   "minutes": minutes, "resume": resume})
    deadline = None if minutes is None else t_start + 60 * minutes
    validator = Validator(trainer.mcfg, device) if validate else None
    reserve = 15.0  # seconds kept for the final save
    step_time, val_time = 0.0, 0.0
    last_val = last_ckpt = t_loop = time.time()
    t_mark, s_mark = t_loop, trainer.step
    loss_sum = torch.zeros((), device=device)
    gn_max = torch.zeros((), device=device)
    n_sum = 0
    last_val_rec: dict = {}
    stopped = "steps"
    while trainer.step < stop_step:
        if deadline is not None and time.time() + 2 * step_time + reserve > deadline:
            stopped = "time"
            break
        loss, gn = trainer.train_step()
        loss_sum += loss
        gn_max = torch.maximum(gn_max, gn)
        n_sum += 1
        if (trainer.step % log_every == 0 or trainer.step == stop_step
                or (step_time == 0 and trainer.step - s_mark == 3)):  # an early estimate for the deadline
            lv = float(loss_sum) / n_sum  # waits for the GPU, so the clock below covers the work
            now = time.time()
            step_time = (now - t_mark) / max(1, trainer.step - s_mark)
            if not math.isfinite(lv):
                raise FloatingPointError(f"loss became {lv} at step {trainer.step}; lower --lr or raise warmup")
            _log(run_dir, {"step": trainer.step, "loss": round(lv, 5), "grad_norm_max": round(float(gn_max), 4),
                           "lr": trainer.lr_at(trainer.step - 1), "s_per_step": round(step_time, 4),
                           "images_per_s": round(tcfg.images_per_step / max(step_time, 1e-9), 1),
                           "elapsed_s": round(now - t_start, 1)})
            trainer.train_seconds += now - t_mark
            t_mark, s_mark = now, trainer.step
            loss_sum.zero_(), gn_max.zero_()
            n_sum = 0
            now = time.time()
            if validator is not None and now - last_val > 60 * val_every_min and (
                    deadline is None or now + val_time + reserve + 5 * step_time < deadline):
                t0 = time.time()
                last_val_rec = {"step": trainer.step, **validator(trainer.ema, trainer.autocast)}
                val_time = time.time() - t0
                last_val_rec["val_seconds"] = round(val_time, 2)
                _log(run_dir, last_val_rec)
                last_val = t_mark = time.time()
            if now - last_ckpt > 60 * ckpt_every_min:
                trainer.wall_seconds = wall0 + now - t_start
                trainer.save(run_dir, {"last_validation": json.dumps(last_val_rec)})
                last_ckpt = t_mark = time.time()
    if n_sum:
        float(loss_sum)
        trainer.train_seconds += time.time() - t_mark
    if validator is not None and (deadline is None or time.time() + val_time + reserve < deadline):
        last_val_rec = {"step": trainer.step, **validator(trainer.ema, trainer.autocast)}
        _log(run_dir, last_val_rec)
    trainer.wall_seconds = wall0 + time.time() - t_start
    files = trainer.save(run_dir, {"last_validation": json.dumps(last_val_rec)})
    _log(run_dir, {"event": "saved", "step": trainer.step, "stopped_by": stopped, "files": files,
                   "train_seconds": round(trainer.train_seconds, 1), "elapsed_s": round(time.time() - t_start, 1)})
    return trainer


def export(run_dir: str, path: str) -> dict:
    """The EMA weights in fp16 through models.io.save_model, with what made them in the metadata."""
    from .models.io import save_model

    tensors, meta = load_sharded(run_dir)
    mcfg = SCMNetConfig.from_dict(json.loads(meta["model_config"]))
    tcfg = TrainConfig.from_dict(json.loads(meta["train_config"]))
    net = SCMNet(mcfg)
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    info = {"training_steps": int(meta["step"]),
            "train_gpu_minutes": round(float(meta.get("wall_seconds", meta["train_seconds"])) / 60, 2),
            "optimisation_minutes": round(float(meta["train_seconds"]) / 60, 2),
            "train_device": meta.get("device", "?"), "weights": f"EMA (decay {tcfg.ema_decay}), fp16",
            "objective": (f"EDM F_theta (sigma_data {mcfg.sigma_data}, log-normal sigma P_mean {tcfg.p_mean} "
                          f"P_std {tcfg.p_std}), {tcfg.cond_dropout:.0%} condition dropout"),
            "config_history": meta.get("config_history", "[]"),
            "data": tcfg.describe_data(), "train_config": json.dumps(tcfg.to_dict()),
            "last_validation": meta.get("last_validation", "{}")}
    save_model(net, path, dtype=torch.float16, metadata=info)
    size = os.path.getsize(path)
    if size > EXPORT_LIMIT_BYTES:
        os.remove(path)
        raise ValueError(f"exported weights are {size / 1e6:.1f} MB, over the {EXPORT_LIMIT_BYTES / 1e6:.0f} MB "
                         f"limit for the embedded model; train a smaller config")
    info["bytes"] = size
    return info


def compact(run_dir: str, out_dir: str) -> list[str]:
    """The run's state in 16 bits: weights and EMA in fp16, AdamW's moments in bf16 (for their
    range), counters as they are. Half the bytes, so a run moves between machines inside one
    transfer; `--resume` from it casts back to fp32 (torch's loaders do), and that one rounding is
    far below a single step's update. The full state stays the one to resume from where it lies."""
    tensors, meta = load_sharded(run_dir)
    small = {}
    for k, v in tensors.items():
        if v.is_floating_point() and v.dim() > 0:
            v = v.to(torch.bfloat16 if k.startswith("optim.") else torch.float16)
        small[k] = v
    meta = {k: v for k, v in meta.items() if k not in ("save_id", "shards", "part")}
    meta["precision"] = "16-bit (compact: weights fp16, moments bf16)"
    return save_sharded(small, out_dir, meta)


def bench(batches, device, model: str = "default", steps: int = 12, warmup: int = 4) -> list[dict]:
    """Seconds per training step (data rendering included) and peak memory at each images-per-step;
    also the rendering alone, to see whether data or the network bounds a step."""
    from .metrics import measure

    rows = []
    for b in batches:
        tr = Trainer(TrainConfig(model=model, images_per_step=b), device)
        for _ in range(warmup):
            tr.train_step()
        with measure(device) as m:
            for _ in range(steps):
                tr.train_step()
        with measure(device) as r:
            for i in range(steps):
                make_batch(1000 + i, tr.tcfg, tr.mcfg, tr.device)
        rows.append({"images_per_step": b, "s_per_step": round(m.seconds / steps, 4),
                     "images_per_s": round(b * steps / m.seconds, 1), "render_s_per_step": round(r.seconds / steps, 4),
                     "peak_mib": m.peak_mib and round(m.peak_mib)})
        print(json.dumps(rows[-1]), flush=True)
        del tr
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m turbo_core.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="run folder (state*.safetensors, log.jsonl)")
    ap.add_argument("--config", default="default", help=f"model config: {sorted(CONFIGS)}")
    ap.add_argument("--steps", type=int, help="total steps of the schedule (with --resume: a new total)")
    ap.add_argument("--minutes", type=float, help="stop and save before this many minutes of wall time")
    ap.add_argument("--batch", type=int, help=f"images per step (default {TrainConfig.images_per_step})")
    ap.add_argument("--lr", type=float, help=f"peak learning rate (default {TrainConfig.lr})")
    ap.add_argument("--warmup", type=int, help=f"warm-up steps (default {TrainConfig.warmup_steps})")
    ap.add_argument("--seed", type=int, help="seed of the weights and of every step's data (default 0)")
    ap.add_argument("--p-mean", type=float, help=f"log-sigma mean of training noise (default {TrainConfig.p_mean})")
    ap.add_argument("--p-std", type=float, help=f"log-sigma std of training noise (default {TrainConfig.p_std})")
    ap.add_argument("--default-camera-prob", type=float,
                    help=f"share of scenes on the default orbit (default {TrainConfig.default_camera_prob})")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its saved state")
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
        bench([int(t) for t in a.bench.split(",")], torch.device(a.device), a.config)
        return 0
    if not a.out:
        ap.error("--out runs/NAME is required to train")
    given = {"total_steps": a.steps, "images_per_step": a.batch, "lr": a.lr, "warmup_steps": a.warmup,
             "seed": a.seed, "p_mean": a.p_mean, "p_std": a.p_std, "default_camera_prob": a.default_camera_prob}
    overrides = {k: v for k, v in given.items() if v is not None}
    train(a.out, TrainConfig(model=a.config), a.device, minutes=a.minutes, resume=a.resume, compile=a.compile,
          log_every=a.log_every, val_every_min=a.val_every_min, ckpt_every_min=a.ckpt_every_min,
          validate=not a.no_val, overrides=overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
