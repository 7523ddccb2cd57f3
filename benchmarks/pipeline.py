"""``python -m benchmarks.pipeline``: slices per second of the DICOM -> TFRecord pipeline against a bare pydicom loop.

Data: ``$LDCT_DATA_DIR/mayo_pairs`` (default ``../shared/data/mayo_pairs`` next to the repository), i.e. the folders
``full_dose/`` and ``quarter_dose/`` of real 512x512 CT slices.  Systems, all measured in the same run and interleaved
(run 1 of every system, then run 2 of every system, ...; the order rotates from run to run):

* ``bare_loop``: one Python process that only reads each file with ``pydicom.dcmread`` and computes HU
  (``pixel_array.astype(float32) * RescaleSlope + RescaleIntercept``).  Nothing is written.
* ``pipeline_multi_processing_1`` / ``_2``: ``ldct_tf.pipeline.dicom_to_tfrecord.run`` on the DirectRunner with
  ``--direct_running_mode multi_processing --direct_num_workers 1`` / ``2``.
* ``pipeline_in_memory``: the same with the DirectRunner's defaults (in_memory), as a reference.

``--repeat K`` writes K copies of the 50 files, each copy with its own SOP Instance UIDs (the pipeline writes one SOP
instance once, so repeating the same ``--input`` would no longer multiply the work), and gives every system those
K x 50 files: the pipeline all copies' folders, the bare loop the same file list.  Pipeline wall time is
measured around the whole ``run()`` call: Beam pipeline construction, runner and worker start-up (including the imports
done inside worker processes), the pipeline itself and the manifest.  Imports of the benchmark process itself are done
once, before any timing, so they count against no system.

Writes ``benchmarks/results/pipeline.json`` (``--output`` to change) and prints a table.  Exit status 1 with a one-line
message when the data is missing or a pipeline run does not convert exactly the expected slices.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import subprocess
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

from benchmarks import harness
from benchmarks.harness import BenchmarkError, measure, wait_for_quiet

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = harness.REPO
DEFAULT_OUTPUT = harness.result_path("pipeline")
SUBFOLDERS = (("quarter_dose", "low"), ("full_dose", "normal"))
BARE = "bare_loop"
MP1 = "pipeline_multi_processing_1"
MP2 = "pipeline_multi_processing_2"
IN_MEMORY = "pipeline_in_memory"
DASK1 = "pipeline_dask_1"
DASK2 = "pipeline_dask_2"
DASK_WORKERS = {DASK1: 1, DASK2: 2}
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
BEAM_ARGS = {
    MP1: ["--direct_num_workers", "1", "--direct_running_mode", "multi_processing"],
    MP2: ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"],
    IN_MEMORY: [],
    DASK1: ["--runner", DASK_RUNNER],
    DASK2: ["--runner", DASK_RUNNER],
}
DESCRIPTIONS = {
    BARE: "single-process loop producing the pipeline's output: ldct_tf.dicom.read_slices (pydicom decode, HU), "
          "int16, pseudonyms, records.encode, tf.io.TFRecordWriter GZIP at the pipeline's level 1",
    MP1: "ldct_tf.pipeline.dicom_to_tfrecord.run, DirectRunner multi_processing, 1 worker process",
    MP2: "ldct_tf.pipeline.dicom_to_tfrecord.run, DirectRunner multi_processing, 2 worker processes",
    IN_MEMORY: "ldct_tf.pipeline.dicom_to_tfrecord.run, DirectRunner defaults (in_memory, in-process), reference",
    DASK1: "ldct_tf.pipeline.dicom_to_tfrecord.run on Beam's DaskRunner, local dask.distributed cluster of 1 worker process "
           "(1 thread), cluster start-up included",
    DASK2: "the same with 2 dask worker processes",
}
#: a run counts as disturbed when other processes used more than this share of the machine's CPU during it
BACKGROUND_WARN_SHARE = 0.10


# ----------------------------------------------------------------------------------------------------- environment

def data_dir() -> Path:
    return harness.data_root() / "mayo_pairs"


def list_files(data: Path) -> tuple[list[Path], list[Path]]:
    """(the two input folders, every file under them in the order the bare loop reads them)."""
    source = harness.data_source()
    folders = [data / name for name, _ in SUBFOLDERS]
    for folder in folders:
        if not folder.is_dir():
            raise BenchmarkError(f"benchmark data not found: {folder} is not a folder (from {source}; set "
                                 "LDCT_DATA_DIR to the folder holding mayo_pairs/)")
    files = []
    for folder in folders:
        found = sorted(Path(d) / f for d, _, names in os.walk(folder) for f in names)
        if not any(f.suffix.upper() == ".IMA" for f in found):
            raise BenchmarkError(f"benchmark data not found: no .IMA files in {folder} (from {source})")
        files.extend(found)
    return folders, files


def file_doses(files: list[Path], folders: list[Path]) -> list[str]:
    """Each file's dose class, from the sub-folder it lies in (as in :func:`write_dose_manifest`)."""
    dose_of = {folder: dose for folder, (_, dose) in zip(folders, SUBFOLDERS)}
    return [next(dose for folder, dose in dose_of.items() if folder in path.parents) for path in files]


