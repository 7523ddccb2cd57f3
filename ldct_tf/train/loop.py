"""The one training loop, shared by ``python -m ldct_tf.train`` and ``python -m ldct_tf.tune``: strategy,
checkpoints and resume, epochs with validation, TensorBoard logging, time and CPU budgets, a clean stop on SIGINT.

A custom loop rather than ``fit``: Keras 3's ``fit`` does not work under MultiWorkerMirroredStrategy
(keras-team/keras#20585), and one loop for every strategy keeps single-GPU, multi-GPU and multi-worker runs identical.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from ldct_tf import ct
from ldct_tf.config import ConfigError

CHECKPOINT = "latest.weights.h5"


# --- strategy -----------------------------------------------------------------------------------------------------

def tf_config() -> dict:
    """The cluster of a multi-worker run, from the ``TF_CONFIG`` environment variable ({} when unset).  Raises
    :class:`ldct_tf.config.ConfigError` when it is not JSON: a guessed cluster would hang the other workers."""
    try:
        return json.loads(os.environ.get("TF_CONFIG", "") or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON: {exc}") from None


def is_multi_worker() -> bool:
    cluster = tf_config().get("cluster", {})
    return sum(len(v) for k, v in cluster.items() if k in ("chief", "worker")) > 1


def is_chief() -> bool:
    """Worker 0 (or the 'chief' task) writes checkpoints, logs and exports; the others write to scratch."""
    task = tf_config().get("task", {})
    if not task:
        return True
    cluster = tf_config().get("cluster", {})
    if task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and task.get("index", 0) == 0 and "chief" not in cluster


def make_strategy(cpu_replicas: int = 0) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy from TF_CONFIG, else MirroredStrategy over the GPUs, else over the CPU.

    ``cpu_replicas`` > 1 (machines without GPUs only) splits the CPU into that many logical devices, so multi-replica
    behaviour can be checked without GPUs.  Must run before TensorFlow initialises its devices.
    """
    if is_multi_worker():
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if cpu_replicas > 1 and not gpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
        return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(cpu_replicas)])
    return tf.distribute.MirroredStrategy()


# --- checkpoints --------------------------------------------------------------------------------------------------

def checkpoint_folder(model_dir: str) -> str:
    """Chief: ``MODEL_DIR/checkpoints``.  Other workers save too (saving reads distributed variables, which is a
    collective operation under MultiWorkerMirroredStrategy) but into a scratch folder that is discarded."""
    return os.path.join(model_dir, "checkpoints") if is_chief() else tempfile.mkdtemp(prefix="ldct_ckpt_")


def save_checkpoint(model, folder: str) -> str:
    tf.io.gfile.makedirs(folder)
    local_dir = tempfile.mkdtemp(prefix="ldct_ckpt_")
    local = os.path.join(local_dir, CHECKPOINT)
    model.save_weights(local)
    final = os.path.join(folder, CHECKPOINT)
    tmp = final + ".tmp"
    tf.io.gfile.copy(local, tmp, overwrite=True)
    tf.io.gfile.rename(tmp, final, overwrite=True)
    with tf.io.gfile.GFile(os.path.join(folder, "checkpoint.json"), "w") as handle:
        json.dump({"step": model.steps_done(), "time": time.time()}, handle)
    tf.io.gfile.rmtree(local_dir)
    return final


def restore_checkpoint(model, model_dir: str) -> int:
    """Load the last checkpoint if there is one; returns the step it was taken at (0 if none)."""
    path = os.path.join(model_dir, "checkpoints", CHECKPOINT)
    if not tf.io.gfile.exists(path):
        return 0
    local_dir = tempfile.mkdtemp(prefix="ldct_ckpt_")
    local = os.path.join(local_dir, CHECKPOINT)
    tf.io.gfile.copy(path, local, overwrite=True)
    model.load_weights(local)
    tf.io.gfile.rmtree(local_dir)
    return model.steps_done()


def write_images(writer, model, sample_low: np.ndarray, step: int) -> None:
    """Low-dose input, denoised, the cycle F(G(low)) and the removed noise (+-100 HU) in the abdomen window, and
    each optimizer's learning rate."""
    low = tf.constant(sample_low)
    denoised = model.low_to_normal(low, training=False)
    cycled = model.normal_to_low(denoised, training=False)
    unit = ct.window("abdomen").model_to_unit

    noise = tf.clip_by_value((ct.from_model(low) - ct.from_model(denoised)) / 200.0 + 0.5, 0.0, 1.0)
    with writer.as_default(step=step):
        tf.summary.image("1_low_dose", unit(low), max_outputs=4)
        tf.summary.image("2_denoised", unit(denoised), max_outputs=4)
        tf.summary.image("3_cycle_low", unit(cycled), max_outputs=4)
        tf.summary.image("4_removed_noise_pm100HU", noise, max_outputs=4)
        for name in ("generator_optimizer", "inverse_generator_optimizer", "normal_critic_optimizer",
                     "low_critic_optimizer"):
            rate = getattr(model, name).learning_rate
            tf.summary.scalar(f"learning_rate/{name}", float(keras.ops.convert_to_numpy(rate)))
    writer.flush()


