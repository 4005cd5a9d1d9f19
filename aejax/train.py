"""Training: the config, the optimizer, and the loop ``train_and_evaluate(config, workdir)``.

The step (:mod:`aejax.step`, re-exported here) is ``train_step(state, batch, rng) -> (state,
metrics)``: a pure function, jitted once per run with the state donated. Randomness comes from
one key folded with the step number, and the data order from one key folded with the epoch, so
a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from aejax import checkpoints, corruptions, distributed, models, objectives, parallel, pca
from aejax.data import batching, offline
from aejax.data import splits as data_splits
# The pure step lives in aejax.step (below aejax.parallel, which the loop uses); these names are
# part of aejax.train's interface.
from aejax.step import (COMPUTE_DTYPES, NonFiniteLossError, PerExampleFn, TrainState,  # noqa: F401
                        apply_gradients, make_evaluate, make_per_example_fn, make_train_step,
                        metrics_template, pad_batches)

log = logging.getLogger(__name__)
Array = jax.Array


class ConfigError(ValueError):
    """A configuration key or value that does not exist or does not fit."""


# --------------------------------------------------------------------------- configuration


def default_config() -> ml_collections.ConfigDict:
    """Every key ``train_and_evaluate`` reads, with its default. Configs override these."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist", validation_size=5000, classes=(), flat=True, binarize=False,
        data_dir="", manual_dir="", train_examples=0,  # train_examples: 0 keeps all
        # on_device: the training set sits on the device(s) and batches are gathered inside the
        # step, when it fits (batching.fits_on_device); False, or too big: batches stream from host
        # memory, each placed on the device two steps ahead of its use.
        on_device=True))
    # Options other than `name` go to the model's constructor (see aejax.models).
    c.model = ml_collections.ConfigDict(dict(name="mlp", hidden=(128,), code_size=32,
                                             activation="relu", code_activation="linear"))
    # terms: {kind: {weight: w, warmup_steps: n, <the term's options>}} (see aejax.objectives).
    c.loss = ml_collections.ConfigDict(dict(reconstruction="bce", terms=ml_collections.ConfigDict()))
    c.corruption = ml_collections.ConfigDict(dict(kind="none"))
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adam", learning_rate=1e-3, schedule="constant", warmup_steps=0, decay_rate=0.5,
        momentum=0.9, nesterov=False, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip_norm=0.0))
    # Data-parallel step: "auto" (sharded when there is more than one device), "none", "pmap" or
    # "sharded" (aejax.parallel.Placement). batch_size is global and must divide over the devices.
    c.parallel = "auto"
    # "bfloat16": forward and backward in bfloat16; parameters, optimizer state and the reduction
    # of the losses stay float32 (aejax.step.make_per_example_fn).
    c.compute_dtype = "float32"
    c.batch_size = 256
    c.eval_batch_size = 1000
    c.num_epochs = 10
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.early_stopping_patience = 0  # epochs without improvement of validation `monitor`; 0: off
    c.early_stopping_min_delta = 0.0
    c.monitor = "loss"
    c.pca_baseline = True
    c.iwae_samples = 0  # VAE: test NLL by the importance-weighted bound with this many samples
    # Greedy layer-wise pretraining (aejax.stacking) when pretrain_epochs > 0.
    c.stacking = ml_collections.ConfigDict(dict(pretrain_epochs=0, compare_scratch=True))
    c.figures = True
    c.num_figure_images = 10
    c.progress = True
    # Several processes (hosts): all run the same command with their own process_id; process 0
    # serves the coordinator at coordinator_address ("host:port"; "" = one process). A process
    # that stops sending heartbeats for heartbeat_timeout seconds counts as dead.
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=1, process_id=0, initialization_timeout=300,
        heartbeat_timeout=60))
    return c


