"""A run's configuration: every key with its default, the checks, the optimizer it names.

Everything here runs before anything compiles, so a bad config is one clear ``ConfigError``.
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
import optax

from aejax import corruptions, jacobians, losses, models, objectives
from aejax.data import batching, offline
from aejax.data.splits import NUM_CLASSES
from aejax.runtime import distributed, placement, writers
from aejax.step import COMPUTE_DTYPES


class ConfigError(ValueError):
    """A configuration key or value that does not exist or does not fit."""


# --------------------------------------------------------------------------- configuration


def default_config() -> ml_collections.ConfigDict:
    """Every key ``train_and_evaluate`` reads, with its default. Configs override these."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist", validation_size=5000, classes=(), flat=True, binarize=False,
        # binarize_method: "threefry" (jax.random) or "counter" (a keyed hash of each pixel's
        # index, several times cheaper on a CPU); see aejax.data.batching.binarize.
        binarize_method="threefry",
        data_dir="", manual_dir="", train_examples=0,  # train_examples: 0 keeps all
        # on_device: the training set sits on the device(s) and batches are gathered inside the
        # step, when it fits (data.fits_on_device); False, or too big: batches stream from host
        # memory, each placed on the device two steps ahead of its use.
        on_device=True))
    # Options other than `name` go to the model's constructor (see aejax.models).
    c.model = ml_collections.ConfigDict(dict(name="mlp", hidden=(128,), code_size=32,
                                             activation="relu", code_activation="linear"))
    # terms: {kind: {weight: w, warmup_steps: n, <the term's options>}} (see aejax.objectives).
    # reconstruction_weight 0 reports the reconstruction term without training it (IWAE).
    c.loss = ml_collections.ConfigDict(dict(reconstruction="bce", reconstruction_weight=1.0,
                                            terms=ml_collections.ConfigDict()))
    c.corruption = ml_collections.ConfigDict(dict(kind="none"))
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adam", learning_rate=1e-3, schedule="constant", warmup_steps=0, decay_rate=0.5,
        momentum=0.9, nesterov=False, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
        grad_clip_norm=0.0))
    # Schedules: "constant", "cosine", "warmup_cosine", "exponential" (decay_rate per epoch) and
    # "burda": learning_rate * 10^(-i/7) for 3^i epochs, i = 0, 1, 2, ... (Burda et al. 2016:
    # 1 + 3 + 9 + 27 + 81 + ... epochs; 121 epochs end stage i = 4).
    # Data-parallel step: "auto" (sharded when there is more than one device), "none", "pmap" or
    # "sharded" (aejax.runtime.placement). batch_size is global and must divide over the devices.
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
    # When checkpoints exist but none verifies (each is moved aside as STEP.corrupt-TIME): False
    # stops with one line; True starts the run afresh (the old metrics.jsonl is moved aside too).
    c.start_fresh_if_unreadable = False
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
    # The contractive estimator audit (aejax.jacobians.contractive_audit) every `every` steps (a
    # multiple of log_every_steps; 0: off), on the first `examples` validation images: the exact
    # ||J||_F^2, the estimator's value, their relative error and the cosine between their
    # gradients with respect to the parameters; logged as split "audit" in metrics.jsonl.
    c.contractive_audit = ml_collections.ConfigDict(dict(every=0, estimator="gaussian",
                                                         num_probes=1, examples=256))
    # TensorBoard event files in the workdir (aejax.runtime.writers): every metric of
    # metrics.jsonl, the config, reconstructions (and a VAE's samples) each epoch.
    c.tensorboard = True
    # Weights & Biases, when wandb is installed: the same, in a W&B run kept across resumes.
    # mode "offline" keeps it on this machine (upload later with `wandb sync WORKDIR/wandb/...`).
    c.wandb = ml_collections.ConfigDict(dict(enabled=False, project="aejax", entity="", name="",
                                             mode="offline"))
    # Several processes (hosts): all run the same command with their own process_id; process 0
    # serves the coordinator at coordinator_address ("host:port"; "" = one process). A process
    # that stops sending heartbeats for heartbeat_timeout seconds counts as dead.
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=1, process_id=0, initialization_timeout=300,
        heartbeat_timeout=60))
    return c


_FREE_FORM = ("model", "loss", "corruption")


