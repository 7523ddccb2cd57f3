"""``python -m ldct_tf.train``: train the CycleGAN on the pipeline's shards under ``tf.distribute``.

    python -m ldct_tf.train --config configs/cpu_small.yaml --data SHARDS --model-dir runs/cpu_small \\
        [train.steps=200 train.batch_size=8 ...]

* Strategy: MultiWorkerMirroredStrategy when ``TF_CONFIG`` names several workers, else MirroredStrategy over all
  local GPUs (or the CPU).  ``train.batch_size`` is the global batch, split across replicas.
* An epoch (``train.steps_per_epoch`` steps) ends with validation, a checkpoint of all four networks and their
  optimizers (``MODEL_DIR/checkpoints/``), and TensorBoard images.  A run killed mid-epoch resumes from the last
  epoch's checkpoint.  A run started again with the same model dir
  resumes from the last checkpoint at the same step with the same optimizer state (``--no-resume`` starts over).
* TensorBoard logs (``MODEL_DIR/logs``): every loss term, learning rates, validation PSNR/SSIM, images.
* At the end the low-to-normal generator is saved as ``MODEL_DIR/generator.keras``, with ``config.yaml`` and
  ``training_summary.json`` beside it.
* With ``loss.simulated`` > 0 the shards' simulated-pair stream (``ldct_tf.pipeline.simulate_pairs``) adds a pixel loss of
  the denoiser on simulated pairs; with every other loss weight 0 the run is supervised on those pairs alone.
  ``train.init_from`` starts the denoiser from another run's ``generator.keras`` (a warm start).
* The loop itself is :mod:`ldct_tf.train.loop`; :func:`run` is the Python API (``train.run(config, data_dir, model_dir)``);
  the command line is ``ldct_tf/train/__main__.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ldct_tf import config as config_lib  # noqa: E402
from ldct_tf import ct, data
from ldct_tf.errors import LdctError
from ldct_tf.train import loop  # noqa: E402
# The loop's public names, importable from here as before the loop had its own module.
from ldct_tf.train.loop import (is_chief, is_multi_worker, make_step_functions, make_strategy,  # noqa: E402,F401
                          restore_checkpoint, run_loop, save_checkpoint)

# --- the run ------------------------------------------------------------------------------------------------------

class TrainingError(LdctError):
    """A problem with the run's inputs or folders, reported as one line."""


def _check_simulated_stream(cfg: config_lib.Config, manifest: dict, data_dir: str) -> None:
    """The shards hold the simulated stream that ``loss.simulated`` (and ``loss.noisier2noise_i0``) needs."""
    if not data.simulated_pair_count(manifest):
        raise TrainingError(f"{data_dir}: loss.simulated > 0 needs simulated pairs; run python -m "
                            "ldct_tf.simulate pairs on it first")
    stream = manifest["simulated"]["train"]
    if cfg.loss.noisier2noise_i0 > 0 and (stream.get("reference"), stream.get("textures")) != ("original", "fitted"):
        raise TrainingError(f"{data_dir}: loss.noisier2noise_i0 needs simulated pairs of the normal-dose slice itself "
                            "in its fitted noise texture (python -m ldct_tf.simulate pairs --reference original "
                            f"--textures fitted); these have --reference {stream.get('reference')} --textures "
                            f"{stream.get('textures')}")


def _first_missing(path: str) -> Optional[str]:
    """The outermost folder of ``path`` that does not exist yet (None when ``path`` exists)."""
    missing = None
    current = os.path.abspath(path)
    while not os.path.exists(current):
        missing, parent = current, os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return missing


def _writable(model_dir: str) -> Optional[str]:
    """Fail before any work when the model folder cannot be written (the error would otherwise come after an epoch).
    Returns the outermost folder this made (None when the folder existed), for :func:`_remove_unstarted`."""
    if "://" in model_dir:
        return None  # remote file systems are checked by their first write
    created = _first_missing(model_dir)
    try:
        os.makedirs(model_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=model_dir, prefix=".write_check_"):
            pass
    except OSError as exc:
        raise TrainingError(f"{model_dir}: cannot write the model folder ({exc.strerror or exc}); "
                            "choose a writable --model-dir") from None
    return created