def write_dose_manifest(files: list[Path], folder: Path) -> Path:
    """``path,dose,patient`` CSV: quarter_dose files low, full_dose files normal, patient = name before the first _."""
    path = folder / "doses.csv"
    dose_of = {name: dose for name, dose in SUBFOLDERS}
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "dose", "patient"])
        for f in files:
            dose = next(dose_of[p] for p in f.parts[::-1] if p in dose_of)
            writer.writerow([str(f), dose, f.name.split("_", 1)[0]])
    return path


def write_distinct_copies(files: list[Path], data: Path, repeat: int, folder: Path) -> tuple[list[Path], list[Path]]:
    """``repeat`` copies of ``files`` (laid out as under ``data``) in ``folder``, each file with a new SOP Instance UID
    and otherwise byte-for-byte the same image; returns (the copies' input folders, every copied file)."""
    import pydicom

    folders, copies = [], []
    for k in range(repeat):
        base = folder / f"copy_{k + 1:02d}"
        folders += [base / name for name, _ in SUBFOLDERS]
        for source in files:
            ds = pydicom.dcmread(source)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            target = base / source.relative_to(data)
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(target)
            copies.append(target)
    return folders, copies


# ---------------------------------------------------------------------------------------------------------- systems

def bare_loop(files: list[Path], doses: dict) -> int:
    """The baseline: the pipeline's output from one Python loop, no Beam.

    Per file: pydicom decode and HU (the pipeline's own ``ldct_tf.dicom.read_slices``), int16 HU, salted pseudonyms,
    the same ``tf.train.Example`` (``records.encode``), written with TensorFlow's ``tf.io.TFRecordWriter`` at the
    pipeline's GZIP level (1) into one file per dose.  Returns the number of slices written.
    """
    import tensorflow as tf

    from ldct_tf import ct, dicom, records
    from ldct_tf.pipeline import transforms

    level = transforms.WriteShardFn("", 1, 1).gzip_level
    options = tf.io.TFRecordOptions(compression_type="GZIP", compression_level=level)
    out = Path(tempfile.mkdtemp(prefix="ldct_bench_loop_"))
    n = 0
    try:
        writers = {dose: tf.io.TFRecordWriter(str(out / f"{dose}.tfrecord.gz"), options) for dose in records.DOSES}
        for path in files:
            for hu, info in dicom.read_slices(path.read_bytes(), name=str(path)):
                record = records.SliceRecord(
                    image=ct.hu_to_int16(hu), dose=doses[path], split="train",
                    patient=records.pseudonym(info.patient_key, "bench", "patient"),
                    series=records.pseudonym(info.series_key, "bench", "series"), instance=info.instance,
                    z_mm=info.z_mm, pixel_spacing_mm=info.pixel_spacing_mm,
                    slice_thickness_mm=info.slice_thickness_mm, kvp=info.kvp, exposure_mas=info.exposure_mas,
                    ctdivol=info.ctdivol, kernel=info.kernel, manufacturer=info.manufacturer)
                writers[doses[path]].write(records.encode(record))
                n += 1
        for writer in writers.values():
            writer.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return n


def pipeline_argv(folders: list[Path], manifest: Path, output: Path, num_shards: int,
                  beam_args: list[str]) -> list[str]:
    argv = []
    for folder in folders:
        argv += ["--input", str(folder)]
    return argv + ["--dose-manifest", str(manifest), "--output", str(output), "--salt", "bench",
                   "--num-shards", str(num_shards)] + beam_args


