"""The resumable training state: safetensors shards small enough for size-limited places."""
from __future__ import annotations

import json
import os
import uuid

import torch

STATE_FORMAT = "turbo4d-train-state"
STATE_FILE = "state.safetensors"
SHARD_BYTES = 15 * 2 ** 20


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
