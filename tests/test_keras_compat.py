"""Each workaround in ldct_tf.keras_compat still needs to exist: these tests reproduce the upstream bug on the pinned
version and FAIL once upstream fixes it (then delete the workaround, its entry and its test)."""

from __future__ import annotations

import io
import warnings
from importlib.metadata import version

import numpy as np
import pydicom
import pydicom.config
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from ldct_tf import keras_compat


@pytest.mark.parametrize("name", sorted(keras_compat.WORKAROUNDS))
def test_each_workaround_was_checked_on_the_installed_version(name):
    entry = keras_compat.WORKAROUNDS[name]
    assert version(entry.package) == entry.checked_on, (
        f"{entry.package} is now {version(entry.package)}: re-run tests/test_keras_compat.py, and if the bug "
        f"({entry.upstream}) is still there update checked_on, else remove the workaround {name!r}")
    assert entry.upstream.startswith("https://github.com/")


def test_keras_bilinear_upsampling_still_fails_to_trace_with_dynamic_sizes():
    import keras
    import tensorflow as tf

    spec = [tf.TensorSpec([None, None, None, 3], tf.float32)]
    layer = keras.layers.UpSampling2D(2, interpolation="bilinear")
    with pytest.raises(tf.errors.OperatorNotAllowedInGraphError, match="symbolic `tf.Tensor` as a Python `bool`"):
        tf.function(lambda x: layer(x), input_signature=spec).get_concrete_function()

    # The stand-in traces and computes what Keras computes where Keras works (static sizes).
    stand_in = keras_compat.traceable_upsampling(layer)
    traced = tf.function(lambda x: stand_in(x), input_signature=spec)
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(traced(tf.constant(x)).numpy(), np.asarray(layer(x)), atol=1e-6)


def _file_with_an_invalid_uid(uid: str) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    before = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        ds.StudyInstanceUID = uid
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    finally:
        pydicom.config.settings.writing_validation_mode = before
    return buffer.getvalue()


def _read_warnings(data: bytes) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(io.BytesIO(data))
        str(ds.StudyInstanceUID)
    return caught


def test_pydicom_validation_warnings_still_quote_the_value_as_plain_userwarnings():
    import ldct_tf.dicom  # noqa: F401 (applies the workaround at import)

    uid = "1.2.840.0099.7"  # a leading zero in a component, as some scanners write: invalid, and an identifier
    data = _file_with_an_invalid_uid(uid)
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE
    assert _read_warnings(data) == []
    pydicom.config.settings.reading_validation_mode = pydicom.config.WARN  # pydicom's default
    try:
        caught = _read_warnings(data)
    finally:
        keras_compat.quiet_pydicom_validation()
    quoting = [w for w in caught if uid in str(w.message)]
    assert quoting, [str(w.message) for w in caught]
    assert all(w.category is UserWarning for w in quoting)  # no category of its own to filter on


def test_keras_symbolic_build_still_reduces_a_distributed_batch_and_cyclegan_skips_it():
    """The bug (keras-team/keras#20585) lives in the TF trainer's symbolic build, which averages the first distributed
    batch over replicas; fit still calls that private hook, so overriding it still takes effect."""
    import inspect

    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    from ldct_tf.models.cyclegan import CycleGAN

    assert "distribute_strategy.reduce(" in inspect.getsource(TensorFlowTrainer._maybe_symbolic_build)
    assert "self._maybe_symbolic_build(" in inspect.getsource(TensorFlowTrainer.fit)
    assert CycleGAN._maybe_symbolic_build is keras_compat.SkipSymbolicBuild._maybe_symbolic_build
    assert CycleGAN.__mro__.index(keras_compat.SkipSymbolicBuild) < CycleGAN.__mro__.index(TensorFlowTrainer)
