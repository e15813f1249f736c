"""The process group: one process per device, torch.distributed between them (NCCL on GPUs, gloo on
the CPU). The caller's process is rank 0 and drives; the others serve its commands.

Two ways in:
- `ParallelGroup.start(devices)`: the pack starts one worker process per further device
  (`python -m turbo_core.parallel.worker`, a fresh interpreter: under ComfyUI a multiprocessing
  spawn would re-run the server's main script in every child) with the rendezvous in environment
  variables, exactly as torchrun sets them; rank 0 hosts the TCPStore.
- `ParallelGroup.from_env()`: every process was started by torchrun (RANK, WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT, LOCAL_RANK); rank 0 gets the group back, every other rank serves
  until rank 0 shuts the group down and then exits, so one script spans several machines.

Commands are small Python objects broadcast from rank 0 (`broadcast_object_list`); tensors travel
through the collectives. A worker that raises writes its traceback into the store under
`turbo4d/error/<rank>` and exits, which breaks the collective rank 0 waits in (gloo closes the
connection; for NCCL a watchdog thread aborts the communicator); rank 0 then raises ParallelError
naming the rank and its message, and tears the group down: the remaining workers are terminated
(then killed), the process group destroyed. The next run starts a fresh group. A worker also dies
with its parent (PR_SET_PDEATHSIG, and a thread watching the parent's pid), so none outlives it.
"""
from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .comm import Comm

log = logging.getLogger("turbo4d")

ERROR_KEY = "turbo4d/error/{}"
READY_KEY = "turbo4d/ready/{}"
ENV_DEVICE = "TURBO4D_PARALLEL_DEVICE"
ENV_TIMEOUT = "TURBO4D_PARALLEL_TIMEOUT"
ENV_SYNC_TIMING = "TURBO4D_PARALLEL_SYNC_TIMING"
DEFAULT_TIMEOUT_S = 600.0
_PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ParallelError(RuntimeError):
    """A failure of the multi-process group (a worker's error names its rank); the group is torn
    down when this is raised, and the next run starts a new one."""


def backend_for(device: torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def parse_devices(devices) -> list[torch.device]:
    """A list of devices from "cuda:0,cuda:1", "0,1" (CUDA indices), "cpu:3" (3 CPU processes) or a
    sequence of devices; every entry must be of one type."""
    if isinstance(devices, str):
        text = devices.strip().lower()
        if text.startswith("cpu:") and text[4:].isdigit():
            return [torch.device("cpu")] * int(text[4:])
        items = [s.strip() for s in text.split(",") if s.strip()]
        out = [torch.device(f"cuda:{s}" if s.isdigit() else s) for s in items]
    else:
        out = [torch.device(d) for d in devices]
    if not out:
        raise ValueError("no devices given")
    if len({d.type for d in out}) != 1:
        raise ValueError(f"devices {[str(d) for d in out]} mix device types; use only CUDA devices or only 'cpu:N'")
    if out[0].type == "cuda" and len({d.index for d in out}) != len(out):
        raise ValueError(f"devices {[str(d) for d in out]} list a GPU twice; each process needs its own")
    return out


def choose_devices(devices: str, first: torch.device, name: str = "Turbo4D Multi-GPU") -> tuple[Optional[list], str]:
    """The group's devices for a user's `devices` text ('all', GPU indices such as '0,1', or 'cpu:N'),
    rank 0 first and always `first` (the device the host runs the model on, which drives the others),
    or None where the run stays on one process; and a line for the log. Errors name `name` (the node)
    and the fix."""
    text = (devices or "all").strip().lower()
    if text.startswith("cpu"):
        if not text[4:].isdigit() or text[3:4] != ":":
            raise ValueError(f"{name}: devices={devices!r} is not 'all', a list of GPU indices such as '0,1', "
                             f"or 'cpu:N' with a number N.")
        if first.type != "cpu":
            raise ValueError(f"{name}: devices={devices!r} asks for CPU processes, but ComfyUI runs the model on "
                             f"{first}. Set devices to 'all' or to GPU indices such as '0,1'.")
        devs = parse_devices(text)
        if len(devs) < 2:
            return None, f"{name}: {len(devs)} CPU process asked for: sampling runs on one."
        return devs, f"{name}: {len(devs)} CPU processes (gloo)"
    if first.type != "cuda" or not torch.cuda.is_available():
        return None, (f"{name}: no GPU (ComfyUI runs on {first}): sampling runs on one process. "
                      f"devices='cpu:2' runs two CPU processes (meant for tests).")
    count = torch.cuda.device_count()
    if text == "all":
        idx = list(range(count))
    else:
        try:
            idx = [int(s.strip().removeprefix("cuda:")) for s in text.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"{name}: devices={devices!r} is not 'all', a list of GPU indices such as '0,1', "
                             f"or 'cpu:N'.") from None
        bad = [i for i in idx if not 0 <= i < count]
        if bad:
            raise ValueError(f"{name}: devices={devices!r} names GPUs {bad}, but this machine has {count} "
                             f"(0..{count - 1}).")
    lead = first.index if first.index is not None else torch.cuda.current_device()
    if lead not in idx:
        raise ValueError(f"{name}: devices={devices!r} leaves out cuda:{lead}, the GPU ComfyUI runs the model on "
                         f"(it is rank 0 and drives the others). Add {lead} to the list.")
    order = [lead] + [i for i in dict.fromkeys(idx) if i != lead]
    if len(order) < 2:
        return None, f"{name}: one GPU (cuda:{lead}): sampling runs on one."
    return [torch.device(f"cuda:{i}") for i in order], f"{name}: {len(order)} GPUs"


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)))


