"""Multi-process sampling (turbo_core.parallel) on the CPU with gloo, 2 and 3 processes, on the
embedded model: every mode gives the one-process result, with and without Chain Bypass (whole
steps decided on rank 0 and per-block bypasses from all-reduced signals); every rank takes the same
accelerator decisions; the statistics count every rank's work; a worker's error and a killed worker
reach the caller naming the rank, and the next run succeeds; no worker outlives its group.

Grids are small (2-3 views x 2-3 frames) and runs short (2-4 steps), so each run takes seconds on a
2-core CPU; the worker processes of one group are reused between tests."""
import os
import signal
import time

import pytest
import torch

from parallel_guard import finishes_within
from turbo_core.accel.block_reuse import BlockReuseConfig
from turbo_core.accel.bypass import ChainBypassConfig
from turbo_core.accel.cache import RollingCacheConfig
from turbo_core.accel.prune import TokenPrunerConfig
from turbo_core.accel.step_skip import StepSkipConfig
from turbo_core.data.scenes import scene_samples
from turbo_core.diffusion import EDM, karras_sigmas
from turbo_core.layout import SCMLayout
from turbo_core.models.io import load_model
from turbo_core.models.scm_net import SCMNet
from turbo_core import parallel
from turbo_core.parallel import ParallelError, ShardPlan, choose_plan, sample_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "models", "turbo4d_default.safetensors")
EDM_ = EDM()
# Both levels of Chain Bypass: whole steps (decided on rank 0, on the CFG-combined image) and
# per-block bypasses (each rank measures its share; the means are all-reduced).
BYPASS = [("bypass", ChainBypassConfig(threshold=5.0, start_percent=0.0, end_percent=1.0, max_consecutive=1)),
          ("step", StepSkipConfig(step_threshold=0.1, kappa_prior=0.4, step_max_skips=1, start_percent=0.0,
                                  end_percent=1.0))]
# mode -> (views, frames, cfg): the smallest grids that split over 3 processes in that mode (the
# two CFG halves cannot: there the plan falls back to frames).
GRIDS = {"cfg": (1, 3, 2.0), "frames": (2, 3, 1.0), "views": (3, 2, 1.0)}


# --- the plan, no processes ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["cfg", "frames", "views"])
@pytest.mark.parametrize("world", [2, 3])
def test_plan_slices_hold_every_image_once(mode, world):
    lay = SCMLayout(batch=3, views=4, frames=5, height=3, width=3)
    plan = ShardPlan(mode, lay, world)
    held = torch.cat([plan.image_index(r) for r in range(world)])
    assert sorted(held.tolist()) == list(range(lay.images))
    for r in range(world):
        loc = plan.local_layout(r)
        assert loc.images == plan.image_index(r).numel() == plan.local_images(r)
        # The rank's images are a contiguous slice of the grid, in the frame-major order.
        start, stop = plan.bounds(r)
        expected = torch.arange(lay.images).view(3, 5, 4).narrow(plan.dim, start, stop - start).reshape(-1)
        assert torch.equal(plan.image_index(r), expected)
        assert plan.token_layout(r).tokens == plan.token_sizes()[r]
    assert sum(plan.token_sizes()) == lay.tokens


def test_auto_plan_prefers_cfg_halves_then_the_more_even_axis():
    assert choose_plan(SCMLayout(2, 4, 12, 8, 8), 2)[0].mode == "cfg"
    assert choose_plan(SCMLayout(1, 4, 12, 8, 8), 2)[0].mode == "frames"
    assert choose_plan(SCMLayout(1, 8, 5, 8, 8), 2)[0].mode == "views"      # 4+4 views beat 3+2 frames
    assert choose_plan(SCMLayout(2, 4, 12, 8, 8), 3)[0].mode == "frames"    # 2 halves do not split 3 ways
    plan, why = choose_plan(SCMLayout(1, 2, 2, 8, 8), 3)
    assert plan is None and "runs on one" in why
    plan, why = choose_plan(SCMLayout(1, 4, 12, 8, 8), 2, "cfg")
    assert plan.mode == "frames" and why.startswith("cfg not possible")
    assert choose_plan(SCMLayout(2, 4, 12, 8, 8), 1)[0] is None


# --- processes -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def net():
    return load_model(WEIGHTS)


@pytest.fixture(scope="module", autouse=True)
def _stop_group():
    yield
    parallel.shutdown()