_FREE_FORM = ("model", "loss", "corruption")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for keys that ``train_and_evaluate`` does not know, with suggestions."""
    default = default_config()

    def walk(cfg, ref, prefix):
        for key in cfg.keys():
            path = f"{prefix}{key}"
            if key not in ref:
                close = difflib.get_close_matches(key, list(ref.keys()), n=1)
                hint = f" Did you mean {prefix}{close[0]!r}?" if close else ""
                raise ConfigError(f"Unknown config key {path!r}.{hint} Known keys under "
                                  f"{prefix or 'config.'}: {sorted(ref.keys())}.")
            if isinstance(ref[key], ml_collections.ConfigDict) and key not in _FREE_FORM:
                walk(cfg[key], ref[key], f"{path}.")

    walk(config, default, "")


def start_distributed(config: ml_collections.ConfigDict) -> bool:
    """Starts ``jax.distributed`` as ``config.distributed`` asks (once per process).

    Call it before anything touches a device; :func:`train_and_evaluate` calls it first thing.

    Returns:
      Whether this process is one of several.

    Raises:
      ConfigError: inconsistent settings, or a process that cannot join (JAX already started).
    """
    d = config.distributed
    if not d.coordinator_address:
        if d.num_processes != 1:
            raise ConfigError(f"distributed.num_processes={d.num_processes} needs "
                              "distributed.coordinator_address (host:port of process 0).")
        return False
    if ":" not in d.coordinator_address:
        raise ConfigError(f"distributed.coordinator_address must be host:port, got "
                          f"{d.coordinator_address!r}.")
    if not (d.num_processes >= 1 and 0 <= d.process_id < d.num_processes):
        raise ConfigError(f"distributed.process_id must be in [0, {d.num_processes}) and "
                          f"num_processes >= 1; got process_id={d.process_id}, "
                          f"num_processes={d.num_processes}.")
    try:
        return distributed.initialize(d.coordinator_address, d.num_processes, d.process_id,
                                      initialization_timeout=d.initialization_timeout,
                                      heartbeat_timeout=d.heartbeat_timeout)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_optimizer(cfg: ml_collections.ConfigDict, total_steps: int,
                    steps_per_epoch: int) -> optax.GradientTransformation:
    """optax optimizer from config: adam/adamw or sgd (momentum, Nesterov), schedules, decay, clipping."""
    lr = float(cfg.learning_rate)
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"optimizer.learning_rate must be a positive number, got {cfg.learning_rate}.")
    schedules = {
        "constant": lambda: optax.constant_schedule(lr),
        "cosine": lambda: optax.cosine_decay_schedule(lr, max(total_steps, 1)),
        "warmup_cosine": lambda: optax.warmup_cosine_decay_schedule(
            0.0, lr, max(cfg.warmup_steps, 1), max(total_steps, cfg.warmup_steps + 1)),
        "exponential": lambda: optax.exponential_decay(lr, max(steps_per_epoch, 1), cfg.decay_rate),
    }
    if cfg.schedule not in schedules:
        raise ConfigError(f"Unknown optimizer.schedule {cfg.schedule!r}; choose one of "
                          f"{sorted(schedules)}.")
    schedule = schedules[cfg.schedule]()
    if cfg.name == "adam":
        tx = (optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
              if cfg.weight_decay else optax.adam(schedule, b1=cfg.b1, b2=cfg.b2))
    elif cfg.name == "sgd":
        tx = optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
        if cfg.weight_decay:
            tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    else:
        raise ConfigError(f"Unknown optimizer.name {cfg.name!r}; choose 'adam' or 'sgd'.")
    if cfg.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Experiment:
    """Everything built from a config before training: data, model, objective, steps."""

    config: ml_collections.ConfigDict
    splits: data_splits.Splits
    model: Any
    per_example: PerExampleFn
    tx: optax.GradientTransformation
    steps_per_epoch: int
    total_steps: int
    parallel: str = "none"
    num_devices: int = 1


def _data_options(config) -> dict:
    d = config.data
    return dict(validation_size=d.validation_size, seed=config.seed,
                classes=tuple(d.classes) or None, flat=d.flat, data_dir=d.data_dir or None,
                manual_dir=d.manual_dir or None)


def resolve_parallel(config: ml_collections.ConfigDict) -> tuple[str, int]:
    """``(mode, number of devices)`` that ``config.parallel`` asks for on this machine.

    Raises:
      ConfigError: an unknown mode, or a ``batch_size`` that does not divide over the devices.
    """
    mode = config.parallel
    if mode not in ("auto",) + parallel.MODES:
        raise ConfigError(f"Unknown parallel {mode!r}; choose 'auto' (sharded when there is more "
                          "than one device) or one of " + ", ".join(map(repr, parallel.MODES)) + ".")
    if mode == "auto":
        mode = "sharded" if jax.device_count() > 1 else "none"
    if jax.process_count() > 1 and mode != "sharded":
        raise ConfigError(f"parallel={mode!r} runs in one process, but this run has "
                          f"{jax.process_count()} processes; use parallel='sharded' (or 'auto').")
    num_devices = {"none": 1, "pmap": jax.local_device_count(), "sharded": jax.device_count()}[mode]
    if config.batch_size % num_devices:
        fit = config.batch_size + (-config.batch_size) % num_devices
        raise ConfigError(
            f"batch_size {config.batch_size} does not split evenly over the {num_devices} devices "
            f"of parallel={mode!r}: use a multiple of {num_devices} (e.g. --config.batch_size="
            f"{fit}), or parallel='none' for one device.")
    return mode, num_devices


def build_experiment(config: ml_collections.ConfigDict,
                     splits: Optional[data_splits.Splits] = None) -> Experiment:
    """Validates ``config`` and builds the experiment (loads data unless ``splits`` is given)."""
    check_config(config)
    if config.batch_size <= 0 or config.eval_batch_size <= 0 or config.num_epochs < 0:
        raise ConfigError("batch_size and eval_batch_size must be positive and num_epochs >= 0; got "
                          f"{config.batch_size}, {config.eval_batch_size}, {config.num_epochs}.")
    if config.log_every_steps <= 0 or config.checkpoint_every_steps <= 0:
        raise ConfigError("log_every_steps and checkpoint_every_steps must be positive; got "
                          f"{config.log_every_steps}, {config.checkpoint_every_steps}.")
    mode, num_devices = resolve_parallel(config)
    if splits is None:
        if config.data.name not in data_splits.DATASETS:
            raise ConfigError(f"Unknown dataset {config.data.name!r}; choose one of {data_splits.DATASETS}.")
        splits = data_splits.load(config.data.name, **_data_options(config))
    if config.data.train_examples:
        if not 0 < config.data.train_examples <= len(splits.train[0]):
            raise ConfigError(f"data.train_examples must be in [1, {len(splits.train[0])}] (0 keeps "
                              f"all), got {config.data.train_examples}.")
        x, y = splits.train
        splits = splits._replace(train=(x[:config.data.train_examples], y[:config.data.train_examples]))
    for split_name, (x, _) in zip(("train", "validation", "test"), splits):
        name = f"{config.data.name} {split_name} images"
        if config.loss.reconstruction == "bce":  # Bernoulli targets must lie in [0, 1]
            data_splits.check_images(x, name=name)
        elif not np.all(np.isfinite(x)):
            raise offline.DataError(f"{name} contain {np.count_nonzero(~np.isfinite(x))} NaN or inf "
                                    "values; clean the data first.")
    model_options = {k: v for k, v in config.model.items() if k != "name"}
    model = models.create(config.model.name, **model_options)
    terms = {k: dict(v) for k, v in config.loss.terms.items()}
    objectives.check_compatible(model, terms)
    objective = objectives.build(config.loss.reconstruction, terms)
    corruption_options = {k: v for k, v in config.corruption.items() if k != "kind"}
    corrupt = (None if config.corruption.kind == "none"
               else corruptions.build(config.corruption.kind, **corruption_options))
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"Unknown compute_dtype {config.compute_dtype!r}; choose one of "
                          f"{COMPUTE_DTYPES}.")
    per_example = make_per_example_fn(model, objective, corrupt=corrupt,
                                      binarize=config.data.binarize,
                                      reconstruction=config.loss.reconstruction,
                                      compute_dtype=config.compute_dtype)
    spe = batching.steps_per_epoch(len(splits.train[0]), config.batch_size)
    total = spe * config.num_epochs
    tx = build_optimizer(config.optimizer, total, spe)
    return Experiment(config, splits, model, per_example, tx, spe, total, mode, num_devices)


def _check_workdir(workdir: str) -> str:
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")  # one per process
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"Cannot write to workdir {workdir!r} ({e.strerror or e}). Choose a "
                      "directory you can write to with --workdir=...") from None
    return workdir


def _truncate_metrics(path: str, step: int) -> None:
    """Drops lines logged after ``step`` (they are about to be recomputed by the resumed run)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    kept = []
    for ln in lines:
        try:
            if json.loads(ln).get("step", 0) <= step:
                kept.append(ln)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    with open(path, "w") as f:
        f.writelines(kept)


