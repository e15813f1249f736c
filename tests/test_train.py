"""Training on CPU at toy size: the loss falls, a resumed run equals an uninterrupted one, the
sharded state round-trips, and the export is a small fp16 file that load_model reads."""
import json
import os

import pytest
import torch
from safetensors import safe_open

from turbo_core.models import CONFIGS, SCMNet
from turbo_core.models.io import load_model, read_metadata
from turbo_core.data.scenes import EVAL_SEED_START, TRAIN_SEEDS
from turbo_core.train.batches import make_batch
from turbo_core.train.cli import main
from turbo_core.train.config import TrainConfig
from turbo_core.train.loop import Trainer, train
from turbo_core.train.shards import load_sharded, save_sharded

TOY = dict(model="tiny", images_per_step=24, views=(2, 3), frames=(2, 4), warmup_steps=2)


def test_batch_is_a_function_of_the_step_and_follows_the_contract():
    tcfg = TrainConfig(**TOY)
    mcfg = CONFIGS["tiny"]
    a, b = make_batch(7, tcfg, mcfg, "cpu"), make_batch(7, tcfg, mcfg, "cpu")
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["noise"], b["noise"]) and a["seeds"] == b["seeds"]
    assert all(0 <= s < TRAIN_SEEDS <= EVAL_SEED_START for s in a["seeds"])
    V, F, S = a["views"], a["frames"], a["scenes"]
    assert a["x"].shape == (S * F * V, 3, 16, 16) and S == max(1, 24 // (V * F))
    x = a["x"].view(S, F, V, 3, 16, 16)
    cond = a["cond"].view(S, F, V, 3, 16, 16)
    for s in range(S):  # every image is conditioned on view 0 of its own frame, or on nothing (dropout)
        kept = cond[s].abs().sum() > 0
        ref = x[s, :, 0:1].expand(F, V, 3, 16, 16)
        assert torch.equal(cond[s], ref if kept else torch.zeros_like(ref))
    cam = a["camera"].view(S, F, V, 2)
    assert torch.all(cam[..., 0, 0] == 0)  # azimuths are relative to the reference view
    assert torch.equal(cam[0, 0], cam[-1, -1])
    assert (a["sigma"].view(S, F * V) == a["sigma"].view(S, F * V)[:, :1]).all()  # one noise level per scene
    # different steps see different grids or scenes
    c = make_batch(8, tcfg, mcfg, "cpu")
    assert c["seeds"] != a["seeds"]


def test_toy_training_lowers_the_loss_on_a_fixed_batch():
    tr = Trainer(TrainConfig(**TOY, lr=2e-3), "cpu")
    batch = make_batch(0, tr.tcfg, tr.mcfg, "cpu")
    before = tr.batch_loss(batch)
    for _ in range(25):
        tr.train_step(batch)
    after = tr.batch_loss(batch)
    assert after < 0.7 * before, (before, after)
    assert tr.step == 25
    # the EMA moved off the initial weights but lags the live ones
    init = Trainer(TrainConfig(**TOY, lr=2e-3), "cpu").net.state_dict()
    k = "blocks.0.mlp.fc2.weight"
    assert not torch.equal(tr.ema.state_dict()[k], init[k])
    assert not torch.equal(tr.ema.state_dict()[k], tr.net.state_dict()[k])


def _state(run_dir):
    tensors, meta = load_sharded(run_dir)
    return tensors, meta


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    tcfg = TrainConfig(**TOY, total_steps=5)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train(straight, tcfg, "cpu", validate=False, log_every=2)
    train(split, tcfg, "cpu", validate=False, log_every=2, steps=3)
    assert int(_state(split)[1]["step"]) == 3
    train(split, None, "cpu", validate=False, resume=True, log_every=2)
    a, ma = _state(straight)
    b, mb = _state(split)
    assert ma["step"] == mb["step"] == "5"
    assert set(a) == set(b)
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line) for line in open(os.path.join(split, "log.jsonl"))]
    assert [r["step"] for r in log if r.get("event") == "saved"] == [3, 5]


