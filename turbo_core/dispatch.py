"""The one door every SCM sub-attention goes through.

The network never calls attention directly. Each block hands the dispatch its sub-attention as a
`compute(seqs, index)` function over axis sequences (see `layout.py`) and its whole chain as a
`chain(x)` function; the dispatch passes them through the active accelerators in order, and each
accelerator may answer from its cache, narrow the work to a subset of sequences, or let it run.
`compute` must accept any subset: `seqs` are the selected sequences and `index` their positions
among all sequences of the axis (None = all of them, in order).

`attend_grid` is the camera/motion entry: the block also hands over the same sub-attention
computed on the image-major tokens where they lie, which runs (through the short-axis kernel of
`kernels/`) when no accelerator looks at that axis's sequences, sparing the sequence copies.

`span` is the entry of a network's own spans: a part of the network (several blocks, convolutions,
a whole UNet level with everything below it) given as a function x -> y of x's shape, which an
accelerator may answer from a cache of its residual y - x (block reuse). A network that has them
declares them up front (`with_spans`, outermost first; spans may nest), so that an accelerator can
plan its memory before the first one runs and knows that they, not its chains, are the units.

Execution policy: a dispatch with `pieces` (a memory.MemoryConfig, see `in_pieces`) runs each
sub-attention's sequences a piece at a time under the accelerators, sized from the free GPU memory,
and falls back from a grid path that runs out of memory to the sequence path in pieces.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .kernels import short_axis
from .kernels.short_axis import grid_attention, short_axis_sdpa
from .layout import AXES, SCMLayout
from .memory import MemoryConfig, attend_in_pieces, note_retry, piece_budget
from .schedule import StepInfo

Compute = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
Chain = Callable[[torch.Tensor], torch.Tensor]
Tokens = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Next:
    """The rest of a block's chain as an accelerator sees it: call it with the block input; where
    the block can compute part of its tokens, `tokens(x, pos)` does that (else None); `stream`:
    the model's blocks feed each other this stream directly (see SCMDispatch.chain)."""

    __slots__ = ("fn", "tokens", "stream")

    def __init__(self, fn: Chain, tokens: Optional[Tokens], stream: bool = False):
        self.fn, self.tokens, self.stream = fn, tokens, stream

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h)


@dataclass(frozen=True)
class Span:
    """A span a network hands to `SCMDispatch.span`: its `key` (any hashable, unique in a call),
    the dispatch blocks (chains) inside it and how many other modules (res blocks, up/down
    sampling) it holds, for the account of the work that a reuse of it skips, and its stream's
    shape."""

    key: object
    blocks: tuple = ()
    modules: int = 0
    shape: tuple = ()  # the stream's shape at its input (and output), so a cache can be planned first
    # "residual": a function x -> y handed to `span` (block reuse's unit). "tokens": one dispatch
    # block (blocks == (block,)) whose chain, handed to `chain` with a token-level form, is a span of
    # its own on a stream of `shape` (images, tokens, channels) (token reuse's unit where the blocks
    # do not feed each other one stream, e.g. a UNet's attention layers between its res blocks).
    form: str = "residual"


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(S, heads, L, d) -> (S, heads, L, d) with PyTorch's fused kernels (CPU and CUDA)."""
    return F.scaled_dot_product_attention(q, k, v)


MAX_ATTENTION_BATCH = 32768


def chunked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sdpa over at most MAX_ATTENTION_BATCH sequences per kernel: the fused CUDA kernels put the
    sequence count in a grid dimension capped at 65535, and the camera and motion axes of a
    training batch or of many scenes evaluated together hold far more sequences (one per token of
    each frame or view)."""
    n = q.shape[0]
    if n <= MAX_ATTENTION_BATCH:
        return sdpa(q, k, v)
    return torch.cat([sdpa(q[i:i + MAX_ATTENTION_BATCH], k[i:i + MAX_ATTENTION_BATCH], v[i:i + MAX_ATTENTION_BATCH])
                      for i in range(0, n, MAX_ATTENTION_BATCH)])


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference softmax(q k^T / sqrt(d)) v, computed in fp32; for tests."""
    scale = q.shape[-1] ** -0.5
    w = torch.einsum("shld,shmd->shlm", q.float(), k.float()) * scale
    return torch.einsum("shlm,shmd->shld", w.softmax(-1), v.float()).to(q.dtype)


# "short-axis": the Triton short-axis kernel for sequences of 2..32 on CUDA, SDPA for the rest.
BACKENDS = {"sdpa": sdpa, "naive": naive_attention, "short-axis": short_axis_sdpa}
_KERNEL_OK = (sdpa, short_axis_sdpa)  # backends the grid path may replace by the kernel


def _sees_sequences(acc, dispatch) -> bool:
    """Whether an accelerator acts on this call's sub-attentions; one that only acts on chains (the
    bypass), or stands aside for the call, leaves them to the grid path."""
    sees = getattr(acc, "sees_sequences", None)
    if sees is not None:
        return bool(sees(dispatch))
    return callable(getattr(acc, "attend", None))  # a duck-typed accelerator: assume it does


