"""``python -m benchmarks.inference``: slices per second denoising 512x512 CT with the exported SavedModel (batch 1
and 8; also 32 on a GPU) against BM3D and non-local means, on the same slices, in the same run; peak memory.

Data: the first ``--slices`` quarter-dose slices of ``$LDCT_DATA_DIR/mayo_pairs`` (default ``../shared/data``), real
512x512 CT.  The SavedModel is the ``cpu_small`` config's generator (``configs/cpu_small.yaml``) with random weights,
exported by ``ldct_tf.export.export_generator`` into a temporary folder and run through
``ldct_tf.export.SavedModelDenoiser`` (what ``python -m ldct_tf.denoise --model`` uses); speed does not depend on
the weights' values.  BM3D and NLM are ``ldct_tf.baselines`` with their tuned default strengths (what the quality
benchmark uses).

Every measurement runs in a fresh child process: it loads the slices and the system, makes one untimed warm-up call
(graph tracing, BM3D's FFT plans), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), then times one
pass over all slices.  ``peak_rss_mib`` is the child's peak resident memory over its whole life (imports, TF
runtime, model, data); ``peak_rss_timed_mib`` the peak during the timed pass only.  The machine may be shared: runs
are interleaved (repeat 1 of every system, then repeat 2, ...; the order rotates), and the load average plus the
CPU other processes used during each run are recorded.  Writes ``benchmarks/results/inference.json``.
"""

from __future__ import annotations

import argparse
import json
import os
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
RESULTS = harness.result_path("inference")
MODEL_CONFIG = "cpu_small"
CPU_BATCHES = (1, 8)
GPU_BATCHES = (1, 8, 32)
#: BM3D must be at least this many times slower per slice than the SavedModel (issue 14's target on this CPU).
TARGET_SPEEDUP_OVER_BM3D = 50.0
#: The SavedModel's conv FLOPs per second must reach this fraction of the roof measured in the run (issue 14).
TARGET_FRACTION_OF_ROOF = 0.40


def generator_flops_per_slice(size: int = 512) -> int:
    """Conv FLOPs of one generator pass on a ``size`` x ``size`` slice (``harness.graph_flops``)."""
    import tensorflow as tf

    from ldct_tf import config as config_lib
    from ldct_tf.models.generator import build_generator

    m = config_lib.load(REPO / "configs" / f"{MODEL_CONFIG}.yaml").model
    generator = build_generator(m.depth, m.base_filters, m.residual_blocks, m.attention, m.norm)
    concrete = tf.function(lambda x: generator(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, size, size, 1], tf.float32))
    return harness.graph_flops(concrete.graph)["flops"]


# ------------------------------------------------------------------------------------------------ environment

def data_dir() -> Path:
    return harness.data_root() / "mayo_pairs"


def slice_files(n: int) -> list[Path]:
    folder = data_dir() / "quarter_dose"
    files = sorted(folder.glob("*.IMA")) if folder.is_dir() else []
    if len(files) < n:
        raise BenchmarkError(f"need {n} slices in {folder}, found {len(files)} "
                         f"(set LDCT_DATA_DIR to the folder holding mayo_pairs/)")
    return files[:n]