def run_pipeline(name: str, folders: list[Path], manifest: Path, num_shards: int,
                 expected: int) -> tuple[dict, dict]:
    from ldct_tf.pipeline.__main__ import run

    output = Path(tempfile.mkdtemp(prefix=f"ldct_bench_{name}_"))
    try:
        argv = pipeline_argv(folders, manifest, output, num_shards, BEAM_ARGS[name])
        if name in DASK_WORKERS:
            # A fresh driver process per Dask run: Beam 2.77's DaskRunner never closes the Client it creates, and a
            # second run in the same process then fails reading a side input ("Requested dask.distributed scheduler
            # but no Client active").  The figure is the child's own time around cluster start-up + run(), so
            # the driver's Python imports are not charged to Dask; its CPU counts as child-process CPU.
            command = [sys.executable, "-m", "benchmarks.pipeline", "--dask-child", str(DASK_WORKERS[name]), "--",
                       *argv]
            done, timing = measure(lambda: subprocess.run(command, cwd=REPO, capture_output=True, text=True))
            lines = [line for line in done.stdout.splitlines() if line.startswith("DASK ")]
            if done.returncode != 0 or not lines:
                raise BenchmarkError(f"{name}: the Dask run failed: {done.stderr.strip().splitlines()[-1:]}")
            answer = json.loads(lines[-1][len("DASK "):])
            result = answer["manifest"]
            timing["wall_including_driver_start"] = timing["wall"]
            timing["wall"] = answer["seconds"]
        else:
            result, timing = measure(lambda: run(argv))
    finally:
        shutil.rmtree(output, ignore_errors=True)
    assert isinstance(result, dict)
    problems = []
    if result.get("slices") != expected:
        problems.append(f"converted {result.get('slices')} slices, expected {expected}")
    if result.get("duplicates_dropped"):
        problems.append(f"dropped {result.get('duplicates_dropped')} duplicate slices (the copies must be distinct)")
    if result.get("rejected") != 0:
        problems.append(f"rejected {result.get('rejected')} ({result.get('rejected_by_reason')})")
    if result.get("input_files") != expected:
        problems.append(f"matched {result.get('input_files')} input files, expected {expected}")
    if problems:
        raise BenchmarkError(f"{name}: " + "; ".join(problems))
    timing["pipeline_seconds"] = float(result["seconds"])
    return result, timing


def per_slice_work(files: list[Path]) -> dict:
    """Diagnostic, outside Beam: mean ms per slice of each step the pipeline does to a slice, and of the bare loop.

    Uses the pipeline's own functions: gzip at level 1 with TFRecord framing, as the pipeline's shard writer does
    (``ldct_tf.pipeline.tfrecord_sink``); gzip at zlib's default level, what Beam's ``WriteToTFRecord`` would spend, is timed
    for reference and left out of the total.
    """
    import numpy as np
    import pydicom

    from ldct_tf import ct, dicom, records
    from ldct_tf.pipeline import tfrecord_sink, transforms

    import tensorflow  # noqa: F401  (records.encode imports it on first use: keep the import out of the timings)

    totals: dict[str, float] = {}

    def timed(key: str, fn: Callable[[], object]) -> object:
        start = time.perf_counter()
        value = fn()
        totals[key] = totals.get(key, 0.0) + (time.perf_counter() - start) * 1000.0
        return value

    encoded_bytes = compressed_bytes = 0
    for path in files:
        def bare() -> object:
            ds = pydicom.dcmread(path)
            return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)

        timed("bare_loop_dcmread_and_hu", bare)
        data = timed("read_bytes", path.read_bytes)
        (hu, info), = timed("decode_dicom_read_slices", lambda: dicom.read_slices(data, name=str(path)))
        hu16 = timed("hu_to_int16", lambda: ct.hu_to_int16(hu))
        item = transforms.Slice(hu=hu16, info=info, dose="low", split="train",
                                patient=records.pseudonym(path.name.split("_", 1)[0], "bench", "patient"),
                                series=records.pseudonym(info.series_uid, "bench", "series"))
        example = timed("encode_tf_example", lambda: records.encode(transforms.to_record(item)))
        timed("slice_stats", lambda: transforms.slice_stats(hu16))

        def gzip(level: int) -> bytes:
            compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            return compressor.compress(tfrecord_sink.frame(example)) + compressor.flush()

        compressed = timed("gzip_level_1_framed", lambda: gzip(1))
        timed("reference_gzip_default_level", lambda: gzip(zlib.Z_DEFAULT_COMPRESSION))
        encoded_bytes += len(example)
        compressed_bytes += len(compressed)
    n = len(files)
    out = {key: round(value / n, 2) for key, value in totals.items()}
    out["pipeline_steps_total"] = round(sum(v for k, v in out.items()
                                            if k not in ("bare_loop_dcmread_and_hu", "reference_gzip_default_level")), 2)
    out["example_kib"] = round(encoded_bytes / n / 1024, 1)
    out["gzip_ratio"] = round(compressed_bytes / encoded_bytes, 3)
    return out


