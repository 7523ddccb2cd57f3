"""``python -m benchmarks.steps_per_execution``: the training loop with 1 vs N steps per ``tf.function`` call.

Both settings run in one process on the same synthetic batches, built from the same config and seed, timed in
alternating rounds (so both see the same background load): ``loop.make_step_functions(model, strategy, k)``, each call
running k CycleGAN steps (``train.steps_per_execution``).  Reports seconds per step (median over rounds), the
speed-up, tracing time, and writes ``benchmarks/results/steps_per_execution.json`` with the machine and versions.

What it shows: the Python dispatch saved per step.  On a CPU, where one step takes hundreds of milliseconds, that is
small; it is meant for GPUs, where a step of a small model is a few milliseconds.  Self-contained (no harness module
existed in this tree when it was written).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "steps_per_execution.json"


def build(config_path: Path, steps_per_execution: int, batch: int):
    """``(call(), steps_done())`` for one setting: a fresh model, its loop step function and an endless iterator."""
    import keras
    import numpy as np
    import tensorflow as tf

    from ldct_tf import config as config_lib
    from ldct_tf.models.factory import build_cyclegan, compile_cyclegan
    from ldct_tf.train import loop

    cfg = config_lib.load(config_path)
    keras.utils.set_random_seed(0)
    strategy = loop.make_strategy()
    with strategy.scope():
        model = compile_cyclegan(build_cyclegan(cfg), cfg)
    patch = cfg.data.patch_size
    rng = np.random.default_rng(0)
    low, normal = (rng.uniform(-0.6, -0.4, (batch, patch, patch, 1)).astype("float32") for _ in range(2))
    iterator = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((low, normal)).repeat()))
    train_step, _ = loop.make_step_functions(model, strategy, steps_per_execution)
    return (lambda: train_step(iterator)), model.steps_done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.steps_per_execution", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "smoke.yaml"))
    parser.add_argument("--n", type=int, default=4, help="steps per call compared with 1 (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating timed rounds (default %(default)s)")
    parser.add_argument("--calls", type=int, default=2, help="calls of the N-step function per round; the 1-step "
                        "function runs the same number of steps (default %(default)s)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    from ldct_tf import config as config_lib

    started = time.time()
    batch = config_lib.load(args.config).train.batch_size
    settings = {1: None, args.n: None}
    tracing = {}
    for k in settings:
        call, steps_done = build(Path(args.config), k, batch)
        t0 = time.perf_counter()
        call()
        steps_done()
        tracing[k] = round(time.perf_counter() - t0, 2)
        settings[k] = (call, steps_done)
    per_step = {k: [] for k in settings}
    steps = args.n * args.calls
    for round_index in range(args.rounds):
        for k in (list(settings) if round_index % 2 == 0 else list(settings)[::-1]):
            call, steps_done = settings[k]
            before = steps_done()
            t0 = time.perf_counter()
            for _ in range(steps // k):
                call()
            after = steps_done()  # reads a variable: waits for the queued steps
            per_step[k].append((time.perf_counter() - t0) / (after - before))
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{k} step(s)/call {statistics.median(v):.4f} s/step" for k, v in per_step.items()), flush=True)
    results = {f"steps_per_execution_{k}": {
        "steps_per_call": k, "step_seconds_median": round(statistics.median(v), 4),
        "step_seconds_all_rounds": [round(x, 4) for x in v], "first_call_seconds_incl_tracing": tracing[k],
        "patches_per_second": round(batch / statistics.median(v), 2)} for k, v in per_step.items()}
    one, n = results["steps_per_execution_1"], results[f"steps_per_execution_{args.n}"]
    report = {
        "benchmark": "steps_per_execution",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m benchmarks.steps_per_execution " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_seconds": round(time.time() - started, 1),
        "config": os.path.relpath(args.config, REPO), "batch_size": batch,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_1min_at_end": round(os.getloadavg()[0], 2),
                    "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
                    "python": platform.python_version()},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "notes": ["same process, same synthetic batch, same seed; the two settings alternate round by round",
                  f"each round runs {steps} steps of each setting; s/step = round wall time / steps done"],
        "results": results,
        "comparisons": {f"speedup_{args.n}_over_1_steps_per_second":
                        round(one["step_seconds_median"] / n["step_seconds_median"], 3)},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["comparisons"]), f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
