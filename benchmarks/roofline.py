"""What this machine achieves at best, and how near a workload comes: shared by every speed benchmark.

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

import os
import time
from typing import Callable, Optional

#: Matmul size and convolution shape of the roof.  Large enough that per-op overhead is negligible.
MATMUL_N = 2048
CONV_SHAPE = (4, 128, 128, 64)  # NHWC input; 3x3 kernel, 64 output channels, same padding


def load_average() -> dict:
    """The 1/5/15-minute load averages and the CPU count (a load above the CPU count means queued work)."""
    one, five, fifteen = os.getloadavg()
    return {"load_1min": round(one, 2), "load_5min": round(five, 2), "load_15min": round(fifteen, 2),
            "cpus": os.cpu_count()}


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


def measure(repeats: int = 5) -> dict:
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
    """Achieved GFLOP/s of ``flops`` done in ``seconds`` and its fraction of ``roof`` (from :func:`measure`)."""
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

    Only live ops count (:func:`_live_ops`).  Identical ops on identical inputs are merged first (a structural hash over the graph, as Grappler's common
    sub-expression elimination does before the graph runs), so a backward pass that two gradient calls share counts
    once.  Returns ``{"flops": int, "by_type": {op type: flops}, "unknown_shape_ops": int}``.
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
