"""The full run, ``train_and_evaluate(config, workdir)``: restore, train epochs, validate, finish.

The phases share one :class:`Trainer`; what must survive a restart is the train state and the
typed :class:`Progress` saved with it in every checkpoint. Randomness comes from one key folded
with the step and the data order from one key folded with the epoch, so a resumed run repeats
an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import secrets
import signal
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from aejax import corruptions, jacobians, models, objectives, pca
from aejax.data import batching, offline, splits as splits_lib
from aejax.runtime import checkpoints, distributed, writers
from aejax.runtime.lock import WorkdirLock
from aejax.runtime.config import (ConfigError, build_optimizer, check_config, data_options,
                                  resolve_parallel, start_distributed, validate)
from aejax.runtime.placement import Placement, prefetch_to_device
from aejax.step import (COMPUTE_DTYPES, NonFiniteLossError, PerExampleFn, TrainState,
                        make_evaluate, make_per_example_fn, make_train_step, metric_names)

log = logging.getLogger(__name__)
Array = jax.Array

PREFETCH = 2  # batches placed ahead of the step on the streaming path
# The values of metrics.jsonl rows that time the run: they differ between runs of the same config.
TIMING_FIELDS = ("steps_per_second", "examples_per_second", "eta_seconds", "seconds",
                 "includes_compile")


# --------------------------------------------------------------------------- the experiment


@dataclasses.dataclass
class Experiment:
    """Everything built from a config before training: data, model, objective, steps."""

    config: ml_collections.ConfigDict
    splits: splits_lib.Splits
    model: Any
    objective: objectives.Objective
    per_example: PerExampleFn
    tx: optax.GradientTransformation
    steps_per_epoch: int
    total_steps: int
    parallel: str = "none"
    num_devices: int = 1


def build_experiment(config: ml_collections.ConfigDict,
                     splits: Optional[splits_lib.Splits] = None) -> Experiment:
    """Validates ``config`` and builds the experiment (loads data unless ``splits`` is given)."""
    validate(config, data_given=splits is not None)
    mode, num_devices = resolve_parallel(config)
    if splits is None and config.data.name not in offline.DATASETS:
        raise ConfigError(f"Unknown dataset {config.data.name!r}; choose one of {offline.DATASETS}.")
    # Model, objective and monitor are checked on a stand-in batch of the data's shape before any
    # data is read (seconds, not the data's load time); the terms' range checks again on the data.
    shape = (splits.train[0].shape[1:] if splits is not None
             else (math.prod(splits_lib.IMAGE_SHAPE),) if config.data.flat else splits_lib.IMAGE_SHAPE)
    stand_in = jax.random.uniform(jax.random.PRNGKey(0), (min(config.batch_size, 16), *shape))
    model = models.from_config(config.model)
    terms = {k: dict(v) for k, v in config.loss.terms.items()}
    objective = objectives.build(config.loss.reconstruction, terms,
                                 reconstruction_weight=config.loss.get("reconstruction_weight", 1.0))
    params = models.init(model, jax.random.PRNGKey(0), stand_in)
    objectives.check_compatible(model, params, stand_in, terms)
    corruption_options = {k: v for k, v in config.corruption.items() if k != "kind"}
    corrupt = (None if config.corruption.kind == "none"
               else corruptions.build(config.corruption.kind, **corruption_options))
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"Unknown compute_dtype {config.compute_dtype!r}; choose one of "
                          f"{COMPUTE_DTYPES}.")
    per_example = make_per_example_fn(model, objective, corrupt=corrupt,
                                      binarize=config.data.binarize,
                                      binarize_method=config.data.binarize_method,
                                      compute_dtype=config.compute_dtype)
    stand_in_batch = examples(model, stand_in, models.stand_in_condition(model, stand_in))
    names = sorted(set(metric_names(per_example, params, stand_in_batch)) - {"grad_norm"})
    if config.monitor not in names:
        raise ConfigError(f"monitor {config.monitor!r} is not a validation metric of this run; "
                          f"choose one of {names}.")
    if splits is None:
        splits = splits_lib.load(config.data.name, **data_options(config))
    if config.data.train_examples:
        if not 0 < config.data.train_examples <= len(splits.train[0]):
            raise ConfigError(f"data.train_examples must be in [1, {len(splits.train[0])}] (0 keeps "
                              f"all), got {config.data.train_examples}.")
        x, y = splits.train
        splits = splits._replace(train=(x[:config.data.train_examples], y[:config.data.train_examples]))
    for split_name, (x, _) in zip(("train", "validation", "test"), splits):
        name = f"{config.data.name} {split_name} images"
        if config.loss.reconstruction == "bce":  # Bernoulli targets must lie in [0, 1]
            splits_lib.check_images(x, name=name)
        elif not np.all(np.isfinite(x)):
            raise offline.DataError(f"{name} contain {np.count_nonzero(~np.isfinite(x))} NaN or "
                                    "inf values; clean the data first.")
    # The stand-in's parameters serve: they depend on the data's shape only, which is the same.
    objectives.check_compatible(model, params, jnp.asarray(splits.train[0][:config.batch_size]),
                                terms)
    spe = batching.steps_per_epoch(len(splits.train[0]), config.batch_size)
    total = spe * config.num_epochs
    tx = build_optimizer(config.optimizer, total, spe)
    return Experiment(config, splits, model, objective, per_example, tx, spe, total, mode,
                      num_devices)


def examples(model, x, y) -> dict:
    """A split (or batch) as the step takes it: ``{"x": x}``, with ``"y": y`` for a conditional
    model (:func:`aejax.models.conditional`)."""
    return {"x": x, "y": y} if models.conditional(model) else {"x": x}


def split_examples(exp: Experiment, split: str, num: Optional[int] = None) -> dict:
    """:func:`examples` of the ``split`` ("train", "validation", "test"), its first ``num`` rows."""
    x, y = getattr(exp.splits, split)
    return examples(exp.model, x[:num], y[:num])


# --------------------------------------------------------------------------- the run state


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a run stands: saved as JSON with every checkpoint, restored on resume.

    Attributes:
      epoch: epochs finished.
      best_validation: best validation value of ``config.monitor`` so far.
      best_epoch: the epoch that reached it (its parameters are the checkpoint's best_params).
      bad_epochs: epochs since then without an improvement (early stopping).
      finished: the run needs no more training.
      stopped_early: early stopping ended it.
      train_seconds: wall time spent training, over every resume (up to the last checkpoint).
      epoch_seconds: the part of it spent on the current epoch.
      history: one row per epoch: train means and validation metrics.
      window_steps: steps summed in the checkpointed metric accumulator since the last log line.
      epoch_sums, epoch_steps: the current epoch's logged train means times their step counts,
        and those steps, so an epoch's averages count every step across a resume.
      parallel, num_devices, num_processes: how the run was placed (pmap runs resume only on
        the same placement).
      run_id: the run's id for W&B, so that a resumed run continues the same W&B run.
    """

    epoch: int = 0
    best_validation: Optional[float] = None
    best_epoch: Optional[int] = None
    bad_epochs: int = 0
    finished: bool = False
    stopped_early: bool = False
    train_seconds: float = 0.0
    epoch_seconds: float = 0.0
    history: tuple = ()
    window_steps: int = 0
    epoch_sums: dict = dataclasses.field(default_factory=dict)
    epoch_steps: int = 0
    parallel: str = "none"
    num_devices: int = 1
    num_processes: int = 1
    run_id: str = ""

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), history=list(self.history))

    @classmethod
    def from_json(cls, meta: dict) -> "Progress":
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in meta.items() if k in known}
        return cls(**dict(fields, history=tuple(fields.get("history", ()))))

    def after_epoch(self, row: dict, monitored: float, cfg: ml_collections.ConfigDict
                    ) -> tuple["Progress", bool]:
        """The progress after an epoch whose validation gave ``monitored``; and whether it improved."""
        best = self.best_validation
        improved = best is None or monitored < best - cfg.early_stopping_min_delta
        epoch = self.epoch + 1
        bad = 0 if improved else self.bad_epochs + 1
        stopped = bool(cfg.early_stopping_patience and bad >= cfg.early_stopping_patience)
        return dataclasses.replace(
            self, epoch=epoch, history=self.history + (row,), bad_epochs=bad, window_steps=0,
            epoch_sums={}, epoch_steps=0, epoch_seconds=0.0,
            best_validation=monitored if improved else best,
            best_epoch=epoch if improved else self.best_epoch,
            finished=stopped or epoch >= cfg.num_epochs, stopped_early=stopped), improved