def _nonfinite_error(bad_step: int, bad_metrics: dict, last_good: Optional[int],
                     ckpt_dir: str) -> NonFiniteLossError:
    bad_terms = {k: float(v) for k, v in bad_metrics.items() if not np.isfinite(v)}
    kept = (f"the last good checkpoint (step {last_good}) is kept in {ckpt_dir}" if last_good is not None
            else "no checkpoint was written yet")
    return NonFiniteLossError(
        f"Non-finite loss at step {bad_step}: {bad_terms}. Training stopped; {kept}. "
        "Lower optimizer.learning_rate, clip gradients (optimizer.grad_clip_norm) or reduce the "
        "weight of the term that diverged, then run again in a new workdir or the same one to "
        "resume from that checkpoint.")


PREFETCH = 2  # batches placed ahead of the step on the streaming path


def _host_batches(place: parallel.Placement, x: np.ndarray, perm: np.ndarray, batch_size: int,
                  first: int, last: int):
    """Batches ``first..last-1`` of an epoch in order ``perm``: this process's rows, placed."""
    rows = distributed.process_rows(batch_size)
    for index in range(first, last):
        batch_rows = perm[index * batch_size:(index + 1) * batch_size][rows]
        yield place.batch(batch_size, {"x": x[batch_rows]})


