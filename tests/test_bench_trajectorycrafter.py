"""The TrajectoryCrafter benchmark's CPU smoke path (bench/bench_trajectorycrafter.py --tiny): the
same code as the full-size GPU run, at reduced width, end to end: full compute with its per-step
breakdown, every applicable preset of the pack against it, fewer steps, and each of diffusers'
cache hooks on its CogVideoX twin against that twin's own full run."""
import json
import math

from bench.bench_trajectorycrafter import main


def test_bench_runs_every_row_at_reduced_width(tmp_path):
    out = tmp_path / "tc.json"
    assert main(["--tiny", "--device", "cpu", "--steps", "6", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    rows = {r["name"]: r for r in d["rows"]}
    full = rows["full compute"]
    parts = full["breakdown_ms_per_step"]
    assert set(parts) == {"self_attention", "perceiver", "mlp", "rest", "total"}
    assert parts["self_attention"] > 0 and parts["perceiver"] > 0 and parts["mlp"] > 0
    ours = [r for r in d["rows"] if r["what"] == "ours" and r["name"] != "full compute"]
    names = {r["name"] for r in ours}
    for want in ("Chain Bypass quality", "Chain Bypass balanced", "Chain Bypass fast", "block_reuse balanced",
                 "token_reuse balanced", "block_reuse balanced + Chain Bypass balanced"):
        assert want in names, names
    assert any(n.endswith("DDIM steps") for n in names)
    for r in ours:
        assert r["latency_s"] > 0 and r["psnr_vs_full"] > 20, r
    peers = [r for r in d["rows"] if r["what"] == "peer"]
    kinds = ("FirstBlockCache", "TaylorSeerCache", "PyramidAttentionBroadcast", "FasterCache", "MagCache")
    for kind in kinds:
        assert any(r["name"].startswith(kind) for r in peers), kind
    for r in peers[1:]:
        assert "error" not in r and r["psnr_vs_full"] > 20 and math.isfinite(r["latency_s"]), r
    assert len(peers[0]["mag_ratios"]) == 6  # MagCache's calibration, taken on the twin's full run
