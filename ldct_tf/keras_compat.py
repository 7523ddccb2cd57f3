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


# --- pydicom: validation warnings that quote values --------------------------------------------------------------

def quiet_pydicom_validation() -> None:
    """Turn pydicom's read-time value validation off (process-wide: pydicom has only a global setting).

    Invalid values are common in clinical files and harmless to us, and the warnings would print them (UIDs, names)
    into logs.  Decoding errors still raise; writing keeps pydicom's strict default.
    """
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
