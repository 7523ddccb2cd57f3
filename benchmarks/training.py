"""``python -m benchmarks.training``: training-step speed of ``configs/cpu_small.yaml``, with same-run baselines.

Systems, each a warm child process holding its model; the parent runs them in lockstep (``--rounds`` rounds of
``--steps`` steps each, the order rotated every round), so every system sees the same background load:

* ``cyclegan``: the CycleGAN step of the training loop (``make_step_functions``) on synthetic batches in memory;
* ``cyclegan_real_data``: the same on real shards through ``ldct_tf.data`` (the input pipeline's cost);
* ``supervised``: one generator of the same shape, L1 on pairs, same batch and optimizer (the arithmetic floor:
  a CycleGAN step does six generator passes, four critic passes and the perceptual network);
* ``cyclegan_control``: ``cyclegan`` again in a second process: identical code, so its ratio to ``cyclegan`` is the
  process-to-process noise of this run (large on a busy 2-core machine);
* ``reference_cyclegan``: the CycleGAN step of the code at :data:`REFERENCE_COMMIT` (before the speed work),
  checked out from git into a scratch folder, on the same synthetic batches.

Reports s/step (median), patches/s, CPU-s/step, peak RSS, conv+matmul FLOPs per step (``benchmarks.harness.graph_flops``) and
their fraction of this machine's float32 roof measured in the same run, the load average, and the ratios.  The v1
figure recorded before (``benchmarks/results/training.json`` at :data:`V1_RESULTS_COMMIT`) is read from git and
compared too; it was measured on a busy machine, so the same-run reference is the fair comparison.

Real shards come from the pipeline on ``../shared/data/mayo_pairs`` (or ``$LDCT_DATA_DIR/mayo_pairs``) converted into
a scratch folder, or ``--data SHARDS``; without either, ``cyclegan_real_data`` is skipped (and the JSON says so).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from benchmarks import harness
from benchmarks.harness import BenchmarkError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = harness.REPO
RESULTS = harness.result_path("training")
CONFIG = "cpu_small"
#: The code before the speed work of issue 14: what ``reference_cyclegan`` runs.
REFERENCE_COMMIT = "0bd127264ea674c85759737ea5a69fc3edbf0045"
#: The commit whose ``benchmarks/results/training.json`` holds the v1 figure (1.40 s/step, 2.9 patches/s).
V1_RESULTS_COMMIT = "95e858a"
PREFIX = "BENCH "


# --- child: one warm system ---------------------------------------------------------------------------------------

def _step_functions():
    """The training loop's step factory, wherever this checkout keeps it."""
    import importlib

    found = {}
    for name in ("make_step_functions", "make_strategy"):
        for module in ("ldct_tf.train.loop", "ldct_tf.train"):  # the training-loop module, when this checkout has it
            try:
                found[name] = getattr(importlib.import_module(module), name)
                break
            except (ImportError, AttributeError):
                continue
        else:
            raise SystemExit(f"benchmarks.training: no {name} in ldct_tf.train.loop or ldct_tf.train")
    return found["make_step_functions"], found["make_strategy"]


def _synthetic(batch: int, patch: int):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    low = rng.uniform(-0.6, -0.4, (batch, patch, patch, 1)).astype("float32")
    normal = rng.uniform(-0.6, -0.4, (batch, patch, patch, 1)).astype("float32")
    return tf.data.Dataset.from_tensors((low, normal)).repeat()


