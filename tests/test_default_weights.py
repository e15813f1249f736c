"""The embedded default weights: the file shipped is the one the model card describes."""
import hashlib
import json
import os

import torch

from turbo_core.models import CONFIGS, SCMNet
from turbo_core.models.io import load_model, read_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "models", "turbo4d_default.safetensors")


def test_sha256_matches_the_recorded_one():
    with open(os.path.join(ROOT, "models", "turbo4d_default.sha256")) as f:
        expected = f.read().split()[0]
    h = hashlib.sha256()
    with open(WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    assert h.hexdigest() == expected
    assert expected in open(os.path.join(ROOT, "MODEL_CARD.md")).read()


def test_weights_load_with_their_config_and_are_trained():
    assert os.path.getsize(WEIGHTS) <= 16 * 2**20
    meta = read_metadata(WEIGHTS)
    assert json.loads(meta["config"]) == CONFIGS["default"].to_dict()
    assert int(meta["training_steps"]) > 1000
    net = load_model(WEIGHTS)
    # Trained, not the zero-initialised output layer of a fresh network.
    assert net.out.weight.abs().sum() > 0
    fresh = SCMNet(CONFIGS["default"])
    assert not torch.equal(net.blocks[0].spatial.qkv.weight, fresh.blocks[0].spatial.qkv.weight)


def test_px64_weights_match_their_sha256_config_and_card():
    """The 64 px benchmark network (BENCHMARKS.md, "At 32 x 32 tokens per image") is the file the
    model card describes: its sha256, the px64 config (32 x 32 tokens per image), trained."""
    path = os.path.join(ROOT, "models", "turbo4d_px64.safetensors")
    with open(os.path.join(ROOT, "models", "turbo4d_px64.sha256")) as f:
        expected = f.read().split()[0]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    assert h.hexdigest() == expected
    assert expected in open(os.path.join(ROOT, "MODEL_CARD.md")).read()
    assert os.path.getsize(path) <= 16 * 2**20
    meta = read_metadata(path)
    assert json.loads(meta["config"]) == CONFIGS["px64"].to_dict()
    assert CONFIGS["px64"].grid == 32
    assert int(meta["training_steps"]) >= 1000 and json.loads(meta["train_config"])["seed"] == 0
    net = load_model(path)
    assert net.cfg.image_size == 64 and net.out.weight.abs().sum() > 0


def test_readme_and_model_card_say_up_front_it_is_not_for_real_videos():
    """Where a user first reads about the main job and the model: the embedded model makes blobs of
    real videos, and SV4D through MultiView Sampler (SV4D) is what does them."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    intro = readme[:readme.index("## Install into an existing ComfyUI")]
    card = open(os.path.join(ROOT, "MODEL_CARD.md")).read()
    card_intro = card[:card.index("## Measured quality")]
    for text in (intro, card_intro):
        text = " ".join(text.replace("**", "").split())  # as rendered: no line breaks, no bold
        assert "on real videos" in text.lower() and "blobs in the input's colours" in text
        assert "MultiView Sampler (SV4D)" in text and "docs/sv4d.md" in text
