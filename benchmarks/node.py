"""``python -m benchmarks.node``: series throughput of the DICOM node against the bare ``ldct_tf.denoise`` CLI.

Data: the real 20-slice JPEG 2000 abdomen series of ``$LDCT_DATA_DIR/abdomen_series/dicom`` (default
``../shared/data``), made into one contiguous series of ``--copies`` x 20 slices (each copy shifted below the previous
one in z; the shared copies' blank SOP Class / SOP Instance / Study / Series UIDs filled in, as a scanner would send
them).  Every run sends a fresh copy (new UIDs), so no run can profit from an earlier one.

Systems, measured in the same run and interleaved (the order alternates from run to run):

* ``node``: one ``python -m ldct_tf.node`` process (shipped model ``saved_models/ldct_denoiser``, ``--quiet-time``
  as given, ``--forward`` to dcmtk's ``storescp`` on 127.0.0.1), started and warmed up with one untimed series before
  the first run, as a service would be.  dcmtk's ``storescu`` sends the series.  The figure is the node's own
  record (``done/<batch>/state.json``): first C-STORE in to last C-STORE out acknowledged by the destination, so it
  includes the transfer in, the quiet time that tells the node the series is complete, denoising and forwarding.
  ``external_seconds`` is the same seen from outside: storescu start to the last derived file at the destination.
* ``cli``: ``python -m ldct_tf.denoise IN OUT --model ... --no-progress`` on the same series' files, wall time of the
  whole process (Python and TensorFlow start-up, model load, scan, denoise, write).  ``in_process_seconds`` is what
  the CLI itself reports (scan + denoise + write, no start-up).

Writes ``benchmarks/results/node.json`` (``--output`` to change) and prints a table.  Exit status 1 with one line when
dcmtk or the data is missing or a run does not deliver every slice.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from benchmarks import harness
from benchmarks.harness import BenchmarkError, machine_info, wait_for_quiet

REPO = harness.REPO
DEFAULT_OUTPUT = harness.result_path("node")
MODEL = REPO / "saved_models" / "ldct_denoiser"
AET = "LDCT"


def data_dir() -> Path:
    return harness.data_root() / "abdomen_series" / "dicom"


def versions() -> dict:
    """The harness's package versions, pynetdicom and DCMTK's (the node's peers in this benchmark)."""
    out = harness.versions("pynetdicom")
    dcmtk = subprocess.run(["storescu", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"v(\d+\.\d+\.\d+)", dcmtk)
    out["dcmtk"] = match.group(1) if match else None
    return out


def write_series(sources: list[Path], folder: Path, copies: int) -> list[Path]:
    """One new series of ``copies`` x len(sources) slices, the pixel data as it was (JPEG 2000)."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    datasets = [pydicom.dcmread(p) for p in sources]
    zs = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    extent = max(zs) - min(zs) + abs(float(datasets[0].SliceThickness or 3.0))
    paths = []
    for copy in range(copies):
        for ds in datasets:
            out = ds.copy()
            out.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
            out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            out.StudyInstanceUID, out.SeriesInstanceUID = study, series
            position = [float(v) for v in ds.ImagePositionPatient]
            position[2] -= copy * extent
            out.ImagePositionPatient = position
            out.InstanceNumber = len(paths) + 1
            path = folder / f"{len(paths):04d}.dcm"
            out.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def echo(port: int, called: str) -> bool:
    return subprocess.run(["echoscu", "-aec", called, "127.0.0.1", str(port)], capture_output=True).returncode == 0


def wait(condition, timeout: float, what: str, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise BenchmarkError(f"{what}: the process exited with status {proc.returncode}")
        time.sleep(0.02)
    raise BenchmarkError(f"timed out ({timeout:.0f} s) waiting for {what}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                TF_CPP_MIN_LOG_LEVEL="2")


class NodeUnderTest:
    def __init__(self, work: Path, model: Path, quiet_time: float, batch_size: int):
        self.dest = work / "destination"
        self.dest.mkdir()
        self.spool = work / "spool"
        self.dest_port, self.port = free_port(), free_port()
        self.storescp = subprocess.Popen(["storescp", "-aet", "DEST", "-od", str(self.dest), str(self.dest_port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.log = open(work / "node.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ldct_tf.node", "--ae-title", AET, "--host", "127.0.0.1", "--port", str(self.port),
             "--model", str(model), "--forward", f"DEST@127.0.0.1:{self.dest_port}", "--spool", str(self.spool),
             "--quiet-time", str(quiet_time), "--batch-size", str(batch_size), "--keep-done"],
            stdout=self.log, stderr=subprocess.STDOUT, env=child_env())
        wait(lambda: echo(self.dest_port, "DEST"), 30, "storescp to listen", self.storescp)
        wait(lambda: echo(self.port, AET), 300, "the node to listen", self.proc)

    def send(self, files: list[Path]) -> dict:
        before = set(p.name for p in self.dest.iterdir())
        done_before = set(p.name for p in (self.spool / "done").iterdir())
        start = time.perf_counter()
        sent = subprocess.run(["storescu", "-xv", "-aec", AET, "127.0.0.1", str(self.port), *map(str, files)],
                              capture_output=True, text=True)
        if sent.returncode != 0:
            raise BenchmarkError(f"storescu failed: {(sent.stdout + sent.stderr).strip().splitlines()[-1:]}")
        wait(lambda: len(set(p.name for p in self.dest.iterdir()) - before) >= len(files), 1800,
             f"{len(files)} derived slices at the destination", self.proc)
        external = time.perf_counter() - start
        wait(lambda: len(set(p.name for p in (self.spool / "done").iterdir()) - done_before) == 1, 30,
             "the node to record the batch", self.proc)
        [batch] = set(p.name for p in (self.spool / "done").iterdir()) - done_before
        state = json.loads((self.spool / "done" / batch / "state.json").read_text())
        if state["slices"] != len(files) or not state["forwarded"]:
            raise BenchmarkError(f"the node denoised {state['slices']} of {len(files)} slices")
        shutil.rmtree(self.spool / "done" / batch)
        return {"seconds": state["finished"] - state["first_received"], "external_seconds": external,
                "receive_seconds": state["last_received"] - state["first_received"],
                "claim_wait_seconds": state["claimed"] - state["last_received"],
                "denoise_seconds": state["denoise_s"], "forward_seconds": state["forward_s"]}

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self.storescp.terminate()
        self.storescp.wait(10)
        self.log.close()


def run_cli(files: list[Path], out: Path, model: Path, batch_size: int) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ldct_tf.denoise", str(files[0].parent), str(out), "--model",
                           str(model), "--batch-size", str(batch_size), "--no-progress"],
                          capture_output=True, text=True, env=child_env())
    wall = time.perf_counter() - start
    match = re.search(r"denoised 1 series, (\d+) slices in ([\d.]+) s", done.stdout)
    if done.returncode != 0 or not match or int(match.group(1)) != len(files):
        raise BenchmarkError(f"ldct_tf.denoise failed: {(done.stdout + done.stderr).strip().splitlines()[-1:]}")
    return {"seconds": wall, "in_process_seconds": float(match.group(2))}


def summary(runs: list[dict], slices: int) -> dict:
    out = {"runs": runs}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[f"{key}_median"] = round(statistics.median(values), 3)
    out["slices_per_second"] = round(slices / out["seconds_median"], 3)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.node", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="timed runs per system (default %(default)s)")
    p.add_argument("--copies", type=int, default=3, help="series length in copies of the 20 real slices "
                                                         "(default %(default)s: 60 slices)")
    p.add_argument("--quiet-time", type=float, default=1.0, help="the node's --quiet-time (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="slices per model call, both systems")
    p.add_argument("--model", default=str(MODEL), help="SavedModel folder (default: the shipped model)")
    p.add_argument("--quiet-wait", type=float, default=10.0,
                   help="before each run, wait up to this many seconds for other processes to go idle")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT))
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not all(shutil.which(t) for t in ("storescu", "storescp", "echoscu")):
            raise BenchmarkError("dcmtk (storescu, storescp, echoscu) not installed: apt-get install dcmtk")
        sources = sorted(p for p in data_dir().iterdir() if p.is_file()) if data_dir().is_dir() else []
        if not sources:
            raise BenchmarkError(f"no abdomen series in {data_dir()} (set LDCT_DATA_DIR)")
        results = run(args, sources, sys.argv[1:] if argv is None else list(argv))
    except BenchmarkError as exc:
        print(f"benchmarks.node: error: {exc}", file=sys.stderr)
        return 1
    output = harness.write_result(results, Path(args.output))
    node, cli = results["systems"]["node"], results["systems"]["cli"]
    print(f"{results['data']['slices']} slices, {args.runs} runs each (medians):")
    print(f"  node  first C-STORE in -> last C-STORE out  {node['seconds_median']:7.2f} s  "
          f"{node['slices_per_second']:6.2f} slices/s  (denoise {node['denoise_seconds_median']:.2f} s, forward "
          f"{node['forward_seconds_median']:.2f} s, quiet time {args.quiet_time:.1f} s)")
    print(f"  cli   whole process                         {cli['seconds_median']:7.2f} s  "
          f"{cli['slices_per_second']:6.2f} slices/s  (in-process {cli['in_process_seconds_median']:.2f} s)")
    print(f"  node / cli time: {results['comparison']['node_over_cli_wall']:.2f}; node / cli in-process: "
          f"{results['comparison']['node_over_cli_in_process']:.2f}")
    print(f"wrote {output}")
    return 0


def run(args: argparse.Namespace, sources: list[Path], argv: list[str]) -> dict:
    model = Path(args.model)
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench_node_") as tmp:
        work = Path(tmp)
        series = [write_series(sources, work / f"series_{i}", args.copies) for i in range(args.runs + 1)]
        node = NodeUnderTest(work, model, args.quiet_time, args.batch_size)
        try:
            node.send(series[0])  # warm-up: graph tracing on the first call, as any running service has done
            node_runs, cli_runs, waited = [], [], []
            for i in range(args.runs):
                order = ("node", "cli") if i % 2 == 0 else ("cli", "node")
                for system in order:
                    waited.append(wait_for_quiet(args.quiet_wait))
                    if system == "node":
                        node_runs.append(node.send(series[i + 1]))
                    else:
                        cli_runs.append(run_cli(series[i + 1], work / f"cli_out_{i}", model, args.batch_size))
        finally:
            node.close()
    slices = len(series[0])
    node_summary, cli_summary = summary(node_runs, slices), summary(cli_runs, slices)
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return {
        "benchmark": "node",
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.node", *argv]),
        "machine": info,
        "versions": versions(),
        "data": {"source": "abdomen_series/dicom (real contrast-enhanced abdomen CT, JPEG 2000 lossless)",
                 "copies": args.copies, "slices": slices, "size": "512x512"},
        "settings": {"quiet_time_s": args.quiet_time, "batch_size": args.batch_size, "runs": args.runs,
                     "model": str(model.relative_to(REPO)) if model.is_relative_to(REPO) else str(model),
                     "runs_started_on_a_quiet_machine": [w is not None for w in waited]},
        "systems": {
            "node": {"description": "python -m ldct_tf.node, warm; first C-STORE in to last C-STORE out "
                                    "(node's record), includes the quiet time", **node_summary},
            "cli": {"description": "python -m ldct_tf.denoise, whole process wall time", **cli_summary},
        },
        "comparison": {
            "node_over_cli_wall": round(node_summary["seconds_median"] / cli_summary["seconds_median"], 3),
            "node_over_cli_in_process": round(node_summary["seconds_median"]
                                              / cli_summary["in_process_seconds_median"], 3),
            "node_minus_quiet_time_over_cli_in_process": round(
                (node_summary["seconds_median"] - args.quiet_time) / cli_summary["in_process_seconds_median"], 3),
        },
    }


if __name__ == "__main__":
    sys.exit(main())