# ------------------------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10,
                        help="distinct copies of the 50 input files (K x 50 slices per run; default %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per system; the median is reported "
                        "(default %(default)s)")
    parser.add_argument("--num-shards", type=int, default=2, help="pipeline --num-shards (default %(default)s)")
    parser.add_argument("--quiet-wait", type=float, default=10.0,
                        help="before each timed run, wait up to this many seconds for other processes to leave the "
                        "CPUs idle (0: never wait; default %(default)s)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON result (default %(default)s)")
    return parser


def disturbed(timing: dict) -> bool:
    background = timing["background_cpu"]
    return background is not None and background > BACKGROUND_WARN_SHARE * timing["wall"] * (os.cpu_count() or 1)


def summarise(name: str, timings: list[dict], slices: int, extra: dict) -> dict:
    walls = [t["wall"] for t in timings]
    median = statistics.median(walls)
    entry = {
        "description": DESCRIPTIONS[name],
        **extra,
        "slices": slices,
        "wall_seconds": {"median": round(median, 3), "min": round(min(walls), 3), "runs": [round(w, 3) for w in walls]},
        "slices_per_second": round(slices / median, 2),
        "cpu_seconds": {"median": round(statistics.median(t["cpu"] for t in timings), 3),
                        "runs": [round(t["cpu"], 3) for t in timings]},
        "cpu_seconds_in_child_processes": [round(t["children_cpu"], 3) for t in timings],
        "background_cpu_seconds": [None if t["background_cpu"] is None else round(t["background_cpu"], 2)
                                   for t in timings],
        "steal_cpu_seconds": [None if t["steal_cpu"] is None else round(t["steal_cpu"], 2) for t in timings],
        "quiet_before_run": [t["waited_for_quiet"] is not None for t in timings],
        "disturbed_runs": sum(disturbed(t) for t in timings),
    }
    if "pipeline_seconds" in timings[0]:
        entry["pipeline_seconds"] = {"median": round(statistics.median(t["pipeline_seconds"] for t in timings), 2),
                                     "runs": [t["pipeline_seconds"] for t in timings]}
    return entry


def print_table(results: dict, out=sys.stdout) -> None:
    print(f"\n{'system':<30} {'slices':>7} {'wall s (median)':>16} {'slices/s':>9} {'CPU s':>7} "
          f"{'vs bare':>8} {'disturbed':>9}", file=out)
    bare_sps = results["systems"][BARE]["slices_per_second"]
    for name, entry in results["systems"].items():
        print(f"{name:<30} {entry['slices']:>7} {entry['wall_seconds']['median']:>16.2f} "
              f"{entry['slices_per_second']:>9.1f} {entry['cpu_seconds']['median']:>7.1f} "
              f"{entry['slices_per_second'] / bare_sps:>8.3f} "
              f"{entry['disturbed_runs']:>5}/{len(entry['wall_seconds']['runs'])}", file=out)
    target = results["target"]
    print(f"target ({target['description']}): {'MET' if target['met'] else 'NOT met'}, ratio {target['ratio']:.3f}",
          file=out)
    if results.get("warnings"):
        for warning in results["warnings"]:
            print(f"WARNING: {warning}", file=out)


