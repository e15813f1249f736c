"""Weights as safetensors, with the network's config in the file's metadata.

Only safetensors is ever read: a pickled checkpoint (.ckpt/.pt/.pth) can run code when loaded,
so it is refused with a message saying how to convert it.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .scm_net import SCMNet, SCMNetConfig

FORMAT = "turbo4d-scm-net"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class CheckpointError(ValueError):
    """A weights file that cannot be used, with the reason and the fix in its message."""


def save_model(net: SCMNet, path: str, dtype: Optional[torch.dtype] = None, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in net.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(net.cfg.to_dict())}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path, metadata=meta)


def read_metadata(path: str) -> dict:
    from safetensors import safe_open

    _check_path(path)
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for a damaged header
        raise CheckpointError(
            f"{os.path.basename(path)} is not a readable .safetensors file ({e}). It may be truncated or "
            f"corrupt: download or export it again.") from e


def _check_path(path: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}. Put the .safetensors file there or pick another.")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{os.path.basename(path)} is a pickled checkpoint; Turbo4D loads .safetensors only, because "
            f"unpickling can run arbitrary code. Convert it with safetensors' save_file in a trusted environment.")


def read_config(path: str) -> SCMNetConfig:
    """The network's config from the file's metadata: the header only, no tensor is read."""
    meta = read_metadata(path)
    name = os.path.basename(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(
            f"{name} is a safetensors file but not a Turbo4D SCM network (its metadata has no "
            f"format={FORMAT!r}). Pick a Turbo4D model, or use the loader for its own model family.")
    try:
        return SCMNetConfig.from_dict(json.loads(meta["config"]))
    except Exception as e:
        raise CheckpointError(f"{name}: its stored config is unreadable ({e}); export the model again.") from e


def load_model(path: str, device="cpu", dtype: Optional[torch.dtype] = None) -> SCMNet:
    from safetensors.torch import load_file

    cfg = read_config(path)
    name = os.path.basename(path)
    try:
        sd = load_file(path, device="cpu")
    except Exception as e:
        raise CheckpointError(f"{name} is truncated or corrupt ({e}); download or export it again.") from e
    net = SCMNet(cfg)
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{name} does not match its config: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}. "
            f"Export the model again.")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{name}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}.")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{name}: tensor {k} holds NaN or Inf values; the file is damaged.")
    net.load_state_dict({k: v.float() for k, v in sd.items()})
    net.to(device=device, dtype=dtype or torch.float32).eval()
    return net