def test_compact_state_halves_the_bytes_and_resumes_close_to_the_full_one(tmp_path):
    tcfg = TrainConfig(**TOY, total_steps=6)
    run, small = str(tmp_path / "run"), str(tmp_path / "small")
    train(run, tcfg, "cpu", validate=False, log_every=2, steps=3)
    main(["--compact", run, "--to", small])
    full, meta = _state(run)
    half, hmeta = _state(small)
    assert set(full) == set(half) and hmeta["step"] == meta["step"] == "3" and "compact" in hmeta["precision"]
    for k, v in full.items():
        if v.dim() == 0:  # counters stay exact
            assert torch.equal(half[k], v), k
        else:
            assert half[k].dtype == (torch.bfloat16 if k.startswith("optim.") else torch.float16), k
            assert torch.allclose(half[k].float(), v, rtol=1e-2, atol=1e-6), k
    size = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
    assert size(small) < 0.6 * size(run)
    # both resume to the end of the schedule; the one rounding leaves the weights close
    train(run, None, "cpu", validate=False, resume=True, log_every=2)
    train(small, None, "cpu", validate=False, resume=True, log_every=2)
    a, b = _state(run)[0], _state(small)[0]
    assert b["model.out.weight"].dtype == torch.float32  # resumed in full precision
    for k in a:
        if k.startswith("ema.") and a[k].dim() > 0:
            assert torch.allclose(a[k], b[k], rtol=2e-2, atol=2e-3), k


def test_sharded_state_round_trips_and_rejects_mixed_saves(tmp_path):
    t = {f"w{i}": torch.full((1000,), float(i)) for i in range(5)}  # 4 kB each
    files = save_sharded(t, str(tmp_path), {"step": "1"}, shard_bytes=9000)
    assert len(files) == 3 and all(os.path.getsize(f) < 9000 + 2000 for f in files)
    back, meta = load_sharded(str(tmp_path))
    assert meta["step"] == "1" and all(torch.equal(back[k], t[k]) for k in t)
    # one shard from another save must not be mixed in silently
    other = str(tmp_path / "other")
    save_sharded(t, other, {"step": "2"}, shard_bytes=9000)
    os.replace(os.path.join(other, "state-1.safetensors"), tmp_path / "state-1.safetensors")
    with pytest.raises(ValueError, match="another save"):
        load_sharded(str(tmp_path))
    # a smaller later save removes the shards it no longer has
    save_sharded(t, str(tmp_path), {"step": "3"})
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors")) == ["state.safetensors"]
    with pytest.raises(FileNotFoundError, match="without --resume"):
        load_sharded(str(tmp_path / "nowhere"))


def test_export_is_fp16_loadable_and_small(tmp_path):
    run = str(tmp_path / "run")
    train(run, TrainConfig(**TOY, total_steps=2), "cpu", validate=False)
    out = str(tmp_path / "m.safetensors")
    assert main(["--export", run, "--to", out]) == 0
    net = load_model(out)
    meta = read_metadata(out)
    assert meta["training_steps"] == "2" and "synth4d" in meta["data"]
    with safe_open(out, framework="pt") as f:
        assert f.get_tensor("out.weight").dtype == torch.float16
    tensors, _ = load_sharded(run)
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    for k, v in net.state_dict().items():
        assert torch.allclose(v, ema[k], atol=1e-3, rtol=1e-3), k
    # the embedded default's export must stay under 16 MB: 2 bytes per parameter plus a small header
    params = sum(p.numel() for p in SCMNet(CONFIGS["default"]).parameters())
    assert 2 * params + 100_000 < 16 * 10 ** 6


def test_cli_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--export", str(tmp_path)])
    assert "--to" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown model config"):
        TrainConfig(model="huge")


