"""The noise index (ldct_tf.noise): monotonic in the noise, blind to anatomy edges, the same in numpy and TF."""

import numpy as np
import pytest

from ldct_tf import noise


def _phantom(size: int = 128) -> np.ndarray:
    """Soft tissue (40 HU) disc with a bright insert and an air border: edges that are not noise."""
    yy, xx = np.mgrid[:size, :size] - size / 2
    r = np.hypot(yy, xx)
    hu = np.where(r < size * 0.45, 40.0, -1000.0)
    hu[(np.abs(yy) < size * 0.1) & (np.abs(xx) < size * 0.1)] = 400.0
    return hu.astype(np.float32)


def test_noise_index_grows_with_the_noise_and_ignores_edges():
    rng = np.random.default_rng(0)
    clean = _phantom()
    levels = [noise.noise_index(clean + rng.normal(0, sd, clean.shape).astype(np.float32)) for sd in (10, 30, 60)]
    assert levels[0] < levels[1] < levels[2]
    # about proportional: 3x and 6x the noise give about 3x and 6x the index
    assert levels[1] / levels[0] == pytest.approx(3.0, rel=0.15)
    assert levels[2] / levels[0] == pytest.approx(6.0, rel=0.15)
    # the edges of the phantom add almost nothing: the clean phantom reads near 0
    assert noise.noise_index(clean) < 0.1 * levels[0]


def test_batch_and_single_agree_and_bad_shapes_are_refused():
    rng = np.random.default_rng(1)
    batch = np.stack([_phantom() + rng.normal(0, sd, (128, 128)) for sd in (15, 45)]).astype(np.float32)
    per_image = noise.noise_index_hu(batch[..., None]).numpy()
    assert per_image == pytest.approx([noise.noise_index(batch[0]), noise.noise_index(batch[1])], rel=1e-6)
    with pytest.raises(ValueError, match="2-D"):
        noise.noise_index(batch)
    with pytest.raises(ValueError, match="smaller"):
        noise.noise_index(np.zeros((3, 3), np.float32))


def test_a_patch_of_air_falls_back_to_every_window():
    rng = np.random.default_rng(2)
    air = (-1000 + rng.normal(0, 20, (32, 32))).astype(np.float32)
    assert 5.0 < noise.noise_index(air) < 25.0
