"""Building blocks of the generator and discriminator, each a serialisable Keras layer.

Instance normalisation is ``keras.layers.GroupNormalization(groups=-1)`` (one group per channel), which replaces
tensorflow-addons' InstanceNormalization (tensorflow-addons does not import on Keras 3).
"""

from __future__ import annotations

from typing import Optional

import keras
from keras import layers, ops

from ldct_tf import ct, noise

NORMS = ("instance", "batch", "none")
PACKAGE = "ldct_tf"


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def norm_layer(norm: str, name: Optional[str] = None) -> layers.Layer:
    """Instance (per-channel GroupNormalization), batch, or no normalisation."""
    check_norm(norm)
    if norm == "instance":
        return layers.GroupNormalization(groups=-1, epsilon=1e-5, name=name)
    if norm == "batch":
        return layers.BatchNormalization(name=name)
    return layers.Identity(name=name)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNormAct(layers.Layer):
    """3x3 convolution -> normalisation -> activation (LeakyReLU 0.2 by default)."""

    def __init__(self, filters: int, kernel_size: int = 3, strides: int = 1, norm: str = "instance",
                 activation: Optional[str] = "leaky_relu", **kwargs):
        super().__init__(**kwargs)
        if filters <= 0:
            raise ValueError(f"filters must be positive, got {filters!r}")
        self.filters, self.kernel_size, self.strides = filters, kernel_size, strides
        self.norm, self.activation_name = check_norm(norm), activation
        # Bias is redundant before a normalisation that re-centres.
        self.conv = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=norm == "none")
        self.normalise = norm_layer(norm)
        self.act = _activation(activation)

    def build(self, input_shape):
        self.conv.build(input_shape)
        out_shape = self.conv.compute_output_shape(input_shape)
        self.normalise.build(out_shape)
        self.built = True

    def call(self, x, training=None):
        return self.act(self.normalise(self.conv(x), training=training))

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "norm": self.norm, "activation": self.activation_name}


def _activation(name: Optional[str]) -> layers.Layer:
    if name is None:
        return layers.Identity()
    if name == "leaky_relu":
        return layers.LeakyReLU(negative_slope=0.2)
    return layers.Activation(name)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaxLeakyReLU(layers.Layer):
    """Leaky ReLU written as ``max(x, slope * x)`` (``0 < slope < 1``): the same function as ``layers.LeakyReLU``.

    Why: after a convolution *with a bias*, TensorFlow 2.21's Grappler remapper fuses Conv2D + BiasAdd + LeakyRelu
    and then finds the training graph's LeakyReluGrad still reading the removed BiasAdd; it logs ``remapper failed:
    ... fanout '.../LeakyReluGrad' exist for missing node '.../BiasAdd'`` and drops every remapper rewrite of the
    whole training step (no upstream issue found; checked with tensorflow 2.21.0 on CPU).  The PatchGAN critic's first
    layer is such a convolution.  ``maximum`` is not a LeakyRelu op at that point, so the remapper succeeds.
    """

    def __init__(self, negative_slope: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < negative_slope < 1.0:
            raise ValueError(f"negative_slope must be in (0, 1), got {negative_slope!r}")
        self.negative_slope = float(negative_slope)

    def call(self, x):
        return keras.ops.maximum(x, x * self.negative_slope)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "negative_slope": self.negative_slope}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResidualBlock(layers.Layer):
    """Two conv-norm layers with an identity shortcut: transforms bottleneck features without changing their shape."""

    def __init__(self, filters: int, norm: str = "instance", **kwargs):
        super().__init__(**kwargs)
        self.filters, self.norm = filters, check_norm(norm)
        self.first = ConvNormAct(filters, norm=norm)
        self.second = ConvNormAct(filters, norm=norm, activation=None)

    def build(self, input_shape):
        if input_shape[-1] != self.filters:
            raise ValueError(f"ResidualBlock({self.filters}) needs {self.filters} input channels, "
                             f"got {input_shape[-1]}")
        self.first.build(input_shape)
        self.second.build(input_shape)
        self.built = True

    def call(self, x, training=None):
        return x + self.second(self.first(x, training=training), training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "norm": self.norm}


@keras.saving.register_keras_serializable(package=PACKAGE)
class AttentionGate(layers.Layer):
    """Additive attention gate (Oktay et al. 2018): the decoder signal decides which encoder features pass the skip.

    Inputs ``[skip, gating]`` at the same resolution (the decoder features are upsampled first).  Returns the skip
    features multiplied by a per-pixel coefficient in (0, 1) computed from both, so irrelevant regions are damped
    before the decoder fuses them.
    """

    def __init__(self, inter_filters: int, **kwargs):
        super().__init__(**kwargs)
        if inter_filters <= 0:
            raise ValueError(f"inter_filters must be positive, got {inter_filters!r}")
        self.inter_filters = inter_filters
        self.theta_skip = layers.Conv2D(inter_filters, 1, use_bias=False)
        self.phi_gate = layers.Conv2D(inter_filters, 1)
        self.psi = layers.Conv2D(1, 1, activation="sigmoid")

    def build(self, input_shape):
        skip_shape, gate_shape = input_shape
        self.theta_skip.build(skip_shape)
        self.phi_gate.build(gate_shape)
        self.psi.build(tuple(skip_shape[:-1]) + (self.inter_filters,))
        self.built = True

    def call(self, inputs):
        skip, gate = inputs
        coefficients = self.psi(keras.ops.relu(self.theta_skip(skip) + self.phi_gate(gate)))
        return skip * coefficients

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "inter_filters": self.inter_filters}


@keras.saving.register_keras_serializable(package=PACKAGE)
class NoiseLevelMap(layers.Layer):
    """Appends the image's own noise level as a constant channel (FFDNet-style conditioning, estimated blind).

    Why inside the network: the denoiser must know how noisy its input is (a 10 % and a 50 % dose scan need different
    smoothing), and a level that the graph measures itself cannot be forgotten or mis-scaled by a caller; TF Serving,
    ``denoise``, the node and training all get the same figure (``ldct_tf.noise``).  The input is on the model scale
    (``ldct_tf.ct.to_model``); the channel is the noise index in HU divided by ``scale_hu``.
    """

    def __init__(self, scale_hu: float = 50.0, coarse: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.scale_hu = float(scale_hu)
        #: Also append :func:`ldct_tf.noise.coarse_noise_index_hu` (a second channel), which tells a smooth kernel's
        #: correlated noise from a sharp kernel's at a similar fine index.
        self.coarse = bool(coarse)

    def call(self, x):
        x32 = ops.cast(x, "float32")
        hu = ct.from_model(x32)
        levels = [noise.noise_index_hu(hu)] + ([noise.coarse_noise_index_hu(hu)] if self.coarse else [])
        maps = [ops.ones_like(x32) * ops.reshape(level / self.scale_hu, (-1, 1, 1, 1)) for level in levels]
        return ops.cast(ops.concatenate([x32, *maps], axis=-1), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] + 1 + int(self.coarse))

    def get_config(self):
        return {**super().get_config(), "scale_hu": self.scale_hu, "coarse": self.coarse}
