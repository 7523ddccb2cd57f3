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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ldct_tf import config as config_lib  # noqa: E402
from ldct_tf import ct, data  # noqa: E402

CHECKPOINT = "latest.weights.h5"


# --- strategy -----------------------------------------------------------------------------------------------------

def tf_config() -> dict:
    try:
        return json.loads(os.environ.get("TF_CONFIG", "") or "{}")
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: TF_CONFIG is not valid JSON: {exc}") from None


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
    window = ct.window("abdomen")

    def unit(x):
        return tf.clip_by_value((ct.from_model(x) - window.low) / window.width, 0.0, 1.0)

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


def make_step_functions(model, strategy):
    """Compiled ``(train_step(iterator), val_step(batch))`` running the model's steps on every replica."""

    @tf.function
    def train_step(iterator):
        strategy.run(model.train_step, args=(next(iterator),))

    @tf.function
    def val_step(batch):
        strategy.run(model.test_step, args=(batch,))

    return train_step, val_step


def run_loop(model, strategy, train_ds, val_ds, *, total_steps: int, steps_per_epoch: int, log_every: int,
             model_dir: str, sample_low: np.ndarray, verbose: int = 1,
             time_limit_s: Optional[float] = None) -> dict:
    """The training loop: ``strategy.run(model.train_step)`` per step, validation, checkpoint and images per epoch.

    A custom loop rather than ``fit``: Keras 3's ``fit`` does not work under MultiWorkerMirroredStrategy
    (keras-team/keras#20585), and one loop for every strategy keeps single-GPU, multi-GPU and multi-worker runs
    identical.  ``time_limit_s`` ends training early (validation, checkpoint and images still happen) after the first
    step past the limit.  Returns the last training and validation metrics.
    """
    log_dir = os.path.join(model_dir, "logs") if is_chief() else tempfile.mkdtemp(prefix="ldct_logs_")
    train_writer = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
    val_writer = tf.summary.create_file_writer(os.path.join(log_dir, "validation"))
    image_writer = tf.summary.create_file_writer(os.path.join(log_dir, "images"))
    folder = checkpoint_folder(model_dir)

    train_step, val_step = make_step_functions(model, strategy)
    iterator = iter(strategy.experimental_distribute_dataset(train_ds))
    train_metrics: dict = {}
    val_metrics: dict = {}
    step = model.steps_done()
    deadline = time.perf_counter() + time_limit_s if time_limit_s else None
    out_of_time = False
    while step < total_steps and not out_of_time:
        epoch = step // steps_per_epoch
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        model.reset_metrics()
        bar = keras.utils.Progbar(epoch_end - step, verbose=verbose if is_chief() else 0,
                                  stateful_metrics=list(model.trackers))
        if verbose and is_chief():
            print(f"Epoch {epoch + 1}/{math.ceil(total_steps / steps_per_epoch)} (steps {step + 1}-{epoch_end})",
                  flush=True)
        done_in_epoch = 0
        while step < epoch_end:
            train_step(iterator)
            step += 1
            done_in_epoch += 1
            if step % log_every == 0 or step == epoch_end:
                train_metrics = read_metrics(model.trackers)
                write_scalars(train_writer, train_metrics, step)
                bar.update(done_in_epoch, values=list(train_metrics.items()))
            if deadline is not None and time.perf_counter() > deadline:
                out_of_time = True
                train_metrics = read_metrics(model.trackers)
                write_scalars(train_writer, train_metrics, step)
                if verbose and is_chief():
                    print(f"\nTime limit reached at step {step}: validating, saving and stopping", flush=True)
                break
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
    return {"train": train_metrics, "validation": val_metrics}


# --- the run ------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldct_tf.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (configs/smoke.yaml, cpu_small.yaml, paper.yaml)")
    parser.add_argument("--data", required=True, help="output folder of pipelines.dicom_to_tfrecord")
    parser.add_argument("--model-dir", required=True, help="checkpoints, logs and the trained generator go here")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    parser.add_argument("--cpu-replicas", type=int, default=0,
                        help="without GPUs: split the CPU into N logical devices under MirroredStrategy (testing)")
    parser.add_argument("--verbose", type=int, default=1, help="Keras progress: 0 silent, 1 bar, 2 line per epoch")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    return parser


