"""``python -m benchmarks.float16_error``: how far a float16-compute export lands from the float32 one, in HU, on real
slices.

    LDCT_DATA_DIR=../shared/data .venv/bin/python -m benchmarks.float16_error \\
        --generator /work/v3/original_from_seed1/generator.keras --reference saved_models/ldct_denoiser/3

Why: ``python -m ldct_tf.export --compute-dtype float16`` exists for GPUs, where float16 convolutions are several
times faster; a clinic must know what it costs in HU before it serves it.  The generator is exported twice through
the export code path (:func:`ldct_tf.export.export_generator`, ``compute_dtype`` float32 and float16), both
SavedModels denoise the same real quarter-dose slices of development patient L143 (never the test patient), and
the absolute HU difference of the outputs is summarised over every pixel (max, 99.9th, 99th percentile, median,
mean) and over the body (input above -500 HU).

``--reference`` (a shipped SavedModel version folder) checks that ``--generator`` is the model shipped there: the
float32 export must reproduce its output (its max |HU difference| is recorded), so the float16 figure is the
shipped model's.  On a CPU float16 is emulated (slow, but the arithmetic is IEEE half precision as on a GPU; the
GPU's convolution algorithms may round differently in the last bit).  Writes ``benchmarks/results/float16_error.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import harness  # noqa: E402

BODY_HU = -500.0  # input pixels above this are "body" (air is about -1000 HU)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.float16_error", description=__doc__.splitlines()[0])
    parser.add_argument("--generator", required=True, help="the generator to export (.keras file)")
    parser.add_argument("--reference", help="a SavedModel version folder the float32 export must reproduce "
                        "(e.g. saved_models/ldct_denoiser/3)")
    parser.add_argument("--slices", type=int, default=4, help="L143 quarter-dose slices, spread over the patient "
                        "(default %(default)s)")
    parser.add_argument("--out", default=str(harness.result_path("float16_error")))
    args = parser.parse_args(argv)
    if args.slices < 1:
        parser.error(f"--slices must be >= 1, got {args.slices}")
    return args


def low_dose_slices(count: int) -> tuple[list[str], "object"]:
    """``count`` quarter-dose slices of the development low-dose patient (L143), evenly spread: names and a
    float32 HU array [count, H, W, 1].  Rows of other patients are filtered out before any file is opened."""
    import numpy as np

    from ldct_tf import dicom

    root = harness.data_root()
    if not (root / "mayo_pairs" / "pairs.csv").exists():
        raise harness.BenchmarkError(f"{root / 'mayo_pairs' / 'pairs.csv'}: not found ({harness.data_source()})")
    rows = [r for r in harness.pair_rows(root) if r["patient"] == harness.LOW_PATIENT != harness.TEST_PATIENT]
    rows.sort(key=lambda r: r["quarter_dose"])
    if not rows:
        raise harness.BenchmarkError(f"{root / 'mayo_pairs'}: no slice of patient {harness.LOW_PATIENT}")
    picked = [rows[i] for i in sorted({round(j * (len(rows) - 1) / max(1, count - 1)) for j in range(count)})]
    arrays = [dicom.read_slices(str(root / "mayo_pairs" / r["quarter_dose"]))[0][0] for r in picked]
    return [Path(r["quarter_dose"]).stem for r in picked], np.stack(arrays).astype("float32")[..., None]


def _denoise_all(version_dir: Path, hu) -> tuple["object", float]:
    """Every slice through ``serving_default`` one at a time (batch 1, as a viewer asks); outputs and s/slice."""
    import numpy as np
    import tensorflow as tf

    serve = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    serve(hu=tf.constant(hu[:1]))  # first call: graph optimisation, not timed
    started = time.perf_counter()
    out = np.concatenate([serve(hu=tf.constant(hu[i:i + 1]))["denoised_hu"].numpy() for i in range(len(hu))])
    return out, (time.perf_counter() - started) / len(hu)


def _stats(diff, mask=None) -> dict:
    import numpy as np

    values = np.abs(diff if mask is None else diff[mask]).astype("float64")
    return {"max": float(values.max()), "p99_9": float(np.percentile(values, 99.9)),
            "p99": float(np.percentile(values, 99)), "median": float(np.median(values)),
            "mean": float(values.mean()), "pixels": int(values.size)}


def measure(args: argparse.Namespace) -> dict:
    """Export twice, denoise the slices with both exports (and the reference), compare."""
    import keras

    from ldct_tf.export import export_generator
    from ldct_tf.models import blocks  # noqa: F401  (registers NoiseLevelMap for loading)

    generator_path = Path(args.generator)
    if not generator_path.is_file():
        raise harness.BenchmarkError(f"{generator_path}: generator file not found")
    names, hu = low_dose_slices(args.slices)
    generator = keras.saving.load_model(generator_path, compile=False)
    outputs, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="float16_error_") as tmp:
        for dtype in ("float32", "float16"):
            folder = export_generator(generator, Path(tmp) / dtype, version=1, warmup_size=0, serving_base=None,
                                      compute_dtype=dtype)
            outputs[dtype], seconds[dtype] = _denoise_all(folder, hu)
    result = {"slices": len(names), "slice_files": names, "slice_shape": list(hu.shape[1:3]),
              "seconds_per_slice_batch1": seconds}
    diff = outputs["float16"] - outputs["float32"]
    body = hu > BODY_HU
    result["abs_hu_difference_float16_vs_float32"] = {"all_pixels": _stats(diff),
                                                      f"body_input_above_{int(BODY_HU)}_hu": _stats(diff, body)}
    result["abs_hu_denoising_change_float32"] = _stats(outputs["float32"] - hu)  # scale: what the model changes
    if args.reference:
        reference_dir = Path(args.reference)
        if not (reference_dir / "saved_model.pb").is_file():
            raise harness.BenchmarkError(f"{reference_dir}: no saved_model.pb (give a SavedModel version folder)")
        shipped, _ = _denoise_all(reference_dir, hu)
        result["reference"] = {"path": os.path.relpath(reference_dir.resolve(), harness.REPO),
                               "max_abs_hu_float32_export_vs_reference": float(abs(outputs["float32"] - shipped).max()),
                               "abs_hu_float16_export_vs_reference": _stats(outputs["float16"] - shipped)}
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.time()
    try:
        figures = measure(args)
    except harness.BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = {
        "benchmark": "float16_error",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m benchmarks.float16_error " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": harness.machine_info(), "versions": harness.versions(),
        "generator": os.path.basename(args.generator), "patient": harness.LOW_PATIENT, "dose": "quarter",
        "baseline": "the float32 export of the same generator, same slices, same run",
        "notes": ["float16 compute: ldct_tf.export.graph.float16_compute (Keras mixed_float16, output head float32)",
                  "on a CPU float16 is emulated: the seconds per slice say nothing about a GPU"],
        **figures,
        "wall_seconds": round(time.time() - started, 1),
    }
    path = harness.write_result(report, Path(args.out))
    err = figures["abs_hu_difference_float16_vs_float32"]["all_pixels"]
    print(f"float16 vs float32 export on {figures['slices']} slices: max {err['max']:.3f} HU, "
          f"p99 {err['p99']:.3f} HU\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
