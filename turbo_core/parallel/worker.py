"""`python -m turbo_core.parallel.worker`: one worker process of a Turbo4D group, started by
`ParallelGroup.start` with the rendezvous in its environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, TURBO4D_PARALLEL_DEVICE)."""
import sys

from turbo_core.parallel.engine import worker_main


def shard_worker():
    """The model layer's command handler (imported here, above both the engine and the layer)."""
    from turbo_core.parallel.net import ShardWorker

    return lambda group: ShardWorker(group).handle


if __name__ == "__main__":
    sys.exit(worker_main(shard_worker))