class SCMDispatch:
    """Routes one model call's sub-attentions and chains through the accelerators."""

    def __init__(self, layout: SCMLayout, step: Optional[StepInfo] = None,
                 accelerators: Sequence = (), backend: str = "sdpa", stats=None,
                 grid: bool = True):
        # A backend is a name from BACKENDS or an attention function itself (q, k, v) -> o, e.g. a
        # counting wrapper in tests or a fused kernel a host provides.
        if callable(backend):
            attention = backend
        elif backend in BACKENDS:
            attention = BACKENDS[backend]
        else:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {sorted(BACKENDS)} "
                             f"or a function (q, k, v) -> o")
        self.layout = layout
        self.step = step
        self.accelerators = list(accelerators)
        self.attention = attention
        self.stats = stats
        # grid=True: camera/motion sub-attentions that no accelerator looks at run on the
        # image-major tokens (attend_grid) when no gradients are wanted and TURBO4D_SHORT_AXIS is
        # not "torch"; False keeps them as sequences. Where the kernel cannot run (no Triton, a
        # custom backend) the grid path's attention transposes q, k, v and o (four copies) where
        # the sequence path copies the input and the output once, so it is a little slower than
        # sequences there and clearly faster with the kernel (BENCHMARKS.md, SV4D 2.0 on a GPU).
        self.grid = grid
        self.pieces: Optional[MemoryConfig] = None  # the execution policy set by in_pieces

    def in_pieces(self, config: MemoryConfig, device=None, largest_bytes: Optional[int] = None) -> "SCMDispatch":
        """This dispatch (same step, accelerators, stats, backend) with its sub-attentions run in
        pieces of `config`. `largest_bytes`: the transient memory of the call's largest
        sub-attention in one piece; when it is over the budget now, or a grid path of the run has
        already run out of memory, camera and motion leave the grid path (which runs them whole)
        for the sequence path, in pieces."""
        view = copy.copy(self)
        view.pieces = config
        if view.grid:
            budget = piece_budget(config, device)
            if config.caps.get("grid") is False or (
                    largest_bytes is not None and budget is not None and largest_bytes > budget):
                view.grid = False
        return view

    def attend(self, block: int, axis: str, seqs: torch.Tensor, compute: Compute) -> torch.Tensor:
        if axis not in self.layout.axes:  # SCMLayout: spatial/camera/motion; JointLayout: joint/perceiver
            raise ValueError(f"unknown axis {axis!r} for {type(self.layout).__name__}; expected one of "
                             f"{self.layout.axes}")
        counted = self._counted(block, axis, compute)

        def run_from(i: int, s: torch.Tensor, index):
            if i == len(self.accelerators):
                if self.pieces is None:
                    return counted(s, index)
                return attend_in_pieces(s, index, counted, self.pieces, block, axis,
                                        on_retry=lambda a, b: self._uncount(block, axis, b - a))
            acc = self.accelerators[i]
            return acc.attend(self, block, axis, s, index, lambda s2, idx2: run_from(i + 1, s2, idx2))

        try:
            return run_from(0, seqs, None)
        finally:
            # run_from refers to itself: a reference cycle that would keep what the closures hold (the
            # compute functions and the activations they capture) until the next garbage collection;
            # unlinked here, all of it is freed when the call returns.
            run_from = None

    def attend_grid(self, block: int, axis: str, x: torch.Tensor, compute: Compute,
                    grid: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    to_axis=None, from_axis=None) -> torch.Tensor:
        """A camera/motion sub-attention of image-major tokens x (N, tokens, c) -> its image-major
        output. `grid(x)` is the same sub-attention computed on x where it lies (projections per
        token, attention through `grid_attention`); it runs when no accelerator looks at this
        axis's sequences, so no sequence copy of x is made. Otherwise the sequences
        (`to_axis`, default the layout's) go through `attend` and come back through `from_axis`.
        In pieces, a grid path that runs out of memory runs again on the sequence path."""
        if grid is not None and self._grid_applies(x) and not any(_sees_sequences(a, self) for a in self.accelerators):
            if axis not in AXES:
                raise ValueError(f"unknown SCM axis {axis!r}")
            total = self.layout.axis_shape(axis)[0]
            if self.stats is not None:
                self.stats.attention_ran(block, axis, computed=total, total=total)
            if self.pieces is None:
                return grid(x)
            failed = False
            try:
                return grid(x)
            except torch.cuda.OutOfMemoryError:
                failed = True  # handled outside the except clause: the traceback holds the grid path's tensors
            if failed:
                self._uncount(block, axis, total)  # counted above before it ran; the sequences count again
                note_retry(self.pieces, f"Turbo4D: out of GPU memory in {axis} attention of block {block} run "
                                        f"whole; running it in pieces of sequences from now on")
                self.pieces.caps["grid"] = False
        seqs = to_axis(x) if to_axis is not None else self.layout.to_axis(x, axis)
        out = self.attend(block, axis, seqs, compute)
        return from_axis(out) if from_axis is not None else self.layout.from_axis(out, axis)

    def _grid_applies(self, x: torch.Tensor) -> bool:
        # With gradients on (training) the forward-only kernel never runs and the grid path would
        # only add its transposes; TURBO4D_SHORT_AXIS=torch asks for the plain SDPA path.
        return bool(self.grid) and not torch.is_grad_enabled() and short_axis.mode() != "torch"

    def grid_attention(self, view: Callable[[torch.Tensor], torch.Tensor]):
        """(q, k, v, heads) -> o over image-major projections, the sequences laid out by `view`
        (e.g. `layout.axis_view`): the short-axis kernel where it applies and the backend is
        SDPA, else this dispatch's backend with the transposes."""
        return grid_attention(view, self.attention, kernel=self.attention in _KERNEL_OK)

    def chain(self, block: int, x: torch.Tensor, chain: Chain, tokens: Optional[Tokens] = None,
              stream: bool = False) -> torch.Tensor:
        """A block's whole chain through the accelerators' `chain` hooks. `tokens(x, pos)` (optional)
        computes the same block's output at token positions `pos` only ((batch, k) positions of
        the image grid, the same in every image of a batch item), reading the whole input x for
        what mixes tokens (spatial keys and values); an accelerator reaches it as `nxt.tokens`.
        `stream=True`: x is the model's residual stream, blocks 0..depth-1 in order, each block's
        output the next one's input with nothing between them, one shape throughout: what the
        per-call levels need to reuse a span of blocks as one residual (block_reuse.py). A model
        whose blocks sit between other layers (a UNet's attention between its res-blocks) leaves
        it False, and those levels leave its blocks alone."""
        counted = None if tokens is None else self._counted_tokens(block, tokens)

        def run_from(i: int, h: torch.Tensor):
            if i == len(self.accelerators):
                if self.stats is not None:
                    self.stats.chain_ran(block, h.shape[0])
                return chain(h)
            return self.accelerators[i].chain(self, block, h, _Next(lambda h2: run_from(i + 1, h2), counted, stream))

        try:
            return run_from(0, x)
        finally:
            run_from = None  # unlinked as in attend: the call's tensors go when it returns

    def _counted_tokens(self, block: int, tokens: Tokens) -> Tokens:
        if self.stats is None:
            return tokens

        def wrapped(x, pos):
            self.stats.tokens_ran(block, self.layout, pos.shape[1])
            return tokens(x, pos)

        return wrapped

    def _uncount(self, block: int, axis: str, sequences: int) -> None:
        """Takes back the count of work that ran out of memory before it finished; it is counted
        again when it runs."""
        if self.stats is not None:
            self.stats.attention_retried(block, axis, sequences)

    def _counted(self, block: int, axis: str, compute: Compute) -> Compute:
        if self.stats is None:
            return compute
        total = self.layout.axis_shape(axis)[0]

        def wrapped(s, index):
            self.stats.attention_ran(block, axis, computed=s.shape[0], total=total)
            return compute(s, index)

        return wrapped


    # --- a network's own spans ---------------------------------------------------------------------
    spans: tuple = ()  # Span, outermost first, as the network declared them (with_spans); () = none

    def with_spans(self, spans: Sequence[Span]) -> "SCMDispatch":
        """This dispatch (same step, accelerators, stats, policy) with the network's spans declared."""
        view = copy.copy(self)
        view.spans = tuple(spans)
        return view

    def span_of(self, key) -> Optional[Span]:
        return next((s for s in self.spans if s.key == key), None)

    def token_spans(self) -> list:
        """The declared spans of form "tokens", in the network's order of preference."""
        return [s for s in self.spans if s.form == "tokens"]

    def span(self, key, x: torch.Tensor, fn: Chain) -> torch.Tensor:
        """A declared span of the network, fn(x) -> y with y of x's shape, through the accelerators'
        `span` hooks (each may answer from a cache, or let it run). The blocks inside it go through
        the dispatch as usual when it runs."""
        if self.span_of(key) is None:
            raise ValueError(f"span {key!r} was not declared (with_spans); declared: {[s.key for s in self.spans]}")

        def run_from(i: int, h: torch.Tensor):
            if i == len(self.accelerators):
                return fn(h)
            hook = getattr(self.accelerators[i], "span", None)
            if hook is None:  # a duck-typed accelerator without spans
                return run_from(i + 1, h)
            return hook(self, key, h, lambda h2: run_from(i + 1, h2))

        try:
            return run_from(0, x)
        finally:
            run_from = None  # unlinked as in attend: the call's tensors go when it returns


class FullCompute(SCMDispatch):
    """A dispatch with no accelerators and no counters: the plain full-compute forward."""

    def __init__(self, layout: SCMLayout, backend: str = "sdpa", grid: bool = True):
        super().__init__(layout, None, (), backend=backend, stats=None, grid=grid)
