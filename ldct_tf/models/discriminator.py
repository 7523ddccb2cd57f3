"""PatchGAN discriminator: classifies overlapping patches as real or generated.

With ``layers=3`` (the default) each output logit sees a 70x70 pixel patch, the pix2pix/CycleGAN choice: enough to
judge noise texture and small structures without judging global anatomy, which an unpaired GAN must not learn to
fake.  Outputs raw scores (LSGAN: no sigmoid).
"""

from __future__ import annotations

import keras
from keras import layers

from ldct_tf.models.blocks import check_norm, norm_layer


def receptive_field(n_layers: int) -> int:
    """Receptive field in pixels of :func:`build_discriminator` with ``n_layers`` strided layers."""
    strides = [2] * n_layers + [1, 1]
    field = 1
    for stride in reversed(strides):
        field = (field - 1) * stride + 4
    return field


def build_discriminator(filters: int = 64, n_layers: int = 3, norm: str = "instance", spectral_norm: bool = False,
                        name: str = "discriminator") -> keras.Model:
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be an integer >= 1, got {n_layers!r}")
    if not isinstance(filters, int) or filters < 1:
        raise ValueError(f"filters must be an integer >= 1, got {filters!r}")
    check_norm(norm)

    def conv(f: int, stride: int, layer_name: str, **kwargs) -> layers.Layer:
        layer = layers.Conv2D(f, 4, strides=stride, padding="same", name=layer_name, **kwargs)
        return layers.SpectralNormalization(layer, name=f"{layer_name}_sn") if spectral_norm else layer

    inputs = keras.Input((None, None, 1), name="image")
    x = conv(filters, 2, "conv0")(inputs)  # no normalisation on the first layer (pix2pix practice)
    x = layers.LeakyReLU(0.2)(x)
    for n in range(1, n_layers + 1):
        stride = 2 if n < n_layers else 1
        x = conv(filters * min(2**n, 8), stride, f"conv{n}", use_bias=norm == "none")(x)
        x = norm_layer(norm, name=f"norm{n}")(x)
        x = layers.LeakyReLU(0.2)(x)
    outputs = conv(1, 1, "logits", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)
