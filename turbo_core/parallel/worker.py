"""`python -m turbo_core.parallel.worker`: one worker process of a Turbo4D group, started by
`ParallelGroup.start` with the rendezvous in its environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, TURBO4D_PARALLEL_DEVICE)."""
import sys

from turbo_core.parallel.engine import worker_main

if __name__ == "__main__":
    sys.exit(worker_main())