def load_average() -> Optional[list[float]]:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _rss_mib(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ one measurement

def export_model(folder: Path) -> Path:
    """cpu_small's generator, random weights, exported as saved_models-style FOLDER/1."""
    import keras

    from ldct_tf import config as config_lib
    from ldct_tf.export import export_generator
    from ldct_tf.models.generator import build_generator

    m = config_lib.load(REPO / "configs" / f"{MODEL_CONFIG}.yaml").model
    keras.utils.set_random_seed(0)
    generator = build_generator(m.depth, m.base_filters, m.residual_blocks, m.attention, m.norm,
                                name="low_to_normal")
    return export_generator(generator, folder / "ldct_denoiser", warmup_size=0, serving_base=None,
                            metadata={"note": "random weights: for speed measurements only"})


def child(system: str, model_dir: str, files: list[str]) -> dict:
    """Time one pass of ``system`` over ``files`` in this (fresh) process."""
    import numpy as np

    from ldct_tf import dicom

    slices = np.stack([dicom.read_slice(f)[0] for f in files]).astype(np.float32)
    if system.startswith("savedmodel_batch"):
        from ldct_tf.export import SavedModelDenoiser

        batch = int(system.rsplit("batch", 1)[1])
        model = SavedModelDenoiser(model_dir, batch_size=batch)

        def run_all() -> np.ndarray:
            return model(slices)

        def warm() -> None:
            model(slices[:batch])
    else:
        from ldct_tf import baselines

        denoiser = baselines.get(system)

        def run_all() -> np.ndarray:
            return np.stack([denoiser(s) for s in slices])

        def warm() -> None:
            denoiser(slices[0])

    warm()
    rss_before = _rss_mib("VmRSS")
    peak_before_reset = _rss_mib("VmHWM")
    reset = _reset_peak_rss()
    started = time.perf_counter()
    cpu0 = time.process_time()
    out = run_all()
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    if out.shape != slices.shape or not np.all(np.isfinite(out)):
        raise SystemExit(f"{system}: returned shape {out.shape} / non-finite values for input {slices.shape}")
    result = {
        "seconds": seconds,
        "process_cpu_seconds": cpu,
        "rss_before_timed_mib": rss_before,
        # VmHWM, not getrusage's ru_maxrss: the latter survives exec and would report the parent's peak
        "peak_rss_timed_mib" if reset else "peak_rss_mib": _rss_mib("VmHWM"),
    }
    if reset:
        result["peak_rss_mib"] = max(peak_before_reset, result["peak_rss_timed_mib"])
    if system.startswith("savedmodel_batch"):
        import tensorflow as tf

        result["device"] = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    return result


def run_child(system: str, model_dir: Path, files: list[Path]) -> dict:
    """One fresh child process timing ``system``; its figures with the load and background CPU around it."""
    cmd = [sys.executable, "-m", "benchmarks.inference", "--child", system, str(model_dir), *map(str, files)]
    load_before = load_average()
    done, timing = harness.measure(lambda: subprocess.run(cmd, cwd=REPO, capture_output=True, text=True))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise BenchmarkError(f"child {system} failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["load_average_before"] = load_before
    result["load_average_after"] = load_average()
    if timing["background_cpu"] is not None:
        # CPU used by every other process during the child's whole life (it includes its start-up, not only the
        # timed pass), per second of the child's life: 1.0 = one core kept busy by someone else
        result["background_cores_busy"] = round(timing["background_cpu"] / timing["wall"], 2)
    return result


# ------------------------------------------------------------------------------------------------ report

def summarise(system: str, runs: list[dict], n_slices: int) -> dict:
    seconds = [r["seconds"] for r in runs]
    median = statistics.median(seconds)
    out = {
        "slices_per_second": round(n_slices / median, 3),
        "seconds_per_slice": round(median / n_slices, 4),
        "seconds_per_pass_all_runs": [round(s, 3) for s in seconds],
        "process_cpu_seconds_per_slice": round(statistics.median(r["process_cpu_seconds"] for r in runs) / n_slices,
                                               4),
        "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
        "rss_before_timed_mib": round(statistics.median(r["rss_before_timed_mib"] for r in runs), 1),
        "background_cores_busy_all_runs": [r.get("background_cores_busy") for r in runs],
        "load_average_before_after_all_runs": [[r["load_average_before"], r["load_average_after"]] for r in runs],
    }
    if all("peak_rss_timed_mib" in r for r in runs):
        out["peak_rss_timed_mib"] = round(max(r["peak_rss_timed_mib"] for r in runs), 1)
    if "device" in runs[0]:
        out["device"] = runs[0]["device"]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=8, help="512x512 slices per pass (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per system, interleaved "
                                                               "(default %(default)s); the median counts")
    parser.add_argument("--systems", help="comma-separated subset of the systems (default: all)")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--child", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        system, model_dir, *files = args.child
        print("RESULT " + json.dumps(child(system, model_dir, files)), flush=True)
        return 0
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    try:
        systems = choose_systems(args.systems, gpus)
        files = slice_files(args.slices)
        started_load = load_average()
        runs, roofs, parameters, flops_per_slice = run_repeats(systems, files, args.repeats)
    except BenchmarkError as exc:
        print(f"benchmarks.inference: error: {exc}", file=sys.stderr)
        return 1
    results = {s: summarise(s, r, len(files)) for s, r in runs.items()}
    roof = max(roofs, key=lambda r: r["roof_gflops"])
    add_roof_fractions(results, flops_per_slice, roof)
    comparisons = compare_with_bm3d(results)
    report = {
        "benchmark": "inference",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m benchmarks.inference " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**harness.machine_info(), "gpus": gpus, "load_average_at_start": started_load,
                    "load_average_at_end": load_average()},
        "versions": harness.versions("scikit-image", "bm3d"),
        "data": {"source": "mayo_pairs/quarter_dose (real AAPM-Mayo quarter-dose CT)", "slices": len(files),
                 "size": "512x512", "files": [f.name for f in files]},
        "model": {"config": f"configs/{MODEL_CONFIG}.yaml", "generator_parameters": parameters,
                  "weights": "random initialisation: inference speed does not depend on the weights' values",
                  "runner": "ldct_tf.export.SavedModelDenoiser (serving_default signature, float32)"},
        "notes": NOTES,
        "roofline": {"used": roof, "roof_gflops_each_measurement": [r["roof_gflops"] for r in roofs],
                     "how": "benchmarks.harness.measure_roof() before the first repeat and after each; the best "
                            "counts; flops_per_slice: conv FLOPs of one generator pass "
                            "(benchmarks.harness.graph_flops)"},
        "results": results,
        "comparisons": comparisons,
        "target": f"SavedModel at least {TARGET_SPEEDUP_OVER_BM3D:g} times faster than BM3D per slice on this CPU",
    }
    harness.write_result(report, Path(args.output))
    print_table(results, comparisons, roof)
    print(f"wrote {args.output}")
    return 0


