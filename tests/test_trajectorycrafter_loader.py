"""TrajectoryCrafter checkpoints as they are found: diffusers' layout, one safetensors file or
shards with their index, keys under `transformer.` or none, fp32 or bf16, with or without the
config.json beside them. Saved here at reduced width, loaded by turbo_core's loader."""
import copy
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from turbo_core.models.io import CheckpointError
from turbo_core.models.trajectorycrafter import CONFIGS, TrajectoryCrafterTransformer, load_trajectorycrafter

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def random_net(cfg=CONFIGS["tiny"], seed=0):
    torch.manual_seed(seed)
    net = TrajectoryCrafterTransformer(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval()


def config_json(cfg):
    """What diffusers' save_pretrained writes for CrossTransformer3DModel (plus training-only keys)."""
    return {"_class_name": "CrossTransformer3DModel", "_diffusers_version": "0.31.0", "dropout": 0.0,
            "sample_width": 90, "sample_height": 60, "sample_frames": 49, "temporal_compression_ratio": 4,
            "use_rotary_positional_embeddings": True, "activation_fn": "gelu-approximate",
            "add_noise_in_inpaint_model": True, **cfg.to_dict()}


def save_diffusers(net, folder, prefix="", dtype=torch.float32, shards=1, config=True):
    """The layout diffusers writes: one diffusion_pytorch_model.safetensors, or numbered shards and
    an index whose weight_map names each tensor's shard."""
    os.makedirs(folder, exist_ok=True)
    sd = {prefix + k: v.to(dtype).contiguous() for k, v in net.state_dict().items()}
    keys = list(sd)
    if shards == 1:
        save_file(sd, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: sd[k] for k in part}, os.path.join(folder, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        with open(os.path.join(folder, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    if config:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config_json(net.cfg), f)
    return folder


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(2, 2, 16, 4, 6, generator=g), inpaint=torch.randn(2, 2, 17, 4, 6, generator=g),
                text=torch.randn(2, 5, 24, generator=g), timestep=torch.tensor([900, 100]),
                reference=torch.randn(1, 1, 16, 4, 6, generator=g))


CASES = [  # (prefix, stored dtype, shards, config.json beside, what the user points at)
    ("", torch.float32, 1, True, "file"),
    ("transformer.", torch.bfloat16, 1, False, "file"),
    ("", torch.float32, 3, True, "folder"),
    ("transformer.", torch.float32, 3, False, "index"),
    ("", torch.bfloat16, 3, False, "shard"),
    ("transformer.", torch.bfloat16, 2, True, "folder"),
]


@pytest.mark.parametrize("prefix,dtype,shards,config,pick", CASES)
def test_loader_recognises_each_diffusers_layout(tmp_path, prefix, dtype, shards, config, pick):
    net = random_net()
    folder = save_diffusers(net, str(tmp_path / "transformer"), prefix, dtype, shards, config)
    path = {"folder": folder, "index": os.path.join(folder, INDEX),
            "file": os.path.join(folder, "diffusion_pytorch_model.safetensors"),
            "shard": os.path.join(folder, f"diffusion_pytorch_model-00002-of-{shards:05d}.safetensors")}[pick]
    loaded = load_trajectorycrafter(path)
    assert loaded.cfg == net.cfg
    sd = loaded.state_dict()
    assert set(sd) == set(net.state_dict())
    for k, v in net.state_dict().items():
        assert sd[k].dtype == dtype and torch.equal(sd[k], v.to(dtype)), k
    if dtype == torch.float32:
        with torch.no_grad():
            assert torch.equal(loaded(**inputs()), net(**inputs()))
    as_fp32 = load_trajectorycrafter(path, dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in as_fp32.state_dict().values())


def test_perceiver_heads_come_from_config_json(tmp_path):
    """The perceiver's width is heads x head_dim: 1 head of 32 and 2 of 16 have the same tensors.
    The config.json beside the weights says which; without it the original's defaults apply."""
    cfg = dataclasses.replace(CONFIGS["tiny"], cross_attn_num_heads=1, cross_attn_dim_head=32)
    net = random_net(cfg)
    with_config = load_trajectorycrafter(save_diffusers(net, str(tmp_path / "a"), config=True))
    without = load_trajectorycrafter(save_diffusers(net, str(tmp_path / "b"), config=False))
    assert with_config.cfg.cross_attn_num_heads == 1 and with_config.cfg == cfg
    assert without.cfg.cross_attn_num_heads == 2  # 16-channel heads: the DiT's, as 32 is no multiple of 128
    with torch.no_grad():
        assert torch.equal(with_config(**inputs()), net(**inputs()))
        assert not torch.allclose(without(**inputs()), net(**inputs()))


def test_plain_cogvideox_fun_without_perceiver_loads(tmp_path):
    cfg = dataclasses.replace(CONFIGS["tiny"], is_train_cross=False)
    net = random_net(cfg)
    loaded = load_trajectorycrafter(save_diffusers(net, str(tmp_path / "t"), config=False))
    assert not loaded.cfg.is_train_cross and not hasattr(loaded, "perceiver_cross_attention")
    kw = {k: v for k, v in inputs().items() if k != "reference"}
    with torch.no_grad():
        assert torch.equal(loaded(**kw), net(**kw))


def test_unusable_files_are_refused_with_the_reason(tmp_path):
    net = random_net()
    folder = save_diffusers(net, str(tmp_path / "s"), shards=3)
    os.remove(os.path.join(folder, "diffusion_pytorch_model-00003-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match="lists shards that are not beside it"):
        load_trajectorycrafter(folder)
    pickled = tmp_path / "model.pt"
    torch.save({}, str(pickled))
    with pytest.raises(CheckpointError, match="pickled checkpoint"):
        load_trajectorycrafter(str(pickled))
    other = tmp_path / "other.safetensors"
    save_file({"encoder.conv_in.conv.weight": torch.zeros(2, 3, 3, 3, 3)}, str(other))
    with pytest.raises(CheckpointError, match="no 'patch_embed.proj.weight'"):
        load_trajectorycrafter(str(other))
    partial = {k: v for k, v in net.state_dict().items() if not k.startswith("perceiver_cross_attention.1.")}
    save_file({k: v.contiguous() for k, v in partial.items()}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="not a complete TrajectoryCrafter transformer"):
        load_trajectorycrafter(str(tmp_path / "partial.safetensors"))


def test_an_index_naming_shards_outside_its_folder_is_refused(tmp_path):
    """A shard index is data from a download: a name with '..' or a separator, or a shard that is a
    symbolic link out of the folder, is refused before anything is opened."""
    folder = save_diffusers(random_net(), str(tmp_path / "model"), shards=2)
    index = os.path.join(folder, INDEX)
    with open(index) as f:
        good = json.load(f)
    secret = tmp_path / "secret.safetensors"
    save_file({"x": torch.zeros(1)}, str(secret))
    for bad in ("../secret.safetensors", str(secret), "sub/diffusion_pytorch_model-00001-of-00002.safetensors"):
        data = copy.deepcopy(good)
        data["weight_map"][next(iter(data["weight_map"]))] = bad
        with open(index, "w") as f:
            json.dump(data, f)
        with pytest.raises(CheckpointError, match="outside its own folder"):
            load_trajectorycrafter(folder)
    with open(index, "w") as f:
        json.dump(good, f)
    shard = os.path.join(folder, "diffusion_pytorch_model-00002-of-00002.safetensors")
    os.replace(shard, str(tmp_path / "moved.safetensors"))
    os.symlink(str(tmp_path / "moved.safetensors"), shard)
    with pytest.raises(CheckpointError, match="outside its own folder"):
        load_trajectorycrafter(folder)
