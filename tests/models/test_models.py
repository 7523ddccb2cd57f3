"""Generator, discriminator and blocks: shapes, identity at initialisation, argument checks, serialisation."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from ldct_tf.models import blocks
from ldct_tf.models.discriminator import HighPass, build_discriminator, receptive_field
from ldct_tf.models.generator import build_generator


@pytest.fixture(scope="module")
def small_generator():
    return build_generator(depth=2, base_filters=8, residual_blocks=1)


@pytest.mark.parametrize("shape", [(1, 32, 32, 1), (2, 64, 48, 1), (1, 128, 96, 1)])
def test_generator_is_fully_convolutional(small_generator, shape):
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype("float32")
    assert small_generator(x).shape == shape


def test_generator_is_close_to_identity_at_init(small_generator):
    x = np.random.default_rng(1).uniform(-1, 0.5, (2, 64, 64, 1)).astype("float32")
    y = np.asarray(small_generator(x))
    # 0.002 on the model scale is about 4 HU: an untrained denoiser changes almost nothing.
    assert np.abs(y - x).max() < 2e-3
    assert np.abs(y - x).max() > 0  # but it is not a constant copy: the residual head is live


@pytest.mark.parametrize("attention, norm", [(True, "instance"), (False, "batch"), (True, "none")])
def test_generator_variants_build(attention, norm):
    model = build_generator(depth=2, base_filters=4, residual_blocks=2, attention=attention, norm=norm)
    names = [layer.name for layer in model.layers]
    assert any("attention" in n for n in names) == attention
    assert sum("res" in n for n in names) == 2
    assert model(np.zeros((1, 16, 16, 1), "float32")).shape == (1, 16, 16, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(depth=0), "depth"), (dict(base_filters=0), "base_filters"), (dict(residual_blocks=-1), "residual_blocks"),
    (dict(norm="layer"), "norm must be one of"),
])
def test_generator_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_generator(**kwargs)


def test_discriminator_patch_output_and_receptive_field():
    assert receptive_field(3) == 70
    d = build_discriminator(filters=8, n_layers=3)
    assert d(np.zeros((2, 128, 128, 1), "float32")).shape == (2, 16, 16, 1)
    d_sn = build_discriminator(filters=4, n_layers=2, spectral_norm=True)
    assert any(isinstance(layer, keras.layers.SpectralNormalization) for layer in d_sn.layers)
    with pytest.raises(ValueError, match="n_layers"):
        build_discriminator(n_layers=0)


def test_instance_norm_is_per_channel_group_norm():
    layer = blocks.norm_layer("instance")
    assert isinstance(layer, keras.layers.GroupNormalization) and layer.groups == -1
    x = np.random.default_rng(2).normal(3, 2, (2, 8, 8, 4)).astype("float32")
    y = np.asarray(layer(x))
    np.testing.assert_allclose(y.mean(axis=(1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(y.std(axis=(1, 2)), 1, atol=1e-2)


def test_attention_gate_scales_skip_features():
    gate = blocks.AttentionGate(4)
    skip = np.random.default_rng(3).normal(size=(1, 8, 8, 6)).astype("float32")
    out = np.asarray(gate([skip, np.ones((1, 8, 8, 5), "float32")]))
    ratio = out / np.where(skip == 0, 1, skip)
    assert out.shape == skip.shape and (ratio > 0).all() and (ratio < 1).all()
    assert np.allclose(ratio, ratio[..., :1])  # one coefficient per pixel, shared by the channels


def test_highpass_removes_smooth_content_and_keeps_texture():
    layer = HighPass(size=5, gain=10.0)
    ramp = np.tile(np.linspace(-0.5, 0.5, 32, dtype="float32"), (32, 1))[None, :, :, None]
    flat_out = np.asarray(layer(ramp + 0.3))
    np.testing.assert_allclose(flat_out[:, 2:-2, 2:-2], 0, atol=1e-5)  # a linear ramp plus offset has no texture
    noise = np.random.default_rng(5).normal(0, 0.01, ramp.shape).astype("float32")
    out = np.asarray(layer(ramp + noise))
    # white noise keeps 24/25 of its variance (std 0.98 sigma), times the gain: 0.098 expected
    assert 0.093 < out[:, 2:-2, 2:-2].std() < 0.103
    assert out.shape == ramp.shape


@pytest.mark.parametrize("critic_input, channels", [("image", 1), ("highpass", 1), ("both", 2)])
def test_discriminator_critic_inputs(critic_input, channels):
    d = build_discriminator(filters=4, n_layers=2, norm="none", critic_input=critic_input)
    conv0 = d.get_layer("conv0")
    assert conv0.kernel.shape[2] == channels
    assert d(np.zeros((1, 32, 32, 1), "float32")).shape == (1, 8, 8, 1)
    with pytest.raises(ValueError, match="critic_input"):
        build_discriminator(critic_input="residual")


@pytest.mark.parametrize("model_fn", [lambda: build_generator(2, 4, 1), lambda: build_discriminator(4, 2, spectral_norm=True),
                                      lambda: build_discriminator(4, 2, critic_input="both")])
def test_keras_saving_round_trip(tmp_path, model_fn):
    model = model_fn()
    x = np.random.default_rng(4).uniform(-1, 1, (1, 32, 32, 1)).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


def test_layer_configs_round_trip():
    for layer in (blocks.ConvNormAct(8, norm="batch", activation="relu"), blocks.ResidualBlock(8),
                  blocks.AttentionGate(3)):
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()


def test_max_leaky_relu_matches_keras_leaky_relu_in_value_and_gradient():
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(5).normal(size=(2, 6, 6, 3)).astype("float32"))
    ours, theirs = blocks.MaxLeakyReLU(0.2), keras.layers.LeakyReLU(negative_slope=0.2)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        a, b = ours(x), theirs(x)
        la, lb = tf.reduce_sum(a * x), tf.reduce_sum(b * x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(tape.gradient(la, x)), np.asarray(tape.gradient(lb, x)), rtol=1e-6)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ours))
    assert isinstance(restored, blocks.MaxLeakyReLU) and restored.negative_slope == 0.2
    with pytest.raises(ValueError, match="negative_slope"):
        blocks.MaxLeakyReLU(1.5)


def test_cyclegan_step_losses_and_updates_match_the_keras_leaky_relu_critics():
    """The speed rewrite of the critics' activation leaves a training step's losses and weight updates unchanged:
    one step on fixed weights and inputs against the same model with critics built from Keras' LeakyReLU."""
    from pathlib import Path

    from ldct_tf import config, ct
    from ldct_tf.models.cyclegan import CycleGAN
    from ldct_tf.models.factory import build_cyclegan, compile_cyclegan

    cfg = config.load(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml")
    keras.utils.set_random_seed(3)
    fast = compile_cyclegan(build_cyclegan(cfg), cfg)

    def keras_critic(critic):
        def swap(layer):
            if isinstance(layer, blocks.MaxLeakyReLU):
                return keras.layers.LeakyReLU(negative_slope=layer.negative_slope)
            return layer.__class__.from_config(layer.get_config())
        clone = keras.models.clone_model(critic, clone_function=swap)
        clone.set_weights(critic.get_weights())
        return clone

    def copy(network):
        clone = keras.models.clone_model(network)
        clone.set_weights(network.get_weights())
        return clone

    reference = CycleGAN(copy(fast.low_to_normal), copy(fast.normal_to_low), keras_critic(fast.normal_critic),
                         keras_critic(fast.low_critic), fast.perceptual)
    assert not any(isinstance(layer, blocks.MaxLeakyReLU) for layer in reference.normal_critic.layers)
    assert any(isinstance(layer, blocks.MaxLeakyReLU) for layer in fast.normal_critic.layers)
    compile_cyclegan(reference, cfg)

    rng = np.random.default_rng(4)
    normal_hu = rng.uniform(-200, 200, (2, 32, 32, 1)).astype("float32")
    low = ct.to_model(normal_hu + rng.normal(0, 40, normal_hu.shape).astype("float32"))
    normal = ct.to_model(normal_hu)
    before = [np.asarray(v).copy() for v in fast.trainable_variables]
    fast_losses = {k: float(v) for k, v in fast.train_step((low, normal)).items()}
    reference_losses = {k: float(v) for k, v in reference.train_step((low, normal)).items()}
    assert fast_losses.keys() == reference_losses.keys() and len(fast_losses) >= 7
    for name, value in reference_losses.items():
        assert fast_losses[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    for ours, theirs in zip(fast.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(np.asarray(v), b) for v, b in zip(fast.trainable_variables, before))  # a real update