def _check_resumable(meta: dict, exp: Experiment, workdir: str) -> None:
    """Refuses to continue a pmap run on another device count or mode: its noise would change."""
    mode, count = meta.get("parallel", "none"), meta.get("num_devices", 1)
    if meta["finished"] or mode != "pmap" or (exp.parallel, exp.num_devices) == (mode, count):
        return
    raise ConfigError(
        f"The run in {workdir} was trained with parallel='pmap' on {count} devices and cannot "
        f"resume with parallel={exp.parallel!r} on {exp.num_devices}: pmap draws each device's "
        "noise from its device index, so the resumed run would not repeat the interrupted one. "
        f"Resume it on {count} devices with parallel='pmap' (on CPU: XLA_FLAGS="
        f"--xla_force_host_platform_device_count={count}), or start in a new workdir.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       splits: Optional[data_splits.Splits] = None, init_params: Any = None) -> dict:
    """Trains, validates every epoch, checkpoints, and evaluates on the test split.

    Running again in the same ``workdir`` resumes from the newest checkpoint (a finished run is
    only re-evaluated, unless ``num_epochs`` was raised: then the added epochs are trained).
    Writes ``metrics.jsonl``, ``summary.json``, checkpoints and figures. With the training set
    on the device, one compiled call runs every step up to the next log step, checkpoint or
    epoch end (:meth:`aejax.parallel.Placement.fused_step`); the host only waits at those.
    With ``config.parallel`` the step runs data-parallel over several devices
    (:class:`aejax.parallel.Placement`); checkpoints hold one copy of the state either way. With
    ``config.distributed`` every process runs this with the same ``workdir`` (a shared file
    system); all of them write the checkpoints, process 0 alone the logs, metrics and figures.

    Args:
      config: see :func:`default_config`.
      workdir: output directory (created; must be writable).
      splits: data to use instead of loading ``config.data`` (tests, stacked training).
      init_params: parameters to start from instead of a random initialization (fine-tuning).

    Returns:
      The summary dict also written to ``summary.json`` (on other processes than 0: the test
      metrics and the run's facts, without the PCA baseline and figures).

    Raises:
      distributed.PeerLostError: another process of the run stopped (after it, exit without
        ``jax.distributed.shutdown``: see :func:`aejax.distributed.exit_without_shutdown`).
    """
    check_config(config)
    start_distributed(config)
    workdir = _check_workdir(workdir)
    exp = build_experiment(config, splits)
    cfg = exp.config
    primary = jax.process_index() == 0
    info = log.info if primary else (lambda *args: None)
    (x_train, _), (x_val, _), (x_test, y_test) = exp.splits
    bs, spe = cfg.batch_size, exp.steps_per_epoch
    place = parallel.Placement.create(exp.parallel, exp.num_devices)
    # Padding rows are masked out of every mean, so rounding up to whole devices changes nothing.
    eval_bs = -(-cfg.eval_batch_size // exp.num_devices) * exp.num_devices

    root = jax.random.PRNGKey(cfg.seed)
    init_rng, data_rng, train_rng, eval_rng = jax.random.split(root, 4)
    data_rng, train_rng, eval_rng = (place.constant(k) for k in (data_rng, train_rng, eval_rng))
    x_first = jnp.asarray(x_train[:bs])
    params = models.init(exp.model, init_rng, x_first)
    if init_params is not None:
        if jax.tree.structure(init_params) != jax.tree.structure(params):
            raise ValueError("init_params do not have the structure of the model's parameters.")
        params = jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype).reshape(a.shape), params, init_params)
    template = metrics_template(exp.per_example, params, x_first)
    state = place.state(TrainState.create(params, exp.tx, template))
    best_params = jax.tree.map(jnp.copy, place.single(state.params))

    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpts = checkpoints.Checkpoints(ckpt_dir, max_to_keep=cfg.keep_checkpoints)
    meta = {"epoch": 0, "best_validation": None, "best_epoch": None, "bad_epochs": 0,
            "finished": False, "stopped_early": False, "history": [], "train_seconds": 0.0}
    # Checkpoints leave out state.bad_metrics: only finite states are saved, so it is always
    # zeros there, and its keys (the metric names) may change between versions of aejax.
    checkpointed = lambda s: {"state": place.single(s).replace(bad_metrics=None),
                              "best_params": best_params}

    def restore_target(on_disk):  # checkpoints of earlier versions hold a bad_metrics dict
        try:
            old = on_disk["state"]["bad_metrics"]
        except (KeyError, TypeError):
            old = None
        bad = None if old is None else jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(getattr(m, "shape", ()) or ()), m.dtype), old)
        target = checkpointed(state)
        return dict(target, state=target["state"].replace(bad_metrics=bad))

    restored = ckpts.restore_latest(restore_target)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    last_good = None
    if restored is not None:
        last_good, tree, meta = restored
        if meta["finished"] and not meta["stopped_early"] and meta["epoch"] < cfg.num_epochs:
            meta["finished"] = False  # num_epochs was raised since: train the epochs added
        _check_resumable(meta, exp, workdir)
        state = place.state(tree["state"].replace(bad_metrics=place.single(state).bad_metrics))
        best_params = tree["best_params"]
        info("Resumed from step %d (epoch %d) in %s", last_good, meta["epoch"], ckpt_dir)
        if primary:
            _truncate_metrics(metrics_path, last_good)
    elif primary and os.path.exists(metrics_path):
        os.remove(metrics_path)
    meta.update(parallel=exp.parallel, num_devices=exp.num_devices,
                num_processes=jax.process_count())

    info("%s: %d train / %d validation / %d test examples; %d steps per epoch, %d epochs; "
         "workdir %s", cfg.data.name, len(x_train), len(x_val), len(x_test), spe,
         cfg.num_epochs, workdir)
    if exp.parallel != "none":
        info("Data-parallel step: parallel=%r over %d devices in %d process(es), %d examples "
             "per device.", exp.parallel, exp.num_devices, jax.process_count(),
             bs // exp.num_devices)
    if meta["finished"]:
        info("The run in %s is finished; evaluating its best parameters again.", workdir)
    step_fn = (parallel.make_device_step(exp.per_example, exp.tx, axis_name=parallel.PMAP_AXIS)
               if exp.parallel == "pmap" else make_train_step(exp.per_example, exp.tx))
    on_device = cfg.data.on_device and batching.fits_on_device(x_train.nbytes)
    if on_device:
        run_step = place.fused_step(step_fn, bs, spe)
        x_train_dev = place.data(x_train)
    else:
        info("Streaming the training set from host memory (data.on_device=%s, %.0f MB): each "
             "process places its rows of every batch, %d batches ahead.", cfg.data.on_device,
             x_train.nbytes / 2**20, PREFETCH)
        run_step = place.stream_step(step_fn)
    evaluate = jax.jit(make_evaluate(exp.per_example))
    param_norm = jax.jit(optax.tree.norm)  # at log steps only: not worth its cost every step
    val_xs, val_masks = place.eval_batches(x_val, eval_bs)

    def check_finite():
        bad_step = int(place.fetch(state.bad_step))
        if bad_step >= 0:
            raise _nonfinite_error(bad_step, place.fetch(state.bad_metrics), last_good, ckpt_dir)

    def save(step):
        nonlocal last_good
        check_finite()
        ckpts.save(step, checkpointed(state), meta)
        last_good = step

    step = int(place.fetch(state.step))
    progress = _progress_bar(cfg, exp.total_steps, step, enabled=primary)
    # A fresh accumulator each time: the step donates (and so deletes) the one it is given.
    new_acc = lambda: place.state(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template))
    t_start = time.time()
    seconds_before = meta["train_seconds"]
    try:
        with open(metrics_path if primary else os.devnull, "a") as metrics_file:
            while not meta["finished"] and meta["epoch"] < cfg.num_epochs:
                epoch = meta["epoch"]
                first = step - epoch * spe
                if on_device:
                    perm = place.permutation(data_rng, len(x_train), epoch)
                else:  # the same order as on the device
                    batches = parallel.prefetch_to_device(_host_batches(
                        place, x_train, place.host_permutation(data_rng, len(x_train), epoch),
                        bs, first, spe), PREFETCH)
                acc, count = new_acc(), 0
                epoch_train = jax.tree.map(lambda s: 0.0, template)
                epoch_count = 0
                index = first
                while index < spe:
                    if on_device:  # every step up to the next log, checkpoint or epoch end
                        n = min(spe - index, cfg.log_every_steps - step % cfg.log_every_steps,
                                cfg.checkpoint_every_steps - step % cfg.checkpoint_every_steps)
                        state, acc = run_step(state, acc, x_train_dev, perm, n, train_rng)
                    else:
                        n = 1
                        state, acc = run_step(state, acc, next(batches), train_rng)
                    step += n
                    count += n
                    index += n
                    progress.update(n)
                    end_of_epoch = index == spe
                    if step % cfg.log_every_steps == 0 or end_of_epoch:
                        means = {k: float(v) / count for k, v in place.fetch(acc).items()}
                        means["param_norm"] = float(place.fetch(param_norm(place.single(state.params))))
                        check_finite()
                        metrics_file.write(json.dumps({"step": step, "split": "train", **means}) + "\n")
                        progress.set_postfix(loss=f"{means['loss']:.4g}", refresh=False)
                        epoch_train = {k: epoch_train.get(k, 0.0) + means[k] * count for k in means}
                        epoch_count += count
                        acc, count = new_acc(), 0
                    if step % cfg.checkpoint_every_steps == 0 and not end_of_epoch:
                        meta["train_seconds"] = seconds_before + time.time() - t_start
                        save(step)
                params_now = place.single(state.params)
                val = {k: float(v) for k, v in
                       evaluate(params_now, val_xs, val_masks, eval_rng, place.single(state.step)).items()}
                row = {"epoch": epoch + 1, "step": step}
                row.update({f"train_{k}": v / max(epoch_count, 1) for k, v in epoch_train.items()})
                row.update({f"validation_{k}": v for k, v in val.items()})
                metrics_file.write(json.dumps({"step": step, "epoch": epoch + 1,
                                               "split": "validation", **val}) + "\n")
                metrics_file.flush()
                meta["history"].append(row)
                monitored = val[cfg.monitor] if cfg.monitor in val else val["loss"]
                best = meta["best_validation"]
                if best is None or monitored < best - cfg.early_stopping_min_delta:
                    meta.update(best_validation=monitored, best_epoch=epoch + 1, bad_epochs=0)
                    best_params = jax.tree.map(jnp.copy, params_now)
                else:
                    meta["bad_epochs"] += 1
                meta["epoch"] = epoch + 1
                if cfg.early_stopping_patience and meta["bad_epochs"] >= cfg.early_stopping_patience:
                    meta.update(finished=True, stopped_early=True)
                if meta["epoch"] >= cfg.num_epochs:
                    meta["finished"] = True
                meta["train_seconds"] = seconds_before + time.time() - t_start
                save(step)
        progress.close()
        ckpts.close()
        test_xs, test_masks = place.eval_batches(x_test, eval_bs)
        test = {k: float(v) for k, v in
                evaluate(best_params, test_xs, test_masks, eval_rng, place.single(state.step)).items()}
    except Exception as e:  # noqa: BLE001 - only a lost peer is turned into another error
        if not distributed.is_peer_failure(e):
            raise
        raise distributed.PeerLostError(
            f"Process {jax.process_index()} of {jax.process_count()} lost contact with the other "
            f"processes near step {step} ({str(e).strip().splitlines()[0]}). Training stopped. "
            f"The newest complete checkpoint in {ckpt_dir} is intact (step {last_good} was the "
            "last one this process saved); start all processes again with the same command to "
            "resume from it.") from e
    summary = _final_evaluation(exp, workdir, parallel.to_host(best_params), meta, test, step,
                                primary=primary)
    info("Wrote %s", os.path.join(workdir, "summary.json"))
    return summary


