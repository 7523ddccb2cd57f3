"""``python -m benchmarks.gpu_check``: the first-GPU-run check: paper.yaml's training step on 1 and on all GPUs, and
the SavedModel's inference speed in float32 and float16.

    .venv/bin/python -m benchmarks.gpu_check                      # a machine with GPUs: configs/paper.yaml
    .venv/bin/python -m benchmarks.gpu_check --cpu-replicas 2     # no GPU: the same on 2 logical CPU devices, tiny

Why: the project was written and tested on a CPU.  This one script answers, on the first machine with GPUs, what a
hospital's 8-GPU run needs to know, each figure against a baseline measured in the same process:

* training: ``configs/paper.yaml`` (its mixed precision, XLA and steps-per-call settings) on one GPU and on all, the
  same number of steps on synthetic batches in memory (the step, not the input pipeline), timed in rounds that
  alternate the two settings so both see the same load.  Patches per second, scaling efficiency = patches/s on N /
  (N x patches/s on 1), and peak GPU memory per device (``tf.config.experimental.get_memory_info``) over the
  first step (which traces).  By default each replica gets ``train.batch_size`` patches (``--global-batch scaled``:
  the global batch grows with the GPUs, weak scaling); ``--global-batch fixed`` keeps ``train.batch_size`` as the
  global batch (what paper.yaml does on 8 GPUs: one patch per GPU).  The perceptual loss's VGG19 is un-pretrained
  (``loss.vgg_weights=none``): the machine may be offline, and speed does not depend on the weights.
* inference: the config's generator (random weights: speed does not depend on them) exported twice through the
  export code path (:func:`ldct_tf.export.export_generator`, ``compute_dtype`` float32 and float16), loaded as
  SavedModels and timed at batch 1, 8 and 32 on 512x512 slices: slices per second and float16's speed-up over
  float32.  float16's HU error on real slices is :mod:`benchmarks.float16_error`'s.

``--cpu-replicas 2`` (machines without GPUs only) splits the CPU into 2 logical devices and shrinks the config
(:data:`CPU_OVERRIDES`, 64x64 slices) so the whole check runs in a few minutes: it tests the script, and its figures
say nothing about GPU speed (the JSON says so).  Writes ``benchmarks/results/gpu_check.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import harness  # noqa: E402

#: What the CPU form changes in the config: small, shallow networks and patches (tracing the two training steps
#: is most of the CPU form's time), no VGG19 (its block5 alone costs minutes on a 2-core CPU), 2 patches per
#: replica.  Everything else (mixed precision request, critics, steps per call) is the config's.
CPU_OVERRIDES = ("data.patch_size=32", "model.depth=2", "model.base_filters=8", "model.residual_blocks=1",
                 "model.disc_filters=16", "model.disc_layers=2", "loss.perceptual=0", "train.batch_size=2")
#: Always: an un-pretrained VGG19 (same FLOPs; no download on an offline machine).
SPEED_OVERRIDES = ("loss.vgg_weights=none",)
CPU_WARNING = ("CPU figures: 2 logical devices share the same CPU cores, and float16 is emulated on a CPU; they test "
               "the script and say nothing about GPU speed or scaling")
DEFAULTS = {"gpu": {"steps": 50, "warmup_steps": 5, "rounds": 3, "slice_size": 512, "inference_slices": 64},
            "cpu": {"steps": 2, "warmup_steps": 2, "rounds": 3, "slice_size": 64, "inference_slices": 32}}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(harness.REPO / "configs" / "paper.yaml"))
    parser.add_argument("--cpu-replicas", type=int, default=0,
                        help="no GPU: run on this many logical CPU devices (>= 2) with a tiny config")
    parser.add_argument("--global-batch", choices=("scaled", "fixed"), default="scaled",
                        help="scaled: train.batch_size per replica (default); fixed: train.batch_size in all")
    parser.add_argument("--steps", type=int, help="timed training steps per round and setting (GPU 50, CPU 2)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps after tracing (GPU 5, CPU 2)")
    parser.add_argument("--rounds", type=int, help="alternating timed rounds (GPU 3, CPU 3)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="inference batch sizes")
    parser.add_argument("--slice-size", type=int, help="inference slice height and width (GPU 512, CPU 64)")
    parser.add_argument("--inference-slices", type=int,
                        help="slices per timed inference round and batch size (GPU 64, CPU 32)")
    parser.add_argument("--out", default=str(harness.result_path("gpu_check")))
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value, applied last")
    args = parser.parse_args(argv)
    if args.cpu_replicas and args.cpu_replicas < 2:
        parser.error(f"--cpu-replicas must be >= 2 (one replica is the baseline), got {args.cpu_replicas}")
    for name, value in (("steps", args.steps), ("warmup_steps", args.warmup_steps), ("rounds", args.rounds),
                        ("slice_size", args.slice_size), ("inference_slices", args.inference_slices)):
        if value is not None and value < (0 if name == "warmup_steps" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be positive, got {args.batch_sizes}")
    mode = "cpu" if args.cpu_replicas else "gpu"
    for name, value in DEFAULTS[mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# --- devices ------------------------------------------------------------------------------------------------------

def devices(cpu_replicas: int) -> dict:
    """The devices of the run: every GPU, or ``cpu_replicas`` logical CPU devices (made before TensorFlow starts
    its runtime).  Raises :class:`harness.BenchmarkError` when the mode does not match the machine."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if cpu_replicas and gpus:
        raise harness.BenchmarkError(f"--cpu-replicas is for machines without GPUs; this one has {len(gpus)}: run "
                                     "without it")
    if not cpu_replicas and not gpus:
        raise harness.BenchmarkError("no GPU found; run with --cpu-replicas 2 for the CPU form (its figures say "
                                     "nothing about GPU speed)")
    if cpu_replicas:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
        names = [f"/cpu:{i}" for i in range(cpu_replicas)]
        return {"kind": "cpu_logical_devices", "devices": names, "physical_gpus": [], "warning": CPU_WARNING}
    details = []
    for gpu in gpus:
        info = tf.config.experimental.get_device_details(gpu)
        details.append({"name": gpu.name, **{k: str(v) for k, v in info.items()}})
    note = ("one GPU only: the all-GPU run is a second 1-GPU run, so its efficiency is the noise floor, not scaling"
            if len(gpus) == 1 else None)
    return {"kind": "gpu", "devices": [f"/gpu:{i}" for i in range(len(gpus))], "physical_gpus": details,
            "warning": note}


