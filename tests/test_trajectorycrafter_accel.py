"""The per-call accelerators on TrajectoryCrafter's DiT (issue 17, item 4), at reduced width on CPU:
block reuse takes the blocks' joint text + video stream as it comes through dispatch.chain, token
reuse reaches the blocks' token-level form (`DiTBlock.forward_tokens`) through it, and the work
they skip is work the network really does not do: counted by hooks on its layers, independently
of the run's stats, and equal to what the dispatch counted. The sampling driver is the benchmark's
(bench/bench_trajectorycrafter.py: the reference's DDIM through a Turbo4DRun, as the ComfyUI
adapter drives it)."""
from collections import defaultdict

import pytest
import torch

from bench.bench_trajectorycrafter import SHAPES, latent_psnr, make_inputs, sample_ours
from turbo_core.accel.base import Accelerator
from turbo_core.accel.block_reuse import BlockReuseConfig
from turbo_core.accel.token_reuse import TokenReuseConfig
from turbo_core.dispatch import SCMDispatch
from turbo_core.layout import JointLayout

from test_trajectorycrafter import call, ref_latents, tiny_net

STEPS = 10


class Rows:
    """Token rows through each block's query projection and feed-forward (forward hooks)."""

    def __init__(self, net):
        self.rows = defaultdict(int)
        self.handles = []
        for blk in net.transformer_blocks:
            # forward is the whole block; the token form (forward_tokens) does not pass here
            self.handles.append(blk.register_forward_hook(
                lambda m, a, out: self.rows.__setitem__("whole", self.rows["whole"] + 1)))
            for key, mod in (("queries", blk.attn1.to_q), ("mlp", blk.ff.net[0].proj)):
                self.handles.append(mod.register_forward_hook(
                    lambda m, a, out, key=key: self.rows.__setitem__(key, self.rows[key] + out.numel() // out.shape[-1])))

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def setup():
    net = tiny_net()
    inp = make_inputs(net.cfg, SHAPES["tiny"], "cpu", torch.float32)
    full = sample_ours(net, inp, STEPS)[0]
    tokens = SHAPES["tiny"]["text"] + SHAPES["tiny"]["frames"] * SHAPES["tiny"]["height"] * SHAPES["tiny"]["width"] // 4
    return net, inp, full, tokens


class TokenProbe(Accelerator):
    """Runs every block whole and, beside it, its token-level form at some positions (text and
    video tokens alike), recording how far the two differ there."""

    name = "probe"

    def __init__(self, pick):
        super().__init__()
        self.pick, self.errors = pick, []

    def chain(self, dispatch, block, x, nxt):
        y = nxt(x)
        pos = self.pick(x.shape[1]).expand(x.shape[0], -1)
        part = nxt.tokens(x, pos)
        want = torch.gather(y, 1, pos[..., None].expand(-1, -1, y.shape[-1]))
        self.errors.append(float((part - want).abs().max() / want.abs().max()))
        return y


@pytest.mark.parametrize("pick", [lambda n: torch.arange(n)[None],                 # every position
                                  lambda n: torch.tensor([[0, 3, 4, 5, 9, n - 1]])])  # text, video, the last
def test_block_token_form_equals_the_block_at_its_positions(pick):
    """DiTBlock.forward_tokens, reached as the chain's `tokens` through the dispatch, gives the
    block's own output at the positions asked for (blocks with and without a perceiver), the
    queries there attending to every token's keys and values."""
    net = tiny_net()
    kw = call(batch=2, frames=2, h=4, w=6, text=5)
    ref = net.reference(ref_latents(batch=2)[:, :1])
    probe = TokenProbe(pick)
    layout = net.token_layout(2, 5, 2, 4, 6, ref.tokens)
    with torch.no_grad():
        net(**kw, reference=ref, dispatch=SCMDispatch(layout, None, [probe]))
    assert len(probe.errors) == net.depth
    assert max(probe.errors) < 1e-5, probe.errors


def test_joint_layout_token_rows_address_the_flattened_stream():
    lay = JointLayout(2, 3, 1, 2, 2)
    assert lay.tokens == 7 and lay.token_images == 2
    pos = torch.tensor([[0, 4], [1, 6]])
    assert lay.token_rows(pos).tolist() == [0, 4, 8, 13]
    with pytest.raises(ValueError, match="batch=2"):
        lay.token_rows(torch.tensor([0, 1]))


def test_block_reuse_skips_whole_dit_blocks_of_the_joint_stream(setup):
    """Block reuse on TrajectoryCrafter: spans of DiT blocks skipped at some calls (their cached
    residual of the whole text + video stream added instead); the blocks that did not run did no
    work (query projections and feed-forward rows counted by hooks = the blocks the dispatch ran),
    and the result stays close to full compute."""
    net, inp, full, tokens = setup
    rows = Rows(net)
    try:
        x, _, calls, s, _ = sample_ours(net, inp, STEPS, [("block_reuse", BlockReuseConfig(threshold=0.4))])
    finally:
        rows.close()
    assert calls == STEPS and s["blocks_reused"] > 0 and s["spans_reused"] > 0
    ran = calls * net.depth - s["blocks_reused"]
    assert rows.rows["whole"] == ran
    assert rows.rows["queries"] == rows.rows["mlp"] == ran * 2 * tokens  # batch 2: both CFG halves
    assert s["sequences_computed"]["joint"] == 2 * ran
    assert s["compute_fraction"] < 0.9
    assert 30 < latent_psnr(x, full) < float("inf")


def test_token_reuse_computes_part_of_the_joint_tokens(setup):
    """Token reuse on TrajectoryCrafter: spans of blocks run on a share of the joint token
    positions; the feed-forward rows the network really computed (hooks) are the whole-block runs
    plus the kept tokens the dispatch counted, fewer than full compute's, and the result stays
    close to full compute."""
    net, inp, full, tokens = setup
    rows = Rows(net)
    stats = {}
    try:
        x, _, calls, s, _ = sample_ours(net, inp, STEPS, [("token_reuse", TokenReuseConfig(threshold=0.4, keep_min=0.25))],
                                        stats_out=stats)
    finally:
        rows.close()
    assert 0 < s["tokens_computed"] < s["tokens_offered"]
    assert rows.rows["mlp"] == rows.rows["whole"] * 2 * tokens + s["tokens_computed"]
    assert stats["stats"].chains_ran == calls * net.depth  # every block ran, whole or on its kept tokens
    assert rows.rows["mlp"] < calls * net.depth * 2 * tokens
    assert 30 < latent_psnr(x, full) < float("inf")
