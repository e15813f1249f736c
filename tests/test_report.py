"""The run payload (what the GUI and the Report node show), the run listeners that feed the live map,
and the report plots, on a real accelerated run of a tiny network."""
from __future__ import annotations

import json

import numpy as np
import pytest

from accel_fixtures import random_net, sample
from turbo_core.accel.bypass import ChainBypassConfig
from turbo_core.accel.cache import RollingCacheConfig
from turbo_core.accel.prune import TokenPrunerConfig
from turbo_core.accel.registry import build_run
from turbo_core.run_report import (STATE_CODES, STATE_COLOURS, draw_map, report_image, row_code, run_payload,
                               state_counts)


@pytest.fixture(scope="module")
def fast_run():
    net = random_net("tiny")
    calls = []
    # All three at work (the shipped presets mostly skip whole steps, and then the cache and the
    # pruner stand aside): every state of the map appears.
    run = build_run([("cache", RollingCacheConfig(threshold=0.3, start_percent=0.1)),
                     ("prune", TokenPrunerConfig(keep_start=0.5, keep_end=0.3)),
                     ("bypass", ChainBypassConfig(threshold=0.2, start_percent=0.1, max_consecutive=2))])
    run.listeners.append(lambda stats, entry: calls.append(
        (len(stats.timeline), None if entry is None else row_code(entry, stats.blocks))))
    _, stats = sample(net, None, run=run)
    return stats, calls


def test_listeners_see_every_call_then_the_end(fast_run):
    stats, calls = fast_run
    assert len(calls) == stats.calls + 1
    # After call i the timeline holds i + 1 entries and the entry is that call's row.
    assert [n for n, _ in calls[:-1]] == list(range(1, stats.calls + 1))
    assert [r for _, r in calls[:-1]] == [row_code(t, stats.blocks) for t in stats.timeline]
    assert calls[-1] == (stats.calls, None)


def test_payload_matches_the_stats(fast_run):
    stats, _ = fast_run
    p = json.loads(json.dumps(run_payload(stats)))  # JSON-safe as sent to the browser
    assert p["summary"] == json.loads(json.dumps(stats.summary()))
    assert p["blocks"] == stats.blocks == 2
    assert len(p["rows"]) == stats.calls == 12
    # Each cell: bypassed if the chain was, else what was skipped in the block (cache, prune, both).
    for row, t in zip(p["rows"], stats.timeline):
        for b, ch in enumerate(row):
            parts = t["parts"].get(b, set())
            want = ("b" if "bypassed" in parts else "x" if {"cached", "pruned"} <= parts else
                    "c" if "cached" in parts else "p" if "pruned" in parts else "r")
            assert ch == want, (t["step"], b, parts)
    counts = state_counts(p["rows"])
    # Every bypassed chain is one "b" cell (a bypassed block does no attention at all).
    assert counts["bypassed"] == stats.chains_bypassed > 0
    assert counts["ran"] > 0 and sum(counts.values()) == stats.calls * stats.blocks
    # Pruning shows on the map although spatial attention runs in full beside it.
    assert stats.reused_by["prune"] and counts["pruned"] + counts["cached+pruned"] > 0
    # Change signals of the bypass are recorded against its threshold.
    th = [s["bypass"]["threshold"] for s in p["signals"] if "bypass" in s]
    assert th and all(t == th[0] for t in th)
    assert set(p["accelerators"]) == {"cache", "prune", "bypass"}


def test_map_cells_have_their_state_colour():
    rows = ["rcpb", "bxbr"]
    img = draw_map(rows, 4, width=420, height=230)
    assert img.dtype == np.uint8 and img.shape == (230, 420, 3)
    L, R, T, B = 60, 12, 28, 48
    pw, ph = 420 - L - R, 230 - T - B
    for i, r in enumerate(rows):
        for b, ch in enumerate(r):
            x = L + int((i + 0.5) * pw / 2)
            state = {v: k for k, v in STATE_CODES.items()}[ch]
            top, bottom = ("cached", "pruned") if ch == "x" else (state, state)
            assert tuple(img[T + int((b + 0.25) * ph / 4), x]) == STATE_COLOURS[top], (i, b, ch)
            assert tuple(img[T + int((b + 0.75) * ph / 4), x]) == STATE_COLOURS[bottom], (i, b, ch)