_REFS: dict = {}


def scene(views, frames):
    return scene_samples([1_000_000], views, frames, 32)[0]


def run(net, mode, specs, steps, group=None):
    views, frames, cfg = GRIDS[mode]
    s = scene(views, frames)
    return sample_grid(net, EDM_, s["noise"], karras_sigmas(steps), s["cond"], s["camera"], views, frames,
                       specs=specs, cfg=cfg, group=group, mode=mode)


def blocks_bypassed(stats) -> int:
    """Chains bypassed one block at a time (not as part of a whole skipped step)."""
    return stats.chains_bypassed - stats.steps_skipped * stats.blocks


def signals(stats, prefix):
    return [(i, name, v) for i, t in enumerate(stats.timeline) for name, vals in sorted(t["signal"].items())
            if name.startswith(prefix) for v, _ in vals]


def assert_same_signals(stats, ref_stats, prefix, rel=1e-5):
    got, want = signals(stats, prefix), signals(ref_stats, prefix)
    assert want and [(i, n) for i, n, _ in got] == [(i, n) for i, n, _ in want]
    for (_, name, a), (_, _, b) in zip(got, want):
        assert a == pytest.approx(b, rel=rel, abs=1e-7), name


def reference(net, mode, specs, steps):
    key = (mode, bool(specs), steps)
    if key not in _REFS:
        _REFS[key] = run(net, mode, specs, steps)
    return _REFS[key]


def worker_pids(group):
    return [p.pid for p in group.procs]


def alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by anyone) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("accel", ["full", "bypass"])
@pytest.mark.parametrize("mode", ["cfg", "frames", "views"])
@pytest.mark.parametrize("world", [2, 3])  # slowest-varying: one group of workers per world size
def test_each_mode_gives_the_one_process_result(net, world, mode, accel):
    specs, steps = ([], 2) if accel == "full" else (BYPASS, 5)
    ref, ref_stats = reference(net, mode, specs, steps)
    group = parallel.acquire(f"cpu:{world}")
    out, stats = run(net, mode, specs, steps, group)
    # fp32 on the CPU: the same arithmetic per image, only the sum order of some reductions differs.
    assert (out - ref).abs().max().item() < 1e-4
    par = stats.parallel
    split = mode if not (mode == "cfg" and world == 3) else "frames"  # 2 CFG halves do not split 3 ways
    ran = ref_stats.calls - ref_stats.steps_skipped  # one stream: a call per skipped step
    assert par["world"] == world and par["calls_by_mode"] == {split: ran}
    # Every rank's work is counted once: the same figures as in one process.
    assert stats.calls == ref_stats.calls and stats.chains_bypassed == ref_stats.chains_bypassed
    assert dict(stats.sequences_computed) == dict(ref_stats.sequences_computed)
    assert stats.compute_fraction == pytest.approx(ref_stats.compute_fraction, rel=1e-9)
    if accel == "bypass":
        # The run really skipped at both levels, else the comparison proves nothing about them.
        assert ref_stats.steps_skipped > 0
        assert blocks_bypassed(ref_stats) > 0
        for r in par["ranks"][1:]:  # a worker sees the calls that ran, not the steps skipped whole
            assert r["decisions"]["chains_bypassed"] == blocks_bypassed(stats)
            assert r["decisions"]["chains_ran"] == stats.chains_ran
        # The per-block estimates are over every rank's share: the one-process values.
        assert_same_signals(stats, ref_stats, "bypass.b")


def test_cache_and_prune_decide_on_the_same_signals_on_every_rank(net):
    """The cache's and the pruner's per-call signals are all-reduced, so every rank measures the same
    change and stands aside at the same calls. Which groups a rank refreshes follows its own share
    (the cache rotates over the frames a rank holds), so a frame split with the cache is close to
    the one-process result, not equal (a CFG split is equal: the next test)."""
    specs = [("cache", RollingCacheConfig(threshold=2.0, start_percent=0.0, max_age=2)),
             ("prune", TokenPrunerConfig(keep_start=0.5, keep_end=0.5, start_percent=0.0))]
    group = parallel.acquire("cpu:2")
    ref, ref_stats = run(net, "frames", specs, 4)
    out, stats = run(net, "frames", specs, 4, group)
    ranks = stats.parallel["ranks"]
    assert stats.cache_hits > 0
    mine = [t["signal"] for t in stats.timeline]
    assert any(k.startswith("cache.") for s in mine for k in s) and any(k.startswith("prune.") for s in mine for k in s)
    for r in ranks[1:]:
        assert r["signals"] == mine  # the same bits: one all-reduce, every rank reads its result
        assert r["decisions"]["calls_aside"] == stats.calls_aside
    assert ((out - ref).abs().mean() / ref.abs().mean()).item() < 0.05


