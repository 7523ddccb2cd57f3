"""CycleGAN losses: LSGAN adversarial, cycle-consistency L1, identity L1, VGG19 perceptual.

All return a scalar mean over the local (per-replica) batch; :class:`ldct_tf.models.cyclegan.CycleGAN` divides by
the number of replicas before taking gradients, because Keras 3 optimizers sum gradients across replicas.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import keras
import tensorflow as tf

from ldct_tf import ct
from ldct_tf.errors import LdctError

VGG19_NOTOP_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"


class VggWeightsError(LdctError, ValueError):
    """The perceptual loss cannot get its VGG19: weights that do not load (offline, a bad file) or a layer it lacks.
    One line naming the fix; a ``ValueError`` as these checks raised before."""


def keras_models_folder() -> str:
    """Where Keras caches downloaded weights (``$KERAS_HOME/models``, default ``~/.keras/models``)."""
    return os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "models")


def _f32(x):
    return tf.cast(x, tf.float32)


def lsgan_generator_loss(fake_scores) -> tf.Tensor:
    """Least-squares GAN, generator side: push the discriminator's scores of generated images to 1 (Mao et al.)."""
    return tf.reduce_mean(tf.square(_f32(fake_scores) - 1.0))


def lsgan_discriminator_loss(real_scores, fake_scores) -> tf.Tensor:
    """Least-squares GAN, discriminator side: real -> 1, generated -> 0, halved as in CycleGAN."""
    return 0.5 * (tf.reduce_mean(tf.square(_f32(real_scores) - 1.0)) + tf.reduce_mean(tf.square(_f32(fake_scores))))


def l1_loss(a, b) -> tf.Tensor:
    """Mean absolute difference (cycle consistency and identity)."""
    return tf.reduce_mean(tf.abs(_f32(a) - _f32(b)))


def mse_loss(a, b) -> tf.Tensor:
    """Mean squared difference (the simulated-pair pixel loss: what PSNR measures)."""
    return tf.reduce_mean(tf.square(_f32(a) - _f32(b)))


def gradient_mse_loss(a, b) -> tf.Tensor:
    """Mean squared difference of the two images' finite-difference gradients (both axes), added to the MSE by the
    simulated-pair loss ``mse_gradient``.

    Why: the MSE optimum of a denoiser is a conditional mean, which rounds off edges (benchmarks/results/ablation.json: validation edge
    sharpness 0.87 on D45f slices with plain MSE); the gradient term weighs errors by their frequency squared, so lost edge
    contrast and fine texture cost more than low-frequency residue.
    """
    da_y, da_x = tf.image.image_gradients(_f32(a))
    db_y, db_x = tf.image.image_gradients(_f32(b))
    return tf.reduce_mean(tf.square(da_y - db_y)) + tf.reduce_mean(tf.square(da_x - db_x))


#: The simulated-pair pixel losses ``loss.simulated_loss`` names.
SIMULATED_LOSSES = ("mse", "l1", "mse_gradient")


def vgg19_weights(weights: str, weights_path: Optional[str]) -> Optional[str]:
    """What to pass as ``keras.applications.VGG19(weights=...)``.

    ``none`` -> un-pretrained (tests; machines without the file).  ``imagenet`` -> a local ``weights_path`` when given,
    else the Keras cache (``~/.keras/models/`` + the notop file name), else Keras' own download, which fails with a
    clear message on machines without internet.
    """
    if weights == "none":
        return None
    if weights != "imagenet":
        raise VggWeightsError(f"loss.vgg_weights must be 'imagenet' or 'none', got {weights!r}")
    if weights_path:
        if not os.path.exists(weights_path):
            raise VggWeightsError(f"{weights_path}: loss.vgg_weights_path does not exist (expected the Keras "
                                  f"VGG19 notop file {VGG19_NOTOP_FILE}); or set loss.perceptual=0")
        return weights_path
    cached = os.path.join(keras_models_folder(), VGG19_NOTOP_FILE)
    return cached if os.path.exists(cached) else "imagenet"


def _weights_failure(source: Optional[str], exc: Exception) -> str:
    """The one line for VGG19 weights that did not load: for the ImageNet download (offline machines) the three ways
    out, since the perceptual loss is optional."""
    if source == "imagenet":
        return (f"the perceptual loss (loss.perceptual > 0) needs the ImageNet VGG19 weights, which could not be "
                f"downloaded (offline?): set loss.perceptual=0, or loss.vgg_weights_path=FILE, or copy the Keras "
                f"file {VGG19_NOTOP_FILE} into {keras_models_folder()}/")
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"{source}: cannot load it as VGG19 weights ({first}); set loss.perceptual=0 or another loss.vgg_weights_path"


class PerceptualLoss:
    """Distance between VGG19 features of two images (model scale), in a chosen HU window.

    The CT slice is mapped to HU, windowed (abdomen by default, so features describe soft tissue rather than the
    bone/air range), scaled to 0-255, replicated to 3 channels and given ImageNet (caffe) preprocessing.  The network
    is frozen, cut at the deepest requested layer (block5 costs most of VGG19 on a CPU) and shared by both cycle
    directions.  Deliberately not a Keras layer: its 20 M frozen weights stay out of the CycleGAN's checkpoints.
    """

    def __init__(self, layers: Sequence[str] = ("block5_conv4",), layer_weights: Optional[Sequence[float]] = None,
                 window: str = "abdomen", weights: str = "imagenet", weights_path: Optional[str] = None):
        layers = list(layers)
        layer_weights = list(layer_weights) if layer_weights is not None else [1.0] * len(layers)
        if not layers:
            raise ValueError("perceptual loss needs at least one VGG19 layer")
        if len(layer_weights) != len(layers):
            raise ValueError(f"{len(layers)} perceptual layers but {len(layer_weights)} weights")
        self.layers, self.layer_weights, self.window = layers, layer_weights, ct.window(window)
        source = vgg19_weights(weights, weights_path)
        try:
            vgg = keras.applications.VGG19(include_top=False, weights=source, input_shape=(None, None, 3))
        except Exception as exc:  # Keras' download or h5 errors: many types, all meaning "no usable weights"
            if source is None:
                raise  # no weights to load: a bug, keep its traceback
            raise VggWeightsError(_weights_failure(source, exc)) from None
        known = [layer.name for layer in vgg.layers]
        for name in layers:
            if name not in known:
                raise VggWeightsError(f"unknown VGG19 layer {name!r} in loss.perceptual_layers; conv layers are "
                                      "e.g. block1_conv2 ... block5_conv4")
        self.extractor = keras.Model(vgg.input, [vgg.get_layer(n).output for n in layers], name="vgg19_features")
        self.extractor.trainable = False
        self.pretrained = source is not None

    def preprocess(self, x) -> tf.Tensor:
        unit = self.window.model_to_unit(x)
        rgb = tf.repeat(unit * 255.0, 3, axis=-1)
        return keras.applications.vgg19.preprocess_input(rgb)

    def __call__(self, a, b) -> tf.Tensor:
        features_a = self.extractor(self.preprocess(a), training=False)
        features_b = self.extractor(self.preprocess(b), training=False)
        if len(self.layers) == 1:
            features_a, features_b = [features_a], [features_b]
        total = tf.constant(0.0, tf.float32)
        for weight, fa, fb in zip(self.layer_weights, features_a, features_b):
            total += weight * tf.reduce_mean(tf.square(_f32(fa) - _f32(fb)))
        return total