def build_system(system: str, data_dir: str):
    """``(step(), wait(), info)`` for one system: ``step`` queues one training step, ``wait`` blocks until done."""
    import keras
    import tensorflow as tf

    from ldct_tf import config as config_lib

    make_step_functions, make_strategy = _step_functions()
    # The configs beside the ldct_tf being measured (the reference commit's own, for the reference system).
    configs = Path(config_lib.__file__).resolve().parents[1] / "configs"
    cfg = config_lib.load(configs / f"{CONFIG}.yaml", ["loss.vgg_weights=none"])
    batch, patch = cfg.train.batch_size, cfg.data.patch_size
    strategy = make_strategy()
    keras.utils.set_random_seed(0)
    if system == "cyclegan_real_data":
        from ldct_tf import data

        dataset = data.unpaired_training_dataset(data_dir, patch, batch, seed=0,
                                                 min_tissue_fraction=cfg.data.min_tissue_fraction,
                                                 augment=cfg.data.augment, shuffle_buffer=cfg.data.shuffle_buffer,
                                                 cache=cfg.data.cache)
    else:
        dataset = _synthetic(batch, patch)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    flops_iterator = iter(strategy.experimental_distribute_dataset(_synthetic(batch, patch)))

    if system == "supervised":
        from ldct_tf.models.losses import l1_loss
        from ldct_tf.models.generator import build_generator

        m, t = cfg.model, cfg.train
        with strategy.scope():
            generator = build_generator(m.depth, m.base_filters, m.residual_blocks, m.attention, m.norm)
            optimizer = keras.optimizers.Adam(t.generator_lr, beta_1=t.beta_1)
            optimizer.build(generator.trainable_variables)

        def replica_step(pair):
            low, normal = pair
            with tf.GradientTape() as tape:
                loss = l1_loss(normal, generator(low, training=True)) / strategy.num_replicas_in_sync
            variables = generator.trainable_variables
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

        @tf.function
        def train_step(it):
            strategy.run(replica_step, args=(next(it),))

        def wait():
            return int(optimizer.iterations.numpy())

        parameters = generator.count_params()
    else:
        from ldct_tf.models.factory import build_cyclegan, compile_cyclegan

        with strategy.scope():
            model = compile_cyclegan(build_cyclegan(cfg), cfg)
        train_step, _ = make_step_functions(model, strategy)
        wait = model.steps_done
        parameters = model.low_to_normal.count_params()

    flops = harness.graph_flops(train_step.get_concrete_function(flops_iterator).graph)
    info = {"batch_size": batch, "patch_size": patch, "generator_parameters": int(parameters),
            "flops_per_step": flops["flops"], "flops_by_op": flops["by_type"],
            "flops_unknown_shape_ops": flops["unknown_shape_ops"]}
    return (lambda: train_step(iterator)), wait, info