def memory(device_names: list[str], before: dict) -> dict:
    """Per GPU: peak bytes since the last reset, and bytes in use before this setting was built.  On logical CPU
    devices TensorFlow reports 0, so the process's peak resident memory is given instead (process-wide, monotonic)."""
    import tensorflow as tf

    if device_names[0].startswith("/cpu"):
        return {"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "note": "TensorFlow reports no per-device memory for CPU devices"}
    out = {}
    for name in device_names:
        key = name.strip("/").upper()
        out[key] = {"peak_bytes": tf.config.experimental.get_memory_info(key)["peak"],
                    "in_use_before_bytes": before[key]}
    return out


def reset_memory(device_names: list[str]) -> dict:
    """Reset each GPU's peak counter; returns the bytes in use now (what earlier settings still hold)."""
    import tensorflow as tf

    if device_names[0].startswith("/cpu"):
        return {}
    now = {}
    for name in device_names:
        key = name.strip("/").upper()
        tf.config.experimental.reset_memory_stats(key)
        now[key] = tf.config.experimental.get_memory_info(key)["current"]
    return now


# --- training -----------------------------------------------------------------------------------------------------

def build_setting(cfg, device_names: list[str], global_batch: str, mixed: bool) -> dict:
    """One training setting on ``device_names``: model, step function, iterator; traced by its first call, after
    which its memory is read (the first call is a whole step)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from ldct_tf.models.factory import build_cyclegan, compile_cyclegan
    from ldct_tf.train import check_batches, loop

    replicas = len(device_names)
    batch = cfg.train.batch_size * (replicas if global_batch == "scaled" else 1)
    cfg.train.batch_size, saved = batch, cfg.train.batch_size
    try:
        check_batches(cfg, replicas)
    finally:
        cfg.train.batch_size = saved
    before = reset_memory(device_names)
    keras.utils.set_random_seed(cfg.train.seed)
    strategy = tf.distribute.MirroredStrategy(device_names)
    with strategy.scope():
        model = compile_cyclegan(build_cyclegan(cfg), cfg, loss_scaling=mixed)
    patch = cfg.data.patch_size
    rng = np.random.default_rng(0)
    low, normal = (rng.uniform(-0.6, -0.4, (batch, patch, patch, 1)).astype("float32") for _ in range(2))
    dataset = tf.data.Dataset.from_tensors((low, normal)).repeat()
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    spe = cfg.train.steps_per_execution
    train_step, _ = loop.make_step_functions(model, strategy, spe, cfg.train.jit_compile)
    started = time.perf_counter()
    train_step(iterator)
    model.steps_done()  # reads a variable: waits for the step
    tracing = time.perf_counter() - started
    return {"replicas": replicas, "devices": device_names, "global_batch": batch,
            "first_call_seconds_incl_tracing": round(tracing, 2),
            "memory_after_first_step": memory(device_names, before),
            "vgg19_pretrained": bool(model.perceptual.pretrained) if model.perceptual else None,
            "_call": lambda: train_step(iterator), "_steps_done": model.steps_done, "_spe": spe}


def time_training(settings: dict, steps: int, rounds: int, warmup_steps: int) -> None:
    """Warm-up steps of every setting once all are built (building the second slowed the first one's next call
    about 90-fold on the CPU), then alternating rounds of ``steps`` steps per setting (order reversed every other
    round); adds the figures."""
    for setting in settings.values():
        for _ in range(math.ceil(warmup_steps / setting["_spe"])):
            setting["_call"]()
        setting["_steps_done"]()
        setting.update(seconds_per_step_all_rounds=[], background_cpu_seconds_all_rounds=[])
    for index in range(rounds):
        for name in (list(settings) if index % 2 == 0 else list(settings)[::-1]):
            s = settings[name]
            before = s["_steps_done"]()

            def run(s=s):
                for _ in range(math.ceil(steps / s["_spe"])):
                    s["_call"]()
                return s["_steps_done"]()  # waits for the queued steps

            after, used = harness.measure(run)
            s["seconds_per_step_all_rounds"].append(round(used["wall"] / (after - before), 5))
            s["background_cpu_seconds_all_rounds"].append(used["background_cpu"])
        print(f"training round {index + 1}/{rounds}: " + ", ".join(
            f"{n} {settings[n]['seconds_per_step_all_rounds'][-1]:.4f} s/step" for n in settings), flush=True)
    for s in settings.values():
        median = statistics.median(s["seconds_per_step_all_rounds"])
        s["seconds_per_step_median"] = median
        s["patches_per_second"] = round(s["global_batch"] / median, 3)


def training(cfg, device_names: list[str], args: argparse.Namespace, mixed: bool) -> dict:
    """1 replica (the baseline) and all replicas: figures, scaling efficiency."""
    settings = {"one_replica": build_setting(cfg, device_names[:1], args.global_batch, mixed),
                "all_replicas": build_setting(cfg, device_names, args.global_batch, mixed)}
    time_training(settings, args.steps, args.rounds, args.warmup_steps)
    one, many = settings["one_replica"], settings["all_replicas"]
    efficiency = many["patches_per_second"] / (many["replicas"] * one["patches_per_second"])
    return {"baseline": "one_replica, built and timed in the same process, rounds alternating",
            "steps_per_round": args.steps, "rounds": args.rounds, "warmup_steps": args.warmup_steps,
            "global_batch_rule": args.global_batch,
            **{name: {k: v for k, v in s.items() if not k.startswith("_")} for name, s in settings.items()},
            "scaling_efficiency": round(efficiency, 4),
            "scaling_efficiency_definition": "patches/s on N replicas / (N x patches/s on 1)"}


# --- inference ----------------------------------------------------------------------------------------------------

def export_both(cfg, folder: Path) -> tuple[dict, int]:
    """The config's generator (random weights), exported with float32 and float16 compute; SavedModel folders."""
    import keras

    from ldct_tf.export import export_generator
    from ldct_tf.models.generator import build_generator

    keras.mixed_precision.set_global_policy("float32")  # training may have set mixed_float16: export decides dtypes
    keras.utils.set_random_seed(0)
    m = cfg.model
    generator = build_generator(m.depth, m.base_filters, m.residual_blocks, m.attention, m.norm,
                                noise_conditional=m.noise_conditional)
    exports = {dtype: export_generator(generator, folder / dtype, version=1, warmup_size=0, serving_base=None,
                                       compute_dtype=dtype) for dtype in ("float32", "float16")}
    return exports, int(generator.count_params())


def inference(cfg, args: argparse.Namespace) -> dict:
    """slices/s of both exports at each batch size, rounds alternating the dtypes; float16's speed-up."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    size = args.slice_size
    figures: dict = {"float32": {}, "float16": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        exports, parameters = export_both(cfg, Path(tmp))
        serve = {d: tf.saved_model.load(str(p)).signatures["serving_default"] for d, p in exports.items()}
        for batch in args.batch_sizes:
            hu = tf.constant(rng.normal(40.0, 20.0, (batch, size, size, 1)).astype("float32"))
            calls = max(1, math.ceil(args.inference_slices / batch))
            for dtype in serve:
                serve[dtype](hu=hu)["denoised_hu"].numpy()  # first call at this shape: not timed
                figures[dtype][f"batch_{batch}"] = {"slices_per_second_all_rounds": []}
            for index in range(args.rounds):
                for dtype in (("float32", "float16") if index % 2 == 0 else ("float16", "float32")):
                    started = time.perf_counter()
                    for _ in range(calls):
                        serve[dtype](hu=hu)["denoised_hu"].numpy()
                    rate = batch * calls / (time.perf_counter() - started)
                    figures[dtype][f"batch_{batch}"]["slices_per_second_all_rounds"].append(round(rate, 3))
            for dtype in serve:
                entry = figures[dtype][f"batch_{batch}"]
                entry["slices_per_second"] = statistics.median(entry["slices_per_second_all_rounds"])
            print(f"inference batch {batch}: " + ", ".join(
                f"{d} {figures[d][f'batch_{batch}']['slices_per_second']:.2f} slices/s" for d in serve), flush=True)
    speedup = {f"batch_{b}": round(figures["float16"][f"batch_{b}"]["slices_per_second"]
                                   / figures["float32"][f"batch_{b}"]["slices_per_second"], 4)
               for b in args.batch_sizes}
    return {"baseline": "the float32 export, same generator, same inputs, rounds alternating",
            "slice_size": size, "generator_parameters": parameters, "batch_sizes": args.batch_sizes,
            "signature": "serving_default (HU in, HU out)", **figures, "float16_speedup_over_float32": speedup}


# --- the run ------------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    """Devices, config, training, inference; the report without the machine header."""
    from ldct_tf import config as config_lib

    found = devices(args.cpu_replicas)
    overrides = [*(CPU_OVERRIDES if args.cpu_replicas else ()), *SPEED_OVERRIDES, *args.overrides]
    if not Path(args.config).is_file():
        raise harness.BenchmarkError(f"{args.config}: config file not found")
    cfg = config_lib.load(args.config, overrides)
    mixed = config_lib.mixed_precision_policy(cfg.train.mixed_precision)
    started = time.perf_counter()
    train = training(cfg, found["devices"], args, mixed)
    train_seconds = time.perf_counter() - started
    infer = inference(cfg, args)
    return {
        "devices": found,
        "config": {"path": os.path.relpath(Path(args.config).resolve(), harness.REPO), "overrides": overrides,
                   "patch_size": cfg.data.patch_size, "batch_size_in_config": cfg.train.batch_size,
                   "mixed_precision_requested": cfg.train.mixed_precision, "mixed_precision_on": mixed,
                   "jit_compile": cfg.train.jit_compile, "steps_per_execution": cfg.train.steps_per_execution,
                   "vgg19_pretrained": train["one_replica"]["vgg19_pretrained"],
                   "data": "synthetic batches in memory (the training step, not the input pipeline)"},
        "training": train,
        "inference": infer,
        "phase_seconds": {"training_incl_tracing": round(train_seconds, 1),
                          "inference_incl_export": round(time.perf_counter() - started - train_seconds, 1)},
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from ldct_tf.errors import LdctError

    started = time.time()
    report = {"benchmark": "gpu_check", "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": harness.machine_info(), "versions": harness.versions()}
    try:
        report.update(run(args))
    except (harness.BenchmarkError, LdctError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report["wall_seconds"] = round(time.time() - started, 1)
    path = harness.write_result(report, Path(args.out))
    print(f"scaling efficiency {report['training']['scaling_efficiency']} on {len(report['devices']['devices'])} "
          f"{report['devices']['kind']}; float16 speed-up {report['inference']['float16_speedup_over_float32']}"
          f"\nwrote {path}")
    if report["devices"]["warning"]:
        print(f"note: {report['devices']['warning']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