class ParallelGroup:
    """One rank's view of the group. Rank 0 drives with `command`; workers run `serve`."""

    def __init__(self, rank: int, world: int, device: torch.device, store, procs: Optional[list] = None,
                 devices: Optional[list] = None, sync_timing: bool = False):
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.backend = backend_for(self.device)
        self.store = store
        self.procs = procs or []            # rank 0 of a started group: the workers' Popen objects
        self.devices = devices or [self.device]
        self.comm = Comm(rank, world, self.device, sync_timing=sync_timing)
        self.alive = True
        self.failure: Optional[str] = None  # what broke the group, once it broke
        self._watch: Optional[threading.Thread] = None
        self._busy = False                  # rank 0 is inside a command's collectives
        self.state: dict = {}               # what the layers above keep per group (loaded model, run)

    # --- starting --------------------------------------------------------------------------
    @classmethod
    def start(cls, devices, sync_timing: bool = False, startup_timeout_s: float = 300.0) -> "ParallelGroup":
        """Rank 0 here, on devices[0]; one worker process per further device."""
        devs = parse_devices(devices)
        world = len(devs)
        if dist.is_initialized():
            raise ParallelError("this process already has a torch.distributed process group (another Turbo4D "
                                "group, or the host's own); shut it down before starting a Turbo4D group")
        backend = backend_for(devs[0])
        if backend == "nccl":
            _check_cuda(devs)
            # Read when rank 0's communicator is made, as in the workers (see _spawn_worker).
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=_timeout(), wait_for_workers=False)
        procs = []
        try:
            for r in range(1, world):
                procs.append(_spawn_worker(r, world, store.port, devs[r], sync_timing))
            _wait_ready(store, procs, startup_timeout_s)
            if devs[0].type == "cuda":
                torch.cuda.set_device(devs[0])
            dist.init_process_group(backend, store=store, rank=0, world_size=world, timeout=_timeout())
        except BaseException:
            _stop_processes(procs)
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
        group = cls(0, world, devs[0], store, procs, devs, sync_timing)
        group._start_watch()
        log.info("Turbo4D Multi-GPU: %d processes (%s) on %s, backend %s", world,
                 ", ".join(str(p.pid) for p in procs) or "-", ", ".join(str(d) for d in devs), backend)
        return group

    @classmethod
    def from_env(cls, serve: bool = True, handler: Optional[Callable] = None) -> Optional["ParallelGroup"]:
        """The group of a torchrun launch (None when the environment names none). Ranks > 0 serve
        rank 0 and then exit the process when `serve` (the default); rank 0 gets its group."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device(os.environ.get(ENV_DEVICE) or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=False, timeout=_timeout())
        if not dist.is_initialized():
            dist.init_process_group(backend_for(device), init_method="env://", rank=rank, world_size=world,
                                    timeout=_timeout())
        group = cls(rank, world, device, store, sync_timing=os.environ.get(ENV_SYNC_TIMING) == "1")
        if rank != 0 and serve:
            if handler is None:
                raise ParallelError("ParallelGroup.from_env(serve=True) needs the handler a worker serves with "
                                    "(turbo_core.parallel.from_env passes the model layer's)")
            sys.exit(group.serve(handler(group)))
        if rank == 0:
            group._start_watch()
        return group

    # --- rank 0: driving -------------------------------------------------------------------
    def command(self, header: dict, body: Optional[Callable] = None):
        """Sends `header` to every worker and runs `body()` (this rank's part of the command and
        its collectives); any failure inside tears the group down and raises ParallelError (a
        worker's error, when one reported, named by rank)."""
        self._check_alive()
        with self.guard():
            self.comm.broadcast_object(header)
            return body() if body is not None else None

    @contextmanager
    def guard(self):
        """Collectives of rank 0 in flight: an exception inside leaves the workers mid-command, so
        the group is torn down (reporting the worker's error where there is one)."""
        if self.rank != 0:
            yield
            return
        self._busy = True
        try:
            yield
        except BaseException as e:
            self._busy = False
            detail = self._worker_errors(wait_s=2.0)
            self.teardown(detail or f"{type(e).__name__}: {e}")
            if detail:
                raise ParallelError(f"Turbo4D Multi-GPU: {detail}. The worker processes were shut down; the "
                                    f"next run starts them again.") from e
            if isinstance(e, (KeyboardInterrupt, ParallelError)) or not isinstance(e, Exception):
                raise
            raise ParallelError(f"Turbo4D Multi-GPU: rank 0 ({self.device}) failed inside a parallel call: "
                                f"{type(e).__name__}: {e}. The worker processes were shut down; the next run "
                                f"starts them again.") from e
        self._busy = False

    def _check_alive(self) -> None:
        if not self.alive:
            raise ParallelError(f"Turbo4D Multi-GPU: the process group is down ({self.failure}); start a new one")
        dead = self._dead_workers()
        if dead:
            detail = self._worker_errors(wait_s=0.5) or "; ".join(dead)
            self.teardown(detail)
            raise ParallelError(f"Turbo4D Multi-GPU: {detail}. The worker processes were shut down; the next run "
                                f"starts them again.")

    def _dead_workers(self) -> list[str]:
        return [text for _, text in self._dead()]

    def _dead(self) -> list[tuple[int, str]]:
        out = []
        for r, p in enumerate(self.procs, start=1):
            code = p.poll()
            if code is not None:
                out.append((r, f"rank {r} ({self.devices[r]}) exited with code {code}"
                               + (f" (signal {-code})" if code < 0 else "")))
        return out

    def _worker_errors(self, wait_s: float = 0.0) -> str:
        """What the workers reported or how they ended, for the error message ('' if none of them
        failed within `wait_s`: the failure was rank 0's own). A worker writes its error before it
        exits, so once a worker is seen dead the store holds all it will ever say. Workers that
        died without a word (killed) come first: the others' errors are then what that broke."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = self._dead()
            found = {}
            for r in range(1, self.world):
                key = ERROR_KEY.format(r)
                try:
                    if self.store.check([key]):
                        found[r] = (f"rank {r} ({self.devices[r] if r < len(self.devices) else '?'}) failed: "
                                    f"{self.store.get(key).decode(errors='replace').strip()}")
                except Exception:  # the store went with the group: nothing more to read
                    pass
            if found or dead:
                silent = [text for r, text in dead if r not in found]
                return "; ".join(silent + [found[r] for r in sorted(found)])
            if time.monotonic() >= deadline:
                return ""
            time.sleep(0.05)

    def _start_watch(self) -> None:
        """NCCL collectives do not fail when a peer dies, they wait: this thread aborts the
        communicator when a worker ends (its process exits, or it reports an error in the store:
        under torchrun there is no process to watch) while rank 0 is inside a command, so the wait
        ends in an error. gloo needs none (a closed connection fails the collective)."""
        if self.backend != "nccl":
            return

        def failed() -> bool:
            if self._dead_workers():
                return True
            try:
                return any(self.store.check([ERROR_KEY.format(r)]) for r in range(1, self.world))
            except Exception:  # the store went with the group
                return False

        def watch():
            while self.alive:
                if self._busy and failed():
                    _abort_default_group()
                    return
                time.sleep(0.2)

        self._watch = threading.Thread(target=watch, name="turbo4d-parallel-watch", daemon=True)
        self._watch.start()

    # --- stopping --------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stops the workers (a shutdown command, then terminate/kill whatever is left) and
        destroys the process group. Safe to call twice and after a failure."""
        if self.rank != 0 or not self.alive:
            return
        try:
            if not self._dead_workers():
                self.comm.broadcast_object({"op": "shutdown"})
        except Exception:  # a broken group: the processes are stopped below all the same
            pass
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        self.teardown(None)

    def teardown(self, reason: Optional[str]) -> None:
        """Ends the group at once: workers terminated then killed, the process group destroyed."""
        if not self.alive:
            return
        self.alive = False
        self.failure = reason
        if reason:
            log.error("Turbo4D Multi-GPU: shutting the process group down: %s", reason)
        _stop_processes(self.procs)
        if dist.is_initialized():
            try:
                if reason and self.backend == "nccl":
                    _abort_default_group()
                dist.destroy_process_group()
            except Exception as e:  # a group already aborted: nothing left to free
                log.debug("Turbo4D Multi-GPU: destroy_process_group: %s", e)
        self.state.clear()

    # --- workers ---------------------------------------------------------------------------
    def serve(self, handle: Callable[[dict], None]) -> int:
        """A worker's loop: run rank 0's commands until "shutdown". On an error the traceback goes
        into the store for rank 0 and the process exits (its collectives cannot be resumed)."""
        try:
            while True:
                header = self.comm.broadcast_object(None, timed=False)
                if header.get("op") == "shutdown":
                    break
                handle(header)
        except BaseException:
            self._report(traceback.format_exc())
            sys.stderr.flush()
            os._exit(1)
        try:
            dist.destroy_process_group()
        except Exception:
            pass
        return 0

    def _report(self, text: str) -> None:
        msg = text.strip().splitlines()
        # The exception line and where it was raised: short enough for a UI error box (the whole
        # traceback goes to the worker's stderr, the host's log).
        short = msg[-1] if msg else "unknown error"
        where = [line.strip() for line in msg if line.strip().startswith("File ")][-1:]
        try:
            self.store.set(ERROR_KEY.format(self.rank), short + (f" (at {where[0]})" if where else ""))
        except Exception:
            pass
        print(f"Turbo4D Multi-GPU rank {self.rank} ({self.device}) failed:\n{text}", file=sys.stderr, flush=True)


# --- processes -----------------------------------------------------------------------------------
def _check_cuda(devs: Sequence[torch.device]) -> None:
    if not torch.cuda.is_available():
        raise ParallelError("CUDA devices were asked for but CUDA is not available in this process")
    n = torch.cuda.device_count()
    bad = [str(d) for d in devs if d.index is None or d.index >= n]
    if bad:
        raise ParallelError(f"devices {bad} do not exist: this machine has {n} CUDA devices (cuda:0..cuda:{n - 1})")


def _spawn_worker(rank: int, world: int, port: int, device: torch.device, sync_timing: bool) -> subprocess.Popen:
    env = dict(os.environ)
    env.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), ENV_DEVICE: str(device),
                "TURBO4D_PARALLEL_PARENT": str(os.getpid()), ENV_SYNC_TIMING: "1" if sync_timing else "0"})
    # NVLink SHARP (multicast) stays off: it needs fabric-manager rights that lent and shared
    # machines do not grant, and the all-to-all this engine runs does not use it.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    # A dead peer must fail the collective, not kill the process (rank 0 is the host's server).
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    env["PYTHONPATH"] = os.pathsep.join([_PACK_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if device.type == "cpu":
        # Each CPU worker gets an equal share of the cores rather than all of them each.
        env.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // world, 1)))
    return subprocess.Popen([sys.executable, "-m", "turbo_core.parallel.worker"], env=env, cwd=_PACK_ROOT)


def _wait_ready(store, procs: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(range(1, len(procs) + 1))
    while pending:
        for r in sorted(pending):
            if store.check([READY_KEY.format(r)]):
                pending.discard(r)
            elif store.check([ERROR_KEY.format(r)]):
                raise ParallelError(f"Turbo4D Multi-GPU: rank {r} failed to start: "
                                    f"{store.get(ERROR_KEY.format(r)).decode(errors='replace')}")
            elif procs[r - 1].poll() is not None:
                raise ParallelError(f"Turbo4D Multi-GPU: rank {r} exited with code {procs[r - 1].returncode} while "
                                    f"starting (its output is in the log above)")
        if pending and time.monotonic() > deadline:
            raise ParallelError(f"Turbo4D Multi-GPU: ranks {sorted(pending)} did not start within {timeout_s:.0f} s")
        time.sleep(0.05)


def _stop_processes(procs: list, grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.05))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _abort_default_group() -> None:
    """Makes pending NCCL collectives of this process fail instead of waiting forever."""
    try:
        from torch.distributed import distributed_c10d as c10d

        abort = getattr(c10d, "_abort_process_group", None)
        if abort is not None:
            abort()
            return
        pg = c10d._get_default_group()
        backend = pg._get_backend(torch.device("cuda"))
        backend.abort()
    except Exception as e:  # nothing to abort, or an API this torch lacks: the timeout still ends it
        log.debug("Turbo4D Multi-GPU: abort: %s", e)


def worker_main(load_handler: Callable[[], Callable]) -> int:
    """Entry point of a started worker (`python -m turbo_core.parallel.worker`). `load_handler()`
    imports the model layer and returns group -> command handler; it is called before the worker
    reports ready, so its import errors reach the driver. (The engine does not import the model
    layer itself: that layer builds on the engine.)"""
    # A host that ignores SIGTERM passes that on to its children; the group stops its workers with it.
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    rank = int(os.environ["RANK"])
    device = torch.device(os.environ.get(ENV_DEVICE, "cpu"))
    store = None
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                              is_master=False, timeout=_timeout())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        handler_of = load_handler()  # the model layer; before ready, so its import errors report

        store.set(READY_KEY.format(rank), "1")
        dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=_timeout())
    except BaseException:
        text = traceback.format_exc()
        if store is not None:
            try:
                store.set(ERROR_KEY.format(rank), text.strip().splitlines()[-1])
            except Exception:
                pass
        print(f"Turbo4D Multi-GPU rank {rank} failed to start:\n{text}", file=sys.stderr, flush=True)
        return 1
    group = ParallelGroup(rank, int(os.environ["WORLD_SIZE"]), device, store,
                          sync_timing=os.environ.get(ENV_SYNC_TIMING) == "1")
    return group.serve(handler_of(group))


def _die_with_parent() -> None:
    """A worker never outlives the process that started it: a thread checks the parent's pid and
    ends the worker when it changes (the parent died and the worker was handed to init). Not
    PR_SET_PDEATHSIG: that fires when the parent's *thread* that started the worker ends, and a
    host may start the group from a thread that does not last as long as the process."""
    parent = int(os.environ.get("TURBO4D_PARALLEL_PARENT", "0") or 0)
    if not parent:
        return

    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="turbo4d-parent-watch", daemon=True).start()