# --------------------------------------------------------------------------- the trainer


class Preempted(RuntimeError):
    """The run stopped on a signal (SIGTERM, SIGINT) after saving a verified checkpoint.

    Attributes:
      signum: the signal; a process ends with status ``128 + signum``, as a shell reports it.
      step: the step of the checkpoint it saved.
    """

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum, self.step = signum, step


class _StopOnSignal:
    """Turns SIGTERM and SIGINT into a request the loop reads at its next step boundary.

    A second signal of either kind while the first is being honoured ends the process the
    default way. Handlers can only be set in the main thread; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        for s, handler in self._previous.items():  # the next one is not caught
            signal.signal(s, handler)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def requested(self) -> Optional[int]:
        """The signal asked for, agreed on by every process (one asking is enough)."""
        if jax.process_count() == 1:
            return self.signum
        from jax.experimental import multihost_utils

        asked = multihost_utils.process_allgather(np.int32(self.signum or 0))
        return int(np.max(asked)) or None


def _nonfinite_error(bad_step: int, sums: dict, last_good: Optional[int],
                     ckpt_dir: str) -> NonFiniteLossError:
    kept = (f"the last good checkpoint (step {last_good}) is kept in {ckpt_dir}"
            if last_good is not None else "no checkpoint was written yet")
    return NonFiniteLossError.at(
        bad_step, sums, f"Training stopped; {kept}. Lower optimizer.learning_rate, clip "
        "gradients (optimizer.grad_clip_norm) or reduce the weight of the term that diverged, "
        "then run again in a new workdir or the same one to resume from that checkpoint.")


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


class Trainer:
    """The phases of one run over one :class:`Experiment` in ``workdir``.

    ``restore`` (or start), then ``train_epoch`` and ``validate`` until the progress says the
    run is finished, then ``finish``. The train state, the best parameters and the
    :class:`Progress` are the run's state; everything else here is built from the config.
    """

    def __init__(self, exp: Experiment, workdir: str, *, init_params: Any = None):
        self.exp, self.workdir = exp, workdir
        cfg = self.cfg = exp.config
        self.primary = jax.process_index() == 0
        self.info = log.info if self.primary else (lambda *args: None)
        self.place = Placement.create(exp.parallel, exp.num_devices)
        # Padding rows are masked out of every mean, so rounding up to whole devices changes nothing.
        self.eval_bs = -(-cfg.eval_batch_size // exp.num_devices) * exp.num_devices
        init_rng, data_rng, train_rng, eval_rng = jax.random.split(jax.random.PRNGKey(cfg.seed), 4)
        self.data_rng, self.train_rng, self.eval_rng = self.place.replicate(
            (data_rng, train_rng, eval_rng))
        x_train = exp.splits.train[0]
        x_first = jnp.asarray(x_train[:cfg.batch_size])
        params = models.init(exp.model, init_rng, x_first)
        first_batch = jax.tree.map(jnp.asarray, split_examples(exp, "train", cfg.batch_size))
        if init_params is not None:
            if jax.tree.structure(init_params) != jax.tree.structure(params):
                raise ValueError("init_params do not have the structure of the model's parameters.")
            params = jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype).reshape(a.shape), params,
                                  init_params)
        self.state = self.place.replicate(TrainState.create(params, exp.tx))
        self.best_params = jax.tree.map(jnp.copy, self.state.params)
        self.progress = Progress(parallel=exp.parallel, num_devices=exp.num_devices,
                                 num_processes=jax.process_count())
        self.ckpt_dir = os.path.join(workdir, "checkpoints")
        self.ckpts = checkpoints.Checkpoints(self.ckpt_dir, max_to_keep=cfg.keep_checkpoints)
        self.last_good: Optional[int] = None
        # The step's metric names, for the accumulators.
        self.template = {k: jax.ShapeDtypeStruct((), jnp.float32)
                         for k in metric_names(exp.per_example, params, first_batch)}
        self.on_device = cfg.data.on_device and batching.fits_on_device(
            sum(a.nbytes for a in split_examples(exp, "train").values()))
        step_fn = make_train_step(exp.per_example, exp.tx,
                                  axis_name="data" if self.place.per_device else None)
        if self.on_device:
            self.run_steps = self.place.fused_step(step_fn, cfg.batch_size, exp.steps_per_epoch)
            self.x_train = self.place.replicate(split_examples(exp, "train"))
        else:
            self.run_steps = self.place.stream_step(step_fn)
        self.evaluate = jax.jit(make_evaluate(exp.per_example))
        self.param_norm = jax.jit(optax.tree.norm)  # at log steps only: not worth it every step
        self.audit = self._make_audit() if cfg.contractive_audit.every else None
        self.acc = self._new_acc()  # metric sums of the steps since the last log line
        self.stop = _StopOnSignal()
        self.writer = writers.MultiWriter()  # opened by fit: metrics.jsonl, TensorBoard, W&B
        self._latent_size: Optional[int] = None  # of a stochastic model, for images

    # -- helpers

    def _make_audit(self):
        """``audit(step) -> {name: float}``: the estimator audit of the current parameters on a
        fixed set of validation images, with noise drawn from the step (a resumed run repeats it)."""
        a, model = self.cfg.contractive_audit, self.exp.model
        data = split_examples(self.exp, "validation", a.examples)
        x, y = jnp.asarray(data["x"]), data.get("y")
        run = jax.jit(functools.partial(
            jacobians.contractive_audit, lambda params, v: models.encoder(model, params, y)(v),
            estimator=a.estimator, num_probes=a.num_probes))
        rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), 0xA0D17)

        def audit(step: int) -> dict:
            params = self.place.fetch(self.state.params)
            out = run(params, x, jax.random.fold_in(rng, step))
            return {k: float(v) for k, v in out.items()}

        return audit

    def _checkpointed(self, state) -> dict:
        return {"state": state, "best_params": self.best_params, "acc": self.acc}

    def _new_acc(self):
        # A fresh accumulator each time: the step donates (and so deletes) the one it is given.
        return self.place.replicate(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), self.template))

    def _check_finite(self, acc) -> None:
        bad_step = int(self.place.fetch(self.state.bad_step))
        if bad_step >= 0:
            raise _nonfinite_error(bad_step, self.place.fetch(acc), self.last_good, self.ckpt_dir)

    def _save(self, step: int) -> None:
        """A checkpoint of everything at ``step``, the logs flushed first: a resumed run then
        finds every line up to its checkpoint, and drops the ones after it."""
        self.writer.flush()
        self._clock()
        self.ckpts.save(step, self._checkpointed(self.state), self.progress.to_json())
        self.last_good = step

    @property
    def step(self) -> int:
        return int(self.place.fetch(self.state.step))

    # -- phases

    def restore(self) -> None:
        """Continues from the newest checkpoint, or starts afresh (dropping old metrics)."""

        def target(on_disk):  # earlier versions: no accumulator; a bad_metrics entry in the state
            tree = self._checkpointed(self.state)
            try:
                on_disk["acc"]
            except (KeyError, TypeError):
                tree = {k: v for k, v in tree.items() if k != "acc"}
            try:
                old = on_disk["state"]["bad_metrics"]
            except (KeyError, TypeError):
                return tree
            fields = {f.name: getattr(self.state, f.name) for f in dataclasses.fields(self.state)}
            shapes = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(tuple(getattr(m, "shape", ()) or ()), m.dtype), old)
            return dict(tree, state=dict(fields, bad_metrics=shapes))

        restored = self.ckpts.restore_latest(
            target, start_fresh_if_unreadable=bool(self.cfg.get("start_fresh_if_unreadable")))
        if restored is None:
            self._set_aside_old_logs()
            return
        self.last_good, tree, meta = restored
        progress = Progress.from_json(meta)
        if progress.finished and not progress.stopped_early and progress.epoch < self.cfg.num_epochs:
            progress = dataclasses.replace(progress, finished=False)  # num_epochs was raised
        self._check_resumable(progress)
        state = tree["state"]
        if isinstance(state, dict):  # the earlier layout
            state = TrainState(**{k: v for k, v in state.items() if k != "bad_metrics"})
        self.state = self.place.replicate(state)
        self.best_params = self.place.replicate(tree["best_params"])
        if "acc" in tree:
            self.acc = self.place.replicate(tree["acc"])
        else:  # earlier versions kept no accumulator: its steps are not in the next log line
            progress = dataclasses.replace(progress, window_steps=0)
        self.progress = dataclasses.replace(progress, parallel=self.exp.parallel,
                                            num_devices=self.exp.num_devices,
                                            num_processes=jax.process_count())
        self.info("Resumed from step %d (epoch %d) in %s", self.last_good, progress.epoch,
                  self.ckpt_dir)

    def _set_aside_old_logs(self) -> None:
        """A run that starts afresh where checkpoints were moved aside as corrupt keeps the
        metrics.jsonl of the run they came from, as ``metrics.jsonl.corrupt-TIME``."""
        path = os.path.join(self.workdir, "metrics.jsonl")
        if not (self.primary and os.path.exists(path) and os.path.isdir(self.ckpt_dir)):
            return
        if any(".corrupt-" in name for name in os.listdir(self.ckpt_dir)):
            os.replace(path, f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")

    def _check_resumable(self, progress: Progress) -> None:
        """Refuses to continue a pmap run on another device count or mode: its noise would change."""
        mode, count = progress.parallel, progress.num_devices
        if progress.finished or mode != "pmap" or (self.exp.parallel, self.exp.num_devices) == (mode, count):
            return
        raise ConfigError(
            f"The run in {self.workdir} was trained with parallel='pmap' on {count} devices and "
            f"cannot resume with parallel={self.exp.parallel!r} on {self.exp.num_devices}: pmap "
            "draws each device's noise from its device index, so the resumed run would not repeat "
            f"the interrupted one. Resume it on {count} devices with parallel='pmap' (on CPU: "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count}), or start in a new workdir.")

    def _host_batches(self, perm: np.ndarray, first: int):
        """Batches ``first..`` of an epoch in order ``perm``: this process's rows, placed."""
        data, bs = split_examples(self.exp, "train"), self.cfg.batch_size
        rows = distributed.process_rows(bs)
        for index in range(first, self.exp.steps_per_epoch):
            take = perm[index * bs:(index + 1) * bs][rows]
            yield self.place.batch(bs, {k: v[take] for k, v in data.items()})

    def train_epoch(self, progress_bar) -> dict:
        """Trains the rest of the current epoch; logs and checkpoints on the way.

        Returns:
          The epoch's train means (over every step of it, across resumes).

        Raises:
          Preempted: a signal asked the run to stop; a checkpoint of this step was saved.
        """
        cfg, spe = self.cfg, self.exp.steps_per_epoch
        epoch, step = self.progress.epoch, self.step
        index = step - epoch * spe
        perm = self.place.permutation(self.data_rng, len(self.exp.splits.train[0]), epoch)
        if not self.on_device:  # the same order as on the device
            batches = prefetch_to_device(self._host_batches(np.asarray(perm), index), PREFETCH)
        p = self.progress
        count, totals, total_count = p.window_steps, dict(p.epoch_sums), p.epoch_steps
        window_start, timed = time.perf_counter(), 0  # this process's steps since the last log
        while index < spe:
            if self.on_device:  # every step up to the next log, checkpoint or epoch end
                n = min(spe - index, cfg.log_every_steps - step % cfg.log_every_steps,
                        cfg.checkpoint_every_steps - step % cfg.checkpoint_every_steps)
                self.state, self.acc = self.run_steps(self.state, self.acc, self.x_train, perm, n,
                                                      self.train_rng)
            else:
                n = 1
                self.state, self.acc = self.run_steps(self.state, self.acc, next(batches),
                                                      self.train_rng)
            step, count, index, timed = step + n, count + n, index + n, timed + n
            progress_bar.update(n)
            if step % cfg.log_every_steps == 0 or index == spe:
                self._check_finite(self.acc)
                means = {k: float(v) / count for k, v in self.place.fetch(self.acc).items()}
                means["param_norm"] = float(self.place.fetch(self.param_norm(self.state.params)))
                now = time.perf_counter()  # after the fetch: the steps are done
                rate = timed / max(now - window_start, 1e-9)
                self.writer.write_scalars(step, "train", {
                    **means, "steps_per_second": rate, "examples_per_second": rate * cfg.batch_size,
                    "eta_seconds": (self.exp.total_steps - step) / rate})
                if self.audit is not None and step % cfg.contractive_audit.every == 0:
                    self.writer.write_scalars(step, "audit", self.audit(step))
                window_start, timed = time.perf_counter(), 0
                progress_bar.set_postfix(loss=f"{means['loss']:.4g}", refresh=False)
                totals = {k: totals.get(k, 0.0) + means[k] * count for k in means}
                total_count += count
                self.acc, count = self._new_acc(), 0
            signum = self.stop.requested()
            if (step % cfg.checkpoint_every_steps == 0 or signum) and index < spe:
                self._check_finite(self.acc)
                self.progress = dataclasses.replace(self.progress, window_steps=count,
                                                    epoch_sums=totals, epoch_steps=total_count)
                self._save(step)
            if signum and index < spe:
                raise self._preempted(signum, step)
        return {k: v / max(total_count, 1) for k, v in totals.items()}

    def _preempted(self, signum: int, step: int) -> Preempted:
        self.ckpts.close()  # waits for the write: the checkpoint is complete on disk
        return Preempted(
            f"Stopped by {signal.Signals(signum).name} at step {step}: a checkpoint of that step "
            f"is in {self.ckpt_dir}. Run the same command again to resume from it.", signum, step)

    def validate(self) -> dict:
        """Validation metrics of the current parameters (masked means over the whole split)."""
        xs, masks = self._val
        out = self.evaluate(self.state.params, xs, masks, self.eval_rng, self.state.step)
        return {k: float(v) for k, v in self.place.fetch(out).items()}

    def end_epoch(self, train_means: dict, val: dict) -> None:
        """Records the epoch, keeps the best parameters, and checkpoints."""
        row = {"epoch": self.progress.epoch + 1, "step": self.step,
               **{f"train_{k}": v for k, v in train_means.items()},
               **{f"validation_{k}": v for k, v in val.items()}}
        self.progress, improved = self.progress.after_epoch(row, val[self.cfg.monitor], self.cfg)
        if improved:
            self.best_params = jax.tree.map(jnp.copy, self.state.params)
        self._save(self.step)

    def _clock(self) -> None:
        """Adds the wall time since the last call to the run's and the epoch's seconds."""
        now = time.time()
        lap, self._t = now - self._t, now
        p = self.progress
        self.progress = dataclasses.replace(p, train_seconds=p.train_seconds + lap,
                                            epoch_seconds=p.epoch_seconds + lap)

    def images(self) -> dict:
        """:func:`epoch_images` of the current parameters on the first validation images."""
        data = split_examples(self.exp, "validation", self.cfg.num_figure_images)
        x = jnp.asarray(data["x"])
        params = self.place.fetch(self.state.params)
        if self._latent_size is None:  # once: 0 for a deterministic model
            description = models.describe(self.exp.model, params, x[:1])
            self._latent_size = description.code_size if description.stochastic else 0
        return epoch_images(self.exp.model, self.exp.objective.reconstruction, params, x,
                            latent_size=self._latent_size, seed=self.cfg.seed,
                            condition=data.get("y"))

    def fit(self) -> None:
        """The loop: epochs of training and validation until the run is finished.

        Raises:
          Preempted: SIGTERM or SIGINT arrived; the run saved a checkpoint and stopped.
        """
        cfg, exp = self.cfg, self.exp
        from tqdm.auto import tqdm

        bar = tqdm(total=exp.total_steps, initial=self.step, mininterval=1.0, unit="step",
                   dynamic_ncols=True, disable=not (cfg.progress and self.primary))
        self._val = self.place.eval_batches(split_examples(exp, "validation"), self.eval_bs)
        self._t = time.time()
        if not self.progress.run_id:
            self.progress = dataclasses.replace(self.progress, run_id=secrets.token_hex(4))
        compiles = True  # the first epoch of a process compiles the step and the evaluation
        with writers.create(cfg, self.workdir, resume_step=self.last_good,
                            run_id=self.progress.run_id, primary=self.primary) as self.writer, \
                self.stop:
            if self.last_good is None:
                self.writer.write_hparams(writers.flat_hparams(cfg.to_dict()),
                                          [writers.tag("validation", cfg.monitor)])
            while not self.progress.finished and self.progress.epoch < cfg.num_epochs:
                train_means = self.train_epoch(bar)
                val = self.validate()
                step, epoch = self.step, self.progress.epoch + 1
                self.writer.write_scalars(step, "validation", {"epoch": epoch, **val})
                if self.writer.takes_images:
                    self.writer.write_images(step, self.images())
                self._clock()
                seconds = max(self.progress.epoch_seconds, 1e-9)
                self.writer.write_scalars(step, "epoch", {
                    "epoch": epoch, "seconds": seconds,
                    "steps_per_second": exp.steps_per_epoch / seconds,
                    "examples_per_second": exp.steps_per_epoch * cfg.batch_size / seconds,
                    "includes_compile": compiles})
                compiles = False
                self.end_epoch(train_means, val)
                signum = self.stop.requested()
                if signum and not self.progress.finished:
                    raise self._preempted(signum, self.step)
        self.writer = writers.MultiWriter()
        bar.close()
        self.ckpts.close()

    def finish(self) -> dict:
        """Test metrics of the best parameters, baselines and figures: the run's summary."""
        xs, masks = self.place.eval_batches(split_examples(self.exp, "test"), self.eval_bs)
        out = self.evaluate(self.best_params, xs, masks, self.eval_rng, self.state.step)
        test = {k: float(v) for k, v in self.place.fetch(out).items()}
        return write_summary(self.exp, self.workdir, self.place.fetch(self.best_params),
                             self.progress, test, self.step, primary=self.primary)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       splits: Optional[splits_lib.Splits] = None, init_params: Any = None) -> dict:
    """Trains, validates every epoch, checkpoints, and evaluates on the test split.

    Running again in the same ``workdir`` resumes from the newest checkpoint (a finished run is
    only re-evaluated, unless ``num_epochs`` was raised: then the added epochs are trained).
    Writes ``metrics.jsonl`` and TensorBoard event files (:mod:`aejax.runtime.writers`: every
    logged metric, throughput and epoch times, the config, images each epoch; W&B when
    ``config.wandb.enabled``), ``summary.json``, checkpoints and figures. With the training set
    on the device, one compiled call runs every step up to the next log step, checkpoint or
    epoch end (:meth:`aejax.runtime.placement.Placement.fused_step`); the host only waits at
    those. With ``config.parallel`` the step runs data-parallel over several devices;
    checkpoints hold one copy of the state either way. With ``config.distributed`` every
    process runs this with the same ``workdir`` (a shared file system); all of them write the
    checkpoints, process 0 alone the logs, metrics and figures.

    Args:
      config: see :func:`aejax.runtime.config.default_config`.
      workdir: output directory (created; must be writable).
      splits: data to use instead of loading ``config.data`` (tests, stacked training).
      init_params: parameters to start from instead of a random initialization (fine-tuning).

    Returns:
      The summary dict also written to ``summary.json`` (on other processes than 0: the test
      metrics and the run's facts, without the PCA baseline and figures).

    Raises:
      Preempted: SIGTERM or SIGINT stopped the run at a step boundary after it saved a
        checkpoint of that step; running again resumes from it.
      WorkdirLockedError: another live run holds ``workdir``.
      distributed.PeerLostError: another process of the run stopped (after it, exit without
        ``jax.distributed.shutdown``: see :func:`aejax.runtime.distributed.exit_without_shutdown`).
    """
    # set-up
    check_config(config)
    start_distributed(config)
    workdir = _check_workdir(workdir)
    # One writer per workdir (process 0 holds it for all the processes of a run).
    with (WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()):
        return _run(config, workdir, splits, init_params)


