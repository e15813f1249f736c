"""The training loop: optimisation steps, EMA, validation on held-out scenes, checkpoints."""
from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..data.scenes import MEAN_SEED_START, VAL_SEED_START
from ..data.synth4d import SceneConfig, render_batch
from ..diffusion import EDM
from ..models.scm_net import CONFIGS, SCMNet, SCMNetConfig
from .attention import TrainingAttention, training_dispatch
from .batches import make_batch
from .config import TrainConfig, grid_choices
from .shards import STATE_FORMAT, load_sharded, save_sharded


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
        self.gpu_seconds = 0.0     # wall time x processes (devices) of each chunk, summed likewise
        self.history: list = []    # config changes made on resume: [{"step": s, "changes": {...}}]
        self.autocast = cuda
        self.rank, self.world = _group()
        self.sync_weights()
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
        step, total = step - t.schedule_start, t.total_steps - t.schedule_start
        if step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        p = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
        return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    def train_step(self, batch: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on `batch` (default: the step's own batch). Returns (loss, grad norm)
        as device tensors, so a caller that does not read them does not wait for the GPU."""
        if batch is None:
            batch = make_batch(self.step, self.tcfg, self.mcfg, self.device, self.edm, rank=self.rank)
        self.net.train()
        loss = edm_loss(self.forward, batch, self.edm, self.autocast, self.attention)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            self._average_gradients()
        gnorm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.tcfg.grad_clip)
        lr = self.lr_at(self.step)
        for grp in self.opt.param_groups:
            grp["lr"] = lr
        self.opt.step()
        self._ema_update()
        self.step += 1
        return loss.detach(), gnorm.detach()

    @torch.no_grad()
    def sync_weights(self):
        """Every process of a data-parallel group takes rank 0's weights and EMA."""
        if self.world > 1:
            for t in list(self.net.state_dict().values()) + list(self.ema.state_dict().values()):
                dist.broadcast(t, 0)

    @torch.no_grad()
    def _average_gradients(self):
        # One all-reduce of all gradients flattened (6.6 M floats for the default network): every
        # process then clips, steps and updates its EMA identically, so the weights stay equal
        # without the DDP wrapper around a network whose forward goes through a dispatch.
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world
        for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(r)

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
                "wall_seconds": repr(self.wall_seconds), "gpu_seconds": repr(self.gpu_seconds),
                "config_history": json.dumps(self.history),
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
        self.gpu_seconds = float(meta.get("gpu_seconds", meta.get("wall_seconds", "0")))
        self.history = json.loads(meta.get("config_history", "[]"))
        return meta

    def init_from(self, path: str) -> dict:
        """A warm start from exported weights (safetensors, `models.io`): the live network and its
        EMA both start from them, AdamW's moments fresh; the step count, the training time and the
        config history continue from the file's metadata."""
        from ..models.io import load_model, read_config, read_metadata

        if read_config(path).to_dict() != self.mcfg.to_dict():
            raise ValueError(f"{path}: its network config differs from {self.tcfg.model!r}; warm-start a run "
                             f"of the config the weights were trained with")
        meta = read_metadata(path)
        sd = load_model(path).state_dict()
        self.net.load_state_dict(sd)
        self.ema.load_state_dict(sd)
        self.step = int(meta.get("training_steps", "0"))
        self.train_seconds = 60 * float(meta.get("optimisation_minutes", "0"))
        self.wall_seconds = 60 * float(meta.get("train_wall_minutes", meta.get("train_gpu_minutes", "0")))
        self.gpu_seconds = 60 * float(meta.get("train_gpu_minutes", "0"))
        self.history = json.loads(meta.get("config_history", "[]"))
        return meta


def _group() -> tuple[int, int]:
    """(rank, processes) of the data-parallel group (torchrun), (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


# --- validation -----------------------------------------------------------------------------------

class Validator:
    """PSNR of the EMA net's samples on held-out scenes (novel views only), beside the two baselines
    of evaluate.py computed on the same scenes: the input view copied, and the per-view mean image."""

    def __init__(self, mcfg: SCMNetConfig, device, scenes: int = 8, steps: int = 16, mean_scenes: int = 128):
        from ..metrics import psnr

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
        from ..evaluate import generate
        from ..metrics import psnr

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
          overrides: Optional[dict] = None, init_from: Optional[str] = None) -> Trainer:
    """Trains until tcfg.total_steps (or `steps` more steps) or until `minutes` are nearly spent,
    then saves. Time reserved at the end covers the final save.

    resume=True takes the config saved in run_dir; `overrides` then changes fields of it (a longer
    schedule, or a fine-tune of the data or noise distribution), and the change is recorded in the
    state's config_history. With no overrides a resumed run repeats the uninterrupted one exactly.

    init_from=PATH (exported weights, .safetensors) starts a new run in run_dir from them: the
    config is the one in their metadata with `overrides` applied, the step count continues from
    theirs, and warm-up and cosine restart there, over overrides["total_steps"] more steps (the
    AdamW moments start fresh, so the warm-up is needed again).

    Under torchrun (a process group initialised) each process trains on its own scenes, gradients
    are averaged every step, and rank 0 alone logs, validates and saves."""
    t_start = time.time()
    device = torch.device(device)
    overrides = dict(overrides or {})
    if overrides.get("model") not in (None, (tcfg or TrainConfig()).model) and resume:
        raise ValueError("a resumed run keeps its model config; start a new run for another one")
    if resume and init_from:
        raise ValueError("--resume continues the run in --out; --init-from starts a new run from weights: pick one")
    rank, world = _group()
    overrides["data_parallel"] = world
    changes = {}
    if init_from:
        from ..models.io import read_metadata

        if os.path.isfile(os.path.join(run_dir, "state.safetensors")):
            raise ValueError(f"{run_dir} already holds a training state: continue it with --resume, or warm-start "
                             f"into an empty --out")
        meta = read_metadata(init_from)
        if "train_config" not in meta:
            raise ValueError(f"{init_from} has no training record (train_config) in its metadata; warm-start from "
                             f"weights exported by `python -m turbo_core.train --export`")
        saved = TrainConfig.from_dict(json.loads(meta["train_config"]))
        if tcfg is not None and tcfg.model != saved.model:
            raise ValueError(f"{init_from} holds a {saved.model!r} network, not {tcfg.model!r}; pass --config {saved.model}")
        start = int(meta.get("training_steps", "0"))
        more = overrides.pop("total_steps", None)
        if not more:
            raise ValueError("a warm start needs the length of its new schedule: --steps N (steps after the weights')")
        overrides.update(total_steps=start + more, schedule_start=start)
        changes = {k: v for k, v in overrides.items() if getattr(saved, k) != (tuple(v) if isinstance(v, list) else v)}
        tcfg = TrainConfig.from_dict({**saved.to_dict(), **changes})
    elif resume:
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
    if init_from:
        trainer.init_from(init_from)
        trainer.history.append({"step": trainer.step, "changes": changes,
                                "warm_start": os.path.basename(init_from), "optimizer": "fresh AdamW moments"})
    trainer.sync_weights()
    wall0, gpu0 = trainer.wall_seconds, trainer.gpu_seconds
    main = rank == 0
    log = (lambda d, rec: _log(d, rec)) if main else (lambda d, rec: None)
    os.makedirs(run_dir, exist_ok=True)
    stop_step = tcfg.total_steps if steps is None else min(tcfg.total_steps, trainer.step + steps)
    log(run_dir, {"event": "start", "step": trainer.step, "stop_step": stop_step, "device": device_name(device),
                   "attention_choice": trainer.attention.choice, "attention_ms": trainer.attention.timings,
                   "params": sum(p.numel() for p in trainer.net.parameters()), "train_config": tcfg.to_dict(),
                   "minutes": minutes, "resume": resume, "init_from": init_from, "processes": world})
    deadline = None if minutes is None else t_start + 60 * minutes
    validator = Validator(trainer.mcfg, device) if validate and main else None
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
        late = deadline is not None and time.time() + 2 * step_time + reserve > deadline
        if world > 1:  # the processes stop at the same step: one flag, the latest clock decides
            flag = torch.tensor([float(late)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
        if late:
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
            log(run_dir, {"step": trainer.step, "loss": round(lv, 5), "grad_norm_max": round(float(gn_max), 4),
                          "lr": trainer.lr_at(trainer.step - 1), "s_per_step": round(step_time, 4),
                          "images_per_s": round(world * tcfg.images_per_step / max(step_time, 1e-9), 1),
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
            if main and now - last_ckpt > 60 * ckpt_every_min:
                trainer.wall_seconds = wall0 + now - t_start
                trainer.gpu_seconds = gpu0 + world * (now - t_start)
                trainer.save(run_dir, {"last_validation": json.dumps(last_val_rec)})
                last_ckpt = t_mark = time.time()
    if n_sum:
        float(loss_sum)
        trainer.train_seconds += time.time() - t_mark
    if validator is not None and (deadline is None or time.time() + val_time + reserve < deadline):
        last_val_rec = {"step": trainer.step, **validator(trainer.ema, trainer.autocast)}
        _log(run_dir, last_val_rec)
    trainer.wall_seconds = wall0 + time.time() - t_start
    trainer.gpu_seconds = gpu0 + world * (time.time() - t_start)
    if not main:
        return trainer
    files = trainer.save(run_dir, {"last_validation": json.dumps(last_val_rec)})
    _log(run_dir, {"event": "saved", "step": trainer.step, "stopped_by": stopped, "files": files,
                   "train_seconds": round(trainer.train_seconds, 1), "elapsed_s": round(time.time() - t_start, 1)})
    return trainer


def bench(batches, device, model: str = "default", steps: int = 12, warmup: int = 4) -> list[dict]:
    """Seconds per training step (data rendering included) and peak memory at each images-per-step;
    also the rendering alone, to see whether data or the network bounds a step."""
    from ..metrics import measure

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