def test_cfg_split_with_the_cache_is_exact(net):
    """Split into CFG halves, the cache's sequence groups and subsamples are the one-process ones,
    and its signals all-reduced, one collective per decision: the result is the one-process result."""
    specs = [("cache", RollingCacheConfig(threshold=2.0, start_percent=0.0, max_age=2))]
    group = parallel.acquire("cpu:2")
    ref, ref_stats = run(net, "cfg", specs, 4)
    _, plain = run(net, "cfg", [], 4, group)  # also sends the weights, if this group has none yet
    _, plain = run(net, "cfg", [], 4, group)
    out, stats = run(net, "cfg", specs, 4, group)
    # Each cache decision's two means (the change and its scale) travel in one all-reduce: every
    # one is a collective across the GPUs and a wait for the slower one.
    decisions = len(signals(stats, "cache."))
    for r, p in zip(stats.parallel["ranks"], plain.parallel["ranks"]):
        assert r["collectives"] - p["collectives"] == decisions > 0
    assert ref_stats.cache_hits > 0
    assert stats.cache_hits == ref_stats.cache_hits
    assert_same_signals(stats, ref_stats, "cache.")
    assert (out - ref).abs().max().item() < 1e-4


class OutsideNet(SCMNet):
    """A network class outside turbo_core: workers refuse to build it, a real error on rank 1."""


def test_a_workers_error_names_the_rank_and_the_next_run_succeeds(net):
    group = parallel.acquire("cpu:2")
    pids = worker_pids(group)
    stranger = OutsideNet(net.cfg)
    stranger.load_state_dict(net.state_dict())
    with pytest.raises(ParallelError, match=r"rank 1 \(cpu\) failed: .*refusing to build"):
        run(stranger.eval(), "frames", [], 2, group)
    assert not group.alive
    assert not any(alive(p) for p in pids)
    ref, _ = reference(net, "frames", [], 2)
    out, _ = run(net, "frames", [], 2, parallel.acquire("cpu:2"))
    assert (out - ref).abs().max().item() < 1e-4


def test_a_worker_killed_mid_run_is_reported_and_the_next_run_succeeds(net):
    group = parallel.acquire("cpu:3")
    pids = worker_pids(group)
    views, frames, cfg = GRIDS["frames"]
    s = scene(views, frames)

    def kill_rank_2(i, x, den):
        if i == 0:
            os.kill(pids[1], signal.SIGKILL)

    with pytest.raises(ParallelError, match=r"rank 2 \(cpu\) exited with code -9"):
        sample_grid(net, EDM_, s["noise"], karras_sigmas(3), s["cond"], s["camera"], views, frames, cfg=cfg,
                    group=group, mode="frames", callback=kill_rank_2)
    assert not group.alive
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)
    ref, _ = reference(net, "frames", [], 2)
    out, _ = run(net, "frames", [], 2, parallel.acquire("cpu:3"))
    assert (out - ref).abs().max().item() < 1e-4


class Interrupted(Exception):
    pass


def test_an_interrupt_between_calls_keeps_the_group_and_starts_the_next_run_clean(net):
    group = parallel.acquire("cpu:2")
    views, frames, cfg = GRIDS["frames"]
    s = scene(views, frames)

    def interrupt(i, x, den):
        if i == 0:
            raise Interrupted()

    with pytest.raises(Interrupted):
        sample_grid(net, EDM_, s["noise"], karras_sigmas(5), s["cond"], s["camera"], views, frames, cfg=cfg,
                    specs=BYPASS, group=group, mode="frames", callback=interrupt)
    assert group.alive and parallel.acquire("cpu:2") is group
    ref, ref_stats = reference(net, "frames", BYPASS, 5)
    out, stats = run(net, "frames", BYPASS, 5, group)
    assert (out - ref).abs().max().item() < 1e-4 and stats.calls == ref_stats.calls