def _remove_unstarted(model_dir: str, created: Optional[str]) -> None:
    """After a failed start, remove the model folder this run made, unless a checkpoint landed in it: a refused
    config, missing VGG19 weights or unusable data must not leave an empty run folder that looks like a result."""
    if created is None or os.path.exists(os.path.join(model_dir, "checkpoints", loop.CHECKPOINT)):
        return
    shutil.rmtree(model_dir, ignore_errors=True)
    folder = os.path.dirname(os.path.abspath(model_dir))
    stop = os.path.dirname(created)
    while folder != stop and os.path.isdir(folder) and not os.listdir(folder):  # parents it made, if still empty
        os.rmdir(folder)
        folder = os.path.dirname(folder)


def _check_same_architecture(cfg: config_lib.Config, model_dir: str) -> None:
    """A model folder holds one architecture: resuming it with other ``model`` settings cannot load its checkpoint."""
    saved = Path(model_dir) / "config.yaml"
    if not saved.exists() or not (Path(model_dir) / "checkpoints" / loop.CHECKPOINT).exists():
        return
    try:
        old = config_lib.load(saved).model
    except config_lib.ConfigError:
        return
    changed = [f"model.{k}: {v!r} -> {getattr(cfg.model, k)!r}" for k, v in vars(old).items()
               if getattr(cfg.model, k) != v]
    if changed:
        raise TrainingError(f"{model_dir}: its checkpoint has another architecture ({'; '.join(changed)}); "
                            "use --no-resume to start over there, or another --model-dir")


def _warm_start(model, init_from: str) -> None:
    """Copy the denoiser's weights from another run (its folder or its ``generator.keras``)."""
    path = Path(init_from)
    path = path / "generator.keras" if path.is_dir() else path
    if not path.exists():
        raise TrainingError(f"{init_from}: train.init_from has no generator.keras")
    source = keras.saving.load_model(path, compile=False)
    try:
        model.low_to_normal.set_weights(source.get_weights())
    except ValueError as exc:
        raise TrainingError(f"{path}: train.init_from has another generator architecture ({exc})") from None
    print(f"Warm start: the denoiser starts from {path}", flush=True)


def check_batches(cfg: config_lib.Config, replicas: int) -> None:
    """Every training stream's global batch splits evenly over the replicas, at least one sample each.

    Why: ``experimental_distribute_dataset`` does not refuse an uneven batch: 3 samples on 2 replicas split [2, 1],
    so the per-replica means weigh samples unequally, and a replica with no sample contributes a NaN mean
    (shared/STACK.md).  One line naming the key, before any work.
    """
    streams = {"train.batch_size": cfg.train.batch_size}
    if cfg.loss.simulated > 0:
        streams["train.simulated_batch_size"] = cfg.train.simulated_batch_size or cfg.train.batch_size
    for key, batch in streams.items():
        if batch < replicas or batch % replicas:
            raise TrainingError(f"{key} {batch} must be a multiple of the {replicas} replicas (at least one sample "
                                f"per replica, the same number on each); use {max(1, batch // replicas) * replicas} "
                                f"or {(batch // replicas + 1) * replicas}")


