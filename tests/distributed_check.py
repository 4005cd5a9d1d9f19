"""One process of a multi-process run on 127.0.0.1; run by tests/test_distributed.py.

``python tests/distributed_check.py WORKDIR PORT NUM_PROCESSES PROCESS_ID [--step-delay S]
[--stream]`` trains :func:`dist_config` on ``placement_check.loop_splits()`` with
``jax.distributed`` on 127.0.0.1:PORT, one CPU device per process (``--stream``: batches from
host memory, each process placing its rows), and prints one JSON line. After a lost peer it exits
as experiments.main does: the error on stderr, status 3; stopped by a signal, status 128 + it.
"""

import argparse
import json
import logging
import sys
import time

from aejax.runtime import distributed, placement, trainer
from placement_check import loop_config, loop_splits

EPOCHS = 4  # 4 steps each: 16 steps, a checkpoint every 3


def dist_config(port: int = 0, num_processes: int = 1, process_id: int = 0, **overrides):
    c = loop_config(num_epochs=EPOCHS, **overrides)
    if port:
        c.distributed.update(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                             process_id=process_id, initialization_timeout=60,
                             heartbeat_timeout=5)
    return c


def slow_down(seconds: float) -> None:
    """Every train step sleeps first: a run long enough to kill a process mid-way."""
    fused_step = placement.Placement.fused_step

    def slowed(self, step_fn, batch_size, steps_per_epoch):
        run = fused_step(self, step_fn, batch_size, steps_per_epoch)

        def step(state, acc, x_all, perm, num_steps, rng):
            time.sleep(seconds * num_steps)
            return run(state, acc, x_all, perm, num_steps, rng)
        return step

    placement.Placement.fused_step = slowed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("port", type=int)
    parser.add_argument("num_processes", type=int)
    parser.add_argument("process_id", type=int)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[aejax] %(message)s"))
    logging.getLogger("aejax").addHandler(handler)
    logging.getLogger("aejax").setLevel(logging.INFO)
    logging.getLogger("aejax").propagate = False
    if args.step_delay:
        slow_down(args.step_delay)
    config = dist_config(args.port, args.num_processes, args.process_id, parallel="auto",
                        **{"data.on_device": not args.stream})
    try:
        summary = trainer.train_and_evaluate(config, args.workdir, splits=loop_splits())
    except distributed.PeerLostError as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.exit_without_shutdown(3)
    except trainer.Preempted as e:  # as experiments.main: the line, status 128 + signal
        print(f"stopped: {e}", file=sys.stderr)
        print(json.dumps({"process_id": args.process_id, "preempted_at": e.step}), flush=True)
        sys.exit(128 + e.signum)
    print(json.dumps({"process_id": args.process_id, "steps": summary["steps"],
                      "test": summary["test"]}), flush=True)


if __name__ == "__main__":
    main()