def test_training_attention_candidates_agree_and_tuning_picks_one():
    from turbo_core.dispatch import naive_attention
    from turbo_core.train.attention import ATTENTION_CANDIDATES, TrainingAttention

    g = torch.Generator().manual_seed(3)
    for L in (2, 5, 12):
        q, k, v = (torch.randn(7, 2, L, 8, generator=g) for _ in range(3))
        ref = naive_attention(q, k, v)
        for name, fn in ATTENTION_CANDIDATES.items():
            assert torch.allclose(fn(q, k, v), ref, atol=1e-5), (name, L)
    ta = TrainingAttention()
    choice = ta.tune([2, 4], images=4, tokens=16, heads=2, dim=8, device="cpu", dtype=torch.float32, repeats=1)
    assert set(choice) == {2, 4} and all(c in ATTENTION_CANDIDATES for c in choice.values())
    q = torch.randn(3, 2, 4, 8, generator=g)
    assert torch.allclose(ta(q, q, q), naive_attention(q, q, q), atol=1e-5)


def test_resume_with_overrides_records_the_change(tmp_path):
    run = str(tmp_path / "run")
    train(run, TrainConfig(**TOY, total_steps=4), "cpu", validate=False, steps=2)
    tr = train(run, None, "cpu", validate=False, resume=True, overrides={"p_mean": 0.0, "total_steps": 3})
    assert tr.step == 3 and tr.tcfg.p_mean == 0.0 and tr.edm.p_mean == 0.0
    _, meta = load_sharded(run)
    assert json.loads(meta["config_history"]) == [{"step": 2, "changes": {"p_mean": 0.0, "total_steps": 3}}]
    assert json.loads(meta["train_config"])["p_mean"] == 0.0


def test_px64_config_has_32x32_tokens_trains_a_step_and_samples_at_64px():
    """The network the per-call levels are checked on at a realistic token count (BENCHMARKS.md,
    "At 32 x 32 tokens per image"): the default's network at 64 x 64 px builds, a training step on
    its 64 px scenes changes it, and the sampler returns every view at 64 px."""
    from turbo_core.data.synth4d import SceneConfig, render_batch
    from turbo_core.evaluate import generate

    mcfg = CONFIGS["px64"]
    assert mcfg.grid == 32 and mcfg.image_size == 64
    assert (mcfg.width, mcfg.depth, mcfg.heads) == (CONFIGS["default"].width, CONFIGS["default"].depth,
                                                    CONFIGS["default"].heads)
    torch.manual_seed(0)
    tr = Trainer(TrainConfig(model="px64", images_per_step=4, views=(2,), frames=(2,), warmup_steps=1), "cpu")
    batch = make_batch(0, tr.tcfg, tr.mcfg, "cpu", tr.edm)
    assert batch["x"].shape == (4, 3, 64, 64)
    before = tr.net.blocks[0].spatial.qkv.weight.detach().clone()
    loss, gnorm = tr.train_step(batch)
    assert torch.isfinite(loss) and torch.isfinite(gnorm) and float(gnorm) > 0
    assert not torch.equal(before, tr.net.blocks[0].spatial.qkv.weight)
    data = render_batch([EVAL_SEED_START], SceneConfig(size=64, views=2, frames=2), "cpu")
    out = generate(tr.ema.eval(), data["images"][:, :, 0], data["cameras"], steps=2)
    assert out.shape == (1, 2, 2, 3, 64, 64) and torch.isfinite(out).all()