def check_workers_agree(strategy, model, model_dir: str) -> None:
    """Under MultiWorkerMirroredStrategy every worker must start from the same step and weights.

    Each worker restores its own ``--model-dir``; with separate folders the chief resumes while the others start
    over, and they would train together with different weights.  Each worker's step and a fingerprint of its weights
    and optimizer state are gathered (one collective); any disagreement refuses to start, in one line.
    """
    if strategy.num_replicas_in_sync < 2:
        return
    variables = list(model.weights) + [v for opt, _ in model._optimizer_networks() for v in opt.variables]
    fingerprint = sum(float(np.abs(np.asarray(keras.ops.convert_to_numpy(v), np.float64)).sum()) for v in variables)
    local = tf.constant([[float(model.steps_done()), fingerprint]], tf.float64)
    gathered = strategy.gather(strategy.run(tf.function(lambda: tf.identity(local))), axis=0).numpy()
    steps, prints = gathered[:, 0], gathered[:, 1]
    if steps.min() != steps.max() or not np.allclose(prints, prints[0], rtol=1e-9, atol=0):
        raise TrainingError(f"{model_dir}: the workers' checkpoints disagree (steps {sorted({int(s) for s in steps})}"
                            "): give every worker the same --model-dir on a shared file system, or copy the chief's "
                            "checkpoints folder to each worker's, or use --no-resume")


def _sample_images(val_pairs: list, multiple: int, train_ds) -> np.ndarray:
    if not val_pairs:
        return next(iter(train_ds))[0].numpy()[:4]
    sample = np.stack([p[0] for p in val_pairs[:4]])
    h, w = sample.shape[1] // multiple * multiple, sample.shape[2] // multiple * multiple
    return ct.to_model(sample[:, :h, :w])


