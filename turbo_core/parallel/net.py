"""A network split over a process group.

`ParallelNet` stands in for an `SCMNet` on rank 0 (same call signature, the network's other
attributes passed through): each call is split by a plan (`plan.py`), its inputs broadcast, every
rank runs the network on its images through a `ShardedDispatch`, and the outputs are gathered on
rank 0. `ShardWorker` is the same on the other ranks, driven by rank 0's commands:

- "load": the network's class, config and weights (broadcast from rank 0's copy, once per network:
  no file and no shared memory needed, and it works across machines);
- "begin" / "end": a sampling run; each worker builds the run's accelerators from the same specs,
  and at the end its counters are gathered into rank 0's RunStats;
- "reference": TrajectoryCrafter's reference latents (sent once per reference object, i.e. once
  per run): each worker computes the perceiver keys/values itself, as rank 0 did, and every later
  call of the run reads them;
- "call": one model call. Rank 0 sends the StepInfo its own run made (the call index, sigma and
  stream), so a worker's accelerators count calls exactly as rank 0's do, including the whole
  steps that rank 0 decided to skip (the step skip is decided on rank 0, on the CFG-combined
  image, before any call is made); per-call signals are all-reduced (`reduced_signals`), so every
  rank takes every decision the same way.
"""
from __future__ import annotations

import importlib
import logging
import time
import weakref
from typing import Optional, Sequence

import torch

from ..dispatch import BACKENDS
from ..layout import AXES
from ..models.scm_net import SCMNet
from ..models.trajectorycrafter import PerceiverReference, TrajectoryCrafterTransformer
from .dispatch import ShardedDispatch, call_decisions, end_share, item_rows, reduced_signals, slice_inputs
from .engine import ParallelError, ParallelGroup
from .plan import choose_plan

log = logging.getLogger("turbo4d")

_BUCKET_BYTES = 256 * 2**20  # weights travel in flat buffers of at most this many bytes
# Every tensor starts this many bytes into its flat buffer: a worker's parameters are views of the
# buffer it received, and matrix kernels take a slow path on operands that are not 16-byte aligned
# (SV4D's one-element mix factors would otherwise shift every later weight by 2 bytes).
_ALIGN_BYTES = 256


# --- the model -----------------------------------------------------------------------------------
def model_spec(net: torch.nn.Module) -> dict:
    """How a worker builds an empty copy of `net`: its class and config (a dataclass with to_dict /
    from_dict, as SCMNetConfig and SV4DConfig are)."""
    cfg = getattr(net, "cfg", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise ParallelError(f"Turbo4D Multi-GPU cannot copy a {type(net).__name__} to other processes: it has no "
                            f"config (cfg.to_dict) to rebuild it from")
    return {"module": type(net).__module__, "class": type(net).__qualname__,
            "config_module": type(cfg).__module__, "config_class": type(cfg).__qualname__,
            "config": cfg.to_dict()}


def _import(module: str, name: str):
    if not module.startswith("turbo_core."):
        raise ParallelError(f"refusing to build {module}.{name}: workers only build turbo_core networks")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def build_model(spec: dict, state: dict, device: torch.device) -> torch.nn.Module:
    """The network of `spec` with the weights of `state` (already on `device`, in their dtype)."""
    cls = _import(spec["module"], spec["class"])
    cfg = _import(spec["config_module"], spec["config_class"]).from_dict(spec["config"])
    with torch.device("meta"):  # no initialisation work: every tensor comes from `state`
        net = cls(cfg)
    net.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(net.parameters()) + list(net.buffers())):
        # Buffers outside the state dict (non-persistent) need the real constructor.
        net = cls(cfg)
        net.load_state_dict(state, strict=True)
        net = net.to(device)
    return net.eval().requires_grad_(False)


