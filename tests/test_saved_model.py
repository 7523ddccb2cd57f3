"""ldct_tf.saved_model: the contract every reader of an exported model shares (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from ldct_tf import ct, saved_model

# What an InvalidArgument from the in-graph checks looks like from Python's eager call, and from a real TF Serving.
PYTHON_TEXT = ("Graph execution error:\n\nDetected at node Assert_1/Assert defined at (most recent call last):\n"
               "<stack traces unavailable>\nassertion failed: [input \\'hu\\' must have exactly 1 channel (shape "
               "[batch, height, width, 1]); got shape] [1 4 4 2]\n\t [[{{node Assert_1/Assert}}]] "
               "[Op:__inference_signature_wrapper_2369]")
SERVER_TEXT = ("assertion failed: [input \\'hu\\' must have exactly 1 channel (shape [batch, height, width, 1]); got "
               "shape] [1 4 4 2]\n\t [[{{node Assert_1/Assert}}]]")
SENTENCE = "input 'hu' must have exactly 1 channel (shape [batch, height, width, 1]); got shape [1 4 4 2]"


def test_graph_error_message_is_the_sentence_whoever_raised_it():
    assert saved_model.graph_error_message(PYTHON_TEXT) == SENTENCE
    assert saved_model.graph_error_message(SERVER_TEXT) == SENTENCE
    numerics = ("Graph execution error:\n\nDetected at node VerifyFinite/CheckNumerics defined at (most recent call "
                "last):\n<stack traces unavailable>\ninput 'hu' contains NaN or Inf; expected finite HU values : "
                "Tensor had NaN values\n\t [[{{node VerifyFinite/CheckNumerics}}]] [Op:__inference_signature_wrapper]")
    assert saved_model.graph_error_message(numerics) == ("input 'hu' contains NaN or Inf; expected finite HU values : "
                                                         "Tensor had NaN values")
    assert saved_model.graph_error_message("Servable not found for request: Latest(x)") == \
        "Servable not found for request: Latest(x)"


def test_int16_codec_is_cts_rounding():
    hu = np.array([[-1024.4, 0.5, 1.5], [40000.0, -40000.0, 12.49]], np.float32)
    data = saved_model.int16_bytes(hu)
    assert data == ct.hu_to_int16(hu).astype("<i2").tobytes()
    np.testing.assert_array_equal(saved_model.from_int16_bytes(data, 2, 3), ct.hu_to_int16(hu))
    with pytest.raises(ValueError, match="expected 12 bytes of int16 for 2x3, got 10"):
        saved_model.from_int16_bytes(data[:-2], 2, 3)


def test_versions_lists_only_integer_folders_with_a_saved_model(tmp_path):
    for name in ("1", "3", "10", "x", "4"):
        (tmp_path / name).mkdir()
    for name in ("1", "3", "10", "x"):
        (tmp_path / name / "saved_model.pb").write_bytes(b"")
    assert saved_model.versions(tmp_path) == [1, 3, 10]
    assert saved_model.resolve_version_dir(tmp_path) == tmp_path / "10"
    assert saved_model.versions(tmp_path / "missing") == []
