"""A run's configuration: every key with its default, the checks, the optimizer it names.

Everything here runs before anything compiles, so a bad config is one clear ``ConfigError``.
"""

from __future__ import annotations

import difflib
import math

import jax
import ml_collections
import optax

from aejax.runtime import distributed, placement


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
        # step, when it fits (data.fits_on_device); False, or too big: batches stream from host
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


def data_options(config) -> dict:
    """The keyword arguments of :func:`aejax.data.splits.load` that ``config.data`` asks for."""
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
    if mode not in ("auto",) + placement.MODES:
        raise ConfigError(f"Unknown parallel {mode!r}; choose 'auto' (sharded when there is more "
                          "than one device) or one of " + ", ".join(map(repr, placement.MODES)) + ".")
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