def _run(config, workdir, splits, init_params) -> dict:
    exp = build_experiment(config, splits)
    trainer = Trainer(exp, workdir, init_params=init_params)
    (x_train, _), (x_val, _), (x_test, _) = exp.splits
    info = trainer.info
    # restore
    trainer.restore()
    info("%s: %d train / %d validation / %d test examples; %d steps per epoch, %d epochs; "
         "workdir %s", config.data.name, len(x_train), len(x_val), len(x_test),
         exp.steps_per_epoch, config.num_epochs, workdir)
    if exp.parallel != "none":
        info("Data-parallel step: parallel=%r over %d devices in %d process(es), %d examples "
             "per device.", exp.parallel, exp.num_devices, jax.process_count(),
             config.batch_size // exp.num_devices)
    if not trainer.on_device:
        info("Streaming the training set from host memory (data.on_device=%s, %.0f MB): each "
             "process places its rows of every batch, %d batches ahead.", config.data.on_device,
             x_train.nbytes / 2**20, PREFETCH)
    if trainer.progress.finished:
        info("The run in %s is finished; evaluating its best parameters again.", workdir)
    # train, validate, finish
    try:
        trainer.fit()
        summary = trainer.finish()
    except Exception as e:  # noqa: BLE001 - only a lost peer is turned into another error
        if not distributed.is_peer_failure(e):
            raise
        raise distributed.PeerLostError(
            f"Process {jax.process_index()} of {jax.process_count()} lost contact with the other "
            f"processes near step {trainer.step} ({str(e).strip().splitlines()[0]}). Training "
            f"stopped. The newest complete checkpoint in {trainer.ckpt_dir} is intact (step "
            f"{trainer.last_good} was the last one this process saved); start all processes "
            "again with the same command to resume from it.") from e
    info("Wrote %s", os.path.join(workdir, "summary.json"))
    return summary


def load_best_params(workdir: str) -> Any:
    """The best-validation parameters of the run in ``workdir`` (plain arrays)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"No checkpoints in {workdir!r}: train a run there first.")
    ckpts = checkpoints.Checkpoints(ckpt_dir, async_save=False)
    try:
        state, _ = ckpts.read()
    finally:
        ckpts.close()
    return state["best_params"]


def reconstruct_images(model, params, x: Array, reconstruction: objectives.Reconstruction,
                       condition: Optional[Array] = None) -> np.ndarray:
    """Deterministic reconstructions of ``x`` (a stochastic model decodes its posterior mean;
    a conditional one is given the labels ``condition``)."""
    return np.asarray(_compiled(_reconstruct, model)(params, x, condition, model=model,
                                                     reconstruction=reconstruction))


def _reconstruct(params, x, condition, *, model, reconstruction):
    return reconstruction.images(models.reconstruct_logits(model, params, x, condition))


def _prior_samples(params, rng, condition, *, model, num, latent_size):
    from aejax import vae

    return vae.sample_prior(model, params, rng, num, latent_size=latent_size, condition=condition)


def class_labels(model, num: int) -> Optional[np.ndarray]:
    """Labels ``0, 1, ..., C-1, 0, 1, ...`` (``num`` of them) to draw a conditional model's
    samples of every class; None for an unconditional model."""
    if not models.conditional(model):
        return None
    return np.arange(num, dtype=np.int32) % int(getattr(model, "num_classes", 10))


_COMPILED = {f: jax.jit(f, static_argnames=static) for f, static in (
    (_reconstruct, ("model", "reconstruction")), (_prior_samples, ("model", "num", "latent_size")))}


def _compiled(fn, model):
    """``fn`` compiled once per model and shape in a process (not once per run or epoch), or as
    it is for a model that cannot be a static argument (one of a user's, holding a list)."""
    try:
        hash(model)
    except TypeError:
        return fn
    return _COMPILED[fn]


def epoch_images(model, reconstruction: objectives.Reconstruction, params, x: Array, *,
                 latent_size: int = 0, seed: int = 0, condition: Optional[Array] = None) -> dict:
    """Pictures of a model's progress, for the writers: ``x`` over its reconstructions and,
    with ``latent_size`` (a stochastic model), two rows of decoded samples of the same prior
    draws each time (``PRNGKey(seed)``; a conditional model's are of the classes ``0, 1, ...``
    in turn, and its reconstructions are given the labels ``condition``).

    Returns:
      ``{tag: (H, W) uint8 picture}``; empty when the examples are not images.
    """
    pictures = {"images/reconstructions": writers.image_grid(
        [x, reconstruct_images(model, params, x, reconstruction, condition)])}
    if latent_size:
        drawn = np.asarray(_compiled(_prior_samples, model)(
            params, jax.random.PRNGKey(seed), class_labels(model, 2 * len(x)), model=model,
            num=2 * len(x), latent_size=latent_size))
        pictures["images/prior_samples"] = writers.image_grid([drawn[:len(x)], drawn[len(x):]])
    return {k: v for k, v in pictures.items() if v is not None}


# --------------------------------------------------------------------------- the summary


def write_summary(exp: Experiment, workdir: str, params, progress: Progress, test: dict,
                  step: int, *, primary: bool = True) -> dict:
    """The summary of a run from the test metrics of ``params`` (numpy): PCA, IWAE, figures.

    Only the ``primary`` process (0) computes the baselines, draws and writes anything.
    """
    cfg = exp.config
    (x_train, _), _, (x_test, y_test) = exp.splits
    y_given = y_test if models.conditional(exp.model) else None  # a conditional model's labels
    summary = {
        "dataset": cfg.data.name,
        "model": cfg.model.to_dict(),
        "num_params": int(sum(np.size(p) for p in jax.tree.leaves(params))),
        "epochs_run": progress.epoch,
        "steps": int(step),
        "best_epoch": progress.best_epoch,
        "stopped_early": progress.stopped_early,
        "train_seconds": round(progress.train_seconds, 2),
        "test": test,
    }
    if not primary:
        return summary
    description = models.describe(exp.model, params, jnp.asarray(x_test[:1]))
    pca_recon = None
    if cfg.pca_baseline:
        x_fit, x_score = x_train, x_test
        if cfg.data.binarize:  # the model's targets are binary: so are PCA's, for a fair row
            x_fit = np.asarray(batching.binarize(jax.random.PRNGKey(cfg.seed + 4),
                                                 jnp.asarray(x_train)))
            x_score = np.asarray(batching.binarize(jax.random.PRNGKey(cfg.seed + 1),
                                                   jnp.asarray(x_test)))
        fitted = pca.fit(x_fit, description.code_size)
        summary["pca"] = {"code_size": description.code_size,
                          "targets": "binarized" if cfg.data.binarize else "grey levels",
                          "test": pca.reconstruction_errors(fitted, x_score)}
        summary["autoencoder_beats_pca"] = (
            test["squared_error_per_image"] < summary["pca"]["test"]["squared_error_per_image"])
        n = cfg.num_figure_images
        pca_recon = np.asarray(pca.decode(fitted, pca.encode(fitted, x_test[:n]), x_test.shape[1:]))
    if description.stochastic and cfg.iwae_samples:
        from aejax import vae

        x_eval = x_test
        if cfg.data.binarize:  # one fixed binarization of the test set, as in Burda et al.
            x_eval = np.asarray(batching.binarize(jax.random.PRNGKey(cfg.seed + 1),
                                                  jnp.asarray(x_test)))
        nll = vae.evaluate_nll(exp.model, params, x_eval, jax.random.PRNGKey(cfg.seed + 2),
                               num_samples=cfg.iwae_samples, batch_size=100, condition=y_given)
        summary["test"]["iwae_nll"] = nll
        summary["test"]["iwae_samples"] = cfg.iwae_samples
        # The k = 1 bound (a Monte Carlo -ELBO) on the same binarized images: "elbo" above is
        # averaged over fresh binarizations, so only this one compares with iwae_nll exactly.
        summary["test"]["iwae_nll_k1"] = vae.evaluate_nll(
            exp.model, params, x_eval, jax.random.PRNGKey(cfg.seed + 3), num_samples=1,
            batch_size=100, chunk_size=1, condition=y_given)
    if cfg.figures:
        n = cfg.num_figure_images
        from aejax import figures  # matplotlib only when figures are asked for

        recon = reconstruct_images(exp.model, params, jnp.asarray(x_test[:n]),
                                   exp.objective.reconstruction,
                                   None if y_given is None else y_given[:n])
        paths = figures.save_run_figures(workdir, x_test[:n], recon, list(progress.history),
                                         pca_recon)
        if description.stochastic:
            from aejax import vae

            if description.conditional:
                classes = int(getattr(exp.model, "num_classes", 10))
                labels = np.repeat(np.arange(classes, dtype=np.int32), n)
                samples = np.asarray(vae.sample_prior(
                    exp.model, params, jax.random.PRNGKey(cfg.seed), classes * n,
                    latent_size=description.code_size, condition=labels))
                paths.append(figures.image_rows(
                    list(samples.reshape(classes, n, *samples.shape[1:])),
                    [f"{c}: {name}" for c, name in enumerate(
                        splits_lib.CLASS_NAMES.get(cfg.data.name, range(classes))[:classes])],
                    os.path.join(workdir, "class_samples.png"),
                    title="decoded samples of z ~ N(0, I), one row per class"))
            else:
                samples = np.asarray(vae.sample_prior(
                    exp.model, params, jax.random.PRNGKey(cfg.seed), 2 * n,
                    latent_size=description.code_size))
                paths.append(figures.image_rows([samples[:n], samples[n:]], ["prior", "samples"],
                                                os.path.join(workdir, "prior_samples.png"),
                                                title="decoded samples from the prior N(0, I)"))
        summary["figures"] = [os.path.basename(p) for p in paths]
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
