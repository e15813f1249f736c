"""Reading a model saved in diffusers' layout from safetensors: one file or shards with their
`*.safetensors.index.json`, keys under a component prefix (`transformer.`, `vae.`) or none, any
floating dtype, and the `config.json` saved beside the weights when there is one.

Only safetensors is read (see io.py: pickles can run code)."""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import torch

from .io import PICKLE_SUFFIXES, CheckpointError

INDEX_SUFFIX = ".safetensors.index.json"


def weight_files(path: str) -> list[str]:
    """The safetensors files of one model: `path` is a .safetensors file (a whole model, or one
    shard, whose siblings are then found through the index beside it), an index .json, or a
    folder holding either."""
    name = os.path.basename(path)
    if os.path.isdir(path):
        entries = sorted(os.listdir(path))
        index = [e for e in entries if e.endswith(INDEX_SUFFIX)]
        files = [e for e in entries if e.endswith(".safetensors")]
        if len(index) == 1:
            return _from_index(os.path.join(path, index[0]))
        if len(files) == 1:
            return [os.path.join(path, files[0])]
        raise CheckpointError(
            f"{path} holds {len(files)} .safetensors files and {len(index)} shard indexes; point at one "
            f"model file, or at a folder with a single model (or its shards and their {INDEX_SUFFIX}).")
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}. Put the .safetensors file there or pick another.")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{name} is a pickled checkpoint; Turbo4D loads .safetensors only, because unpickling can run "
            f"arbitrary code. Use the model's .safetensors files (diffusers saves them by default).")
    if name.endswith(".json"):
        return _from_index(path)
    if not name.endswith(".safetensors"):
        raise CheckpointError(f"{name} is not a .safetensors file or a {INDEX_SUFFIX}; pick the model's weights.")
    folder = os.path.dirname(os.path.abspath(path))
    for e in sorted(os.listdir(folder)):
        if e.endswith(INDEX_SUFFIX):
            files = _from_index(os.path.join(folder, e))
            if os.path.abspath(path) in files:
                return files  # a shard: the whole model is its index's files
    return [path]


def _from_index(index_path: str) -> list[str]:
    name = os.path.basename(index_path)
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{name} is not a readable shard index ({e}); download it again.") from e
    folder = os.path.dirname(os.path.abspath(index_path))
    names = sorted(set(weight_map.values()))
    # The shards are the index's siblings (diffusers writes plain file names): a name that would
    # lead elsewhere (a separator, '..', a link out of the folder) is refused, not opened.
    real = os.path.realpath(folder)
    outside = [n for n in names if not isinstance(n, str) or os.path.basename(n) != n or n in ("", ".", "..")
               or os.path.dirname(os.path.realpath(os.path.join(folder, n))) != real]
    if outside:
        raise CheckpointError(f"{name} lists shards outside its own folder ({outside[:3]}); a diffusers index names "
                              f"files beside it. Download the model again.")
    files = [os.path.join(folder, f) for f in names]
    missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if missing:
        raise CheckpointError(f"{name} lists shards that are not beside it: {missing[:3]}; download every shard "
                              f"into {folder}.")
    return files


def read_shapes(files: Iterable[str]) -> dict:
    """{key: shape} from the files' headers (no tensor is read)."""
    from safetensors import safe_open

    shapes = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    shapes[k] = tuple(f.get_slice(k).get_shape())
        except Exception as e:  # safetensors raises several types for a damaged header
            raise CheckpointError(f"{os.path.basename(path)} is not a readable .safetensors file ({e}). It may be "
                                  f"truncated or corrupt: download it again.") from e
    return shapes


def strip_prefix(keys: Iterable[str], prefix: str, marker: str) -> str:
    """"" or `prefix` (e.g. "transformer."): the one under which `marker` (a key every file of
    this model has) is found. A whole-pipeline file keeps the component under its prefix."""
    keys = set(keys)
    if marker in keys:
        return ""
    if prefix + marker in keys:
        return prefix
    raise CheckpointError(f"no {marker!r} (nor {prefix + marker!r}) among the file's tensors: it is not this "
                          f"model, or it is in another key layout than diffusers'")


def read_config(files: list[str]) -> Optional[dict]:
    """The config.json beside the weights (diffusers saves one per component), or None."""
    path = os.path.join(os.path.dirname(os.path.abspath(files[0])), "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e}); fix or remove it.") from e


def load_tensors(files: list[str], keys: Iterable[str], prefix: str, dtype: Optional[torch.dtype],
                 device="cpu") -> dict:
    """{key: tensor} for `keys` (without the prefix), each read from the file holding it, cast to
    `dtype` (None: as stored), checked for NaN/Inf."""
    from safetensors import safe_open

    want = {prefix + k: k for k in keys}
    out = {}
    for path in files:
        name = os.path.basename(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for full in f.keys():
                    k = want.get(full)
                    if k is None:
                        continue
                    t = f.get_tensor(full)
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        raise CheckpointError(f"{name}: tensor {full} holds NaN or Inf values; the file is damaged.")
                    out[k] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{name} is truncated or corrupt ({e}); download it again.") from e
    return out
