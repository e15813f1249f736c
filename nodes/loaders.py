"""Turbo4D Model Loader: a safetensors SCM network (or an SV4D / SV4D 2.0 UNet) -> a ComfyUI MODEL."""
from __future__ import annotations

import os

import torch

import folder_paths
from comfy_api.latest import io

from turbo_core.models.io import CheckpointError, load_model, read_config

from .model import PACK_DIR, make_model_patcher
from . import files, sv4d


NODE = "Turbo4D Model Loader"
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
    """The file's path in models/turbo4d/, or an SV4D file's in diffusion_models / checkpoints
    (nodes/files.py refuses a name or a link leading out of those folders)."""
    if model_name == EMBEDDED:
        return DEFAULT_WEIGHTS
    register_model_folder()
    path = files.model_file(NODE, "model_name", FOLDER, model_name) or sv4d.sv4d_path(model_name, NODE)
    if path is not None:
        return path
    for folder in sv4d.FOLDERS:  # there, but not an SV4D file: say what it is
        other = files.model_file(NODE, "model_name", folder, model_name)
        if other is not None:
            raise CheckpointError(
                f"{model_name} is in models/{folder}/ but is not an SV4D or SV4D 2.0 file: it is "
                f"{sv4d.describe_other(other)}. This loader takes Turbo4D networks (models/{FOLDER}/) and SV4D / "
                f"SV4D 2.0 UNets; load other models with ComfyUI's own loaders.")
    raise CheckpointError(f"{model_name} is not in models/{FOLDER}/ (nor an SV4D file in models/diffusion_models/ "
                          f"or models/checkpoints/). Put the .safetensors file there and refresh, or pick "
                          f"'{EMBEDDED}'.")


_config_cache: dict = {}


def scm_configs() -> dict:
    """{name: SCMNetConfig} of the embedded model and every Turbo4D network in models/turbo4d/,
    read from the files' headers (cached by size and mtime: the grid nodes' schema and prompt
    validation ask for their limits)."""
    out = {}
    register_model_folder()
    try:
        names = list(folder_paths.get_filename_list(FOLDER))
    except OSError:  # the folder was removed while ComfyUI runs
        names = []
    for name in [EMBEDDED] + names:
        try:
            path = weights_path(name)
            st = os.stat(path)
        except (ValueError, OSError):  # refused, missing: the loader says why when it is picked
            continue
        key = (path, st.st_size, st.st_mtime)
        if key not in _config_cache:
            try:
                _config_cache[key] = read_config(path)
            except (CheckpointError, OSError):
                _config_cache[key] = None
        if _config_cache[key] is not None:
            out[name] = _config_cache[key]
    return out


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
                               tooltip=f"'{EMBEDDED}' is the small network shipped with the pack, trained on "
                                       f"procedural scenes (spheres, boxes, a floor) at 32 x 32 pixels: a test bed for "
                                       f"the accelerators. On real videos its novel views are blobs in the input's "
                                       f"colours. For real videos load SV4D / SV4D 2.0 (docs/sv4d.md: where the "
                                       f"weights go) and sample with MultiView Sampler (SV4D). Other entries are "
                                       f".safetensors files in ComfyUI's models/{FOLDER}/ folder, and SV4D / SV4D 2.0 "
                                       f"files in models/diffusion_models/ or models/checkpoints/."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="auto",
                               tooltip="Precision of the weights. auto: fp32 on a CPU, fp16/bf16 on a GPU "
                                       "that runs them fast."),
                io.Combo.Input("variant", options=list(sv4d.LOADER_VARIANTS), default="auto", optional=True,
                               tooltip="SV4D files only: which model the file is. SV4D 2.0's 8-view model has "
                                       "exactly SV4D 2.0's tensors (only its camera attention differs), so auto "
                                       "tells them apart by the file name ('8view' in it, as in "
                                       "sv4d2_8views.safetensors); set sv4d2_8views for a renamed 8-view file. SV4D "
                                       "and SV4D 2.0 are told by their tensors, and a choice that contradicts them "
                                       "is refused. Leave auto for other models."),
            ],
            outputs=[io.Model.Output("model", display_name="model", tooltip="The Turbo4D model.")],
        )

    @classmethod
    def validate_inputs(cls, model_name):
        # Declaring model_name here exempts it from ComfyUI's own option-list check (ComfyUI 0.8+
        # checks V3 combos before the graph runs and would answer only "Value not in list"), so a
        # missing file reaches execute's message naming the folder and the fix on every version.
        return True

    @classmethod
    def fingerprint_inputs(cls, model_name, weight_dtype, variant="auto"):
        try:
            path = weights_path(model_name)
            return f"{path}:{os.path.getmtime(path) if os.path.exists(path) else 'missing'}:{weight_dtype}:{variant}"
        except ValueError:  # CheckpointError, files.FileRefused: execute says why
            return f"{model_name}:{weight_dtype}:{variant}"

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str, variant: str = "auto") -> io.NodeOutput:
        if weight_dtype not in DTYPES:
            raise ValueError(f"Turbo4D Model Loader: weight_dtype={weight_dtype!r}; pick one of {list(DTYPES)}.")
        if variant not in sv4d.LOADER_VARIANTS:
            raise ValueError(f"Turbo4D Model Loader: variant={variant!r}; pick one of {list(sv4d.LOADER_VARIANTS)}.")
        try:
            path = weights_path(model_name)
            if model_name == EMBEDDED and not os.path.isfile(path):
                raise ValueError(
                    f"Turbo4D Model Loader: the embedded weights {path} are missing. They ship with the pack: "
                    f"restore the file (git checkout -- models/turbo4d_default.safetensors) or reinstall the pack.")
            if sv4d.sv4d_version_of(path):  # recognised by its keys, wherever it lies
                return io.NodeOutput(sv4d.load_sv4d_model(path, DTYPES[weight_dtype], variant))
            if variant != "auto":
                raise ValueError(f"Turbo4D Model Loader: variant={variant!r} is for SV4D / SV4D 2.0 files, and "
                                 f"{model_name!r} is not one (its tensors are not an SV4D UNet's). Set variant to "
                                 f"auto.")
            net = load_model(path)
        except CheckpointError as e:
            raise ValueError(f"Turbo4D Model Loader, model_name={model_name!r}: {e}") from e
        return io.NodeOutput(make_model_patcher(net, DTYPES[weight_dtype]))


NODES = [Turbo4DModelLoader]
