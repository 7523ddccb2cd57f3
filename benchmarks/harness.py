"""What every benchmark and experiment repeats, in one place: ``benchmarks.harness``.

- the machine (:func:`machine_info`), the package versions (:func:`versions`) and the data folder (:func:`data_root`:
  ``$LDCT_DATA_DIR``, else ``../shared/data`` beside the repository);
- the quiet wait (:func:`wait_for_quiet`) and CPU accounting of one timed call (:func:`measure`), because on a shared
  2-core machine a figure means little without how busy the machine was while it was taken;
- JSON writing of ``benchmarks/results/<name>.json`` (:func:`write_result`);
- the development split of the AAPM-Mayo pairs that the quality benchmark and the model-choice experiments share
  (:func:`split_of`, :func:`pairs_of`, :func:`make_shards`);
- the roof: what this machine achieves at best, and how near a workload comes (:func:`measure_roof`,
  :func:`graph_flops`, :func:`fraction`).

Benchmarks import this module and no other benchmark module, so each benchmark can be read, run and changed alone.

The roof.  What this machine achieves at best, and how near a workload comes: shared by every speed benchmark.

A speed figure alone says little on a shared 2-core CPU, where the same code runs 1x or 5x slower depending on what
else is running.  Each benchmark therefore measures, in the same run, the float32 throughput of two large dense
kernels (a square matmul and a 3x3 convolution with 64 channels, the best case for oneDNN), records the load
average, and reports each workload's FLOPs and its achieved fraction of that roof.

FLOPs of a TensorFlow function are counted from its graph (:func:`graph_flops`): 2 x the multiply-adds of every
convolution (forward and both backward kernels) and matmul, after merging identical sub-expressions the way
Grappler does at run time (two ``tape.gradient`` calls share their backward pass).  Element-wise work (normalisation,
activations, optimizer updates) is not counted: it is small in FLOPs, though not always in time, which is exactly
what the fraction of the roof shows.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
#: Packages every result records; a benchmark adds its own (``versions("apache-beam")``).
CORE_PACKAGES = ("tensorflow", "keras", "numpy", "pydicom", "ldct_tf")


class BenchmarkError(Exception):
    """A benchmark cannot run (missing data, a failed child): reported as one line, exit status 1."""


# ------------------------------------------------------------------------------------------------- the machine

def data_root() -> Path:
    """The shared data folder: ``$LDCT_DATA_DIR``, else ``../shared/data`` beside the repository (never copied in)."""
    root = os.environ.get("LDCT_DATA_DIR")
    return (Path(root).expanduser() if root else REPO.parent / "shared" / "data").resolve()


def data_source() -> str:
    """Where :func:`data_root` came from, for error messages."""
    return "$LDCT_DATA_DIR" if os.environ.get("LDCT_DATA_DIR") else "default data root ../shared/data"


def machine_info() -> dict:
    """Platform, CPU model and count, Python, and the load average when the run started."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        model = ""
    info = {"platform": platform.platform(), "processor": platform.processor() or model, "cpu_model": model,
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "python_implementation": platform.python_implementation()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_available"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def versions(*extra: str) -> dict:
    """Installed versions of :data:`CORE_PACKAGES` and ``extra`` (None for a package not installed)."""
    out = {}
    for name in (*CORE_PACKAGES, *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_average() -> dict:
    """The 1/5/15-minute load averages and the CPU count (a load above the CPU count means queued work)."""
    one, five, fifteen = os.getloadavg()
    return {"load_1min": round(one, 2), "load_5min": round(five, 2), "load_15min": round(fifteen, 2),
            "cpus": os.cpu_count()}


def machine_cpu_seconds() -> Optional[tuple[float, float]]:
    """(CPU seconds all processes spent in user + system mode, CPU seconds stolen by the hypervisor) since boot, from
    /proc/stat; None where unavailable.  Interrupt time is left out: it is not charged to any process."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    steal = fields[7] if len(fields) > 7 else 0
    return (fields[0] + fields[1] + fields[2]) / hz, steal / hz


def own_cpu_seconds() -> float:
    """CPU of this process plus its finished children (e.g. Beam worker processes once they have exited)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def children_cpu_seconds() -> float:
    t = os.times()
    return t.children_user + t.children_system


def wait_for_quiet(max_wait: float, window: float = 1.0, threshold: float = 0.15) -> Optional[float]:
    """Wait (up to ``max_wait`` s) until other processes use under ``threshold`` CPU over a ``window`` s sample.

    Returns the seconds waited (0 where /proc/stat is unavailable), or None when the machine never went quiet.
    """
    start = time.perf_counter()
    while True:
        before, own0 = machine_cpu_seconds(), own_cpu_seconds()
        if before is None:
            return 0.0
        time.sleep(window)
        after = machine_cpu_seconds() or before
        other = after[0] - before[0] - (own_cpu_seconds() - own0)
        if other < threshold * window:
            return time.perf_counter() - start
        if time.perf_counter() - start >= max_wait:
            return None


def measure(fn: Callable[[], object]) -> tuple[object, dict]:
    """``fn()`` and its wall time, own and children's CPU, and the CPU other processes (and the hypervisor) took."""
    before, own0, children0 = machine_cpu_seconds(), own_cpu_seconds(), children_cpu_seconds()
    start = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - start
    own = own_cpu_seconds() - own0
    children = children_cpu_seconds() - children0
    after = machine_cpu_seconds()
    background = steal = None
    if before is not None and after is not None:
        background = max(0.0, (after[0] - before[0]) - own)
        steal = after[1] - before[1]
    return result, {"wall": wall, "cpu": own, "children_cpu": children, "background_cpu": background,
                    "steal_cpu": steal}


# ------------------------------------------------------------------------------------------------------ results

def result_path(name: str) -> Path:
    """``benchmarks/results/<name>.json``: where ``python -m benchmarks.<name>`` writes its figures."""
    return RESULTS / f"{name}.json"


def write_result(result: dict, path: Optional[Path] = None, indent: int = 2) -> Path:
    """Write ``result`` as strict JSON to ``path`` (default :func:`result_path` of ``result["benchmark"]``), through
    a temporary file, so an interrupted run never leaves half a results file."""
    from ldct_tf.evaluate.report import jsonable  # the project's one strict-JSON converter (heavy: numpy, ldct_tf)

    path = Path(path) if path is not None else result_path(result["benchmark"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(jsonable(result), indent=indent, allow_nan=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------ the development split of the AAPM-Mayo pairs
# Each patient feeds ONE side of the unpaired training, as a clinic's data would: the real low-dose stream is patient
# L143 (quarter dose), the normal-dose stream and the source of the simulated pairs are patient L096 (full dose).  No
# pair is ever used as a pair.  Recipes and checkpoints are chosen on the validation split, which holds slices of the
# same two training-side patients that training never reads (L096 slices 07-09: D45f; L143 slices 22-24: B30f), both
# doses, so it can be scored as pairs.  L286 is the test patient: its slices are in the ``test`` split, which
# training never reads and nothing is chosen on.

TEST_PATIENT = "L286"
LOW_PATIENT = "L143"
NORMAL_PATIENT = "L096"
VALIDATION_SLICES = {"L096": ("07", "08", "09"), "L143": ("22", "23", "24")}


def pair_rows(root: Path) -> list[dict]:
    """The rows of ``root/mayo_pairs/pairs.csv`` (patient, kernel, quarter_dose, full_dose)."""
    with open(root / "mayo_pairs" / "pairs.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def slice_number(row: dict) -> str:
    return Path(row["full_dose"]).stem.rsplit("_", 1)[-1]


def split_of(row: dict) -> str:
    """``train``, ``val`` or ``test``: the split of one pairs.csv row (see the comment above)."""
    patient = row["patient"]
    if patient == TEST_PATIENT:
        return "test"
    return "val" if slice_number(row) in VALIDATION_SLICES.get(patient, ()) else "train"


def write_dose_manifest(root: Path, out_csv: Path) -> Path:
    """Dose manifest of the split above: per file, its dose, patient and split."""
    mayo = root / "mayo_pairs"
    with open(out_csv, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "dose", "patient", "split"])
        for row in pair_rows(root):
            patient, split = row["patient"], split_of(row)
            if split == "train":
                if patient == LOW_PATIENT:
                    writer.writerow([mayo / row["quarter_dose"], "low", patient, split])
                elif patient == NORMAL_PATIENT:
                    writer.writerow([mayo / row["full_dose"], "normal", patient, split])
            else:
                writer.writerow([mayo / row["quarter_dose"], "low", patient, split])
                writer.writerow([mayo / row["full_dose"], "normal", patient, split])
    return out_csv


def make_shards(root: Path, work: Path, salt: str = "quality-benchmark") -> Path:
    """Run the Beam pipeline over the Mayo pairs with the manifest above; returns the shard folder."""
    from ldct_tf.pipeline import __main__ as pipeline_cli

    manifest = write_dose_manifest(root, work / "doses.csv")
    shards = work / "shards"
    code = pipeline_cli.main(["--input", str(root / "mayo_pairs"), "--dose-manifest", str(manifest),
                                   "--output", str(shards), "--salt", salt, "--num-shards", "1"])
    if code:
        raise BenchmarkError(f"the pipeline failed with exit status {code} on {root / 'mayo_pairs'}")
    return shards


def pairs_of(root: Path, split: str) -> list[dict]:
    """pairs.csv rows of one split (for scoring with ldct_tf.evaluate)."""
    return [row for row in pair_rows(root) if split_of(row) == split]


# -------------------------------------------------------------------------------------------------------- the roof

#: Matmul size and convolution shape of the roof.  Large enough that per-op overhead is negligible.
MATMUL_N = 2048
CONV_SHAPE = (4, 128, 128, 64)  # NHWC input; 3x3 kernel, 64 output channels, same padding


def _best_seconds(fn: Callable[[], object], repeats: int, inner: int) -> float:
    """Fastest of ``repeats`` timings of ``inner`` calls (per call): the least disturbed by other processes."""
    import numpy as np

    np.asarray(fn())  # trace and warm up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            out = fn()
        np.asarray(out)
        best = min(best, (time.perf_counter() - started) / inner)
    return best


def measure_roof(repeats: int = 5) -> dict:
    """GFLOP/s of a float32 matmul and convolution here, now (fastest of ``repeats``), with the load around it."""
    import tensorflow as tf

    before = load_average()
    a = tf.random.stateless_normal((MATMUL_N, MATMUL_N), seed=(1, 2))
    matmul = tf.function(lambda: tf.matmul(a, a))
    matmul_s = _best_seconds(matmul, repeats, inner=5)
    n, h, w, c = CONV_SHAPE
    x = tf.random.stateless_normal(CONV_SHAPE, seed=(3, 4))
    k = tf.random.stateless_normal((3, 3, c, c), seed=(5, 6))
    conv = tf.function(lambda: tf.nn.conv2d(x, k, 1, "SAME"))
    conv_s = _best_seconds(conv, repeats, inner=5)
    matmul_gflops = 2 * MATMUL_N**3 / matmul_s / 1e9
    conv_gflops = 2 * n * h * w * c * 9 * c / conv_s / 1e9
    return {
        "matmul_float32_gflops": round(matmul_gflops, 1), "matmul_n": MATMUL_N,
        "conv3x3_float32_gflops": round(conv_gflops, 1), "conv_input_nhwc": list(CONV_SHAPE),
        "roof_gflops": round(max(matmul_gflops, conv_gflops), 1),
        "how": f"fastest of {repeats} x 5 calls of each kernel in this process",
        "load_before": before, "load_after": load_average(),
    }


def fraction(flops: float, seconds: float, roof: dict) -> dict:
    """Achieved GFLOP/s of ``flops`` done in ``seconds`` and its fraction of ``roof`` (from :func:`measure_roof`)."""
    achieved = flops / seconds / 1e9
    return {"gflops_per_second": round(achieved, 2),
            "fraction_of_roof": round(achieved / roof["roof_gflops"], 4)}


# --- FLOPs of a graph ---------------------------------------------------------------------------------------------

_CONVS = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "DepthwiseConv2dNative")
_MATMULS = ("MatMul", "BatchMatMulV2", "BatchMatMulV3")


def _shape(tensor) -> Optional[list]:
    dims = tensor.shape.as_list() if tensor.shape.rank is not None else None
    return dims if dims is not None and all(d is not None for d in dims) else None


def _op_flops(op) -> Optional[int]:
    """2 x multiply-adds of one convolution or matmul op; None when a shape is unknown."""
    if op.type in ("Conv2D", "DepthwiseConv2dNative"):
        out, kernel = _shape(op.outputs[0]), _shape(op.inputs[1])
        if out is None or kernel is None:
            return None
        # Each output value: kernel height x width x input channels products (depthwise: one input channel).
        per_output = kernel[0] * kernel[1] * (kernel[2] if op.type == "Conv2D" else 1)
        return 2 * out[0] * out[1] * out[2] * out[3] * per_output
    if op.type in ("Conv2DBackpropInput", "Conv2DBackpropFilter"):
        # Both cost what the forward convolution costs: every (output pixel, kernel tap, in, out) product once.
        grad_out = _shape(op.inputs[2])
        kernel = _shape(op.inputs[1]) if op.type == "Conv2DBackpropInput" else _shape(op.outputs[0])
        if grad_out is None or kernel is None:
            return None
        return 2 * grad_out[0] * grad_out[1] * grad_out[2] * kernel[0] * kernel[1] * kernel[2] * kernel[3]
    if op.type in _MATMULS:
        a, b, out = _shape(op.inputs[0]), _shape(op.inputs[1]), _shape(op.outputs[0])
        if a is None or b is None or out is None:
            return None
        transposed = op.get_attr("transpose_a") if op.type == "MatMul" else op.get_attr("adj_x")
        inner = a[-2] if transposed else a[-1]
        size = 1
        for d in out:
            size *= d
        return 2 * size * inner
    return None


def _live_ops(graph) -> list:
    """Ops the function's outputs or side effects depend on; the rest (e.g. the filter gradients of a frozen network,
    which the gradient code emits but nothing reads) is pruned before the graph runs, so it is not counted."""
    roots = [t.op for t in getattr(graph, "outputs", [])] + list(getattr(graph, "control_outputs", []))
    if not roots:  # a plain Graph: everything may run
        return graph.get_operations()
    live, stack = set(), list(roots)
    while stack:
        op = stack.pop()
        if op.name in live:
            continue
        live.add(op.name)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return [op for op in graph.get_operations() if op.name in live]


def graph_flops(graph) -> dict:
    """FLOPs of the convolutions and matmuls of a (Func)Graph, counting each distinct computation once.

    Only live ops count (:func:`_live_ops`).  Identical ops on identical inputs are merged first (a structural hash
    over the graph, as Grappler's common sub-expression elimination does before the graph runs), so a backward pass
    that two gradient calls share counts once.  Returns ``{"flops": int, "by_type": {op type: flops}, "unknown_shape_ops": int}``.
    """
    hashes: dict = {}
    seen: set = set()
    by_type: dict = {}
    unknown = 0

    def key(op) -> int:
        if op.name in hashes:
            return hashes[op.name]
        stack = [op]
        while stack:  # iterative post-order: graphs of a training step are deeper than Python's recursion limit
            top = stack[-1]
            pending = [t.op for t in top.inputs if t.op.name not in hashes]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            if top.name in hashes:
                continue
            attrs = tuple(sorted((name, str(value)) for name, value in top.node_def.attr.items()
                                 if not name.startswith("_")))
            inputs = tuple((hashes[t.op.name], t.value_index) for t in top.inputs)
            # Placeholders and variables are their own identity; constants are equal when their values are.
            leaf = top.name if not top.inputs and top.type != "Const" else None
            hashes[top.name] = hash((top.type, attrs, inputs, leaf))
        return hashes[op.name]

    for op in _live_ops(graph):
        if op.type not in _CONVS + _MATMULS:
            continue
        signature = key(op)
        if signature in seen:
            continue
        seen.add(signature)
        flops = _op_flops(op)
        if flops is None:
            unknown += 1
            continue
        by_type[op.type] = by_type.get(op.type, 0) + flops
    return {"flops": int(sum(by_type.values())), "by_type": by_type, "unknown_shape_ops": unknown}
