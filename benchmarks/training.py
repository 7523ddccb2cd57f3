"""``python -m benchmarks.training``: CycleGAN training speed and memory on this machine.

For each config (``cpu_small``, ``paper``) and each input (real shards through ``ldct_tf.data`` vs synthetic tensors
already in memory), a fresh child process builds the model exactly as ``ldct_tf.train`` does, runs warm-up steps, then
times steps with the training loop's own step function.  Peak memory is the child's peak RSS.  The input pipeline is
not the bottleneck when real-shard steps/s is within 5 % of synthetic steps/s.  Also reports each generator's FLOPs
on one 512x512 slice.  Writes ``benchmarks/results/training.json``.

The real shards come from running the pipeline on ``../shared/data/mayo_pairs`` (or ``$LDCT_DATA_DIR/mayo_pairs``)
into a temporary folder, or from ``--data SHARDS``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "training.json"
CONFIGS = {"cpu_small": {"warmup": 3, "steps": 15}, "paper": {"warmup": 2, "steps": 4}}


def child(config_name: str, mode: str, data_dir: str, warmup: int, steps: int) -> dict:
    """One measurement in this (fresh) process."""
    import keras
    import numpy as np
    import tensorflow as tf

    from ldct_tf import config as config_lib
    from ldct_tf import data
    from ldct_tf.models.factory import build_cyclegan, compile_cyclegan
    from ldct_tf.train import make_step_functions, make_strategy

    # VGG19 ImageNet weights are not on this machine; un-pretrained VGG19 costs exactly the same.
    cfg = config_lib.load(REPO / "configs" / f"{config_name}.yaml", ["loss.vgg_weights=none"])
    strategy = make_strategy()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = compile_cyclegan(build_cyclegan(cfg), cfg)
    batch, patch = cfg.train.batch_size, cfg.data.patch_size
    if mode == "real":
        dataset = data.unpaired_training_dataset(data_dir, patch, batch, seed=0,
                                                 min_tissue_fraction=cfg.data.min_tissue_fraction,
                                                 augment=cfg.data.augment, shuffle_buffer=cfg.data.shuffle_buffer,
                                                 cache=cfg.data.cache)
    else:
        rng = np.random.default_rng(0)
        low = rng.uniform(-0.6, -0.4, (batch, patch, patch, 1)).astype("float32")
        normal = rng.uniform(-0.6, -0.4, (batch, patch, patch, 1)).astype("float32")
        dataset = tf.data.Dataset.from_tensors((low, normal)).repeat()
    train_step, _ = make_step_functions(model, strategy)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    started = time.perf_counter()
    for _ in range(warmup):
        train_step(iterator)
    model.steps_done()  # waits for the queued steps
    warm_seconds = time.perf_counter() - started
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step(iterator)
        model.steps_done()
        times.append(time.perf_counter() - t0)
    times_sorted = sorted(times)
    median = times_sorted[len(times) // 2]
    return {
        "config": config_name, "mode": mode, "batch_size": batch, "patch_size": patch,
        "warmup_steps": warmup, "warmup_seconds_incl_tracing": round(warm_seconds, 2),
        "timed_steps": steps, "step_seconds_median": round(median, 4), "step_seconds_all": [round(t, 4) for t in times],
        "steps_per_second": round(1.0 / median, 4),
        "patches_per_second": round(batch / median, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "generator_parameters": int(model.low_to_normal.count_params()),
        "discriminator_parameters": int(model.normal_critic.count_params()),
    }


def generator_flops(config_name: str, size: int = 512) -> int:
    """Floating-point operations of one low-to-normal generator pass on a ``size`` x ``size`` slice (TF profiler)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from ldct_tf import config as config_lib
    from ldct_tf.models.generator import build_generator

    m = config_lib.load(REPO / "configs" / f"{config_name}.yaml").model
    generator = build_generator(m.depth, m.base_filters, m.residual_blocks, m.attention, m.norm)
    concrete = tf.function(lambda x: generator(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, size, size, 1], tf.float32))
    frozen = convert_variables_to_constants_v2(concrete)
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(frozen.graph.as_graph_def(), name="")
        options = tf.compat.v1.profiler.ProfileOptionBuilder(
            tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()).with_empty_output().build()
        return int(tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops)