def _buckets(entries: list) -> list[list[int]]:
    """Indices of `entries` (name, shape, dtype) grouped into flat buffers: one dtype each, at most
    _BUCKET_BYTES unless one tensor is larger."""
    out, cur, cur_dtype, cur_bytes = [], [], None, 0
    for i, (_, shape, dtype) in enumerate(entries):
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=_dtype(dtype)).element_size()
        if cur and (dtype != cur_dtype or cur_bytes + nbytes > _BUCKET_BYTES):
            out.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_dtype = dtype
        cur_bytes += nbytes
    if cur:
        out.append(cur)
    return out


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _offsets(entries: list, bucket: list[int]) -> tuple[list[tuple[int, int]], int]:
    """([(offset, numel)] of the bucket's tensors in its flat buffer, in elements, each offset a
    multiple of _ALIGN_BYTES), and the buffer's length."""
    size = torch.empty((), dtype=_dtype(entries[bucket[0]][2])).element_size()
    step = max(_ALIGN_BYTES // size, 1)
    out, at = [], 0
    for i in bucket:
        n = int(torch.Size(entries[i][1]).numel())
        out.append((at, n))
        at += -(-n // step) * step
    return out, at


def pack(state: dict, entries: list, bucket: list[int], device) -> torch.Tensor:
    """The bucket's tensors of `state` in one flat buffer (see _offsets)."""
    places, total = _offsets(entries, bucket)
    flat = torch.zeros(total, dtype=_dtype(entries[bucket[0]][2]), device=device)
    for i, (at, n) in zip(bucket, places):
        flat[at:at + n].copy_(state[entries[i][0]].detach().reshape(-1))
    return flat


def unpack(flat: torch.Tensor, entries: list, bucket: list[int]) -> dict:
    """{name: tensor} of a bucket: views of `flat`, each aligned as it was packed."""
    places, _ = _offsets(entries, bucket)
    return {entries[i][0]: flat[at:at + n].view(entries[i][1]) for i, (at, n) in zip(bucket, places)}


def _comm_device(group: ParallelGroup) -> torch.device:
    return group.device if group.backend == "nccl" else torch.device("cpu")


def ensure_model(group: ParallelGroup, net: torch.nn.Module) -> None:
    """Rank 0: every worker holds `net`'s class, config and current weights (sent once per network
    object and dtype)."""
    params = list(net.parameters())
    key = (str(params[0].dtype) if params else "", sum(p.numel() for p in params))
    held = group.state.get("model")
    if held is not None and held[0]() is net and held[1] == key:
        return
    state = net.state_dict()
    entries = [(name, tuple(t.shape), str(t.dtype).replace("torch.", "")) for name, t in state.items()]
    dev = _comm_device(group)

    def body():
        for bucket in _buckets(entries):
            group.comm.broadcast(pack(state, entries, bucket, dev))

    t0 = time.perf_counter()
    group.command({"op": "load", "spec": model_spec(net), "entries": entries}, body)
    group.state.update(model=(weakref.ref(net), key), reference=None)  # a new model drops the workers' reference
    log.info("Turbo4D Multi-GPU: sent %s (%.1f M parameters) to %d workers in %.2f s", type(net).__name__,
             key[1] / 1e6, group.world - 1, time.perf_counter() - t0)


def _receive_model(group: ParallelGroup, header: dict) -> torch.nn.Module:
    entries = header["entries"]
    dev = _comm_device(group)
    state = {}
    for bucket in _buckets(entries):
        _, total = _offsets(entries, bucket)
        flat = group.comm.broadcast(torch.empty(total, dtype=_dtype(entries[bucket[0]][2]), device=dev))
        state.update(unpack(flat.to(group.device), entries, bucket))
    return build_model(header["spec"], state, group.device)


def _cost(net, layout) -> dict:
    """The network's per-sequence cost table as the adapters give it to RunStats: SCMNet's cost
    model, or for a UNet whose blocks sit on several grids the average over its block work."""
    if hasattr(net, "block_work"):
        work = net.block_work(layout)
        return {a: sum(n * f for (_, ax), (n, f) in work.items() if ax == a)
                / max(sum(n for (_, ax), (n, _f) in work.items() if ax == a), 1) for a in AXES}
    return net.cost(layout)


def backend_name(attention) -> str:
    """The name of a dispatch's attention function in BACKENDS (workers build theirs by name)."""
    for name, fn in BACKENDS.items():
        if fn is attention:
            return name
    raise ParallelError("Turbo4D Multi-GPU: this run's attention backend is a custom function, which cannot be "
                        "sent to the worker processes; use one of " + ", ".join(sorted(BACKENDS)))


# --- runs ----------------------------------------------------------------------------------------
def begin_run(group: ParallelGroup, specs: Sequence = (), backend: str = "short-axis") -> None:
    """Rank 0: a sampling run starts; every worker builds the same accelerators (`specs`, as
    turbo_core.accel.registry.build_run takes them) and clears its counters."""
    group.comm.reset_counters()
    if group.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(group.device)
    group.command({"op": "begin", "specs": list(specs or []), "backend": backend})
    # reference: the workers drop a run's perceiver keys/values at its end, so each run sends its own.
    group.state.update(run=True, modes={}, notes=[], run_started=time.perf_counter(), reference=None,
                       references_sent=0)


def end_run(group: ParallelGroup, stats=None) -> Optional[dict]:
    """Rank 0: the run ended (also after an error or interrupt between calls). Gathers every
    worker's counters into `stats` (rank 0's RunStats: its own share is already there) and returns
    the run's parallel summary (also set as `stats.parallel`). None if the group broke."""
    if not group.alive:
        return None
    group.state.update(run=False, reference=None)
    mine = _summary(group, stats, group.state.get("run_started"))
    summaries = group.command({"op": "end"}, lambda: group.comm.gather_objects(mine))
    out = {"world": group.world, "backend": group.backend, "devices": [str(d) for d in group.devices],
           "calls_by_mode": dict(group.state.get("modes", {})), "notes": list(group.state.get("notes", [])),
           # TrajectoryCrafter: reference latents sent, each making every worker's perceiver keys/values once.
           "references_sent": group.state.get("references_sent", 0),
           "comm_timed": group.comm.timed,
           "ranks": [{k: v for k, v in s.items() if k != "done"} for s in summaries]}
    if stats is not None:
        for s in summaries[1:]:
            _add_done(stats, s["done"])
        setattr(stats, "parallel", out)
    return out


def summary_line(summary: dict, name: str = "Turbo4D Multi-GPU") -> str:
    """One line on how a run was split (end_run's summary): processes, modes, communication share and
    peak GPU memory per rank."""
    modes = ", ".join(f"{k} {v} calls" for k, v in summary["calls_by_mode"].items()) or "no split call"
    ranks = summary["ranks"]
    out = f"{name}: {summary['world']} processes ({summary['backend']}), {modes}"
    if summary.get("comm_timed"):
        shares = [f"{r['comm_seconds'] / r['busy_seconds'] * 100:.1f}%" for r in ranks if r.get("busy_seconds")]
        if shares:
            out += f"; time in collectives per rank {' / '.join(shares)}"
    peaks = [r["peak_memory_mb"] for r in ranks if r.get("peak_memory_mb") is not None]
    if peaks:
        out += "; peak GPU memory " + " / ".join(f"{p / 1024:.1f}" for p in peaks) + " GB"
    return out


def _summary(group: ParallelGroup, stats, started: Optional[float]) -> dict:
    dev = group.device
    peak = int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None
    busy = group.state.get("busy", 0.0) if group.rank else (time.perf_counter() - started if started else 0.0)
    return {"rank": group.rank, "device": str(dev), "comm_seconds": round(group.comm.seconds, 6),
            "comm_bytes": group.comm.bytes, "collectives": group.comm.count, "busy_seconds": round(busy, 6),
            "peak_memory_mb": None if peak is None else round(peak / 2**20, 1),
            "cache_mb": None if stats is None else round(stats.cache_bytes_peak / 2**20, 3),
            "done": None if stats is None else _done(stats),
            # Each rank's own decisions and the signals they were taken on (all-reduced: the same
            # values on every rank); small, and what a test or a report checks agreement with.
            "decisions": None if stats is None else decisions(stats),
            "signals": [] if stats is None else [t["signal"] for t in stats.timeline]}


def decisions(stats) -> dict:
    """The accelerator decisions a rank took (the same on every rank of a split run)."""
    return {"chains_ran": stats.chains_ran, "chains_bypassed": stats.chains_bypassed, "cache_hits": stats.cache_hits,
            "cache_misses": stats.cache_misses, "calls_aside": dict(stats.calls_aside),
            "spans_reused": stats.spans_reused, "blocks_reused": stats.blocks_reused}


def _done(stats) -> dict:
    """The work a rank did (what adds up over ranks; the per-call counters that every rank counts
    alike, calls, chains and cache decisions, stay rank 0's)."""
    return {"sequences_computed": dict(stats.sequences_computed), "sequences_reused": dict(stats.sequences_reused),
            "reused_by": {k: dict(v) for k, v in stats.reused_by.items()}, "flops_done": stats.flops_done,
            "per_block": {k: (v[0], v[2]) for k, v in stats.per_block.items()}}


def _add_done(stats, done: Optional[dict]) -> None:
    if not done:
        return
    for axis, n in done["sequences_computed"].items():
        stats.sequences_computed[axis] += n
    for axis, n in done["sequences_reused"].items():
        stats.sequences_reused[axis] += n
    for src, per in done["reused_by"].items():
        for axis, n in per.items():
            stats.reused_by[src][axis] += n
    stats.flops_done += done["flops_done"]
    for key, (computed, flops) in done["per_block"].items():
        cell = stats.per_block[key]
        cell[0] += computed
        cell[2] += flops


def set_sync_timing(group: ParallelGroup, sync: bool) -> None:
    """Rank 0: time collectives exactly (a device sync around each, on every rank) or not; see Comm.
    Benchmarks switch it on for a run that measures the communication share, off for the timed ones."""
    group.command({"op": "timing", "sync": bool(sync)})
    group.comm.sync_timing = bool(sync)


# --- rank 0's stand-in for the network -----------------------------------------------------------
class ParallelNet:
    """Rank 0's SCMNet, split over `group`: call it as the network (same signature); every other
    attribute is the network's. `mode`: "auto", "cfg", "frames" or "views" (plan.choose_plan)."""

    def __init__(self, net: torch.nn.Module, group: ParallelGroup, mode: str = "auto"):
        self.__dict__.update(net=net, group=group, mode=mode)

    def __getattr__(self, name):
        return getattr(self.__dict__["net"], name)

    def __call__(self, x, *args, **kwargs):
        if isinstance(self.net, TrajectoryCrafterTransformer):
            return self._call_joint(x, *args, **kwargs)
        if not isinstance(self.net, SCMNet):
            return self._call_items(x, *args, **kwargs)
        return self._call_scm(x, *args, **kwargs)

    def _cfg_only(self) -> None:
        """Networks split by batch items only run every mode as cfg; said once per run."""
        if self.mode in ("auto", "cfg"):
            return
        note = f"{type(self.net).__name__} splits only the CFG halves; mode {self.mode} runs as cfg"
        notes = self.group.state.setdefault("notes", [])
        if note not in notes:
            notes.append(note)
            log.info("Turbo4D Multi-GPU: %s", note)

    def _plan(self, layout, dispatch, mode):
        group = self.group
        plan, why = choose_plan(layout, group.world if group.alive else 1, mode)
        notes = group.state.setdefault("notes", [])
        if why not in notes:
            notes.append(why)
            if plan is None or why != plan.mode:
                log.info("Turbo4D Multi-GPU: %s", why)
        if plan is None:
            return None
        if dispatch is not None and dispatch.accelerators and not group.state.get("run"):
            raise ParallelError("Turbo4D Multi-GPU: this call has accelerators but no parallel run was begun "
                                "(turbo_core.parallel.begin_run); the workers would not know them")
        ensure_model(group, self.net)
        modes = group.state.setdefault("modes", {})
        modes[plan.mode] = modes.get(plan.mode, 0) + 1
        return plan

    def _call_items(self, x, timesteps, context, y, cond_view, views, frames, dispatch=None, memory=None):
        """A network that is split by batch items only (SV4D / SV4D 2.0: its res blocks mix frames
        and its camera attention runs over pixel groups, so only the CFG halves split): every
        tensor argument holds whole batch items, contiguous, and each rank takes its items' rows."""
        net = self.net
        n, views, frames = x.shape[0], int(views), int(frames)
        layout = net.token_layout(n, views, frames, *x.shape[-2:])
        self._cfg_only()
        plan = self._plan(layout, dispatch, "cfg")
        if plan is None or plan.mode != "cfg":
            return net(x, timesteps, context, y, cond_view, views, frames, dispatch=dispatch, memory=memory)
        t = torch.as_tensor(timesteps, device=x.device).float().reshape(-1)
        inputs = {"x": x, "timesteps": t.expand(n) if t.numel() == 1 else t, "context": context, "y": y,
                  "cond_view": cond_view}
        extra = {"memory": None if memory is None else (memory.piece_bytes, memory.reserve_bytes, memory.min_piece)}

        def share(sd, xs, ts, cs, ys, cvs):
            return net(xs, ts, cs, ys, cvs, views, frames, dispatch=sd, memory=memory)

        return self._split_call("call_items", plan, dispatch, inputs, x.device, item_rows, share, extra)

    def _call_joint(self, latents, text, timestep, inpaint=None, reference=None, dispatch=None, rope=None):
        """TrajectoryCrafter (same signature as its forward), split by its CFG halves: its joint
        attention runs over every frame of a batch item, so only batch items split. The perceiver's
        reference keys/values are each rank's own, computed once per reference object (once per
        run: the adapters compute one per run) from the latents it came from."""
        net = self.net
        self._cfg_only()
        if net.cfg.is_train_cross and reference is not None and not isinstance(reference, PerceiverReference):
            reference = net.reference(reference)  # raw latents: for this call alone, as the network does
        b, f, _, hh, ww = latents.shape
        layout = net.token_layout(b, text.shape[1], f, hh, ww, reference.tokens if reference is not None else 0)
        plan = self._plan(layout, dispatch, "cfg")
        if plan is None or plan.mode != "cfg":
            return net(latents, text, timestep, inpaint=inpaint, reference=reference, dispatch=dispatch, rope=rope)
        if reference is not None and reference.batch != 1 and b % reference.batch:
            raise ValueError(f"a call of batch {b} cannot use a reference of batch {reference.batch}")
        self._send_reference(reference)
        t = torch.as_tensor(timestep, device=latents.device).float().reshape(-1)
        inputs = {"latents": latents, "text": text, "timestep": t.expand(b) if t.numel() == 1 else t}
        if inpaint is not None:
            inputs["inpaint"] = inpaint

        def share(sd, *local):
            rows = dict(zip(inputs, local))
            ref = None if reference is None else reference.items(*plan.bounds(0))
            out = net(rows["latents"], rows["text"], rows["timestep"], inpaint=rows.get("inpaint"), reference=ref,
                      dispatch=sd, rope=rope)
            # The gather moves "images": a JointLayout's are latent frames, batch-major.
            return out.flatten(0, 1)

        full = self._split_call("call_joint", plan, dispatch, inputs, latents.device, item_rows, share)
        return full.unflatten(0, (b, -1))

    def _send_reference(self, reference: Optional[PerceiverReference]) -> None:
        """Every worker holds the perceiver keys/values of `reference` (its own, computed from the
        latents it came from; sent once per reference object)."""
        group = self.group
        held = group.state.get("reference")
        if reference is None or (held is not None and held() is reference):
            return
        if reference.source is None:
            raise ParallelError("Turbo4D Multi-GPU: this perceiver reference does not say which latents it came from; "
                                "make it with TrajectoryCrafterTransformer.reference(latents)")
        src = reference.source.to(_comm_device(group)).contiguous()
        group.command({"op": "reference", "shape": tuple(src.shape), "dtype": str(src.dtype).replace("torch.", "")},
                      lambda: group.comm.broadcast(src))
        group.state["reference"] = weakref.ref(reference)
        group.state["references_sent"] = group.state.get("references_sent", 0) + 1

    def _call_scm(self, x, c_noise, camera, views, frames, frame_index=None, dispatch=None, layout=None):
        net = self.net
        layout = layout or net.token_layout(x.shape[0], int(views), int(frames))
        plan = self._plan(layout, dispatch, self.mode)
        if plan is None:
            return net(x, c_noise, camera, views, frames, frame_index=frame_index, dispatch=dispatch, layout=layout)
        n = x.shape[0]
        inputs = {
            "x": x,
            "c_noise": torch.as_tensor(c_noise, device=x.device).float().reshape(-1).expand(n),
            "camera": camera,
            "frame_index": frame_index if frame_index is not None else layout.frame_index(device=x.device),
        }

        def share(sd, xs, cs, cams, fis):
            lay = sd.layout
            return net(xs, cs, cams, lay.views, lay.frames, frame_index=fis, dispatch=sd, layout=lay)

        return self._split_call("call", plan, dispatch, inputs, x.device, slice_inputs, share)

    def _split_call(self, op: str, plan, dispatch, inputs: dict, device, rows, share, extra: Optional[dict] = None):
        """One call split by `plan` (rank 0's side of every split call): the header that tells the
        workers (with the per-call decisions rank 0 took), the broadcast of `inputs`, then rank 0's
        share: `rows(plan, 0, *inputs)` its rows of them, `share(sd, *those rows)` its output
        images, through a ShardedDispatch with the signals all-reduced; the gathered images come
        back on `device`."""
        group = self.group
        dev = _comm_device(group)
        inputs = {k: v.to(dev).contiguous() for k, v in inputs.items()}
        header = {"op": op, "plan": plan, "step": None if dispatch is None else dispatch.step,
                  # The per-call levels' decisions rank 0 took for this call: every rank takes them.
                  "decided": call_decisions(dispatch),
                  "backend": backend_name(dispatch.attention) if dispatch is not None else "sdpa",
                  "grid": True if dispatch is None else dispatch.grid,
                  **(extra or {}),
                  "inputs": [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in inputs.items()]}

        def body():
            for v in inputs.values():
                group.comm.broadcast(v)
            sd = (ShardedDispatch.like(dispatch, plan, group.comm) if dispatch is not None
                  else ShardedDispatch(plan, group.comm))
            local = rows(plan, 0, *(v.to(device) for v in inputs.values()))
            with reduced_signals(group.comm):
                out = share(sd, *local)
                end_share(sd)
            return group.comm.gather_images(out, plan).to(device)

        return group.command(header, body)


# --- the other ranks -----------------------------------------------------------------------------
class ShardWorker:
    """A worker's model, run and per-stream bookkeeping; `handle` executes one command."""

    def __init__(self, group: ParallelGroup):
        self.group = group
        self.net: Optional[torch.nn.Module] = None
        self.run = None
        self.memory = None  # the SV4D UNet's MemoryConfig of the current run
        self.reference: Optional[PerceiverReference] = None  # TrajectoryCrafter's, of the current run
        self.signature: dict = {}

    def handle(self, header: dict) -> None:
        op = header["op"]
        if op == "load":
            self.net = self.reference = None  # free the old weights before the new arrive
            self.net = _receive_model(self.group, header)
        elif op == "reference":
            src = self.group.comm.broadcast(torch.empty(header["shape"], dtype=_dtype(header["dtype"]),
                                                        device=_comm_device(self.group)))
            if self.net is None:
                raise RuntimeError("rank 0 sent a reference before any model")
            self.reference = None  # the previous run's, freed before the new one is made
            with torch.inference_mode():
                self.reference = self.net.reference(src.to(self.group.device))
        elif op == "begin":
            from ..accel.registry import build_run

            self.run = build_run(header["specs"], backend=header["backend"])
            self.run.begin()
            self.signature.clear()
            self.memory = None
            self.group.comm.reset_counters()
            self.group.state["busy"] = 0.0
            if self.group.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.group.device)
        elif op == "call":
            t0 = time.perf_counter()
            self._call(header)
            self.group.state["busy"] = self.group.state.get("busy", 0.0) + time.perf_counter() - t0
        elif op in ("call_items", "call_joint"):
            t0 = time.perf_counter()
            (self._call_items if op == "call_items" else self._call_joint)(header)
            self.group.state["busy"] = self.group.state.get("busy", 0.0) + time.perf_counter() - t0
        elif op == "timing":
            self.group.comm.sync_timing = bool(header["sync"])
        elif op == "end":
            run, self.run = self.run, None
            self.reference = None  # the perceiver keys/values (0.5 GB at full size) go with the run
            summary = _summary(self.group, run.stats if run is not None else None, None)
            if run is not None:
                run.end()  # frees every cache now
            self.group.comm.gather_objects(summary)
        else:
            raise ValueError(f"unknown command {op!r} from rank 0")

    def _received(self, header: dict) -> dict:
        """A call's inputs as rank 0 broadcast them (name -> tensor), on this rank's device."""
        g = self.group
        dev = _comm_device(g)
        received = {k: g.comm.broadcast(torch.empty(shape, dtype=_dtype(dt), device=dev))
                    for k, shape, dt in header["inputs"]}
        if self.net is None:
            raise RuntimeError("rank 0 sent a model call before any model")
        return {k: v.to(g.device) for k, v in received.items()}

    def _call_items(self, header: dict) -> None:
        g = self.group
        inputs = self._received(header)
        plan, step, net = header["plan"], header["step"], self.net
        x, t, context, y, cond_view = item_rows(plan, g.rank, *inputs.values())
        lay = plan.local_layout(g.rank)
        memory = None
        if header["memory"] is not None:
            from ..memory import MemoryConfig

            if self.memory is None:  # one per run: it keeps the piece sizes that worked
                piece, reserve, min_piece = header["memory"]
                self.memory = MemoryConfig(piece_bytes=piece, reserve_bytes=reserve, min_piece=min_piece)
            memory = self.memory

        def network(d):
            return net(x, t, context, y, cond_view, lay.views, lay.frames, dispatch=d, memory=memory)

        self._run_call(plan, step, header, x, network, work=net.block_work(lay))

    def _call_joint(self, header: dict) -> None:
        g = self.group
        received = self._received(header)
        plan, net = header["plan"], self.net
        rows = dict(zip(received, item_rows(plan, g.rank, *received.values())))
        ref = None
        if net.cfg.is_train_cross:
            if self.reference is None:
                raise RuntimeError("rank 0 sent a TrajectoryCrafter call before its reference")
            ref = self.reference.items(*plan.bounds(g.rank))
        lay = plan.local_layout(g.rank)
        x = rows["latents"]

        def network(d):
            out = net(x, rows["text"], rows["timestep"], inpaint=rows.get("inpaint"), reference=ref, dispatch=d)
            return out.flatten(0, 1)

        self._run_call(plan, header["step"], header, x, network, work=net.block_work(lay), cost={})

    def _run_call(self, plan, step, header, x, network, work=None, cost=None) -> None:
        """One call of this rank's share: through the run's accelerators when rank 0's call had a
        step (a sampling run), plain otherwise; then the outputs go to rank 0."""
        comm, run, net = self.group.comm, self.run, self.net
        if run is None or step is None:
            sd = ShardedDispatch(plan, comm, backend=header["backend"], grid=header["grid"])
            with reduced_signals(comm):
                out = network(sd)
            comm.gather_images(out, plan)
            return
        from ..accel.stats import RunStats

        sig = (plan, x.dtype)
        if self.signature.get(step.stream, sig) != sig:
            # As Turbo4DRun.dispatch: a new shape makes this stream's cached activations invalid.
            for a in run.per_call:
                st = a.streams.pop(step.stream, None)
                if st is not None:
                    st.reset()
        self.signature[step.stream] = sig
        if run.stats is None:
            blocks = net.blocks if isinstance(getattr(net, "blocks", None), int) else net.depth
            run.stats = RunStats(blocks=blocks, cost=dict(_cost(net, plan.layout) if cost is None else cost))
        # Whole steps are rank 0's decision (Turbo4DRun.step, on the CFG-combined image): a call
        # that reaches a worker runs; only the per-call mechanisms act here.
        sd = ShardedDispatch(plan, comm, step, run.per_call, backend=header["backend"], stats=run.stats,
                             grid=header["grid"])
        sd.decided = header.get("decided")
        run.stats.begin_call(step, sd.layout, work)
        for a in run.per_call:
            a.begin_call(sd)
        with reduced_signals(comm):
            out = run.model_call(sd, x, lambda: network(sd))
            end_share(sd)  # where rank 0 makes it: after its share, before the gather
        run.end_call(sd)
        comm.gather_images(out, plan)

    def _call(self, header: dict) -> None:
        g = self.group
        inputs = self._received(header)
        plan, step = header["plan"], header["step"]
        x, c_noise, camera, frame_index = slice_inputs(plan, g.rank, *inputs.values())
        net = self.net
        lay = plan.local_layout(g.rank)

        def network(d):
            return net(x, c_noise, camera, lay.views, lay.frames, frame_index=frame_index, dispatch=d, layout=d.layout)

        self._run_call(plan, step, header, x, network)