def load_best_params(workdir: str) -> Any:
    """The best-validation parameters of the run in ``workdir`` (plain arrays)."""
    ckpts = checkpoints.Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        state, _ = ckpts.read()
    finally:
        ckpts.close()
    return state["best_params"]


def _progress_bar(cfg, total: int, initial: int, *, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not (cfg.progress and enabled),
                mininterval=1.0, unit="step", dynamic_ncols=True)


def reconstruct_images(model, params, x: Array, reconstruction: str) -> np.ndarray:
    """Deterministic reconstructions of ``x`` (the VAE decodes its posterior mean)."""
    if isinstance(model, models.VAE):
        mean, _ = model.apply({"params": params}, x, method=model.encode)
        logits = model.apply({"params": params}, mean, method=model.decode)
    else:
        logits, _ = model.apply({"params": params}, x)
    return np.asarray(objectives.reconstruct(logits, reconstruction))


def _final_evaluation(exp: Experiment, workdir: str, params, meta: dict, test: dict,
                      step: int, *, primary: bool = True) -> dict:
    """The summary of a run from the test metrics of ``params`` (numpy): PCA, IWAE, figures.

    Only the ``primary`` process (0) computes the baselines, draws and writes anything.
    """
    cfg = exp.config
    (x_train, _), _, (x_test, _) = exp.splits
    summary = {
        "dataset": cfg.data.name,
        "model": cfg.model.to_dict(),
        "num_params": int(sum(np.size(p) for p in jax.tree.leaves(params))),
        "epochs_run": meta["epoch"],
        "steps": int(step),
        "best_epoch": meta["best_epoch"],
        "stopped_early": meta["stopped_early"],
        "train_seconds": round(meta["train_seconds"], 2),
        "test": test,
    }
    if not primary:
        return summary
    code_size = _code_size(exp.model)
    pca_recon = None
    if cfg.pca_baseline and code_size is not None:
        fitted = pca.fit(x_train, code_size)
        summary["pca"] = {"code_size": code_size, "test": pca.reconstruction_errors(fitted, x_test)}
        summary["autoencoder_beats_pca"] = (
            test["squared_error_per_image"] < summary["pca"]["test"]["squared_error_per_image"])
        n = cfg.num_figure_images
        pca_recon = np.asarray(pca.decode(fitted, pca.encode(fitted, x_test[:n]), x_test.shape[1:]))
    if isinstance(exp.model, models.VAE) and cfg.iwae_samples:
        from aejax import vae

        x_eval = x_test
        if cfg.data.binarize:  # one fixed binarization of the test set, as in Burda et al.
            x_eval = np.asarray(batching.binarize(jax.random.PRNGKey(cfg.seed + 1), jnp.asarray(x_test)))
        nll = vae.evaluate_nll(exp.model, params, x_eval, jax.random.PRNGKey(cfg.seed + 2),
                               num_samples=cfg.iwae_samples, batch_size=100,
                               chunk_size=min(cfg.iwae_samples, 500))
        summary["test"]["iwae_nll"] = nll
        summary["test"]["iwae_samples"] = cfg.iwae_samples
        # The k = 1 bound (a Monte Carlo -ELBO) on the same binarized images: "elbo" above is
        # averaged over fresh binarizations, so only this one compares with iwae_nll exactly.
        summary["test"]["iwae_nll_k1"] = vae.evaluate_nll(
            exp.model, params, x_eval, jax.random.PRNGKey(cfg.seed + 3), num_samples=1,
            batch_size=100, chunk_size=1)
    if cfg.figures:
        n = cfg.num_figure_images
        from aejax import figures  # matplotlib only when figures are asked for

        recon = reconstruct_images(exp.model, params, jnp.asarray(x_test[:n]), cfg.loss.reconstruction)
        paths = figures.save_run_figures(workdir, x_test[:n], recon, meta["history"], pca_recon)
        if isinstance(exp.model, models.VAE):
            from aejax import vae

            samples = np.asarray(vae.sample_prior(exp.model, params, jax.random.PRNGKey(cfg.seed),
                                                  2 * n))
            paths.append(figures.image_rows([samples[:n], samples[n:]], ["prior", "samples"],
                                            os.path.join(workdir, "prior_samples.png"),
                                            title="decoded samples from the prior N(0, I)"))
        summary["figures"] = [os.path.basename(p) for p in paths]
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _code_size(model) -> Optional[int]:
    if isinstance(model, models.MLPAutoencoder):
        return model.code_size
    if isinstance(model, models.VAE):
        return model.latent_size
    if isinstance(model, models.ConvAutoencoder):
        return math.prod(model.code_shape)
    return None