def child(system: str, data_dir: str, warmup: int) -> int:
    """Serve ``RUN k`` requests on stdin: run k timed steps, answer with their wall and CPU seconds."""
    step, wait, info = build_system(system, data_dir)
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    wait()
    info["warmup_steps"], info["warmup_seconds_incl_tracing"] = warmup, round(time.perf_counter() - started, 2)
    print(PREFIX + json.dumps({"ready": info}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] != "RUN":
            break
        walls, cpus = [], []
        for _ in range(int(command[1])):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wait()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        print(PREFIX + json.dumps({"wall": walls, "cpu": cpus, "load_1min": os.getloadavg()[0]}), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(PREFIX + json.dumps({"peak_rss_mib": round(peak, 1)}), flush=True)
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: TensorFlow's thread pools sometimes hang it (seen here, TF 2.21)


# --- parent -------------------------------------------------------------------------------------------------------

class Child:
    """A system's warm process, driven line by line."""

    def __init__(self, system: str, data_dir: str, warmup: int, pythonpath: str, extra_env: dict | None = None):
        env = {**os.environ, "PYTHONPATH": pythonpath, **(extra_env or {})}
        self.system = system
        kind = system.split("@")[0].replace("_control", "")
        self.log = tempfile.TemporaryFile(mode="w+")  # TensorFlow's log: a pipe nobody reads would fill and block
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.training", "--child", kind, data_dir, str(warmup)], cwd=REPO,
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        self.log.seek(0)
        error = self.log.read()[-3000:]
        raise BenchmarkError(f"system {self.system} failed:\n{error}")

    def run(self, steps: int) -> dict:
        self.process.stdin.write(f"RUN {steps}\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> dict:
        self.process.stdin.write("QUIT\n")
        self.process.stdin.flush()
        last = self.read()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return last


def reference_tree(scratch: Path) -> str | None:
    """The reference commit's ``ldct_tf`` and ``configs`` in a scratch folder (None when git cannot provide it)."""
    target = scratch / "reference"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", REFERENCE_COMMIT, "ldct_tf", "configs"],
                             capture_output=True)
    if archive.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return str(target)


def v1_recorded() -> dict | None:
    """The v1 cpu_small figures as committed at :data:`V1_RESULTS_COMMIT` (read from git, not restated here)."""
    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{V1_RESULTS_COMMIT}:benchmarks/results/training.json"],
                           capture_output=True, text=True)
    if shown.returncode != 0:
        return None
    result = json.loads(shown.stdout)["results"][f"{CONFIG}/synthetic"]
    return {"commit": V1_RESULTS_COMMIT, "step_seconds_median": result["step_seconds_median"],
            "patches_per_second": result["patches_per_second"],
            "note": "measured on a busy machine (load not recorded); same batch and patch size"}


def make_shards(out: Path) -> str | None:
    data_root = harness.data_root() / "mayo_pairs"
    if not (data_root / "pairs.csv").exists():
        return None
    from ldct_tf.demo.sample_data import write_mayo_dose_manifest
    from ldct_tf.pipeline.__main__ import run

    manifest = write_mayo_dose_manifest(data_root, out / "doses.csv")
    shards = out / "shards"
    run(["--input", str(data_root / "quarter_dose"), "--input", str(data_root / "full_dose"), "--dose-manifest",
         str(manifest), "--output", str(shards), "--salt", "benchmark", "--splits", "train=1", "--num-shards", "2"])
    return str(shards)


def summarise(system: str, info: dict, walls: list, cpus: list, loads: list, peak: dict, roof: dict) -> dict:
    median = statistics.median(walls)
    return {
        "system": system, **{k: info[k] for k in ("batch_size", "patch_size", "generator_parameters",
                                                  "warmup_steps", "warmup_seconds_incl_tracing")},
        "timed_steps": len(walls), "step_seconds_median": round(median, 4),
        "step_seconds_fastest": round(min(walls), 4), "step_seconds_all": [round(w, 4) for w in walls],
        "cpu_seconds_per_step_median": round(statistics.median(cpus), 4),
        "steps_per_second": round(1 / median, 3), "patches_per_second": round(info["batch_size"] / median, 2),
        "flops_per_step": info["flops_per_step"], "flops_by_op": info["flops_by_op"],
        **{f"median_{k}": v for k, v in harness.fraction(info["flops_per_step"], median, roof).items()},
        **{f"fastest_{k}": v for k, v in harness.fraction(info["flops_per_step"], min(walls), roof).items()},
        "load_1min_during": [round(x, 2) for x in loads], "peak_rss_mib": peak.get("peak_rss_mib"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="pipeline output folder (default: converted from the Mayo pairs)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per system per round (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per system first (default %(default)s)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                        help="also run the CycleGAN step with these environment variables, e.g. "
                             "threads:TF_NUM_INTRAOP_THREADS=1,TF_NUM_INTEROP_THREADS=2 (repeatable)")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--child", nargs=3, metavar=("SYSTEM", "DATA", "WARMUP"), help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        system, data_dir, warmup = args.child
        return child(system, data_dir, int(warmup))
    import tensorflow as tf

    started = time.time()
    try:
        with tempfile.TemporaryDirectory() as scratch_name:
            plan, skipped, variants, data_dir = plan_systems(args, Path(scratch_name))
            infos, walls, cpus, loads, roofs, peaks = run_lockstep(args, plan, variants, data_dir)
    except BenchmarkError as exc:
        print(f"benchmarks.training: error: {exc}", file=sys.stderr)
        return 1
    roof = max(roofs, key=lambda r: r["roof_gflops"])
    results = {name: summarise(name, infos[name], walls[name], cpus[name], loads[name], peaks[name], roof)
               for name in plan}
    v1 = v1_recorded()
    comparisons = compare(results, v1)
    report = {
        "benchmark": "training",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m benchmarks.training " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_seconds": round(time.time() - started, 1),
        "config": CONFIG, "reference_commit": REFERENCE_COMMIT,
        "machine": {**harness.machine_info(), "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]},
        "versions": harness.versions(),
        "roofline": {"used": roof, "roof_gflops_each_round": [r["roof_gflops"] for r in roofs]},
        "variants": variants,
        "notes": NOTES,
        "v1_recorded": v1,
        "skipped": skipped,
        "results": results,
        "comparisons": comparisons,
    }
    harness.write_result(report, Path(args.output))
    print_table(results, comparisons, roofs, roof)
    print(f"wrote {args.output}")
    return 0


NOTES = [
    "each system is one warm child process; the parent runs them in lockstep, rotating the order each round, "
    "so all see the same background load (load_1min_during); peak_rss_mib is each child's peak",
    "steps are the training loop's own distributed step (make_step_functions), MirroredStrategy over the "
    "local devices, float32, the config's thread and XLA settings",
    "VGG19 built without ImageNet weights (not on this machine); the cost is identical",
    "flops_per_step: 2 x multiply-adds of convolutions (forward and backward) and matmuls in the step's "
    "graph after merging identical sub-expressions; element-wise work is not counted",
    "fraction_of_roof: achieved conv+matmul GFLOP/s over the best float32 matmul/conv GFLOP/s measured in "
    "this run, before the first round and after each (roofline.used)",
]


def plan_systems(args: argparse.Namespace, scratch: Path) -> tuple[dict, dict, dict, Optional[str]]:
    """(system -> its PYTHONPATH, skipped system -> why, variant -> environment, the real shards or None)."""
    here = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    reference = reference_tree(scratch)
    data_dir = args.data or make_shards(scratch)
    # cyclegan_control: a second process of the same code, so the JSON shows how much two identical processes
    # differ under this machine's load (the noise floor of every ratio).
    plan = {"cyclegan": here, "supervised": here, "cyclegan_control": here}
    skipped = {}
    if data_dir:
        plan["cyclegan_real_data"] = here
    else:
        skipped["cyclegan_real_data"] = "no shards: pass --data or provide ../shared/data/mayo_pairs"
    if reference:
        plan["reference_cyclegan"] = os.pathsep.join([reference, str(REPO)])
    else:
        skipped["reference_cyclegan"] = f"git could not provide commit {REFERENCE_COMMIT}"
    variants = {}
    for spec in args.variant:
        label, _, assignments = spec.partition(":")
        variants[f"cyclegan@{label}"] = dict(item.split("=", 1) for item in assignments.split(",") if item)
        plan[f"cyclegan@{label}"] = here
    return plan, skipped, variants, data_dir


def run_lockstep(args: argparse.Namespace, plan: dict, variants: dict, data_dir: Optional[str]) -> tuple:
    """Start every system's warm child, run ``args.rounds`` rounds of ``args.steps`` steps each with the order
    rotated, the roof measured before the first round and after each; returns (ready infos, walls, CPU seconds,
    loads, roofs, each child's last answer with its peak RSS)."""
    print(f"starting {', '.join(plan)} ({args.warmup} warm-up steps each) ...", flush=True)
    children = {name: Child(name, data_dir or "-", args.warmup, path, variants.get(name))
                for name, path in plan.items()}
    infos = {name: c.read()["ready"] for name, c in children.items()}
    roofs = [harness.measure_roof()]
    walls: dict = {name: [] for name in plan}
    cpus: dict = {name: [] for name in plan}
    loads: dict = {name: [] for name in plan}
    order = list(plan)
    for round_index in range(args.rounds):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            answer = children[name].run(args.steps)
            walls[name] += answer["wall"]
            cpus[name] += answer["cpu"]
            loads[name].append(answer["load_1min"])
        roofs.append(harness.measure_roof())
        print(f"round {round_index + 1}/{args.rounds} (roof {roofs[-1]['roof_gflops']} GFLOP/s): " + ", ".join(
            f"{n} {statistics.median(walls[n]):.3f} s" for n in order), flush=True)
    peaks = {name: c.close() for name, c in children.items()}
    return infos, walls, cpus, loads, roofs, peaks


def compare(results: dict, v1: Optional[dict]) -> dict:
    """The ratios the JSON reports: against the reference commit, the recorded v1, the supervised floor, real data
    and the control process (the noise floor)."""
    def ratio(a: str, b: str, key: str = "patches_per_second"):
        return round(results[a][key] / results[b][key], 3) if a in results and b in results else None

    return {
        "cyclegan_over_reference_patches_per_second": ratio("cyclegan", "reference_cyclegan"),
        "cyclegan_over_v1_recorded_patches_per_second":
            round(results["cyclegan"]["patches_per_second"] / v1["patches_per_second"], 3) if v1 else None,
        "target_3x_v1_recorded_met":
            results["cyclegan"]["patches_per_second"] >= 3 * v1["patches_per_second"] if v1 else None,
        "supervised_over_cyclegan_patches_per_second": ratio("supervised", "cyclegan"),
        "cyclegan_over_supervised_flops_per_step":
            round(results["cyclegan"]["flops_per_step"] / results["supervised"]["flops_per_step"], 3),
        "real_data_over_synthetic_steps_per_second": ratio("cyclegan_real_data", "cyclegan", "steps_per_second"),
        "control_over_cyclegan_patches_per_second (same code: the noise floor)": ratio("cyclegan_control", "cyclegan"),
    }


def print_table(results: dict, comparisons: dict, roofs: list, roof: dict) -> None:
    print(f"\nroof {roof['roof_gflops']} GFLOP/s (best of {len(roofs)}); load "
          f"{roofs[0]['load_before']['load_1min']} -> {roofs[-1]['load_after']['load_1min']}")
    print(f"{'system':<20} {'s/step':>7} {'patches/s':>9} {'CPU s':>6} {'GFLOP':>6} {'of roof':>7} {'MiB':>6}")
    for name, r in results.items():
        print(f"{name:<20} {r['step_seconds_median']:>7.3f} {r['patches_per_second']:>9.1f} "
              f"{r['cpu_seconds_per_step_median']:>6.2f} {r['flops_per_step'] / 1e9:>6.1f} "
              f"{r['median_fraction_of_roof']:>7.1%} {r['peak_rss_mib'] or 0:>6.0f}")
    for key, value in comparisons.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
