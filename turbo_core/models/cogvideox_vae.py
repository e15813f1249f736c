"""The CogVideoX VAE (3D causal, 8x spatial and 4x temporal compression, 16 latent channels) for
TrajectoryCrafter: diffusers' `AutoencoderKLCogVideoX`, used as a dependency, loaded from
safetensors by this module.

Why diffusers' and not the pack's own: the VAE runs once per run (encode the render, mask and
reference frames, decode the result), no accelerator touches it, and it is 1,200 lines of causal
convolutions with a frame-chunked conv cache, spatial norms, tiling and slicing. diffusers'
implementation is maintained, memory-tuned (tiled decode of 49 frames at 384 x 672 fits where a
plain decode does not), and is what TrajectoryCrafter's own VAE file was copied from: on random
weights its decode equals TrajectoryCrafter's `models/autoencoder_magvit.py` exactly, and so does
its encode once the frame chunk is the same (below). A copy in the pack would add risk and upkeep
for no speed. The import is lazy, so the rest of turbo_core runs without diffusers.

The one difference: the encoder runs in chunks of frames (1 + 4k), and each chunk's GroupNorms
normalise over the chunk's frames, so the chunk length changes the latents. TrajectoryCrafter's
VAE (CogVideoX-Fun's) encodes 4 frames per chunk; diffusers >= 0.31 defaults to 8. `build` sets 4.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .diffusers_files import load_tensors, read_config, read_shapes, strip_prefix, weight_files
from .io import CheckpointError

# vae/config.json of CogVideoX-5b, which CogVideoX-Fun-V1.1-5b-InP ships unchanged.
CONFIG_5B = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "down_block_types": ["CogVideoXDownBlock3D"] * 4, "up_block_types": ["CogVideoXUpBlock3D"] * 4,
    "block_out_channels": [128, 256, 256, 512], "layers_per_block": 3, "act_fn": "silu", "norm_eps": 1e-6,
    "norm_num_groups": 32, "temporal_compression_ratio": 4, "sample_height": 480, "sample_width": 720,
    "scaling_factor": 0.7, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False,
}
ENCODE_FRAME_CHUNK = 4  # TrajectoryCrafter's autoencoder_magvit.py: frame_batch_size = 4
MARKER = "encoder.conv_in.conv.weight"
PREFIX = "vae."


def _diffusers_vae_class():
    try:
        from diffusers import AutoencoderKLCogVideoX
    except ImportError as e:
        raise ImportError(f"the CogVideoX VAE comes from diffusers, which is not installed ({e}): "
                          f"pip install 'diffusers>=0.32' into ComfyUI's Python") from e
    return AutoencoderKLCogVideoX


def build(config: Optional[dict] = None, device=None):
    """diffusers' AutoencoderKLCogVideoX for `config` (None: CogVideoX 5B's), encoding in
    TrajectoryCrafter's 4-frame chunks; on `device` ("meta": shapes only)."""
    cls = _diffusers_vae_class()
    cfg = dict(CONFIG_5B)
    cfg.update({k: v for k, v in (config or {}).items() if not k.startswith("_")})
    with torch.device(device or "cpu"):
        vae = cls(**{k: v for k, v in cfg.items() if k in _init_args(cls)})
    vae.num_sample_frames_batch_size = ENCODE_FRAME_CHUNK
    return vae.eval()


def _init_args(cls) -> set:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def config_from_shapes(shapes: dict, base: Optional[dict] = None) -> dict:
    """The VAE config a state dict's shapes imply (widths, depth, channels), over `base` (a
    config.json, or CogVideoX 5B's): what the shapes cannot tell (GroupNorm groups, scaling
    factor) comes from the base."""
    cfg = dict(CONFIG_5B)
    cfg.update({k: v for k, v in (base or {}).items() if not k.startswith("_")})
    try:
        levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks.")})
        cfg["block_out_channels"] = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.conv.weight"][0] for i in levels]
        cfg["layers_per_block"] = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down_blocks.0.resnets.")})
        cfg["in_channels"] = shapes["encoder.conv_in.conv.weight"][1]
        cfg["out_channels"] = shapes["decoder.conv_out.conv.weight"][0]
        cfg["latent_channels"] = shapes["decoder.conv_in.conv.weight"][1]
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"the tensors are not a CogVideoX VAE in diffusers' layout (no {e})") from e
    cfg["down_block_types"] = ["CogVideoXDownBlock3D"] * len(levels)
    cfg["up_block_types"] = ["CogVideoXUpBlock3D"] * len(levels)
    cfg["use_quant_conv"] = "quant_conv.weight" in shapes
    cfg["use_post_quant_conv"] = "post_quant_conv.weight" in shapes
    return cfg


def load(path: str, dtype: Optional[torch.dtype] = None, device="cpu"):
    """The VAE from a safetensors file (or shards, or a folder) in diffusers' layout, keys under
    `vae.` or none; the config.json beside it, when present, supplies what the shapes cannot."""
    files = weight_files(path)
    shapes = read_shapes(files)
    name = os.path.basename(path.rstrip("/"))
    prefix = strip_prefix(shapes, PREFIX, MARKER)
    own = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
    cfg = config_from_shapes(own, read_config(files))
    vae = build(cfg, device="meta")
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    missing = [k for k in expected if k not in own]
    wrong = [k for k in expected if k in own and own[k] != expected[k]]
    if missing or wrong:
        raise CheckpointError(f"{name} is not a CogVideoX VAE: {len(missing)} tensors missing (first: "
                              f"{missing[:1]}), {len(wrong)} of another shape (first: {wrong[:1]})")
    sd = load_tensors(files, expected, prefix, dtype or torch.float32, device)
    vae.load_state_dict(sd, assign=True)
    vae.num_sample_frames_batch_size = ENCODE_FRAME_CHUNK
    return vae.eval()


def encode(vae, video: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """video (B, 3, F, H, W) in [-1, 1] -> latents (B, 16, F', H/8, W/8) times the scaling factor:
    the posterior's mode (TrajectoryCrafter's render and mask), or a sample when a generator is
    given (its reference frames are sampled)."""
    dist = vae.encode(video.to(vae.dtype)).latent_dist
    z = dist.mode() if generator is None else dist.sample(generator)
    return z * vae.config.scaling_factor


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 16, F', h, w) -> video (B, 3, F, 8h, 8w) in [-1, 1]."""
    return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
