"""Runs one experiment: ``python -m experiments.main --config=experiments/configs/NAME.py --workdir=DIR``.

Override any config key on the command line, e.g. ``--config.num_epochs=5``. Running again with
the same workdir resumes from the newest checkpoint. Several processes: run the same command in
each with ``--config.distributed.coordinator_address=HOST:PORT
--config.distributed.num_processes=N --config.distributed.process_id=I``.
"""

import json
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, summary.json and figures.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. experiments/configs/fashion_deep.py.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Orbax and JAX log every save at INFO through absl; keep the console to what a user acts on.
    absl_logging.set_verbosity(absl_logging.WARNING)
    ours = logging.getLogger("aejax")
    ours.setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[aejax] %(message)s"))
    ours.addHandler(handler)
    ours.propagate = False
    # Imported here so that --help and flag errors come back without loading JAX.
    from aejax.data import offline
    from aejax.runtime import checkpoints, config, distributed, lock, stacking, trainer
    from aejax.step import NonFiniteLossError

    try:
        # Before anything touches a device; the stacked runs then join the same processes.
        config.check_config(FLAGS.config)
        if config.start_distributed(FLAGS.config):
            import jax

            if jax.process_index() != 0:  # process 0 speaks for the run
                ours.setLevel(logging.WARNING)
        summary = stacking.train(FLAGS.config, FLAGS.workdir)
    except distributed.PeerLostError as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.exit_without_shutdown(3)
    except trainer.Preempted as e:  # the checkpoint is saved: status 128 + signal, as a shell says
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except checkpoints.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        # Without the interpreter's exit: orbax's background threads are not daemons, and one
        # left waiting by a failed write would hold the process for minutes.
        distributed.exit_without_shutdown(2)
    except (config.ConfigError, offline.DataError, NonFiniteLossError, lock.WorkdirLockedError,
            OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.config.distributed.process_id != 0:
        return  # process 0 prints the run's summary
    if "finetune" in summary:  # greedy stacking: the fine-tuned and from-scratch results
        summary = {"stacked": summary["finetune"]["test"],
                   "scratch": summary.get("scratch", {}).get("test"),
                   "stacked_beats_scratch": summary.get("stacked_beats_scratch")}
    shown = {k: summary[k] for k in ("test", "pca", "autoencoder_beats_pca", "epochs_run",
                                     "train_seconds", "stacked", "scratch",
                                     "stacked_beats_scratch") if k in summary}
    print(json.dumps(shown, indent=2))


def parse_flags(argv):
    # A mistyped --config.key becomes one clear line, not a traceback.
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        msg = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        print(f"error: bad command line: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