def test_shutdown_leaves_no_worker_process():
    group = parallel.acquire("cpu:2")
    pids = worker_pids(group)
    assert pids and all(alive(p) for p in pids)
    parallel.shutdown()
    assert not group.alive and not any(alive(p) for p in pids)
    assert not torch.distributed.is_initialized()


def test_bench_multigpu_runs_on_cpu_processes(tmp_path):
    """The GPU benchmark's path end to end on two gloo processes at toy size."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "bench.bench_multigpu", "--device", "cpu", "--tiny", "--presets",
                        "off,fast", "--modes", "cfg,frames", "--cfgs", "2.0", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((out / "bench_multigpu.json").read_text())
    split = [row for row in res["rows"] if row["gpus"] == 2]
    assert {row["mode"] for row in split} == {"cfg", "frames"} and len(split) == 4
    for row in split:  # full compute and the preset give the one-process result split as well
        assert row["psnr_vs_1_db"] == "inf" or row["psnr_vs_1_db"] > 90, row
    assert {c["mode"] for c in res["comm"]} == {"cfg", "frames"}
    assert all(s is not None and 0 <= s < 1 for c in res["comm"] for s in c["comm_share_per_rank"])
    assert "| tiny | fast | 2.0 | 2 | frames |" in r.stdout


def test_workers_end_when_the_driving_process_dies_without_shutting_down():
    """A host killed outright runs no exit handler; its workers notice and end by themselves."""
    import subprocess
    import sys

    code = ("import os, sys; from turbo_core import parallel; g = parallel.acquire('cpu:2'); "
            "print(*[p.pid for p in g.procs], flush=True); os._exit(0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    pids = [int(p) for p in r.stdout.split()]
    assert r.returncode == 0 and pids, r.stderr[-2000:]
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids)


TORCHRUN_SCRIPT = """
import sys, torch
from turbo_core import parallel
from turbo_core.diffusion import EDM, karras_sigmas
from turbo_core.models import CONFIGS, SCMNet
torch.manual_seed(0)
net = SCMNet(CONFIGS["tiny"])
with torch.no_grad():
    for p in net.parameters():
        p.normal_(0, 0.08)