def test_warm_start_from_exported_weights_continues_their_step_count_and_restarts_the_schedule(tmp_path):
    """scripts/gpu_train.sh RESUME=1 with no run state: training continues from the shipped weights
    (safetensors), counting steps and time on from theirs, with a fresh warm-up and cosine."""
    run, out = str(tmp_path / "run"), str(tmp_path / "m.safetensors")
    train(run, TrainConfig(**TOY, total_steps=4, lr=2e-3), "cpu", validate=False)
    main(["--export", run, "--to", out])
    shipped = load_model(out).state_dict()
    warm = str(tmp_path / "warm")
    # no step yet: the live network and the EMA are the file's weights, the count is the file's
    tr = train(warm, None, "cpu", validate=False, init_from=out, overrides={"total_steps": 3}, steps=0)
    assert tr.step == 4 and tr.tcfg.model == "tiny" and tr.tcfg.lr == 2e-3
    assert (tr.tcfg.schedule_start, tr.tcfg.total_steps) == (4, 7)
    for k, v in shipped.items():
        assert torch.equal(tr.net.state_dict()[k], v) and torch.equal(tr.ema.state_dict()[k], v), k
    assert tr.lr_at(4) == pytest.approx(2e-3 / TOY["warmup_steps"])  # warm-up again, from the new start
    assert tr.lr_at(6) == pytest.approx(2e-3)                          # then the cosine, to the new end
    assert tr.lr_at(7) == pytest.approx(0.05 * 2e-3)
    _, meta = load_sharded(warm)
    hist = json.loads(meta["config_history"])
    assert hist[-1]["step"] == 4 and hist[-1]["warm_start"] == "m.safetensors"
    assert hist[-1]["changes"] == {"total_steps": 7, "schedule_start": 4}
    # the run then trains on and resumes like any other; its export carries the continued count
    train(warm, None, "cpu", validate=False, resume=True)
    again = str(tmp_path / "again.safetensors")
    main(["--export", warm, "--to", again])
    assert read_metadata(again)["training_steps"] == "7"
    assert not torch.equal(load_model(again).state_dict()["out.weight"], shipped["out.weight"])


def test_warm_start_refuses_pickles_a_used_run_folder_and_a_missing_length(tmp_path):
    run, out = str(tmp_path / "run"), str(tmp_path / "m.safetensors")
    train(run, TrainConfig(**TOY, total_steps=2), "cpu", validate=False)
    main(["--export", run, "--to", out])
    pt = tmp_path / "m.pt"
    pt.write_bytes(b"\x80\x04K\x01.")  # a pickle: never unpickled
    from turbo_core.models.io import CheckpointError
    with pytest.raises(CheckpointError, match="safetensors only"):
        train(str(tmp_path / "w1"), None, "cpu", validate=False, init_from=str(pt), overrides={"total_steps": 2})
    with pytest.raises(ValueError, match="--resume"):
        train(run, None, "cpu", validate=False, init_from=out, overrides={"total_steps": 2})
    with pytest.raises(ValueError, match="--steps N"):
        train(str(tmp_path / "w2"), None, "cpu", validate=False, init_from=out)
    with pytest.raises(ValueError, match="--config tiny"):
        train(str(tmp_path / "w3"), TrainConfig(model="default"), "cpu", validate=False, init_from=out,
              overrides={"total_steps": 2})


def _data_parallel_worker(rank, world, port, run, out_dir):
    import torch.distributed as dist
    from safetensors.torch import save_file

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tr = train(run, TrainConfig(**TOY, total_steps=3), "cpu", validate=False, log_every=1)
        save_file({k: v.contiguous() for k, v in tr.net.state_dict().items()},
                  os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_data_parallel_on_two_gloo_processes_keeps_equal_weights_and_trains_on_both_ranks_scenes(tmp_path):
    """The torchrun path of scripts/gpu_train.sh (NGPU=2) on a CPU: gradients averaged over two
    processes, each on its own scenes; rank 0 saves; the weights stay identical on both."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = str(tmp_path / "ddp")
    mp.spawn(_data_parallel_worker, args=(2, port, run, str(tmp_path)), nprocs=2, join=True)
    w0, w1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    tensors, meta = load_sharded(run)
    assert meta["step"] == "3" and json.loads(meta["train_config"])["data_parallel"] == 2
    assert float(meta["gpu_seconds"]) > 1.5 * float(meta["wall_seconds"])  # two processes' time
    for k in w0:
        assert torch.equal(tensors["model." + k], w0[k]), k
    # the two ranks render different scenes, so the run is not the single-process one
    tcfg = TrainConfig(**TOY)
    assert make_batch(1, tcfg, CONFIGS["tiny"], "cpu")["seeds"] != make_batch(1, tcfg, CONFIGS["tiny"], "cpu", rank=1)["seeds"]
    single = train(str(tmp_path / "single"), TrainConfig(**TOY, total_steps=3), "cpu", validate=False)
    assert not torch.equal(single.net.state_dict()["out.weight"], w0["out.weight"])
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert log[0]["processes"] == 2 and sum(r.get("event") == "start" for r in log) == 1  # rank 0 alone logs
