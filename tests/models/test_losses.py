import numpy as np
import pytest
import tensorflow as tf

from ldct_tf.models import losses


def test_lsgan_terms():
    ones, zeros = tf.ones((2, 4, 4, 1)), tf.zeros((2, 4, 4, 1))
    assert float(losses.lsgan_generator_loss(ones)) == 0.0
    assert float(losses.lsgan_generator_loss(zeros)) == 1.0
    assert float(losses.lsgan_discriminator_loss(ones, zeros)) == 0.0
    assert float(losses.lsgan_discriminator_loss(zeros, ones)) == 1.0
    assert float(losses.l1_loss(ones, zeros)) == 1.0


@pytest.fixture(scope="module")
def perceptual():
    return losses.PerceptualLoss(["block1_conv2", "block2_conv2"], [1.0, 0.5], weights="none")


def test_perceptual_is_zero_for_equal_images_and_grows_with_noise(perceptual):
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.55, -0.4, (2, 32, 32, 1)).astype("float32")  # soft tissue on the model scale
    small = x + rng.normal(0, 0.002, x.shape).astype("float32")
    large = x + rng.normal(0, 0.02, x.shape).astype("float32")
    assert float(perceptual(x, x)) == 0.0
    assert 0 < float(perceptual(x, small)) < float(perceptual(x, large))


def test_perceptual_is_truncated_and_frozen(perceptual):
    names = [layer.name for layer in perceptual.extractor.layers]
    assert "block2_conv2" in names and "block3_conv1" not in names
    assert not perceptual.extractor.trainable_weights
    assert perceptual.pretrained is False


def test_perceptual_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown VGG19 layer"):
        losses.PerceptualLoss(["block9_conv1"], weights="none")
    with pytest.raises(ValueError, match="weights"):
        losses.PerceptualLoss(["block1_conv1"], [1.0, 2.0], weights="none")
    with pytest.raises(losses.VggWeightsError, match="vgg_weights_path"):
        losses.PerceptualLoss(["block1_conv1"], weights="imagenet", weights_path=str(tmp_path / "missing.h5"))


def test_weights_source_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert losses.vgg19_weights("none", None) is None
    assert losses.vgg19_weights("imagenet", None) == "imagenet"  # nothing cached: Keras' own loader
    cached = tmp_path / "models" / losses.VGG19_NOTOP_FILE
    cached.parent.mkdir()
    cached.write_bytes(b"")
    assert losses.vgg19_weights("imagenet", None) == str(cached)
    with pytest.raises(ValueError):
        losses.vgg19_weights("places365", None)
