"""ldct_tf.saved_model: the contract every reader of an exported model shares (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from ldct_tf import ct, saved_model
from tests.conftest import REPO

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


def test_check_strength_takes_0_to_1_and_refuses_the_rest():
    assert saved_model.check_strength(0) == 0.0 and saved_model.check_strength("0.5") == 0.5
    assert saved_model.check_strength(np.float32(1.0)) == 1.0
    for bad in (-0.01, 1.01, float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"^strength must be a finite number in \[0, 1\], got"):
            saved_model.check_strength(bad)
    with pytest.raises(ValueError, match=r"^--strength must be a number in \[0, 1\], got 'high'$"):
        saved_model.check_strength("high", "--strength")


def test_apply_strength_ends_are_exact_and_between_is_the_mix():
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 300, (2, 9, 7)).astype(np.float32)
    hu[:, 0] = -3024.0  # padding below the clip range
    network = rng.normal(0, 300, hu.shape).astype(np.float32)
    assert saved_model.apply_strength(network, hu, 0.0).tobytes() == hu.tobytes()
    assert saved_model.apply_strength(network, hu, 1.0).tobytes() == network.tobytes()
    half = saved_model.apply_strength(network, hu, 0.5)
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, (hu.astype(np.float64) + network) / 2, atol=1e-3)


@pytest.mark.parametrize("version", ["1", "2"])
def test_a_version_exported_before_the_strength_control_still_loads_and_takes_a_strength(version):
    """Versions 1 and 2 have only ``serving_default`` and ``denoise_bytes``: their output is strength 1, and another
    strength is the same formula applied to that output outside the graph."""
    old_version = REPO / "saved_models" / "ldct_denoiser" / version
    if not (old_version / "saved_model.pb").exists():
        pytest.skip(f"shipped version {version} not in this checkout")
    denoiser = saved_model.SavedModelDenoiser(old_version)
    assert "default_strength" not in denoiser.metadata and denoiser.default_strength == denoiser.strength == 1.0
    assert saved_model.STRENGTH_SIGNATURE not in denoiser._loaded.signatures
    hu = np.random.default_rng(1).normal(40, 80, (1, 32, 32)).astype(np.float32)
    hu[:, :2] = -2048.0
    network = denoiser(hu)
    assert np.abs(network - hu).mean() > 5.0
    assert denoiser(hu, strength=0.0).tobytes() == hu.tobytes()
    np.testing.assert_allclose(denoiser(hu, strength=0.5), (hu + network) / 2, atol=1e-3)
    assert saved_model.SavedModelDenoiser(old_version, strength=0.0)(hu).tobytes() == hu.tobytes()
