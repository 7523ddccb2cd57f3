import numpy as np
import pytest

from ldct_tf import ct


def test_to_hu_applies_rescale():
    stored = np.array([[0, 1024, 2048]], dtype=np.uint16)
    np.testing.assert_array_equal(ct.to_hu(stored, 1.0, -1024.0), [[-1024, 0, 1024]])
    np.testing.assert_allclose(ct.to_hu(stored, 0.5, -10.0), [[-10, 502, 1014]])


def test_padding_value_becomes_air():
    stored = np.array([[-2000, 0, 40]], dtype=np.int16)
    np.testing.assert_array_equal(ct.to_hu(stored, 1.0, 0.0, padding_value=-2000), [[ct.AIR_HU, 0, 40]])


def test_padding_range_limit_covers_the_range():
    stored = np.array([0, 5, 10, 11, 1000], dtype=np.uint16)
    hu = ct.to_hu(stored, 1.0, -1024.0, padding_value=0, padding_range_limit=10)
    np.testing.assert_array_equal(hu, [ct.AIR_HU, ct.AIR_HU, ct.AIR_HU, -1013, -24])


def test_model_scale_round_trip_and_clipping():
    hu = np.array([-3000.0, -1024.0, 0.0, 1000.0, 3071.0, 5000.0], np.float32)
    x = ct.to_model(hu)
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_allclose(ct.from_model(x), np.clip(hu, ct.HU_MIN, ct.HU_MAX), atol=1e-3)


def test_model_scale_matches_for_tensors():
    import tensorflow as tf

    hu = np.linspace(-1100, 3200, 17, dtype=np.float32)
    np.testing.assert_allclose(ct.to_model(tf.constant(hu)).numpy(), ct.to_model(hu), atol=1e-6)
    np.testing.assert_allclose(ct.from_model(tf.constant(ct.to_model(hu))).numpy(), np.clip(hu, -1024, 3071),
                               atol=1e-3)


def test_windows():
    abdomen = ct.window("abdomen")
    assert (abdomen.low, abdomen.high, abdomen.width) == (-160, 240, 400)
    assert ct.window("wide").width == 2924
    np.testing.assert_allclose(abdomen.to_unit(np.array([-500, -160, 40, 240, 900])), [0, 0, 0.5, 1, 1])
    with pytest.raises(ValueError, match="unknown HU window 'spine'"):
        ct.window("spine")


def test_hu_to_int16_rounds_and_clips():
    out = ct.hu_to_int16(np.array([-0.6, 0.4, 1.5, 40000.0, -40000.0]))
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, [-1, 0, 2, 32767, -32768])


def test_pad_to_multiple_numpy_and_tensorflow_agree():
    import tensorflow as tf

    assert [ct.padded_size(n, 8) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 24]
    image = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    padded = ct.pad_to_multiple(image, 4)
    assert padded.shape == (8, 8) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[:5, :6], image)  # bottom/right padding: a plain crop gives it back
    assert (padded[5:] == ct.AIR_HU).all() and (padded[:, 6:] == ct.AIR_HU).all()
    batch = np.stack([image, image + 1])[..., None]  # [N, H, W, 1]
    expected = ct.pad_to_multiple(batch, 4, value=-1.0, axes=(1, 2))
    assert expected.shape == (2, 8, 8, 1)
    got = ct.pad_to_multiple(tf.constant(batch), 4, value=-1.0, axes=(1, 2))
    np.testing.assert_array_equal(got.numpy(), expected)
    assert ct.pad_to_multiple(image[:4, :4], 4).shape == (4, 4)  # already a multiple: unchanged