def dask_child(workers: int, argv: list[str]) -> int:
    """One pipeline run on a fresh local dask.distributed cluster; prints its manifest and seconds."""
    from distributed import LocalCluster

    from ldct_tf.pipeline.__main__ import run

    start = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        manifest = run(argv + ["--dask_client_address", cluster.scheduler_address])
    print("DASK " + json.dumps({"manifest": manifest, "seconds": time.perf_counter() - start}), flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["--dask-child"]:
        return dask_child(int(raw[1]), raw[3:])
    args = build_parser().parse_args(argv)
    if args.repeat < 1 or args.runs < 1 or args.num_shards < 0:
        print("error: --repeat and --runs must be >= 1, --num-shards >= 0", file=sys.stderr)
        return 2
    try:
        folders, files = list_files(data_dir())
        systems = import_once_and_list_systems()
        machine = harness.machine_info()
        started = time.perf_counter()
        timings, work, warmup = run_systems(args, folders, files, systems)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    command = " ".join(["python -m benchmarks.pipeline", *(sys.argv[1:] if argv is None else argv)])
    results = build_results(args, command, machine, folders, files, timings, work, warmup)
    results["total_benchmark_seconds"] = round(time.perf_counter() - started, 1)
    harness.write_result(results, args.output)
    print_table(results)
    print(f"\nwrote {args.output}")
    return 0


def import_once_and_list_systems() -> list[str]:
    """Import once, before any timing, and list the systems this installation can run.

    The pipeline module, and TensorFlow, which records.encode imports lazily (the in-memory runner would otherwise
    pay for it in its first run only).  Worker processes import their own copy inside the timed run() call.
    """
    import numpy  # noqa: F401
    import pydicom  # noqa: F401
    import tensorflow  # noqa: F401

    from ldct_tf.pipeline.__main__ import run  # noqa: F401

    systems = [BARE, MP1, MP2, IN_MEMORY]
    try:
        import distributed  # noqa: F401

        systems += [DASK1, DASK2]
    except ImportError:
        print("note: dask.distributed not installed (pip install -e \".[dask]\"): no Dask systems", flush=True)
    return systems


def run_systems(args: argparse.Namespace, folders: list[Path], files: list[Path],
                systems: list[str]) -> tuple[dict, dict, dict]:
    """Every system ``args.runs`` times, interleaved, on ``args.repeat`` distinct copies of ``files``; returns
    (timings per system, the per-slice work diagnostic, the untimed warm-up's timing)."""
    expected = len(files) * args.repeat
    doses = {path: dose for path, dose in zip(files, file_doses(files, folders))}
    timings: dict[str, list[dict]] = {name: [] for name in systems}
    scratch = Path(tempfile.mkdtemp(prefix="ldct_bench_"))
    try:
        print(f"writing {args.repeat} distinct copies of the {len(files)} files ...", flush=True)
        copy_folders, copies = write_distinct_copies(files, folders[0].parent, args.repeat, scratch / "inputs")
        manifest = write_dose_manifest(copies, scratch)
        copy_doses = {copy: doses[source] for copy, source in zip(copies, files * args.repeat)}
        print(f"{len(files)} files in {', '.join(str(f) for f in folders)}; repeat {args.repeat} -> {expected} "
              f"slices per run; {args.runs} run(s) of each system", flush=True)
        print("diagnostic: per-slice work outside Beam ...", flush=True)
        work = per_slice_work(files)
        print("warm-up: one untimed in_memory pipeline run with repeat 1 ...", flush=True)
        (scratch / "warmup").mkdir()
        warmup_manifest = write_dose_manifest(copies[:len(files)], scratch / "warmup")  # the first copy alone
        _, warmup = run_pipeline(IN_MEMORY, copy_folders[:len(SUBFOLDERS)], warmup_manifest, args.num_shards,
                                 len(files))
        for r in range(args.runs):
            for name in systems[r % len(systems):] + systems[:r % len(systems)]:
                timings[name].append(timed_run(name, args, copies, copy_doses, copy_folders, manifest, expected))
                print(f"run {r + 1}/{args.runs} {name:<30} {timings[name][-1]['wall']:8.2f} s  "
                      f"{expected / timings[name][-1]['wall']:8.1f} slices/s"
                      + ("" if timings[name][-1]["waited_for_quiet"] is not None
                         else "  (machine was not quiet before this run)"), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return timings, work, warmup


def timed_run(name: str, args: argparse.Namespace, copies: list[Path], copy_doses: dict, copy_folders: list[Path],
              manifest: Path, expected: int) -> dict:
    """One timed run of system ``name`` after the quiet wait."""
    waited = wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
    if name == BARE:
        slices, timing = measure(lambda: bare_loop(copies, copy_doses))
        if slices != expected:
            raise BenchmarkError(f"{BARE}: read {slices} slices, expected {expected}")
    else:
        _, timing = run_pipeline(name, copy_folders, manifest, args.num_shards, expected)
    timing["waited_for_quiet"] = waited
    return timing


TIMING_NOTES = [
    "wall_seconds of a pipeline system is measured around the whole ldct_tf.pipeline.dicom_to_tfrecord.run() call: "
    "input matching, output checks, Beam pipeline construction, runner and worker process start-up "
    "(with the imports the workers do, TensorFlow included), the pipeline itself and the manifest",
    "pipeline_seconds is the pipeline's own figure (manifest 'seconds': construction + pipeline.run until "
    "finished)",
    "imports of the benchmark process (Beam, TensorFlow, pydicom, the pipeline module) happen once before any "
    "timing; an untimed in_memory pipeline run (repeat 1) warms up the process and the file cache",
    "slices_per_second = slices / median wall seconds; each pipeline writes into a fresh temporary folder, "
    "removed after the run",
    "cpu_seconds: CPU of the benchmark process and its finished child processes (Beam workers) during the run; "
    "cpu_seconds_in_child_processes: the part used by the Beam worker processes (the rest is the benchmark "
    "process: the runner, or the whole in_memory pipeline, or the bare loop)",
    "background_cpu_seconds: CPU used by all other processes on the machine during the run (from "
    "/proc/stat, user + system time); large values mean the figures are disturbed. steal_cpu_seconds: CPU "
    "time the hypervisor gave to other guests while this VM wanted it. Before each timed run the benchmark "
    "waits up to quiet_wait_seconds for the other processes to go idle (quiet_before_run says whether they "
    "did)",
]


def build_results(args: argparse.Namespace, command: str, machine: dict, folders: list[Path], files: list[Path],
                  timings: dict, work: dict, warmup: dict) -> dict:
    """The JSON result: machine, versions, parameters, every system's summary, the target and the warnings."""
    systems = list(timings)
    expected = len(files) * args.repeat
    results: dict = {
        "benchmark": "pipeline",
        "description": "slices per second converting real CT DICOM (Mayo full/quarter dose, 512x512) into "
                       "TFRecord shards with ldct_tf.pipeline.dicom_to_tfrecord, against a single-process loop "
                       "producing the same output (decode, HU, tf.io.TFRecordWriter GZIP)",
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "machine": machine, "versions": harness.versions("apache-beam"),
        "parameters": {
            "repeat": args.repeat, "runs": args.runs, "files": len(files), "slices_per_run": expected,
            "num_shards": args.num_shards, "quiet_wait_seconds": args.quiet_wait, "data_dir": str(data_dir()),
            "inputs": [str(f) for f in folders], "order": f"interleaved; run r starts at system r mod {len(systems)}",
        },
        "timing_notes": TIMING_NOTES,
        "warmup_wall_seconds": round(warmup["wall"], 3),
        "per_slice_work_ms": {
            "description": "diagnostic, single process outside Beam, mean over the files once: the steps the "
                           "pipeline applies to each slice (its own functions) and the bare loop's work",
            **work,
        },
        "systems": {BARE: summarise(BARE, timings[BARE], expected, {})},
    }
    for name in systems[1:]:
        results["systems"][name] = summarise(name, timings[name], expected,
                                             {"beam_args": BEAM_ARGS[name] or ["(DirectRunner defaults)"]})
    ratio = results["systems"][MP2]["slices_per_second"] / results["systems"][BARE]["slices_per_second"]
    results["target"] = {
        "description": "pipeline at 2 workers (multi_processing) at least as fast as the bare single-process loop",
        "met": bool(ratio >= 1.0), "ratio": round(ratio, 4),
    }
    results["warnings"] = disturbed_warnings(timings)
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return results


def disturbed_warnings(timings: dict) -> list[str]:
    cpus = os.cpu_count() or 1
    return [f"{name} run {i + 1}: other processes used {t['background_cpu']:.1f} CPU s during its {t['wall']:.1f} s "
            f"({cpus} CPUs); its figure is disturbed"
            for name, runs in timings.items() for i, t in enumerate(runs) if disturbed(t)]


if __name__ == "__main__":
    sys.exit(main())
