"""One trial: the base config with the trial's values, built and compiled under the search's strategy, trained
epoch by epoch with the training loop's own epoch (:func:`ldct_tf.train.loop.train_epoch`) and scored after each epoch.

A subclassed :class:`keras_tuner.HyperModel` with its own ``fit``, because the CycleGAN trains with a custom loop
(``ldct_tf.train.loop``), not ``keras.Model.fit``; Keras Tuner still gets its callbacks (best-epoch checkpoints,
Hyperband's bookkeeping) once per epoch.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Optional, Sequence

import keras
import keras_tuner
import tensorflow as tf

from ldct_tf import config as config_lib
from ldct_tf import data
from ldct_tf.train import loop
from ldct_tf.tune.scoring import Validation
from ldct_tf.tune.space import Dimension, apply_values


class CycleGANHyperModel(keras_tuner.HyperModel):
    """Builds and compiles the CycleGAN of one trial (the base config with the trial's values) and trains it with the
    training loop's step function, scoring the validation slices after every epoch."""

    def __init__(self, base: config_lib.Config, space: Sequence[Dimension], data_dir: str, validation: Validation,
                 strategy: tf.distribute.Strategy, objective: keras_tuner.Objective, epochs: int, verbose: int = 1):
        super().__init__(name="ldct_cyclegan")
        self.objective = objective
        self.base = base
        self.space = list(space)
        self.data_dir = data_dir
        self.validation = validation
        self.strategy = strategy
        self.epochs = epochs
        self.verbose = verbose
        self._datasets: dict[tuple, tf.data.Dataset] = {}

    def trial_config(self, hp: keras_tuner.HyperParameters) -> config_lib.Config:
        values = {}
        for dim in self.space:
            section, _, name = dim.key.partition(".")
            values[dim.key] = dim.declare(hp, getattr(getattr(self.base, section), name))
        return apply_values(self.base, values)

    def training_dataset(self, cfg: config_lib.Config) -> tf.data.Dataset:
        """The training input of a trial as ``python -m ldct_tf.train`` reads it
        (:func:`ldct_tf.data.training_dataset`: unpaired batches, plus the simulated pairs when ``loss.simulated``
        > 0), shared by the trials that read the data alike: every such trial sees the same seeded patches, and
        decoding and tracing the input pipeline are paid once."""
        d, t, loss = cfg.data, cfg.train, cfg.loss
        key = (d.patch_size, t.batch_size, t.seed, d.min_tissue_fraction, d.augment, d.shuffle_buffer, d.cache,
               d.kernel_matched)
        if loss.simulated > 0:
            key += (t.simulated_batch_size, d.cache_simulated, loss.noisier2noise_i0)
        if key not in self._datasets:
            self._datasets[key] = data.training_dataset(self.data_dir, cfg, seed=t.seed)
        return self._datasets[key]

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        """A compiled CycleGAN with its four networks and optimizers built (inside the strategy's scope), as the
        tuner requires of a subclassed model."""
        from ldct_tf.models.factory import build_cyclegan, compile_cyclegan

        cfg = self.trial_config(hp)
        if cfg.train.batch_size % self.strategy.num_replicas_in_sync:
            raise keras_tuner.errors.FailedTrialError(
                f"train.batch_size {cfg.train.batch_size} is not divisible by the "
                f"{self.strategy.num_replicas_in_sync} replicas")
        keras.utils.set_random_seed(cfg.train.seed)  # every trial starts from the same initial weights' seed
        scope = self.strategy.scope() if not tf.distribute.has_strategy() else contextlib.nullcontext()
        with scope:
            try:
                model = build_cyclegan(cfg)
            except ValueError as exc:  # an impossible combination, e.g. patch size vs depth: fail this trial only
                raise keras_tuner.errors.FailedTrialError(str(exc)) from None
            return compile_cyclegan(model, cfg, loss_scaling=keras.mixed_precision.global_policy().name ==
                                    "mixed_float16")

    def fit(self, hp, model, *args, callbacks=None, epochs: Optional[int] = None, initial_epoch: int = 0,
            verbose=None, **kwargs) -> dict:
        """Train ``epochs`` epochs (from ``initial_epoch`` when Hyperband continues a trial) and return the metrics
        of the best-scoring epoch, with ``seconds`` for the whole trial."""
        cfg = self.trial_config(hp)
        t = cfg.train
        epochs = int(epochs or self.epochs)
        verbose = self.verbose if verbose is None else verbose
        steps_per_epoch = max(1, t.steps_per_epoch)
        started = time.perf_counter()
        train_step, _ = loop.make_step_functions(model, self.strategy)
        iterator = iter(self.strategy.experimental_distribute_dataset(self.training_dataset(cfg)))
        callback_list = keras.callbacks.CallbackList(list(callbacks or []), model=model)
        writer = _trial_writer(callbacks)
        objective = self.objective
        best: Optional[dict] = None
        callback_list.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            callback_list.on_epoch_begin(epoch)
            first = model.steps_done()
            train_metrics, _, _ = loop.train_epoch(model, train_step, iterator, first, first + steps_per_epoch,
                                                   log_every=max(1, t.log_every), verbose=verbose)
            logs = {f"train_{k}": v for k, v in train_metrics.items()}
            logs.update(self.validation.score(model.low_to_normal, cfg.model.size_multiple))
            logs["epoch"] = float(epoch + 1)
            if writer is not None:
                loop.write_scalars(writer, {k: v for k, v in logs.items() if k != "epoch"}, model.steps_done())
            if verbose:
                print(f"epoch {epoch + 1}/{epochs}: " + " - ".join(
                    f"{k}: {v:.4g}" for k, v in logs.items() if k.startswith("val_")), flush=True)
            callback_list.on_epoch_end(epoch, logs)
            if best is None or objective.better_than(objective.get_value(logs), objective.get_value(best)):
                best = dict(logs)
        callback_list.on_train_end()
        if best is None:
            raise keras_tuner.errors.FailedTrialError(f"no epochs to train (initial_epoch {initial_epoch} >= "
                                                      f"epochs {epochs})")
        best["seconds"] = round(time.perf_counter() - started, 2)
        return best


def _trial_writer(callbacks) -> Optional[Any]:
    """A TensorBoard writer in the trial's folder (found from the tuner's checkpoint callback), or None (also on
    the non-chief workers of a multi-worker strategy)."""
    if not loop.is_chief():
        return None
    for callback in callbacks or []:
        path = getattr(callback, "filepath", None)
        if isinstance(path, str) and os.path.basename(os.path.dirname(path)).startswith("trial_"):
            return tf.summary.create_file_writer(os.path.join(os.path.dirname(path), "logs"))
    return None
