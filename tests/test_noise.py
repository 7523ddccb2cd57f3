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


def test_coarse_index_matches_the_fine_one_for_white_noise_and_reads_higher_for_smooth_noise():
    from scipy import ndimage

    rng = np.random.default_rng(2)
    clean = _phantom(256)
    white = rng.normal(0, 40, clean.shape).astype(np.float32)
    smooth = ndimage.gaussian_filter(rng.normal(0, 1, clean.shape), 1.2).astype(np.float32)
    smooth *= 40.0 / smooth.std()

    def both(image):
        batch = (clean + image)[None, :, :, None]
        return float(noise.noise_index_hu(batch)[0]), float(noise.coarse_noise_index_hu(batch)[0])

    fine_w, coarse_w = both(white)
    fine_s, coarse_s = both(smooth)
    assert coarse_w == pytest.approx(fine_w, rel=0.15)  # white noise: a 2x2 average halves it, x2 restores it
    assert coarse_s / fine_s > 1.4 * (coarse_w / fine_w)  # correlated noise survives the average


def test_noise_level_map_adds_one_channel_or_two_with_the_coarse_level():
    import keras

    from ldct_tf import ct
    from ldct_tf.models import blocks
    from ldct_tf.models.generator import build_generator

    rng = np.random.default_rng(3)
    x = ct.to_model((_phantom(64) + rng.normal(0, 30, (64, 64))).astype(np.float32))[None, :, :, None]
    one = blocks.NoiseLevelMap()(x).numpy()
    two = blocks.NoiseLevelMap(coarse=True)(x).numpy()
    assert one.shape == (1, 64, 64, 2) and two.shape == (1, 64, 64, 3)
    assert np.array_equal(one, two[..., :2])
    assert two[0, 0, 0, 2] == pytest.approx(float(noise.coarse_noise_index_hu(ct.from_model(x))[0]) / 50.0, rel=1e-5)
    layer = blocks.NoiseLevelMap.from_config(blocks.NoiseLevelMap(coarse=True).get_config())
    assert layer.coarse is True
    model = build_generator(depth=1, base_filters=4, residual_blocks=0, norm="none", noise_conditional=True,
                            noise_coarse=True)
    assert model.get_layer("enc0_conv1").weights[0].shape[2] == 3
    with pytest.raises(ValueError, match="noise_conditional"):
        build_generator(depth=1, base_filters=4, residual_blocks=0, noise_coarse=True)
    assert isinstance(model, keras.Model)
