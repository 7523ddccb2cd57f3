"""Every workaround for an upstream Keras or pydicom bug, in one place.

Each one is listed in :data:`WORKAROUNDS` with the upstream issue and the version it was checked on, and
``tests/test_keras_compat.py`` reproduces each bug on the pinned version: when an upgrade fixes one, its test fails,
and the workaround (and its test) can go.  To add one: a :class:`Workaround` entry, the code below it, and a test that
shows the bug.  Keras and pydicom are imported inside the functions, so importing this module costs nothing (the Beam
workers import ``ldct_tf.dicom`` without TensorFlow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras
    import tensorflow as tf


@dataclass(frozen=True)
class Workaround:
    """One upstream bug we work around: where it is reported and on which version it was last reproduced."""

    package: str
    checked_on: str
    upstream: str
    summary: str


WORKAROUNDS: dict[str, Workaround] = {
    "traceable_upsampling": Workaround(
        package="keras", checked_on="3.15.1",
        upstream="https://github.com/keras-team/keras/pull/23315 (regression from keras-team/keras#22079)",
        summary="bilinear UpSampling2D cannot be traced with unknown height and width: ops.image.resize tests "
                "size[0] <= 0 in Python"),
    "skip_symbolic_build": Workaround(
        package="keras", checked_on="3.15.1",
        upstream="https://github.com/keras-team/keras/issues/20585",
        summary="Keras' TensorFlow trainer builds a model symbolically before fit/evaluate/predict by reducing the "
                "first distributed batch across replicas, which fails under MultiWorkerMirroredStrategy; a model "
                "built at construction skips that private hook (SkipSymbolicBuild).  Reproducing the failure needs "
                "two worker processes under TF_CONFIG (tests/test_distributed.py runs that set-up through our own "
                "loop, far beyond a few seconds), so the test checks the Keras code path the bug lives in instead"),
    "loss_scale_all_replicas": Workaround(
        package="keras", checked_on="3.15.1",
        upstream="https://github.com/keras-team/keras/pull/18691 (added LossScaleOptimizer._tf_apply, "
                 "keras/src/optimizers/loss_scale_optimizer.py): its comment assumes the gradients are already "
                 "all-reduced, but they are the replica's own (the all-reduce happens later, "
                 "inside the inner optimizer); reproduced in tests/train/test_mixed_precision.py",
        summary="under MirroredStrategy LossScaleOptimizer decides skip-or-apply from the FIRST replica's gradients "
                "only (experimental_local_results(finite)[0]): an overflow on another replica is applied, the "
                "all-reduced Inf/NaN reaches every replica's weights and the scale is not halved.  "
                "apply_if_all_finite combines the finite flag over all replicas (an all-reduce) and applies or skips "
                "every optimizer of a step together"),
    "quiet_pydicom_validation": Workaround(
        package="pydicom", checked_on="3.0.2",
        upstream="https://github.com/pydicom/pydicom/issues/1649",
        summary="read-time validation warnings are plain UserWarnings that quote the offending value (a UID or a "
                "name), so they cannot be filtered apart from other warnings and put identifiers into logs"),
}


# --- Keras: bilinear UpSampling2D with dynamic sizes -------------------------------------------------------------

def traceable_upsampling(layer: "keras.layers.UpSampling2D") -> "keras.layers.Layer":
    """A stand-in for ``layer`` that calls ``tf.image.resize`` the way Keras does (bilinear, no antialiasing), so a
    graph with unknown slice sizes traces and gives the same numbers (see ``WORKAROUNDS``)."""
    import keras
    import tensorflow as tf

    class TraceableUpSampling2D(keras.layers.Layer):
        def __init__(self, size, interpolation, **kwargs):
            super().__init__(**kwargs)
            self.size, self.interpolation = tuple(size), interpolation

        def call(self, x):
            if self.interpolation == "nearest":
                return tf.repeat(tf.repeat(x, self.size[0], axis=1), self.size[1], axis=2)
            new_size = tf.shape(x)[1:3] * tf.constant(self.size, tf.int32)
            return tf.cast(tf.image.resize(x, new_size, method=self.interpolation, antialias=False), x.dtype)

        def compute_output_shape(self, shape):
            scale = lambda d, f: None if d is None else d * f  # noqa: E731
            return (shape[0], scale(shape[1], self.size[0]), scale(shape[2], self.size[1]), shape[3])

    if layer.data_format != "channels_last":
        raise ValueError(f"layer {layer.name}: only channels_last upsampling is supported for export")
    return TraceableUpSampling2D(layer.size, layer.interpolation, name=layer.name, dtype=layer.dtype_policy)


def with_traceable_upsampling(model: "keras.Model") -> "keras.Model":
    """A copy of ``model``, with the same weights, whose UpSampling2D layers are :func:`traceable_upsampling`."""
    import keras

    def clone(layer):
        if isinstance(layer, keras.layers.UpSampling2D):
            return traceable_upsampling(layer)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


# --- Keras: symbolic build reduces a distributed batch (keras-team/keras#20585) -------------------------------------

class SkipSymbolicBuild:
    """Mixin (before ``keras.Model``) for a model that is fully built at construction: Keras' private
    ``_maybe_symbolic_build`` hook is skipped, so no distributed data batch is reduced across replicas before
    ``fit``/``evaluate`` (see ``WORKAROUNDS``).  A plain class: importing it does not import Keras."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        return