def write_scalars(writer, values: dict, step: int) -> None:
    with writer.as_default(step=step):
        for name, value in values.items():
            tf.summary.scalar(name, value)
    writer.flush()


def read_metrics(trackers: dict) -> dict:
    """Tracker results summed over replicas and workers (Keras metric variables are SUM/ON_READ)."""
    return {name: float(keras.ops.convert_to_numpy(tracker.result())) for name, tracker in trackers.items()}


def make_step_functions(model, strategy, steps_per_execution: int = 1, jit_compile: bool = False):
    """Compiled ``(train_step(iterator[, steps]), val_step(batch))`` running the model's steps on every replica.

    ``train_step`` runs ``steps`` training steps (default ``steps_per_execution``) in one call: one Python dispatch
    for several steps, which matters when a step is short (a GPU).  ``jit_compile`` compiles each replica's step with
    XLA (``tf.function(jit_compile=True)`` around ``model.train_step`` inside ``strategy.run``, as Keras' own trainer
    does: the iterator and the loop over steps stay outside XLA, which cannot compile them).  ``model.compile``'s
    ``jit_compile`` does not reach a custom loop (shared/STACK.md).
    """
    if steps_per_execution < 1:
        raise ValueError(f"steps_per_execution must be >= 1, got {steps_per_execution!r}")
    replica_step = tf.function(model.train_step, jit_compile=True) if jit_compile else model.train_step

    @tf.function
    def train_step(iterator, steps=None):
        if steps is None and steps_per_execution == 1:  # no loop in the graph: the step as it always was
            strategy.run(replica_step, args=(next(iterator),))
            return
        for _ in tf.range(steps_per_execution if steps is None else steps):
            strategy.run(replica_step, args=(next(iterator),))

    @tf.function
    def val_step(batch):
        strategy.run(model.test_step, args=(batch,))

    train_step.replica_step = replica_step  # what strategy.run calls: tests read its XLA setting and compiler IR
    return train_step, val_step


@dataclass
class Budget:
    """When to stop before ``total_steps``: wall-clock seconds, CPU seconds of this process (all its threads: equal
    CPU budgets stay equal on a machine that other work slows down), or a SIGINT."""

    wall_s: Optional[float] = None
    cpu_s: Optional[float] = None

    def __post_init__(self):
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()
        self.interrupted = False

    def exhausted(self) -> Optional[str]:
        if self.interrupted:
            return "interrupted (SIGINT)"
        if self.wall_s is not None and time.perf_counter() - self._wall0 > self.wall_s:
            return "time limit"
        if self.cpu_s is not None and time.process_time() - self._cpu0 > self.cpu_s:
            return "CPU budget"
        return None


class StopOnSigint:
    """Context manager: the first Ctrl-C asks the loop to stop after the current step (it then validates, saves the
    checkpoint and the generator); a second one interrupts at once."""

    def __init__(self, budget: Budget):
        self.budget = budget

    def _handler(self, signum, frame):
        if self.budget.interrupted:
            raise KeyboardInterrupt
        self.budget.interrupted = True
        print("\nStopping after this step (Ctrl-C again to abort without saving)", flush=True)

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class PlainProgress:
    """Progress for a log file: a plain line (no carriage returns, no ``\\x1b[`` colour codes, which Keras'
    ``Progbar`` writes whenever ``posix`` is imported, i.e. always on Linux) at most every ``interval_s`` seconds and
    at the end of the epoch.  Same ``update(current, values)`` as ``keras.utils.Progbar``."""

    def __init__(self, target: int, interval_s: float = 30.0):
        self.target, self.interval_s = target, interval_s
        self._start = self._last = time.perf_counter()

    def update(self, current: int, values: Optional[list] = None) -> None:
        now = time.perf_counter()
        if current < self.target and now - self._last < self.interval_s:
            return
        self._last = now
        metrics = "".join(f" - {name}: {value:.4g}" for name, value in values or [])
        print(f"{current}/{self.target} - {now - self._start:.0f}s{metrics}", flush=True)


def progress_bar(target: int, verbose: int, metric_names: list):
    """Keras' live bar on a terminal at ``verbose`` 1; :class:`PlainProgress` lines when stdout is a file (or at
    ``verbose`` 2: one line at the end of the epoch); Keras' silent bar at 0."""
    from ldct_tf.cli import stdout_is_terminal

    if verbose == 1 and stdout_is_terminal():
        return keras.utils.Progbar(target, verbose=1, stateful_metrics=metric_names)
    if verbose:
        return PlainProgress(target, interval_s=30.0 if verbose == 1 else math.inf)
    return keras.utils.Progbar(target, verbose=0, stateful_metrics=metric_names)