net.eval()
g = parallel.from_env()          # ranks > 0 serve rank 0 here and exit
n, s = 3 * 4, net.cfg.image_size
gen = torch.Generator().manual_seed(1)
noise, cond, cam = torch.randn(n, 3, s, s, generator=gen), torch.randn(n, 3, s, s, generator=gen), torch.rand(n, 2, generator=gen)
ref, _ = parallel.sample_grid(net, EDM(), noise, karras_sigmas(3), cond, cam, 3, 4, cfg=2.0)
out, st = parallel.sample_grid(net, EDM(), noise, karras_sigmas(3), cond, cam, 3, 4, cfg=2.0, group=g, mode="frames")
print("RESULT", g.rank, g.world, (out - ref).abs().max().item(), st.parallel["calls_by_mode"], flush=True)
parallel.shutdown()
"""


def test_a_torchrun_launch_is_joined(tmp_path):
    """Under torchrun every process runs the script; rank 0 drives, the others serve and exit."""
    import subprocess
    import sys

    script = tmp_path / "split.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    assert len(lines) == 1 and lines[0][1:3] == ["0", "2"], r.stdout
    assert float(lines[0][3]) < 1e-5 and "'frames': 3" in r.stdout


SV4D_SPECS = {
    "bypass": [("bypass", {"threshold": 100.0, "start_percent": 0.0, "end_percent": 1.0, "max_consecutive": 1})],
    # The UNet's own spans (its levels, nested): planned alike on both ranks, drifts all-reduced.
    "block_reuse": [("block_reuse", {"threshold": 10.0, "drift_prior": 0.05, "max_cache_mb": 64.0, "max_age": 3})],
}


@pytest.mark.parametrize("accel", ["bypass", "block_reuse"])
def test_sv4d_unet_cfg_halves_give_the_one_process_result(accel):
    """The SV4D 2.0 UNet (reduced width, random weights) splits by its CFG halves: per call, with the
    per-block Chain Bypass (all-reduced signals), or with block reuse of the UNet's declared spans
    (the same spans reused at the same calls as in one process), the one-process output."""
    from test_sv4d import inputs as sv4d_inputs, random_net as sv4d_net
    from turbo_core.accel.registry import build_run
    from turbo_core.parallel import ParallelNet, begin_run, end_run

    net = sv4d_net("sv4d2")
    inp = sv4d_inputs(batch=2, frames=1, views=2)
    specs = SV4D_SPECS[accel]
    sigmas = [10.0, 5.0, 2.5, 1.2, 0.0]
    lay = net.token_layout(4, 2, 1, 16, 16)
    work = net.block_work(lay)

    def sample(model, group=None):
        run = build_run(specs, backend="sdpa")
        run.begin()
        if group is not None:
            begin_run(group, specs, "sdpa")
        outs = []
        with torch.no_grad():
            for s in sigmas[:-1]:
                d = run.dispatch(lay, s, sigmas, stream="(0, 1)", blocks=net.blocks, work=work)
                t = torch.full((4,), 0.25 * torch.tensor(s).log().item())
                outs.append(run.model_call(d, inp["x"], lambda: model(inp["x"], t, inp["context"], inp["y"],
                                                                       inp["cond_view"], 2, 1, dispatch=d)))
                run.end_call(d)
        stats = run.end()
        if group is not None:
            end_run(group, stats)
        return torch.stack(outs), stats

    ref, ref_stats = sample(net)
    group = parallel.acquire("cpu:2")
    out, stats = sample(ParallelNet(net, group, "frames"), group)  # frames: SV4D runs it as cfg
    assert stats.parallel["calls_by_mode"] == {"cfg": len(sigmas) - 1}
    if accel == "block_reuse":
        assert ref_stats.spans_reused > 0 and ref_stats.spans_run > 0
        assert (stats.spans_reused, stats.blocks_reused, stats.spans_run) == \
            (ref_stats.spans_reused, ref_stats.blocks_reused, ref_stats.spans_run)
        # These spans' drift is a few 1e-4: a difference of residuals held in 16 bits, where the
        # split's round-off can move one half-precision step (2.4e-4 of a value, relative).
        assert_same_signals(stats, ref_stats, "block_reuse.", rel=2e-3)
        ranks = stats.parallel["ranks"]
        assert ranks[1]["decisions"] == ranks[0]["decisions"]
        assert ranks[1]["signals"] == [t["signal"] for t in stats.timeline]
        assert (out - ref).abs().max().item() < 1e-3  # round-off through the 16-bit residuals
        return
    assert (out - ref).abs().max().item() < 1e-4
    assert ref_stats.chains_bypassed > 0
    assert stats.chains_bypassed == ref_stats.chains_bypassed
    assert_same_signals(stats, ref_stats, "bypass.b")
    assert dict(stats.sequences_computed) == dict(ref_stats.sequences_computed)


def test_weights_arrive_aligned_whatever_the_sizes_before_them():
    """A worker's parameters are views of the buffers the weights travel in. SV4D's one-element mix
    factors sit between its matrices; packed back to back, every later weight started 2 bytes off
    a 16-byte boundary and its matrix products took a slow path (the split ran slower than one GPU).
    Packed with aligned offsets, every tensor starts a multiple of 256 bytes into its buffer and arrives unchanged."""
    from turbo_core.parallel.net import _buckets, pack, unpack

    gen = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(shape, generator=gen).to(torch.bfloat16)
             for i, shape in enumerate([(1,), (3, 5), (320, 320), (1,), (7,), (64, 3, 3, 3)])}
    entries = [(k, tuple(t.shape), "bfloat16") for k, t in state.items()]
    got, base = {}, {}
    for bucket in _buckets(entries):
        flat = pack(state, entries, bucket, "cpu")  # a CUDA buffer starts on a 256-byte boundary
        for k, t in unpack(flat, entries, bucket).items():
            got[k], base[k] = t, flat.data_ptr()
    assert got.keys() == state.keys()
    for k, t in got.items():
        assert (t.data_ptr() - base[k]) % 256 == 0, k
        assert torch.equal(t, state[k]), k


SYNC_SCRIPT = """
import os, torch, torch.distributed as dist
from turbo_core.parallel.comm import Comm
dist.init_process_group("nccl", rank=0, world_size=1)
dev = torch.device("cuda:0")
torch.cuda.set_device(dev)
comm = Comm(0, 1, dev)
xs = [torch.randn(4096, 320, device=dev, dtype=torch.bfloat16), torch.rand(77, device=dev)]
comm.means(xs)  # warm-up: NCCL's first collective sets itself up
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
got = comm.means(xs)
torch.cuda.set_sync_debug_mode("default")
want = [x.float().mean() for x in xs]
print("OK", all(torch.allclose(g, w, rtol=1e-5) for g, w in zip(got, want)), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host sync is a GPU's")
def test_signal_means_all_reduce_without_a_host_sync(tmp_path):
    """A split call's signal reduction queues its work and returns: the host never waits for the
    GPU inside it (a count tensor built from host numbers made it wait behind every queued kernel,
    once per signal)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": ROOT, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517",
           "NCCL_NVLS_ENABLE": "0"}
    r = subprocess.run([sys.executable, "-c", SYNC_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "OK True" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


# --- the per-call levels under a split ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["cfg", "frames", "views"])
def test_block_reuse_on_a_split_call_takes_the_one_process_decisions_on_every_rank(net, mode):
    """Block reuse on a split call: every rank reuses the spans one process reuses, at the same
    calls, on the same drift figures (the whole call's: the ranks' sums all-reduced), so the run
    finishes and its image is the one-process one but for round-off. With the output weighed (the
    default), which only rank 0 could: before, a worker (weight 1) ran spans rank 0 reused and
    waited in their drift's all-reduce while rank 0 gathered the images (the hang), and before that
    block reuse stood aside on split calls (nothing reused)."""
    specs = [("block_reuse", BlockReuseConfig(threshold=0.5, drift_prior=0.05, max_cache_mb=256.0))]
    unweighed = [("block_reuse", BlockReuseConfig(threshold=0.5, drift_prior=0.05, max_cache_mb=256.0,
                                                  weigh_output=False))]
    ref, ref_stats = run(net, mode, specs, 4)
    assert ref_stats.spans_reused > 0  # it reused, else the comparison proves nothing
    if mode == "cfg":  # the weight changes decisions here: a worker deciding unweighed would differ
        assert run(net, mode, unweighed, 4)[1].spans_reused != ref_stats.spans_reused
    group = parallel.acquire("cpu:2")
    with finishes_within(group, 120, f"a {mode} split with block reuse"):
        out, stats = run(net, mode, specs, 4, group)
    assert (stats.spans_reused, stats.blocks_reused, stats.spans_run) == \
        (ref_stats.spans_reused, ref_stats.blocks_reused, ref_stats.spans_run)
    assert_same_signals(stats, ref_stats, "block_reuse.")
    ranks = stats.parallel["ranks"]
    for r in ranks[1:]:
        assert r["decisions"] == ranks[0]["decisions"]
        assert r["signals"] == [t["signal"] for t in stats.timeline]  # the same bits on every rank
    plain, _ = reference(net, mode, [], 4)
    split_plain, _ = run(net, mode, [], 4, group)
    # Round-off: the split's own (batch halves) reaches the residuals cached in 16 bits, where it can
    # flip one half-precision step (about 5e-4 of a residual near 1); the reuse's own change of the
    # image is far larger, so the bound still tells reuse taken differently apart.
    assert (out - ref).abs().max().item() < 1e-3
    assert (ref - plain).abs().max().item() > 10 * max((out - ref).abs().max().item(), 1e-4)
    assert (split_plain - plain).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", ["cfg", "frames"])
def test_token_reuse_stands_aside_on_split_calls_on_every_rank_and_says_so(net, mode):
    """Token reuse picks its top-k tokens from each rank's own share, so the ranks' picks would
    differ: on a split call it stands aside on every rank alike and says so, and the run is the
    one-process full-compute result."""
    from turbo_core.accel.token_reuse import SPLIT_ASIDE as TOKEN_ASIDE, TokenReuseConfig

    specs = [("token_reuse", TokenReuseConfig(threshold=10.0, max_cache_mb=64.0))]
    _, one = run(net, mode, specs, 4)
    assert one.tokens_computed < one.tokens_offered  # in one process the settings do reuse
    ref, _ = reference(net, mode, [], 4)
    group = parallel.acquire("cpu:2")
    with finishes_within(group, 120, f"a {mode} split with token reuse"):
        out, stats = run(net, mode, specs, 4, group)
    assert (out - ref).abs().max().item() < 1e-4
    assert stats.tokens_computed == stats.tokens_offered
    assert TOKEN_ASIDE in stats.notes
