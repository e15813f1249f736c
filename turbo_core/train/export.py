"""The trained EMA weights as the embedded model file."""
from __future__ import annotations

import json
import os

import torch

from ..models.scm_net import SCMNet, SCMNetConfig
from .config import TrainConfig
from .shards import load_sharded

EXPORT_LIMIT_BYTES = 16 * 10 ** 6


def export(run_dir: str, path: str) -> dict:
    """The EMA weights in fp16 through models.io.save_model, with what made them in the metadata."""
    from ..models.io import save_model

    tensors, meta = load_sharded(run_dir)
    mcfg = SCMNetConfig.from_dict(json.loads(meta["model_config"]))
    tcfg = TrainConfig.from_dict(json.loads(meta["train_config"]))
    net = SCMNet(mcfg)
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    info = {"training_steps": int(meta["step"]),
            "train_gpu_minutes": round(float(meta.get("gpu_seconds", meta.get("wall_seconds", meta["train_seconds"]))) / 60, 2),
            "train_wall_minutes": round(float(meta.get("wall_seconds", meta["train_seconds"])) / 60, 2),
            "optimisation_minutes": round(float(meta["train_seconds"]) / 60, 2),
            "train_device": meta.get("device", "?"),
            "processes": str(tcfg.data_parallel), "weights": f"EMA (decay {tcfg.ema_decay}), fp16",
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