def test_report_image_adds_quality_panel_when_a_reference_is_given(fast_run):
    stats, _ = fast_run
    p = run_payload(stats)
    plain = report_image(p)
    with_q = report_image(p, {"psnr": 30.0, "ssim": 0.9, "speedup": p["summary"]["compute_speedup"]})
    assert plain.shape[1] == with_q.shape[1] == 720
    assert with_q.shape[0] > plain.shape[0] + 150
    # The map is in the picture: its ran and bypassed colours both appear.
    for state in ("ran", "bypassed"):
        assert (plain == np.array(STATE_COLOURS[state], np.uint8)).all(-1).sum() > 100, state


# --- the Report and Preview nodes on the real server ------------------------------------------------
def _grid_prompt(extra: dict) -> dict:
    p = {
        "1": {"class_type": "Turbo4DModelLoader", "inputs": {"model_name": "embedded default", "weight_dtype": "auto"}},
        "2": {"class_type": "Turbo4DSyntheticScene",
              "inputs": {"seed": 5, "views": 2, "frames": 3, "size": 32, "elevation": 20.0,
                         "azimuth_start": 0.0, "azimuth_span": 360.0}},
    }
    for sid, seed in (("3", 1), ("4", 1)):  # two identical full-compute runs: "accelerated" and reference
        p[sid] = {"class_type": "Turbo4DMultiViewSampler",
                  "inputs": {"model": ["1", 0], "input": ["2", 0], "views": 2, "frames": 3, "elevation": 20.0,
                             "azimuth_span": 360.0, "seed": seed, "steps": 3, "cfg": 1.0,
                             "sampler_name": "euler", "scheduler": "karras"}}
    p.update(extra)
    return p


def test_report_and_preview_nodes_on_the_server(comfy):
    import os

    from PIL import Image

    prompt = _grid_prompt({
        "5": {"class_type": "Turbo4DReport", "inputs": {"run_stats": ["3", 3], "images": ["3", 0],
                                                         "reference": ["4", 0], "reference_stats": ["4", 3]}},
        "6": {"class_type": "Turbo4DMultiViewPreview", "inputs": {"images": ["3", 0], "views": 2, "fps": 8.0}},
    })
    entry = comfy.run(prompt, timeout=240)
    out = entry["outputs"]
    rep = out["5"]
    shown = rep["turbo4d"][0]
    assert shown["summary"] == out["3"]["turbo4d"][0]["summary"]
    assert shown["quality"]["psnr"] is None  # identical runs: exact (inf is sent as null)
    assert shown["quality"]["ssim"] == pytest.approx(1.0)
    assert shown["quality"]["wall_speedup"] > 0 and shown["quality"]["speedup_kind"] == "wall-clock"
    assert "PSNR vs reference exact" in rep["text"][0]
    img_info = rep["images"][0]
    path = os.path.join(comfy.base_dir, "temp", img_info["subfolder"], img_info["filename"])
    with Image.open(path) as im:
        assert im.size[0] == 720 and im.size[1] > 600  # summary, map, signals, quality vs speed
    prev = out["6"]["turbo4d_preview"][0]
    assert (prev["views"], prev["frames"], prev["width"]) == (2, 3, 32)
    for v, row in enumerate(prev["cells"]):
        for f, cell in enumerate(row):
            assert cell["filename"].endswith(f"_v{v:02d}_f{f:03d}.png")
            with Image.open(os.path.join(comfy.base_dir, "temp", cell["subfolder"], cell["filename"])) as im:
                assert im.size == (32, 32)


def test_report_names_the_missing_reference(comfy):
    from comfy_host import PromptFailed

    prompt = _grid_prompt({"5": {"class_type": "Turbo4DReport", "inputs": {"run_stats": ["3", 3], "images": ["3", 0]}}})
    del prompt["4"]
    with pytest.raises(PromptFailed) as e:
        comfy.run(prompt, timeout=240)
    assert "'reference' is not connected" in e.value.message
