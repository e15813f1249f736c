"""Turbo4D Model Loader: a safetensors SCM network (or an SV4D / SV4D 2.0 UNet) -> a ComfyUI MODEL."""
from __future__ import annotations

import os

import torch

import folder_paths
from comfy_api.latest import io

from turbo_core.models.io import CheckpointError, load_model

from .model import PACK_DIR, make_model_patcher
from . import sv4d


FOLDER = "turbo4d"
EMBEDDED = "embedded default"
DEFAULT_WEIGHTS = os.path.join(PACK_DIR, "models", "turbo4d_default.safetensors")
DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def register_model_folder() -> str:
    """models/turbo4d/ in ComfyUI's models directory (and wherever extra_model_paths.yaml adds one).
    Done when the folder is first needed, not on import; doing it again changes nothing."""
    path = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([path], {".safetensors", ".sft"})
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        pass  # a read-only models dir only means no local models
    return path


def model_files() -> list[str]:
    """models/turbo4d/, then the SV4D files of ComfyUI's diffusion_models and checkpoints folders."""
    register_model_folder()
    try:
        names = list(folder_paths.get_filename_list(FOLDER))
    except OSError:  # the folder was removed while ComfyUI runs
        names = []
    return names + [n for n in sv4d.sv4d_files() if n not in names]


def weights_path(model_name: str) -> str:
    if model_name == EMBEDDED:
        return DEFAULT_WEIGHTS
    register_model_folder()
    path = folder_paths.get_full_path(FOLDER, model_name) or sv4d.sv4d_path(model_name)
    if path is None:
        raise CheckpointError(f"{model_name} is not in models/{FOLDER}/ (nor an SV4D file in models/diffusion_models/ "
                              f"or models/checkpoints/). Put the .safetensors file there and refresh, or pick "
                              f"'{EMBEDDED}'.")
    return path


class Turbo4DModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DModelLoader",
            display_name="Turbo4D Model Loader",
            category="Turbo4D/loaders",
            description="Loads a Turbo4D multi-view 4D network (safetensors only) as a MODEL that the "
                        "MultiView Sampler, ComfyUI's KSampler and the Turbo4D accelerators can drive; "
                        "SV4D / SV4D 2.0 files (for MultiView Sampler (SV4D)) are listed too.",
            inputs=[
                io.Combo.Input("model_name", options=[EMBEDDED] + model_files(),
                               default=EMBEDDED,
                               tooltip=f"'{EMBEDDED}' is the small network shipped with the pack; other "
                                       f"entries are .safetensors files in ComfyUI's models/{FOLDER}/ folder, and "
                                       f"SV4D / SV4D 2.0 files in models/diffusion_models/ or models/checkpoints/."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="auto",
                               tooltip="Precision of the weights. auto: fp32 on a CPU, fp16/bf16 on a GPU "
                                       "that runs them fast."),
            ],
            outputs=[io.Model.Output("model", display_name="model", tooltip="The Turbo4D model.")],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name, weight_dtype):
        try:
            path = weights_path(model_name)
            return f"{path}:{os.path.getmtime(path) if os.path.exists(path) else 'missing'}:{weight_dtype}"
        except CheckpointError:
            return f"{model_name}:{weight_dtype}"

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str) -> io.NodeOutput:
        if weight_dtype not in DTYPES:
            raise ValueError(f"Turbo4D Model Loader: weight_dtype={weight_dtype!r}; pick one of {list(DTYPES)}.")
        try:
            path = weights_path(model_name)
            if model_name == EMBEDDED and not os.path.isfile(path):
                raise ValueError(
                    f"Turbo4D Model Loader: the embedded weights {path} are missing. They ship with the pack: "
                    f"restore the file (git checkout -- models/turbo4d_default.safetensors) or reinstall the pack.")
            if sv4d.sv4d_version_of(path):  # recognised by its keys, wherever it lies
                return io.NodeOutput(sv4d.load_sv4d_model(path, DTYPES[weight_dtype]))
            else:
                net = load_model(path)
        except CheckpointError as e:
            raise ValueError(f"Turbo4D Model Loader, model_name={model_name!r}: {e}") from e
        return io.NodeOutput(make_model_patcher(net, DTYPES[weight_dtype]))


NODES = [Turbo4DModelLoader]
