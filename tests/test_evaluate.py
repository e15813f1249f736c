"""Evaluation at toy size on CPU: the report has every field for each grid, the baselines are what
they claim to be, the PNG is written, and the sweep picks a setting from its own rows."""
import json
import os

import cv2
import pytest
import torch

from turbo_core.data.synth4d import SceneConfig, render_batch
from turbo_core.evaluate import generate, main, mean_image, nfe, scores
from turbo_core.models.io import load_model
from turbo_core.data.scenes import EVAL_SEED_START
from turbo_core.train.config import TrainConfig
from turbo_core.train.export import export
from turbo_core.train.loop import train


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    train(str(d / "run"), TrainConfig(model="tiny", images_per_step=16, views=(2, 3), frames=(2,),
                                      total_steps=2), "cpu", validate=False)
    path = str(d / "toy.safetensors")
    export(str(d / "run"), path)
    return path


def test_eval_report_has_all_fields(toy_model, tmp_path):
    out = str(tmp_path / "eval")
    assert main(["--model", toy_model, "--scenes", "2", "--views", "3", "--frames", "2", "--also", "2x3",
                 "--steps", "2", "--mean-scenes", "3", "--out", out]) == 0
    rep = json.load(open(os.path.join(out, "eval.json")))
    assert rep["model_metadata"]["training_steps"] == "2"
    assert rep["sampler"] == {"name": "euler", "steps": 2, "cfg": 1.0, "sigmas": "karras 0.002..80 rho 7", "nfe": 2}
    assert "3000000" in rep["mean_image_definition"]
    assert [(g["views"], g["frames"]) for g in rep["grids"]] == [(3, 2), (2, 3)]
    for g in rep["grids"]:
        for method in ("model", "copy_input", "mean_image"):
            r = g[method]
            assert len(r["psnr_per_view"]) == len(r["ssim_per_view"]) == g["views"]
            assert isinstance(r["psnr_novel"], float) and -1 <= r["ssim_novel"] <= 1
        assert g["copy_input"]["psnr_per_view"][0] == "inf" and g["copy_input"]["ssim_per_view"][0] == 1.0
        assert g["margin_db_novel"] == pytest.approx(
            g["model"]["psnr_novel"] - max(g["copy_input"]["psnr_novel"], g["mean_image"]["psnr_novel"]), abs=1e-3)
        png = cv2.imread(g["png"])
        # 2 scenes x 2 chosen frames of 16 px rows, columns: input + V ground truth + V generated
        assert png is not None and png.shape[1] == 3 * (16 * (1 + 2 * g["views"]) + 8)
    md = open(os.path.join(out, "eval.md")).read()
    assert "| copy_input |" in md and "| mean_image |" in md and "3 views x 2 frames" in md


def test_sweep_reports_each_setting_and_a_recommendation(toy_model, tmp_path):
    out = str(tmp_path / "sweep")
    main(["--model", toy_model, "--scenes", "1", "--views", "2", "--frames", "2", "--sweep-steps", "1,2",
          "--sweep-cfg", "1.0,2.0", "--sweep-samplers", "euler,heun", "--out", out])
    rep = json.load(open(os.path.join(out, "sweep.json")))
    assert len(rep["rows"]) == 8
    assert {(r["sampler"], r["steps"], r["cfg"]) for r in rep["rows"]} == {
        (s, n, c) for s in ("euler", "heun") for n in (1, 2) for c in (1.0, 2.0)}
    assert rep["recommended"] in rep["rows"] and rep["best"] in rep["rows"]
    assert rep["recommended"]["psnr_novel"] >= rep["best"]["psnr_novel"] - 0.25
    assert nfe("heun", 2, 2.0) == 6 and nfe("euler", 4, 1.0) == 4


def test_generation_is_chunk_invariant_and_baselines_are_exact(toy_model):
    net = load_model(toy_model)
    scene = SceneConfig(size=16, views=2, frames=2)
    data = render_batch(range(EVAL_SEED_START, EVAL_SEED_START + 3), scene)
    gt = data["images"]
    a = generate(net, gt[:, :, 0], data["cameras"], steps=2, cfg=1.5, seeds=[5, 6, 7], chunk=1)
    b = generate(net, gt[:, :, 0], data["cameras"], steps=2, cfg=1.5, seeds=[5, 6, 7], chunk=3)
    assert a.shape == gt.shape and torch.allclose(a, b, atol=1e-5)
    assert a.abs().max() <= 1
    # the mean image is the per-view, per-pixel average over frames and scenes
    m = mean_image(scene, 3, "cpu", chunk=2)
    ref = render_batch(range(3_000_000, 3_000_003), scene)["images"].mean(dim=(0, 1))
    assert torch.allclose(m[0, 0], ref, atol=1e-6)
    s = scores(gt, gt)
    assert s["psnr_per_view"] == ["inf", "inf"] and s["ssim_per_view"] == [1.0, 1.0]


def test_bad_grid_is_named(toy_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", toy_model, "--also", "3by6", "--out", str(tmp_path)])
    assert "VIEWSxFRAMES" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at most 8 views"):
        main(["--model", toy_model, "--views", "9", "--frames", "2", "--out", str(tmp_path)])
