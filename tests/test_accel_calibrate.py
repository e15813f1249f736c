"""Calibration picks the fastest setting that keeps the quality target and round-trips as JSON;
presets build runs; the script sampler's scene inputs; the benchmark runs at toy size on a CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from accel_fixtures import EDM_, F, V, grid_inputs, net
from turbo_core.accel.calibrate import Calibration, calibrate, load_calibration, save_calibration
from turbo_core.accel.mechanisms import names
from turbo_core.accel.presets import PRESET_NAMES, apply_preset, turbo4d_specs
from turbo_core.accel.registry import build_run
from turbo_core.data.scenes import scene_samples
from turbo_core.diffusion import karras_sigmas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_calibration_picks_last_passing_candidate_and_round_trips(net, tmp_path):
    noise, cond, cam = grid_inputs(net)
    samples = [{"noise": noise, "cond": cond, "camera": cam}]
    sigmas = karras_sigmas(10)
    # 0 never bypasses (PSNR inf); a huge threshold bypasses all it may; the target sits between.
    cal = calibrate(net, EDM_, samples, sigmas, V, F, mechanism="bypass", candidates=[0.0, 0.05, 0.2, 50.0],
                    target_psnr=80.0, base_config={"start_percent": 0.1, "max_consecutive": 4})
    psnrs = [p["psnr_min"] for p in cal.points]
    assert psnrs[0] == float("inf") and psnrs[-1] < 80.0
    passing = [p["passes"] for p in cal.points]
    first_fail = passing.index(False)
    assert cal.value == [0.0, 0.05, 0.2, 50.0][first_fail - 1]
    assert cal.points[-1]["compute_fraction"] < cal.points[0]["compute_fraction"]
    path = tmp_path / "calibrated.json"
    save_calibration(cal, str(path))
    back = load_calibration(str(path))
    assert back.value == cal.value and back.config == cal.config
    specs = back.specs([("prune", None)])
    assert [n for n, _ in specs] == ["prune", "bypass"] and specs[1][1].threshold == cal.value
    assert specs[1][1].max_consecutive == 4


def test_step_calibration_measures_its_kappa_prior(net):
    """Calibrating whole steps first measures the model's forecast-error rate on the samples and
    runs every candidate with it as kappa_prior; the chosen config keeps it."""
    from turbo_core.accel.script import sample_accelerated
    from turbo_core.accel.step_skip import StepSkipConfig

    noise, cond, cam = grid_inputs(net)
    samples = [{"noise": noise, "cond": cond, "camera": cam}]
    sigmas = karras_sigmas(12)
    cal = calibrate(net, EDM_, samples, sigmas, V, F, mechanism="step", field_name="step_threshold",
                    candidates=[0.01, 0.05, 0.2], target_psnr=30.0,
                    base_config={"start_percent": 0.0, "step_max_skips": 6})
    probe = StepSkipConfig(start_percent=0.0, step_max_skips=6, step_threshold=1e-12)
    _, st = sample_accelerated(net, EDM_, [("step", probe)], noise, sigmas, cond, cam, V, F)
    measured = st.kappa_measured
    assert measured > 0 and cal.value is not None
    assert cal.config["kappa_prior"] == pytest.approx(measured)
    assert cal.points[-1]["compute_fraction"] < cal.points[0]["compute_fraction"]


def test_calibration_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="calibrate"):
        load_calibration(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_calibration(str(bad))
    binary = tmp_path / "weights.json"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError) as e:
        load_calibration(str(binary))
    assert "weights.json" in str(e.value) and "binary" in str(e.value) and "calibrate again" in str(e.value)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"threshold": 0.1}))
    with pytest.raises(ValueError, match="not a Turbo4D calibration"):
        load_calibration(str(other))
    off = Calibration("cache", "threshold", None, 40.0, None)
    assert off.specs([("cache", None), ("prune", None)]) == [("prune", None)]


def test_presets_build_runs():
    for name in PRESET_NAMES:
        specs = turbo4d_specs(name)
        assert (len(specs) == 0) == (name == "off")
        assert name == "off" or {"step", "block_reuse"} <= {n for n, _ in specs}
        build_run(specs)
        for mech in names():
            s = apply_preset([(mech, None)], mech, name)
            assert (len(s) == 0) == (name == "off")
    with pytest.raises(ValueError, match="unknown preset 'turbo'"):
        turbo4d_specs("turbo")
    # A combined preset replaces whatever the list held for the three, and keeps the rest.
    assert [n for n, _ in turbo4d_specs("fast", [("cache", None), ("other", 1)])][0] == "other"


def test_scene_samples_are_frame_major_with_relative_cameras():
    s = scene_samples([1_000_000], views=3, frames=2, size=16)[0]
    assert s["noise"].shape == s["cond"].shape == s["gt"].shape == (6, 3, 16, 16)
    assert torch.equal(s["cond"][0], s["gt"][0]) and torch.equal(s["cond"][1], s["gt"][0])  # view 0 of frame 0
    assert torch.equal(s["cond"][3], s["gt"][3])                                              # frame 1
    assert s["camera"][0, 0] == 0 and s["camera"][1, 0] > 0 and torch.equal(s["camera"][:3], s["camera"][3:])


def test_bench_smoke_on_cpu(tmp_path):
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "bench.bench_accel", "--device", "cpu", "--tiny", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / "bench_accel.json").read_text())
    names = [row["name"] for row in res["rows"]]
    assert "full" in names and "turbo4d-balanced" in names and any(n.startswith("fixed-") for n in names)
    full = res["rows"][names.index("full")]
    assert full["psnr_vs_full"] is None or full["psnr_vs_full"] == float("inf")
    for row in res["rows"]:
        assert row["seconds"] > 0 and 0 < row["compute_fraction"] <= 1.0
        assert row["psnr_vs_gt"] is not None
    assert (out / "speed_quality.png").stat().st_size > 1000
