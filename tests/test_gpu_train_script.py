"""scripts/gpu_train.sh, the one training script for both shipped networks: a bad CONFIG and a
RESUME with nothing to resume from stop at once, naming the fix, before any GPU time is spent.
(Its training path is the Python tested in test_train.py; the script runs on a GPU host.)"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_train.sh")


def _run(tmp_path, **env):
    # a stand-in for the GPU host's python: the header's probe answers, anything else would run on
    # the CPU (these cases must stop before any of it)
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then echo 1; exit 0; fi\nexec {sys.executable} "$@"\n')
    py.chmod(0o755)
    full = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(py), "PATH": os.environ["PATH"], **env}
    return subprocess.run(["bash", SCRIPT], env=full, capture_output=True, text=True, timeout=120)


def test_unknown_config_stops_and_names_the_two_configs(tmp_path):
    r = _run(tmp_path, CONFIG="huge")
    assert r.returncode == 2 and "CONFIG=default or CONFIG=px64" in r.stdout


def test_resume_with_no_run_state_and_no_weights_stops_before_training(tmp_path):
    r = _run(tmp_path, CONFIG="px64", RESUME="1", RUN="no_such_run", INIT=str(tmp_path / "missing.safetensors"))
    assert r.returncode == 2
    assert "carry runs/no_such_run or set INIT" in r.stdout
    assert "throughput probe" not in r.stdout and "train on" not in r.stdout