def run(cfg: config_lib.Config, data_dir: str, model_dir: str, *, resume: bool = True, cpu_replicas: int = 0,
        verbose: int = 1) -> dict:
    """Train ``cfg`` on the shards in ``data_dir`` into ``model_dir``; returns the training summary.

    Raises :class:`TrainingError` for unusable inputs or folders (the command prints it as one line).
    """
    try:
        manifest = data.read_manifest(data_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise TrainingError(str(exc)) from None
    simulated = cfg.loss.simulated > 0
    if simulated:
        _check_simulated_stream(cfg, manifest, data_dir)  # before the model folder is made: bad data leaves nothing
    created = _writable(model_dir)
    try:
        return _run_in(cfg, data_dir, model_dir, manifest, resume=resume, cpu_replicas=cpu_replicas, verbose=verbose)
    except BaseException:
        _remove_unstarted(model_dir, created)
        raise


def _run_in(cfg: config_lib.Config, data_dir: str, model_dir: str, manifest: dict, *, resume: bool,
            cpu_replicas: int, verbose: int) -> dict:
    """:func:`run` once the inputs are read and the model folder exists."""
    simulated = cfg.loss.simulated > 0
    if resume:
        _check_same_architecture(cfg, model_dir)

    strategy = make_strategy(cpu_replicas)
    replicas = strategy.num_replicas_in_sync
    t = cfg.train
    check_batches(cfg, replicas)
    mixed = config_lib.mixed_precision_policy(t.mixed_precision)
    keras.utils.set_random_seed(t.seed)
    strategy_name = "MultiWorkerMirroredStrategy" if is_multi_worker() else type(strategy).__name__
    print(f"Strategy {strategy_name} with {replicas} replica(s); global batch {t.batch_size}; "
          f"mixed precision {'on' if mixed else 'off'}", flush=True)

    from ldct_tf.models.factory import build_cyclegan, compile_cyclegan

    with strategy.scope():
        model = compile_cyclegan(build_cyclegan(cfg), cfg, loss_scaling=mixed)
    try:
        start_step = restore_checkpoint(model, model_dir) if resume else 0
    except (ValueError, KeyError, OSError) as exc:
        raise TrainingError(f"{model_dir}: cannot load its checkpoint ({str(exc).splitlines()[0]}); use --no-resume "
                            "or another --model-dir") from None
    if is_multi_worker():
        check_workers_agree(strategy, model, model_dir)
    if start_step:
        print(f"Resuming from the checkpoint at step {start_step}", flush=True)
    elif t.init_from:
        _warm_start(model, t.init_from)
    if start_step >= t.steps:
        print(f"Already trained for {start_step} >= train.steps={t.steps} steps", flush=True)

    steps_per_epoch = max(1, min(t.steps_per_epoch, t.steps))
    try:
        train_ds = data.training_dataset(data_dir, cfg, seed=t.seed)  # checks the streams; its first batch: a sample
        val_pairs, paired = data.validation_examples(data_dir, cfg.data.val_max_slices)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    val_ds = data.validation_dataset(val_pairs, paired, cfg.model.size_multiple, replicas)
    print(f"Validation: {len(val_pairs)} {'paired' if paired else 'unpaired'} slices"
          if val_pairs else "Validation: none (the val split lacks a dose)", flush=True)
    sample = _sample_images(val_pairs, cfg.model.size_multiple, train_ds)

    budget = loop.Budget(wall_s=t.time_limit_minutes * 60 if t.time_limit_minutes > 0 else None,
                         cpu_s=t.cpu_limit_minutes * 60 if t.cpu_limit_minutes > 0 else None)
    if (budget.wall_s or budget.cpu_s) and is_multi_worker():
        print("train.time_limit_minutes / cpu_limit_minutes are ignored under MultiWorkerMirroredStrategy: every "
              "worker must run the same number of steps, and their clocks do not agree", flush=True)
        budget = loop.Budget()
    started, cpu_started = time.perf_counter(), time.process_time()
    with loop.StopOnSigint(budget):
        # Each worker builds its own input: its shards (FILE) or every n-th record (DATA), one replica's batches.
        metrics = run_loop(model, strategy, lambda context: data.training_dataset(data_dir, cfg, seed=t.seed,
                                                                                 input_context=context),
                           val_ds, total_steps=t.steps, steps_per_epoch=steps_per_epoch,
                           log_every=max(1, t.log_every), model_dir=model_dir, sample_low=sample,
                           verbose=verbose, budget=budget, steps_per_execution=t.steps_per_execution,
                           jit_compile=t.jit_compile)
    seconds = time.perf_counter() - started
    final_step = model.steps_done()

    summary = {
        "steps": final_step, "steps_requested": t.steps, "stopped_by_time_limit": final_step < t.steps,
        "stopped_by": metrics.pop("stopped_by"),
        "resumed_from_step": start_step, "seconds": round(seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "steps_per_second": round((final_step - start_step) / seconds, 3) if seconds > 0 else None,
        "strategy": strategy_name, "replicas": replicas, "mixed_precision": mixed,
        "steps_per_execution": t.steps_per_execution, "jit_compile": t.jit_compile,
        "validation": {"slices": len(val_pairs), "paired": paired},
        "data": {"counts": manifest["counts"], "patients": manifest.get("patients"),
                 "simulated": manifest.get("simulated") if simulated else None},
        "init_from": t.init_from if t.init_from and not start_step else None,
        "final_metrics": metrics,
        "vgg19_pretrained": bool(model.perceptual.pretrained) if model.perceptual else None,
    }
    if is_chief():
        tf.io.gfile.makedirs(model_dir)
        with tf.io.gfile.GFile(os.path.join(model_dir, "config.yaml"), "w") as handle:
            handle.write(cfg.to_yaml())
        with tf.io.gfile.GFile(os.path.join(model_dir, "training_summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        local_dir = tempfile.mkdtemp()
        model.low_to_normal.save(os.path.join(local_dir, "generator.keras"))
        tf.io.gfile.copy(os.path.join(local_dir, "generator.keras"), os.path.join(model_dir, "generator.keras"),
                         overwrite=True)
        print(f"Trained to step {final_step} in {seconds:.0f} s; generator saved to "
              f"{os.path.join(model_dir, 'generator.keras')}", flush=True)
        if summary["stopped_by"] == "interrupted (SIGINT)":
            print(f"Interrupted: the checkpoint at step {final_step} is kept in {model_dir}/checkpoints; run the same "
                  "command again to resume from it", flush=True)
    return summary