def closest_key(key: str, known: Sequence[str]) -> Optional[str]:
    """The key of ``known`` a mistyped ``key`` most likely means, or None.

    A close spelling (``num_epoch``), else the one key whose words' initials ``key`` is
    (``lr``: ``learning_rate``), else the one key that contains it (``epochs``: ``num_epochs``).
    """
    close = difflib.get_close_matches(key, list(known), n=1)
    if close:
        return close[0]
    initials = [k for k in known if "".join(w[:1] for w in k.split("_")) == key]
    containing = [k for k in known if len(key) > 2 and key in k]
    for found in (initials, containing):
        if len(found) == 1:
            return found[0]
    return None


def missing_key(config: ml_collections.ConfigDict, path: str
                ) -> Optional[tuple[str, Optional[str], list[str]]]:
    """Where the dotted ``path`` (``"optimizer.lr"``) leaves ``config``; None when it exists.

    Returns:
      ``(dotted path of the first missing key, dotted path of the key it most likely means or
      None, the keys that exist there)``.
    """
    node, parts = config, path.split(".")
    for i, key in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict):
            return None  # below a plain value: not a missing key
        if key not in node:
            prefix = "".join(f"{p}." for p in parts[:i])
            known = sorted(node.keys())
            close = closest_key(key, known)
            return prefix + key, (prefix + close if close else None), known
        node = node[key]
    return None


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for keys that ``train_and_evaluate`` does not know, with suggestions."""
    default = default_config()

    def walk(cfg, ref, prefix):
        for key in cfg.keys():
            path = f"{prefix}{key}"
            if key not in ref:
                close = closest_key(key, list(ref.keys()))
                hint = f" Did you mean {prefix + close!r}?" if close else ""
                raise ConfigError(f"Unknown config key {path!r}.{hint} Known keys under "
                                  f"{prefix or 'config.'}: {sorted(ref.keys())}.")
            if isinstance(ref[key], ml_collections.ConfigDict) and key not in _FREE_FORM:
                walk(cfg[key], ref[key], f"{path}.")

    walk(config, default, "")


# --------------------------------------------------------------------------- validation


def validate(config: ml_collections.ConfigDict, *, data_given: bool = False) -> None:
    """Raises ConfigError unless every key of ``config`` exists and holds a value that fits.

    Types and ranges of every key of :func:`default_config`; names against the choices where
    they live (:data:`aejax.models.ACTIVATIONS`, :data:`aejax.objectives.RECONSTRUCTIONS`,
    :data:`aejax.objectives.CONTRACTIVE_TERM_MODES`, :data:`aejax.corruptions.CORRUPTIONS`, ...).
    The model, objective, corruption and optimizer are then built once, so their own checks
    (unknown model options, a ``module:Class`` that does not import) run here too. Nothing is
    compiled, no data is read and no device is touched: call it first.

    The model section is free-form: the standard options are checked for aejax's own models
    only; a user's model checks its options itself.

    Args:
      config: a run's configuration (see :func:`default_config`).
      data_given: the caller brings the data (``splits=``), so ``data.name`` is only a label.
    """
    check_config(config)
    _check_run(config)
    _check_data(config.data, data_given)
    if config.data.train_examples and config.batch_size > config.data.train_examples:
        raise ConfigError(f"batch_size {config.batch_size} is larger than data.train_examples "
                          f"{config.data.train_examples}, so an epoch has no full batch; lower "
                          "batch_size or raise data.train_examples.")
    _check_model(config.model)
    _check_loss(config.loss)
    _check_corruption(config.corruption)
    _check_optimizer(config.optimizer)
    _check_distributed(config.distributed)
    _check_writers(config)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _integer(path: str, value: Any, low: int = 0, high: Optional[int] = None,
             why: str = "") -> None:
    """``low <= value < high``, an integer (not a bool); ``why``: what the bounds mean."""
    if _is_int(value) and value >= low and (high is None or value < high):
        return
    if (low, high) == (1, None):
        want, why = "positive", "; ".join(filter(None, ("an integer >= 1", why)))
    else:
        want = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high})"
    _refuse(path, want, why, value)


def _real(path: str, value: Any, low: float = 0.0, high: float = math.inf, *,
          closed: str = "[)", why: str = "") -> None:
    """A finite number in the interval ``low, high`` with the ends that ``closed`` says."""
    ok = (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
          and (value >= low if closed[0] == "[" else value > low)
          and (value <= high if closed[1] == "]" else value < high))
    if ok:
        return
    if (low, high, closed[0]) == (0.0, math.inf, "("):
        want = "a positive number"
    elif high == math.inf:
        want = f"a finite number {'>=' if closed[0] == '[' else '>'} {low:g}"
    else:
        want = f"a number in {closed[0]}{low:g}, {high:g}{closed[1]}"
    _refuse(path, want, why, value)


def _refuse(path: str, want: str, why: str, value: Any) -> None:
    raise ConfigError(f"{path} must be {want}{f' ({why})' if why else ''}; got {value!r}.")


def _boolean(path: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{path} must be True or False; got {value!r}.")


def _string(path: str, value: Any, *, nonempty: str = "") -> None:
    """A string; ``nonempty``: what it must name (then "" is refused)."""
    if not isinstance(value, str) or (nonempty and not value):
        raise ConfigError(f"{path} must be {nonempty or 'a string'}; got {value!r}.")


def _choice(path: str, value: Any, choices: Sequence[str], what: str) -> None:
    if not (isinstance(value, str) and value in choices):
        raise ConfigError(f"Unknown {what} {value!r} ({path}); choose one of "
                          f"{', '.join(map(repr, choices))}.")


def _sizes(path: str, value: Any, *, count: Optional[int] = None, empty: bool = False) -> None:
    """A tuple (or list) of positive integers: layer widths, a shape."""
    if (isinstance(value, (tuple, list)) and all(_is_int(v) and v > 0 for v in value)
            and (empty or value) and (count is None or len(value) == count)):
        return
    want = f"{count} positive integers" if count else "a tuple of positive integers"
    raise ConfigError(f"{path} must be {want}{' (may be empty)' if empty else ''}; got {value!r}.")


def _check_run(c: ml_collections.ConfigDict) -> None:
    _integer("seed", c.seed, 0, 2**32)
    _choice("parallel", c.parallel, ("auto",) + placement.MODES, "parallel mode")
    _choice("compute_dtype", c.compute_dtype, COMPUTE_DTYPES, "compute_dtype")
    for key in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints", "num_figure_images"):
        _integer(key, c[key], 1)
    _integer("stacking.pretrain_epochs", c.stacking.pretrain_epochs, 0)
    _boolean("stacking.compare_scratch", c.stacking.compare_scratch)
    _boolean("start_fresh_if_unreadable", c.start_fresh_if_unreadable)
    if c.stacking.pretrain_epochs:  # fine-tuning for 0 epochs keeps the stacked parameters
        _integer("num_epochs", c.num_epochs, 0)
    else:
        _integer("num_epochs", c.num_epochs, 1, why="a run of 0 epochs trains nothing")
    _integer("early_stopping_patience", c.early_stopping_patience, 0,
             why="epochs without improvement; 0 turns early stopping off")
    _real("early_stopping_min_delta", c.early_stopping_min_delta)
    _string("monitor", c.monitor, nonempty="the name of a validation metric, e.g. 'loss'")
    _integer("iwae_samples", c.iwae_samples, 0, why="0: no importance-weighted test NLL")
    for key in ("pca_baseline", "figures", "progress", "tensorboard"):
        _boolean(key, c[key])
    a = c.contractive_audit
    _integer("contractive_audit.every", a.every, 0, why="steps between audits; 0 turns it off")
    if a.every and a.every % c.log_every_steps:
        raise ConfigError(f"contractive_audit.every must be a multiple of log_every_steps "
                          f"({c.log_every_steps}); got {a.every}.")
    _choice("contractive_audit.estimator", a.estimator, jacobians.ESTIMATORS, "estimator")
    least = 3 if a.estimator == "hutch++" else 1
    _integer("contractive_audit.num_probes", a.num_probes, least,
             why="Jacobian products per example" + ("; Hutch++ needs 3" if least == 3 else ""))
    _integer("contractive_audit.examples", a.examples, 1)


def _check_writers(c: ml_collections.ConfigDict) -> None:
    w = c.wandb
    _boolean("wandb.enabled", w.enabled)
    _string("wandb.project", w.project, nonempty="a W&B project name")
    for key in ("entity", "name"):
        _string(f"wandb.{key}", w[key])
    _choice("wandb.mode", w.mode, writers.WANDB_MODES, "W&B mode")
    missing = writers.missing_package(c)
    if missing == "tensorboardX":
        raise ConfigError("tensorboard=True needs the tensorboardX package: pip install "
                          "'aejax[experiments]' (or tensorboardX), or set tensorboard=False.")
    if missing == "wandb":
        raise ConfigError("wandb.enabled=True needs the wandb package: pip install wandb, or set "
                          "wandb.enabled=False.")


def _check_data(d: ml_collections.ConfigDict, data_given: bool) -> None:
    if data_given:
        _string("data.name", d.name)
    else:
        _choice("data.name", d.name, offline.DATASETS, "dataset")
    v = d.validation_size
    if not ((_is_int(v) and v >= 1) or (isinstance(v, float) and 0.0 < v < 1.0)):
        raise ConfigError("data.validation_size must be a number of examples >= 1 or a fraction "
                          f"in (0, 1) of the training split; got {v!r}.")
    if not (isinstance(d.classes, (tuple, list))
            and all(_is_int(k) and 0 <= k < NUM_CLASSES for k in d.classes)):
        raise ConfigError(f"data.classes must be a tuple of labels in 0..{NUM_CLASSES - 1} (empty "
                          f"keeps all); got {d.classes!r}.")
    for key in ("flat", "binarize", "on_device"):
        _boolean(f"data.{key}", d[key])
    _choice("data.binarize_method", d.binarize_method, batching.BINARIZE_METHODS,
            "binarization method")
    for key in ("data_dir", "manual_dir"):
        if d[key] is not None:
            _string(f"data.{key}", d[key])
    _integer("data.train_examples", d.train_examples, 0, why="0 keeps all")


def _activation(path: str, value: Any) -> None:
    _choice(path, value, sorted(models.ACTIVATIONS), "activation")


# The options of aejax's own models; the models check the names of the others they take
# (upsampling, likelihood) themselves.
_MODEL_OPTIONS: dict[str, Callable[[str, Any], None]] = {
    "input_shape": _sizes,
    "hidden": lambda path, v: _sizes(path, v, empty=True),
    "features": lambda path, v: _sizes(path, v, count=3),
    "code_size": lambda path, v: _integer(path, v, 1),
    "latent_size": lambda path, v: _integer(path, v, 1),
    "activation": _activation,
    "code_activation": _activation,
    "tied": _boolean,
    "upsampling": _string,
    "likelihood": _string,
    "num_latents": lambda path, v: _integer(path, v, 1),
    "code_dim": lambda path, v: _integer(path, v, 1),
    "num_codes": lambda path, v: _integer(path, v, 1),
}


def _check_model(m: ml_collections.ConfigDict) -> None:
    name = m.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model.name must name a model: one of {sorted(models.MODELS)}, one "
                          "registered with aejax.models.register, or 'module:Class'; got "
                          f"{name!r}.")
    options = {k: v for k, v in m.items() if k != "name"}
    try:  # unknown names and options, a 'module:Class' that does not import
        model = models.create(name, **options)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    if type(model).__module__ == models.__name__:
        for key, value in options.items():
            _MODEL_OPTIONS.get(key, lambda path, v: None)(f"model.{key}", value)


# The modes of aejax's terms that take one (a term registered by a user checks its own).
_TERM_MODES = {"contractive": objectives.CONTRACTIVE_TERM_MODES,
               "decoder_jacobian": losses.CONTRACTIVE_MODES}


def _term_mode(path: str, value: Any) -> None:
    kind = path.split(".")[-2]
    if kind in _TERM_MODES:
        _choice(path, value, _TERM_MODES[kind], f"{kind} mode")

# The loss terms' options, checked where a term takes them (objectives.build reports the others).
_TERM_OPTIONS: dict[str, Callable[[str, Any], None]] = {
    "weight": lambda path, v: _real(path, v, why="0 turns the term off"),
    "warmup_steps": lambda path, v: _integer(path, v, 0),
    "mode": lambda path, v: _term_mode(path, v),
    "num_probes": lambda path, v: _integer(path, v, 1),
    "chunk_size": lambda path, v: None if v is None else _integer(path, v, 1),
    "rho": lambda path, v: _real(path, v, 0.0, 1.0, closed="()"),
    "layer": lambda path, v: _string(path, v, nonempty="a layer name, e.g. 'code' or 'hidden_0'"),
    "dataset_size": lambda path, v: _integer(path, v, 1, why="the number of training examples"),
    "num_samples": lambda path, v: _integer(path, v, 1),
    "kernel": lambda path, v: _choice(path, v, sorted(losses.MMD_KERNELS), "mmd kernel"),
    "sigma": lambda path, v: _real(path, v, 0.0, closed="()"),
}


def _check_loss(loss: ml_collections.ConfigDict) -> None:
    _choice("loss.reconstruction", loss.reconstruction, objectives.RECONSTRUCTIONS,
            "reconstruction")
    _real("loss.reconstruction_weight", loss.get("reconstruction_weight", 1.0),
          why="0 reports the term without training it")
    if not isinstance(loss.terms, ml_collections.ConfigDict):
        raise ConfigError("loss.terms must be a dict {kind: {weight: w, <options>}}; got "
                          f"{loss.terms!r}.")
    terms = {}
    for kind, options in loss.terms.items():
        path = f"loss.terms.{kind}"
        _choice(path, kind, sorted(objectives.TERMS), "loss term")
        if not isinstance(options, ml_collections.ConfigDict):
            raise ConfigError(f"{path} must be a dict of the term's options, e.g. "
                              f"{{'weight': 0.1}}; got {options!r}.")
        takes = {"weight", "warmup_steps", *inspect.signature(objectives.TERMS[kind]).parameters}
        for key, value in options.items():
            if key in takes and key in _TERM_OPTIONS:
                _TERM_OPTIONS[key](f"{path}.{key}", value)
        terms[kind] = dict(options)
    try:  # the terms' own checks: unknown options, ranges
        objectives.build(loss.reconstruction, terms,
                         reconstruction_weight=loss.get("reconstruction_weight", 1.0))
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def _check_corruption(c: ml_collections.ConfigDict) -> None:
    kind = c.get("kind")
    _choice("corruption.kind", kind, sorted(corruptions.CORRUPTIONS), "corruption")
    if kind != "none":  # a run without corruption ignores the options
        try:
            corruptions.build(kind, **{k: v for k, v in c.items() if k != "kind"})
        except (ValueError, TypeError) as e:
            raise ConfigError(f"corruption: {e}") from None


def _check_optimizer(o: ml_collections.ConfigDict) -> None:
    _real("optimizer.learning_rate", o.learning_rate, closed="()")
    _integer("optimizer.warmup_steps", o.warmup_steps, 0)
    _real("optimizer.decay_rate", o.decay_rate, 0.0, 1.0, closed="(]",
          why="the factor per epoch of schedule='exponential'")
    for key in ("momentum", "b1", "b2"):
        _real(f"optimizer.{key}", o[key], 0.0, 1.0)
    _boolean("optimizer.nesterov", o.nesterov)
    _real("optimizer.eps", o.eps, closed="()", why="Adam's epsilon")
    _real("optimizer.weight_decay", o.weight_decay)
    _real("optimizer.grad_clip_norm", o.grad_clip_norm, why="0 turns clipping off")
    build_optimizer(o, total_steps=1, steps_per_epoch=1)  # its names: name, schedule


def _check_distributed(d: ml_collections.ConfigDict) -> None:
    _string("distributed.coordinator_address", d.coordinator_address)
    _integer("distributed.num_processes", d.num_processes, 1)
    _integer("distributed.process_id", d.process_id, 0, d.num_processes)
    _integer("distributed.initialization_timeout", d.initialization_timeout, 1, why="seconds")
    _integer("distributed.heartbeat_timeout", d.heartbeat_timeout, 1, why="seconds")


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
        "burda": lambda: burda_schedule(lr, max(steps_per_epoch, 1), max(total_steps, 1)),
    }
    if cfg.schedule not in schedules:
        raise ConfigError(f"Unknown optimizer.schedule {cfg.schedule!r}; choose one of "
                          f"{sorted(schedules)}.")
    schedule = schedules[cfg.schedule]()
    if cfg.name == "adam":
        eps = float(cfg.get("eps", 1e-8))
        tx = (optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=eps, weight_decay=cfg.weight_decay)
              if cfg.weight_decay else optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=eps))
    elif cfg.name == "sgd":
        tx = optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
        if cfg.weight_decay:
            tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    else:
        raise ConfigError(f"Unknown optimizer.name {cfg.name!r}; choose 'adam' or 'sgd'.")
    if cfg.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx


def burda_schedule(learning_rate: float, steps_per_epoch: int,
                   total_steps: int) -> optax.Schedule:
    """Burda et al.'s schedule: ``learning_rate * 10^(-i/7)`` for ``3^i`` epochs, i = 0, 1, ...

    Piecewise constant, a function of the step alone (a resumed run continues on it); the
    stages past ``total_steps`` are not built.
    """
    boundaries, epochs, i = {}, 0, 0
    while True:
        epochs += 3 ** i
        i += 1
        if epochs * steps_per_epoch >= total_steps:
            break
        boundaries[epochs * steps_per_epoch] = 10.0 ** (-1 / 7)
    return optax.piecewise_constant_schedule(learning_rate, boundaries)


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