def train_epoch(model, train_step, iterator, start_step: int, end_step: int, *, log_every: int, writer=None,
                verbose: int = 1, budget: Optional[Budget] = None,
                steps_per_execution: int = 1) -> tuple[dict, int, Optional[str]]:
    """One epoch (or what is left of it): ``train_step(iterator)`` from ``start_step`` to ``end_step`` with a
    progress bar; every ``log_every`` steps, at the end and at an early stop the trackers are read (and written to
    ``writer``).  Stops after the first step past ``budget``.  Returns the last training metrics, the step reached
    and why it stopped early (None when it ran to ``end_step``).

    With ``steps_per_execution`` N > 1 each call runs up to N steps, never past ``end_step`` or the next multiple of
    ``log_every``: the epoch, its checkpoint and the logged steps are the same as with N = 1; only the budget is
    checked per call (so a run may pass its budget by up to N - 1 steps)."""
    model.reset_metrics()
    verbose = verbose if is_chief() else 0
    bar = progress_bar(end_step - start_step, verbose, list(model.trackers))
    metrics: dict = {}
    step, stopped_by = start_step, None
    while step < end_step and not stopped_by:
        if steps_per_execution == 1:
            train_step(iterator)
            step += 1
        else:
            steps = min(steps_per_execution, end_step - step, log_every - step % log_every)
            train_step(iterator, tf.constant(steps))
            step += steps
        stopped_by = budget.exhausted() if budget is not None else None
        if step == end_step or stopped_by or (step % log_every == 0 and (writer is not None or verbose)):
            metrics = read_metrics(model.trackers)
            if writer is not None:
                write_scalars(writer, metrics, step)
            bar.update(step - start_step, values=list(metrics.items()))
    return metrics, step, stopped_by


def run_loop(model, strategy, train_ds, val_ds, *, total_steps: int, steps_per_epoch: int, log_every: int,
             model_dir: str, sample_low: np.ndarray, verbose: int = 1,
             time_limit_s: Optional[float] = None, budget: Optional[Budget] = None, steps_per_execution: int = 1,
             jit_compile: bool = False) -> dict:
    """``strategy.run(model.train_step)`` per step (``steps_per_execution`` per call, each replica's step XLA-compiled
    with ``jit_compile``: :func:`make_step_functions`); validation, checkpoint and images per epoch.

    ``train_ds`` is a dataset of global batches, or a function of a ``tf.distribute.InputContext`` returning one
    replica's batches (``strategy.distribute_datasets_from_function``: each worker builds its own input).

    Training ends early (validation, checkpoint and images still happen) after the first step past ``time_limit_s``
    or past ``budget`` (which may also be a SIGINT).  Returns the last training and validation metrics and, under
    ``stopped_by``, why it stopped early (None when it ran all steps).
    """
    budget = budget or Budget(wall_s=time_limit_s)
    log_dir = os.path.join(model_dir, "logs") if is_chief() else tempfile.mkdtemp(prefix="ldct_logs_")
    train_writer = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
    val_writer = tf.summary.create_file_writer(os.path.join(log_dir, "validation"))
    image_writer = tf.summary.create_file_writer(os.path.join(log_dir, "images"))
    folder = checkpoint_folder(model_dir)

    train_step, val_step = make_step_functions(model, strategy, steps_per_execution, jit_compile)
    iterator = iter(strategy.distribute_datasets_from_function(train_ds) if callable(train_ds)
                    else strategy.experimental_distribute_dataset(train_ds))
    train_metrics: dict = {}
    val_metrics: dict = {}
    step = model.steps_done()
    stopped_by = None
    while step < total_steps and not stopped_by:
        epoch = step // steps_per_epoch
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        if verbose and is_chief():
            print(f"Epoch {epoch + 1}/{math.ceil(total_steps / steps_per_epoch)} (steps {step + 1}-{epoch_end})",
                  flush=True)
        train_metrics, step, stopped_by = train_epoch(model, train_step, iterator, step, epoch_end,
                                                      log_every=log_every, writer=train_writer, verbose=verbose,
                                                      budget=budget, steps_per_execution=steps_per_execution)
        out_of_time = bool(stopped_by)
        if stopped_by and verbose and is_chief():
            print(f"\n{stopped_by[0].upper() + stopped_by[1:]} reached at step {step}: validating, saving and "
                  "stopping", flush=True)
        if val_ds is not None:
            model.reset_metrics()
            for batch in strategy.experimental_distribute_dataset(val_ds):
                val_step(batch)
            val_metrics = read_metrics({**model.trackers, **model.val_trackers})
            write_scalars(val_writer, val_metrics, step)
            if verbose and is_chief():
                print("validation: " + " - ".join(f"{k}: {v:.4g}" for k, v in val_metrics.items()), flush=True)
        save_checkpoint(model, folder)
        write_images(image_writer, model, sample_low, step)
    return {"train": train_metrics, "validation": val_metrics, "stopped_by": stopped_by}
