"""PatchGAN discriminator: classifies overlapping patches as real or generated.

With ``layers=3`` (the default) each output logit sees a 70x70 pixel patch, the pix2pix/CycleGAN choice: enough to
judge noise texture and small structures without judging global anatomy, which an unpaired GAN must not learn to
fake.  Outputs raw scores (LSGAN: no sigmoid).  Activations are :class:`~ldct_tf.models.blocks.MaxLeakyReLU` (the same
function as Keras' LeakyReLU; it keeps Grappler's remapper working on the training step).
"""

from __future__ import annotations

import keras
from keras import layers

from ldct_tf.models.blocks import PACKAGE, MaxLeakyReLU, check_norm, norm_layer

#: What the critic looks at: the image, its high-pass residual (noise texture), or both as two channels.
CRITIC_INPUTS = ("image", "highpass", "both")


@keras.saving.register_keras_serializable(package=PACKAGE)
class HighPass(layers.Layer):
    """``gain * (x - box_blur(x))``: the fine texture of a model-scale image, amplified.

    Why: on the model scale ([-1024, 3071] HU -> [-1, 1]) the noise that separates quarter from full dose is about
    0.01, buried under anatomy a hundred times larger.  A critic fed the high-pass residual sees noise texture at
    unit scale and learns the dose difference much faster than one that must first find it under the anatomy.
    """

    def __init__(self, size: int = 5, gain: float = 40.0, **kwargs):
        super().__init__(**kwargs)
        if size < 3 or size % 2 == 0:
            raise ValueError(f"size must be an odd integer >= 3, got {size!r}")
        self.size, self.gain = size, gain

    def call(self, x):
        half = self.size // 2
        padded = keras.ops.pad(x, [[0, 0], [half, half], [half, half], [0, 0]], mode="reflect")
        blurred = keras.ops.average_pool(padded, self.size, strides=1, padding="valid")
        return (x - blurred) * self.gain

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "size": self.size, "gain": self.gain}


def receptive_field(n_layers: int) -> int:
    """Receptive field in pixels of :func:`build_discriminator` with ``n_layers`` strided layers."""
    strides = [2] * n_layers + [1, 1]
    field = 1
    for stride in reversed(strides):
        field = (field - 1) * stride + 4
    return field


def build_discriminator(filters: int = 64, n_layers: int = 3, norm: str = "instance", spectral_norm: bool = False,
                        name: str = "discriminator", critic_input: str = "image") -> keras.Model:
    """PatchGAN critic; ``critic_input`` picks what it sees (:data:`CRITIC_INPUTS`, see :class:`HighPass`)."""
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be an integer >= 1, got {n_layers!r}")
    if not isinstance(filters, int) or filters < 1:
        raise ValueError(f"filters must be an integer >= 1, got {filters!r}")
    check_norm(norm)
    if critic_input not in CRITIC_INPUTS:
        raise ValueError(f"critic_input must be one of {CRITIC_INPUTS}, got {critic_input!r}")

    def conv(f: int, stride: int, layer_name: str, **kwargs) -> layers.Layer:
        layer = layers.Conv2D(f, 4, strides=stride, padding="same", name=layer_name, **kwargs)
        return layers.SpectralNormalization(layer, name=f"{layer_name}_sn") if spectral_norm else layer

    inputs = keras.Input((None, None, 1), name="image")
    x = inputs
    if critic_input == "highpass":
        x = HighPass(name="highpass")(inputs)
    elif critic_input == "both":
        x = layers.Concatenate(name="image_and_highpass")([inputs, HighPass(name="highpass")(inputs)])
    x = conv(filters, 2, "conv0")(x)  # no normalisation on the first layer (pix2pix practice)
    x = MaxLeakyReLU(0.2)(x)
    for n in range(1, n_layers + 1):
        stride = 2 if n < n_layers else 1
        x = conv(filters * min(2**n, 8), stride, f"conv{n}", use_bias=norm == "none")(x)
        x = norm_layer(norm, name=f"norm{n}")(x)
        x = MaxLeakyReLU(0.2)(x)
    outputs = conv(1, 1, "logits", dtype="float32")(x)
    # The head is float32 under mixed precision (LSGAN's squared scores overflow float16 first).  An explicit cast:
    # SpectralNormalization returns its compute dtype, float16, even around a float32 layer (shared/STACK.md).
    outputs = layers.Activation("linear", dtype="float32", name="scores_float32")(outputs)
    return keras.Model(inputs, outputs, name=name)