def train(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.overrides)
    except config_lib.ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    print("Resolved config:\n" + cfg.to_yaml(), flush=True)
    manifest = data.read_manifest(args.data)

    strategy = make_strategy(args.cpu_replicas)
    replicas = strategy.num_replicas_in_sync
    t = cfg.train
    if t.batch_size % replicas:
        raise SystemExit(f"error: train.batch_size {t.batch_size} is not divisible by the {replicas} replicas")
    gpus = tf.config.list_physical_devices("GPU")
    mixed = t.mixed_precision and bool(gpus)
    if t.mixed_precision and not gpus:
        print("train.mixed_precision ignored: no GPU (float16 is slower than float32 on a CPU)", flush=True)
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    keras.utils.set_random_seed(t.seed)
    strategy_name = "MultiWorkerMirroredStrategy" if is_multi_worker() else type(strategy).__name__
    print(f"Strategy {strategy_name} with {replicas} replica(s); global batch {t.batch_size}; "
          f"mixed precision {'on' if mixed else 'off'}", flush=True)

    from ldct_tf.models.factory import build_cyclegan, compile_cyclegan

    with strategy.scope():
        model = compile_cyclegan(build_cyclegan(cfg), cfg, loss_scaling=mixed)
    start_step = 0 if args.no_resume else restore_checkpoint(model, args.model_dir)
    if start_step:
        print(f"Resuming from the checkpoint at step {start_step}", flush=True)
    if start_step >= t.steps:
        print(f"Already trained for {start_step} >= train.steps={t.steps} steps", flush=True)

    steps_per_epoch = max(1, min(t.steps_per_epoch, t.steps))
    train_ds = data.unpaired_training_dataset(
        args.data, cfg.data.patch_size, t.batch_size, seed=t.seed, min_tissue_fraction=cfg.data.min_tissue_fraction,
        augment=cfg.data.augment, shuffle_buffer=cfg.data.shuffle_buffer, cache=cfg.data.cache)
    val_pairs, paired = data.validation_examples(args.data, cfg.data.val_max_slices)
    val_ds = data.validation_dataset(val_pairs, paired, 2**cfg.model.depth, replicas)
    print(f"Validation: {len(val_pairs)} {'paired' if paired else 'unpaired'} slices"
          if val_pairs else "Validation: none (the val split lacks a dose)", flush=True)
    sample = (np.stack([p[0] for p in val_pairs[:4]]) if val_pairs else None)
    if sample is not None:
        multiple = 2**cfg.model.depth
        h, w = sample.shape[1] // multiple * multiple, sample.shape[2] // multiple * multiple
        sample = ct.to_model(sample[:, :h, :w])
    else:
        sample = next(iter(train_ds))[0].numpy()[:4]

    time_limit = t.time_limit_minutes * 60 if t.time_limit_minutes > 0 else None
    if time_limit and is_multi_worker():
        print("train.time_limit_minutes is ignored under MultiWorkerMirroredStrategy: every worker must run the same "
              "number of steps, and their clocks do not agree", flush=True)
        time_limit = None
    started = time.perf_counter()
    metrics = run_loop(model, strategy, train_ds, val_ds, total_steps=t.steps, steps_per_epoch=steps_per_epoch,
                       log_every=max(1, t.log_every), model_dir=args.model_dir, sample_low=sample,
                       verbose=args.verbose, time_limit_s=time_limit)
    seconds = time.perf_counter() - started
    final_step = model.steps_done()

    summary = {
        "steps": final_step, "steps_requested": t.steps, "stopped_by_time_limit": final_step < t.steps,
        "resumed_from_step": start_step, "seconds": round(seconds, 1),
        "steps_per_second": round((final_step - start_step) / seconds, 3) if seconds > 0 else None,
        "strategy": strategy_name, "replicas": replicas, "mixed_precision": mixed,
        "validation": {"slices": len(val_pairs), "paired": paired},
        "data": {"counts": manifest["counts"], "patients": manifest.get("patients")},
        "final_metrics": metrics,
        "vgg19_pretrained": bool(model.perceptual.pretrained) if model.perceptual else None,
    }
    if is_chief():
        tf.io.gfile.makedirs(args.model_dir)
        with tf.io.gfile.GFile(os.path.join(args.model_dir, "config.yaml"), "w") as handle:
            handle.write(cfg.to_yaml())
        with tf.io.gfile.GFile(os.path.join(args.model_dir, "training_summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        local_dir = tempfile.mkdtemp()
        model.low_to_normal.save(os.path.join(local_dir, "generator.keras"))
        tf.io.gfile.copy(os.path.join(local_dir, "generator.keras"), os.path.join(args.model_dir, "generator.keras"),
                         overwrite=True)
        print(f"Trained to step {final_step} in {seconds:.0f} s; generator saved to "
              f"{os.path.join(args.model_dir, 'generator.keras')}", flush=True)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    train(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