# --- Keras: LossScaleOptimizer checks replica 0 only (see WORKAROUNDS["loss_scale_all_replicas"]) ------------------

def all_replicas_finite(grads: list) -> "tf.Tensor":
    """True when every gradient on EVERY replica is finite: the replica's own check, combined by an all-reduce of a
    0/1 overflow count (call in the replica context; under no strategy it is the local check)."""
    import tensorflow as tf

    local = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])
    overflows = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM,
                                                               tf.cast(tf.logical_not(local), tf.float32))
    return tf.equal(overflows, 0.0)


def _apply_unscaled(optimizer, grads: list, variables: list) -> None:
    """One optimizer's update from loss-scaled gradients; a LossScaleOptimizer unscales them and counts the finite
    step toward doubling its scale (what Keras does on a finite step, with public attributes only)."""
    import keras

    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer.apply_gradients(zip(grads, variables))
        return
    scale = optimizer.dynamic_scale
    optimizer.inner_optimizer.apply([None if g is None else g / keras.ops.cast(scale, g.dtype) for g in grads],
                                    variables)
    grow = keras.ops.equal(optimizer.step_counter, optimizer.dynamic_growth_steps - 1)
    optimizer.step_counter.assign(keras.ops.where(grow, 0, optimizer.step_counter + 1))
    optimizer.dynamic_scale.assign(keras.ops.where(grow, scale * 2.0, scale))


def _skip(optimizers: list) -> None:
    """An overflow somewhere: no optimizer applies; every loss scale halves and its growth count restarts."""
    import keras

    for optimizer in optimizers:
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer.step_counter.assign(0)
            optimizer.dynamic_scale.assign(optimizer.dynamic_scale * 0.5)


def apply_if_all_finite(updates: list, finite: "tf.Tensor") -> None:
    """Apply every ``(optimizer, grads, variables)`` of ``updates`` when ``finite`` (from :func:`all_replicas_finite`,
    so equal on every replica), else skip them all and halve each loss scale.  Call in the replica context.

    Why one decision for all: a step that updated the critics but skipped an overflowing generator would leave the
    networks out of step; and the decision must be the same on every replica, or mirrored weights would diverge.
    The branch is taken in the cross-replica context (a ``merge_call``) as Keras does, because a replica-context cond
    may not hold an optimizer's merge_call; strategies that need no merge_call (XLA on GPUs) branch in place.
    """
    import tensorflow as tf

    optimizers = [optimizer for optimizer, _, _ in updates]

    def apply_all(grads_per_update):
        for (optimizer, _, variables), grads in zip(updates, grads_per_update):
            _apply_unscaled(optimizer, grads, variables)

    grads = [list(g) for _, g, _ in updates]
    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(finite, lambda: apply_all(grads) or tf.no_op(), lambda: _skip(optimizers) or tf.no_op())
        return

    def cross_replica(distribution, finite_per_replica, grads_per_replica):
        decided = distribution.experimental_local_results(finite_per_replica)[0]  # all-reduced: the same everywhere

        def apply_fn():
            distribution.extended.call_for_each_replica(apply_all, args=(grads_per_replica,))
            return tf.no_op()

        tf.cond(decided, apply_fn, lambda: _skip(optimizers) or tf.no_op())

    tf.distribute.get_replica_context().merge_call(cross_replica, args=(finite, grads))


# --- pydicom: validation warnings that quote values --------------------------------------------------------------

def quiet_pydicom_validation() -> None:
    """Turn pydicom's read-time value validation off (process-wide: pydicom has only a global setting).

    Invalid values are common in clinical files and harmless to us, and the warnings would print them (UIDs, names)
    into logs.  Decoding errors still raise; writing keeps pydicom's strict default.
    """
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
