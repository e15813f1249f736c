"""Which processes a Multi-GPU run uses (turbo_core.parallel.choose_devices), and the run's summary
line: what the node's text input may say, and the errors that name the fix. CPU only (on a host
without CUDA a GPU list runs on one process and says so)."""
import pytest
import torch

from turbo_core.parallel import choose_devices, summary_line

CPU = torch.device("cpu")


def test_cpu_processes_are_counted_and_one_runs_on_one():
    devs, line = choose_devices("cpu:3", CPU, "Node")
    assert devs == [CPU] * 3 and line == "Node: 3 CPU processes (gloo)"
    devs, line = choose_devices("CPU:1", CPU, "Node")
    assert devs is None and "sampling runs on one" in line


@pytest.mark.parametrize("text", ["cpu", "cpu:x", "cpu2"])
def test_a_malformed_cpu_count_names_the_forms_accepted(text):
    with pytest.raises(ValueError, match=r"Node: devices=.*is not 'all', a list of GPU indices.*'cpu:N'"):
        choose_devices(text, CPU, "Node")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU fallback")
def test_gpus_asked_for_without_a_gpu_run_on_one_process_and_say_how_to_test():
    devs, line = choose_devices("0,1", CPU, "Node")
    assert devs is None and "no GPU (ComfyUI runs on cpu)" in line and "devices='cpu:2'" in line


def test_summary_line_names_modes_collective_share_and_peaks():
    summary = {"world": 2, "backend": "nccl", "calls_by_mode": {"cfg": 50}, "comm_timed": True,
               "ranks": [{"comm_seconds": 0.1, "busy_seconds": 10.0, "peak_memory_mb": 7782.4},
                         {"comm_seconds": 0.2, "busy_seconds": 10.0, "peak_memory_mb": 7680.0}]}
    assert summary_line(summary, "Node") == ("Node: 2 processes (nccl), cfg 50 calls; time in collectives per rank "
                                             "1.0% / 2.0%; peak GPU memory 7.6 / 7.5 GB")
    assert summary_line({**summary, "calls_by_mode": {}, "comm_timed": False,
                         "ranks": [{}, {}]}, "Node") == "Node: 2 processes (nccl), no split call"