def make_shards(out: Path) -> str:
    data_root = Path(os.environ.get("LDCT_DATA_DIR", REPO.parent / "shared" / "data")) / "mayo_pairs"
    if not (data_root / "pairs.csv").exists():
        raise SystemExit(f"benchmarks.training: {data_root} not found; pass --data SHARDS or set LDCT_DATA_DIR")
    from ldct_tf.sample_data import write_mayo_dose_manifest
    from pipelines.dicom_to_tfrecord import run

    manifest = write_mayo_dose_manifest(data_root, out / "doses.csv")
    shards = out / "shards"
    run(["--input", str(data_root / "quarter_dose"), "--input", str(data_root / "full_dose"), "--dose-manifest",
         str(manifest), "--output", str(shards), "--salt", "benchmark", "--splits", "train=1", "--num-shards", "2"])
    return str(shards)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="pipeline output folder (default: converted from the Mayo pairs)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated (default %(default)s)")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--child", nargs=5, metavar=("CONFIG", "MODE", "DATA", "WARMUP", "STEPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, mode, data_dir, warmup, steps = args.child
        print("RESULT " + json.dumps(child(name, mode, data_dir, int(warmup), int(steps))), flush=True)
        return 0

    import keras
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data or make_shards(Path(scratch))
        results = {}
        for name in args.configs.split(","):
            plan = CONFIGS[name]
            for mode in ("synthetic", "real"):
                cmd = [sys.executable, "-m", "benchmarks.training", "--child", name, mode, data_dir,
                       str(plan["warmup"]), str(plan["steps"])]
                print(f"{name} / {mode}: {plan['warmup']} warm-up + {plan['steps']} timed steps ...", flush=True)
                done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    raise SystemExit(f"child {name}/{mode} failed:\n{done.stderr[-3000:]}")
                results[f"{name}/{mode}"] = json.loads(lines[-1][len("RESULT "):])
        comparisons = {}
        for name in args.configs.split(","):
            real, synthetic = results[f"{name}/real"], results[f"{name}/synthetic"]
            ratio = real["steps_per_second"] / synthetic["steps_per_second"]
            comparisons[name] = {
                "real_over_synthetic_steps_per_second": round(ratio, 4),
                "input_pipeline_within_5_percent": ratio >= 0.95,
                "generator_gflops_per_512x512_slice": round(generator_flops(name) / 1e9, 2),
            }
    report = {
        "benchmark": "training",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m benchmarks.training " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "gpus": [d.name for d in tf.config.list_physical_devices("GPU")], "python": platform.python_version()},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "notes": ["one child process per measurement; peak_rss_mib is that process's peak resident memory",
                  "steps are the training loop's own distributed step (ldct_tf.train.make_step_functions), "
                  "MirroredStrategy over the local devices, float32, XLA off (the configs' default)",
                  "VGG19 built without ImageNet weights (not on this machine); the cost is identical",
                  "baseline: synthetic = the same batch held in memory, so real vs synthetic isolates the input "
                  "pipeline"],
        "results": results,
        "comparisons": comparisons,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'run':<22} {'steps/s':>8} {'s/step':>7} {'patches/s':>9} {'peak MiB':>9}")
    for key, r in results.items():
        print(f"{key:<22} {r['steps_per_second']:>8.3f} {r['step_seconds_median']:>7.2f} "
              f"{r['patches_per_second']:>9.1f} {r['peak_rss_mib']:>9.0f}")
    for name, c in comparisons.items():
        print(f"{name}: real/synthetic {c['real_over_synthetic_steps_per_second']:.3f} "
              f"(within 5 %: {c['input_pipeline_within_5_percent']}), generator "
              f"{c['generator_gflops_per_512x512_slice']} GFLOPs per 512x512 slice")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