NOTES = [
    "each run is a fresh child process: load slices and system, one untimed warm-up call, then one timed "
    "pass over all slices; the median of the repeats counts",
    "savedmodel_batchN: SavedModelDenoiser(batch_size=N) called on the whole stack (N slices per signature "
    "call); nlm and bm3d: ldct_tf.baselines (tuned default strengths), one slice at a time",
    "peak_rss_mib: the child's peak resident memory over its whole life (imports, TensorFlow runtime, model, "
    "data); peak_rss_timed_mib: the peak during the timed pass only (peak mark reset after the warm-up)",
    "the machine is shared with other work: runs are interleaved with a rotating order so that contention "
    "hits every system alike; background_cores_busy is the CPU other processes used during each child's "
    "life, in cores; load averages are os.getloadavg() before and after each run",
    "speedup compares wall-clock seconds per slice (what a user waits); cpu_seconds_ratio compares the CPU "
    "seconds the process used per slice (all its threads), which contention from other processes disturbs "
    "less",
]


def choose_systems(wanted: Optional[str], gpus: list[str]) -> list[str]:
    """The systems this installation can run (BM3D only with the optional extra), or the ``--systems`` subset."""
    from ldct_tf import baselines

    batches = GPU_BATCHES if gpus else CPU_BATCHES
    systems = [f"savedmodel_batch{b}" for b in batches] + ["nlm"]
    if baselines.bm3d_available():
        systems.append("bm3d")
    else:
        print("bm3d is not installed (pip install 'ldct_tf[baselines]'): BM3D left out", file=sys.stderr)
    if wanted:
        names = wanted.split(",")
        unknown = sorted(set(names) - set(systems))
        if unknown:
            raise BenchmarkError(f"unknown or unavailable systems {unknown}; available {systems}")
        systems = [s for s in systems if s in names]
    return systems


def run_repeats(systems: list[str], files: list[Path], repeats: int) -> tuple[dict, list[dict], Optional[int], int]:
    """Interleaved repeats of every system, the roof measured before the first and after each; returns (runs per
    system, the roofs, the generator's parameter count, its conv FLOPs per slice)."""
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    roofs = [harness.measure_roof()]
    flops_per_slice = generator_flops_per_slice()
    with tempfile.TemporaryDirectory() as scratch:
        print(f"exporting the {MODEL_CONFIG} generator (random weights) ...", flush=True)
        model_dir = export_model(Path(scratch))
        for repeat in range(repeats):
            for system in systems[repeat % len(systems):] + systems[:repeat % len(systems)]:
                print(f"run {repeat + 1}/{repeats}: {system} on {len(files)} slices ...", flush=True)
                runs[system].append(run_child(system, model_dir, files))
            roofs.append(harness.measure_roof())
        parameters = json.loads((model_dir / "metadata.json").read_text()).get("parameters")
    return runs, roofs, parameters, flops_per_slice


def add_roof_fractions(results: dict, flops_per_slice: int, roof: dict) -> None:
    for system, r in results.items():
        if system.startswith("savedmodel"):
            r["flops_per_slice"] = flops_per_slice
            r.update(harness.fraction(flops_per_slice, r["seconds_per_slice"], roof))
            r[f"meets_target_{TARGET_FRACTION_OF_ROOF:g}_of_roof"] = r["fraction_of_roof"] >= TARGET_FRACTION_OF_ROOF


def compare_with_bm3d(results: dict) -> dict:
    """Each SavedModel batch size's wall-clock speed-up and CPU-seconds ratio over BM3D (empty without BM3D)."""
    comparisons = {}
    if "bm3d" not in results:
        return comparisons
    for system in results:
        if system.startswith("savedmodel"):
            speedup = results["bm3d"]["seconds_per_slice"] / results[system]["seconds_per_slice"]
            cpu_ratio = (results["bm3d"]["process_cpu_seconds_per_slice"]
                         / results[system]["process_cpu_seconds_per_slice"])
            comparisons[f"{system}_over_bm3d_per_slice"] = {
                "speedup": round(speedup, 2),
                f"meets_target_{TARGET_SPEEDUP_OVER_BM3D:g}x": speedup >= TARGET_SPEEDUP_OVER_BM3D,
                "cpu_seconds_ratio": round(cpu_ratio, 2),
            }
    return comparisons


def print_table(results: dict, comparisons: dict, roof: dict) -> None:
    print(f"\n{'system':<20} {'slices/s':>9} {'s/slice':>8} {'peak MiB':>9} {'timed peak':>11}")
    for system, r in results.items():
        print(f"{system:<20} {r['slices_per_second']:>9.3f} {r['seconds_per_slice']:>8.3f} {r['peak_rss_mib']:>9.0f} "
              f"{r.get('peak_rss_timed_mib', float('nan')):>11.0f}")
    for name, c in comparisons.items():
        print(f"{name}: {c['speedup']}x wall clock, {c['cpu_seconds_ratio']}x CPU seconds")
    for system, r in results.items():
        if "fraction_of_roof" in r:
            print(f"{system}: {r['gflops_per_second']} GFLOP/s = {r['fraction_of_roof']:.1%} of the "
                  f"{roof['roof_gflops']} GFLOP/s roof")


if __name__ == "__main__":
    sys.exit(main())
