"""Runs one experiment: ``python -m experiments.main --config=experiments/configs/NAME.py --workdir=DIR``.

Override any config key on the command line, e.g. ``--config.num_epochs=5``. Running again with
the same workdir resumes from the newest checkpoint. Several processes: run the same command in
each with ``--config.distributed.coordinator_address=HOST:PORT
--config.distributed.num_processes=N --config.distributed.process_id=I``.

Bad input is one line on stderr and exit status 2: a config file that does not load, a key that
does not exist or a value that does not fit is refused before any data is read or anything is
compiled. ``--traceback`` raises the error with its traceback instead.
"""

import json
import logging
import os
import re
import sys

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard event files, summary.json "
                    "and figures.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. experiments/configs/fashion_deep.py.",
                                lock_config=True)
flags.DEFINE_bool("traceback", False, "On an error, raise it with its traceback instead of "
                  "printing one line (for debugging aejax itself).")
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
        # Before anything touches a device or reads data; the stacked runs then join the same
        # processes.
        config.validate(FLAGS.config)
        if config.start_distributed(FLAGS.config):
            import jax

            if jax.process_index() != 0:  # process 0 speaks for the run
                ours.setLevel(logging.WARNING)
        summary = stacking.train(FLAGS.config, FLAGS.workdir)
    except distributed.PeerLostError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        distributed.exit_without_shutdown(3)
    except trainer.Preempted as e:  # the checkpoint is saved: status 128 + signal, as a shell says
        print(f"stopped: {_one_line(e)}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except checkpoints.CheckpointError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        # Without the interpreter's exit: orbax's background threads are not daemons, and one
        # left waiting by a failed write would hold the process for minutes.
        distributed.exit_without_shutdown(2)
    # ValueError and TypeError: what the model, the objective and the data say of bad input
    # (a shape, an option) once they are built.
    except (config.ConfigError, offline.DataError, NonFiniteLossError, lock.WorkdirLockedError,
            OSError, ValueError, TypeError) as e:
        if FLAGS.traceback:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
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


def _one_line(error) -> str:
    """An error's message on one line; of a message that quotes a traceback, its last line."""
    text = str(error).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a KeyError's repr
        text = text[1:-1].replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        lines = lines[-1:]
    return " ".join(lines) or type(error).__name__


def _config_argument(argv) -> str | None:
    """The value of --config in ``argv`` (``path`` or ``path:argument``), or None."""
    for i, arg in enumerate(argv):
        match = re.match(r"--?config(=|$)", arg)
        if match:
            if match.group(1):
                return arg[match.end():]
            return argv[i + 1] if i + 1 < len(argv) else None
    return None


def _load_config(argument: str) -> tuple[ml_collections.ConfigDict | None, str | None]:
    """The config that ``--config=argument`` names, or None and why it does not load (one line).

    The file runs again here, on the error path only: the flag keeps neither a config whose
    overrides failed nor the exception of a file that did not load.
    """
    path = argument.split(":", 1)[0]
    if not (os.path.isfile(path) and os.access(path, os.R_OK)):
        problem = "is not a readable file" if os.path.exists(path) else "does not exist"
        return None, f"config file {path!r} {problem}; give --config=experiments/configs/NAME.py."
    try:
        loaded = FLAGS["config"].parser.parse(argument)
    except SyntaxError as e:
        return None, f"syntax error in {e.filename}, line {e.lineno}: {e.msg}."
    except Exception as e:  # noqa: BLE001 - what the file raises is the user's to see
        return None, f"config file {path} does not load: {_one_line(e)}"
    if not isinstance(loaded, ml_collections.ConfigDict):
        return None, (f"get_config() in {path} returned {type(loaded).__name__}; it must return "
                      "an ml_collections.ConfigDict.")
    return loaded, None


def _unknown_override(loaded: ml_collections.ConfigDict, argv) -> str | None:
    """The first --config.KEY in ``argv`` whose KEY ``loaded`` does not have, in one line."""
    from aejax.runtime.config import missing_key  # loads JAX: on this error path only

    for arg in argv:
        match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
        found = match and missing_key(loaded, match.group(1))
        if found:
            key, close, known = found
            hint = f'Did you mean "{close}"?' if close else f"Keys there: {', '.join(known)}."
            return f'unknown config key "{key}" (from {arg.split("=", 1)[0]}). {hint}'
    return None


def parse_flags(argv):
    # A missing or broken config file, or a mistyped --config.KEY, is one clear line and status
    # 2, not a traceback.
    argument = _config_argument(argv)
    try:
        rest = FLAGS(argv)
        if isinstance(FLAGS.config, ml_collections.ConfigDict):
            return rest
        error = ValueError("the config file does not load")  # ml_collections defers the error
    except Exception as e:  # noqa: BLE001 - every command-line error is one line and status 2
        error = e
    message = None
    if argument is not None:
        loaded, message = _load_config(argument)
        message = message or _unknown_override(loaded, argv)
    print(f"error: {message or f'bad command line: {_one_line(error)}'}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
