"""One noise-conditional network for two noise levels (the v3 design): it must denoise both."""

import numpy as np
import pytest

from ldct_tf import ct


def _clean(rng, size=32):
    """Smooth random soft-tissue structures (what a denoiser must keep)."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 3)
    return (40 + 400 * field / (np.abs(field).max() + 1e-6)).astype(np.float32)


@pytest.mark.slow
def test_tiny_noise_conditional_model_trained_on_two_levels_denoises_both():
    import keras
    import tensorflow as tf

    from ldct_tf.models import losses
    from ldct_tf.models.generator import build_generator

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = build_generator(depth=2, base_filters=8, residual_blocks=1, attention=False, norm="none",
                            noise_conditional=True)
    assert model.get_layer("noise_level") is not None
    optimizer = keras.optimizers.Adam(2e-3)

    def batch(n=16):
        clean = np.stack([_clean(rng) for _ in range(n)])
        sd = rng.choice([10.0, 60.0], size=(n, 1, 1)).astype(np.float32)
        noisy = clean + sd * rng.normal(0, 1, clean.shape).astype(np.float32)
        return ct.to_model(noisy[..., None]), ct.to_model(clean[..., None])

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = losses.mse_loss(model(x, training=True), y)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    for _ in range(300):
        step(*batch())
    for sd in (10.0, 60.0):
        clean = np.stack([_clean(rng) for _ in range(8)])
        noisy = clean + sd * rng.normal(0, 1, clean.shape).astype(np.float32)
        out = ct.from_model(np.asarray(model(ct.to_model(noisy[..., None]))))[..., 0]
        rmse_in = float(np.sqrt(np.mean((noisy - clean) ** 2)))
        rmse_out = float(np.sqrt(np.mean((out - clean) ** 2)))
        assert rmse_out < 0.75 * rmse_in, (sd, rmse_in, rmse_out)


def test_noise_conditional_generator_saves_and_loads(tmp_path):
    import keras

    from ldct_tf.models.generator import build_generator

    model = build_generator(depth=2, base_filters=4, residual_blocks=0, attention=False, norm="none",
                            noise_conditional=True)
    x = ct.to_model(np.random.default_rng(0).normal(40, 30, (1, 16, 16, 1)).astype(np.float32))
    model.save(tmp_path / "g.keras")
    again = keras.saving.load_model(tmp_path / "g.keras", compile=False)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(again(x)))
