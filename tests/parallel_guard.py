"""A hang guard for tests of split calls (turbo_core.parallel on gloo)."""
import faulthandler
import os
import signal
import threading
from contextlib import contextmanager

import pytest

from turbo_core.parallel import ParallelError


@contextmanager
def finishes_within(group, seconds, what):
    """A hang guard that works while rank 0 is blocked inside a gloo collective (where no Python
    signal handler runs): after `seconds` a thread dumps rank 0's stacks and kills the workers, so
    the collective fails and the test fails, naming what hung, instead of waiting forever."""
    fired = threading.Event()

    def fire():
        fired.set()
        faulthandler.dump_traceback(all_threads=True)
        for pid in [p.pid for p in group.procs]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    timer = threading.Timer(seconds, fire)
    timer.start()
    try:
        yield
    except ParallelError:
        if fired.is_set():
            pytest.fail(f"{what} hung (did not finish in {seconds} s; rank 0's stacks above)")
        raise
    finally:
        timer.cancel()
    assert not fired.is_set(), f"{what} took over {seconds} s"
