"""Attention U-Net generator with a residual bottleneck and a global residual connection.

Encoder: two conv blocks per level, then a strided convolution halves the resolution (multi-scale features).
Bottleneck: residual blocks transform the coarsest features.  Decoder: bilinear upsampling + convolution (transposed
convolutions leave checkerboard artefacts, which in CT look like structured noise), an attention gate on every skip
connection, concatenation, two conv blocks.  The last 1x1 convolution predicts the noise to remove and is initialised
near zero, so an untrained generator is close to the identity: training starts from "change nothing", the right prior
for a denoiser.

Fully convolutional: any height and width divisible by ``2**depth`` (callers pad; see :func:`pad_to_multiple`).
Input and output are on the model scale (HU mapped to [-1, 1] by ``ldct_tf.ct.to_model``).
"""

from __future__ import annotations

import keras
from keras import layers

from ldct_tf.models.blocks import AttentionGate, ConvNormAct, NoiseLevelMap, ResidualBlock, check_norm


def build_generator(depth: int = 3, base_filters: int = 32, residual_blocks: int = 4, attention: bool = True,
                    norm: str = "instance", name: str = "generator", noise_conditional: bool = False,
                    noise_coarse: bool = False) -> keras.Model:
    """Build the generator as a functional Keras model (serialisable with ``keras.saving``).

    ``noise_conditional``: the first layer also sees the input's own noise level as a constant channel
    (:class:`~ldct_tf.models.blocks.NoiseLevelMap`), so one network can serve doses from 5 to 50 %.
    ``noise_coarse`` (with ``noise_conditional``): and a second channel, the noise level after a 2x2 average, which
    tells a smooth kernel's noise from a sharp kernel's (:func:`ldct_tf.noise.coarse_noise_index_hu`).
    """
    if noise_coarse and not noise_conditional:
        raise ValueError("noise_coarse needs noise_conditional=True")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    if not isinstance(base_filters, int) or base_filters < 1:
        raise ValueError(f"base_filters must be an integer >= 1, got {base_filters!r}")
    if not isinstance(residual_blocks, int) or residual_blocks < 0:
        raise ValueError(f"residual_blocks must be an integer >= 0, got {residual_blocks!r}")
    check_norm(norm)

    inputs = keras.Input((None, None, 1), name="image")
    x = NoiseLevelMap(coarse=noise_coarse, name="noise_level")(inputs) if noise_conditional else inputs
    skips = []
    for level in range(depth):
        filters = base_filters * 2**level
        x = ConvNormAct(filters, norm=norm, name=f"enc{level}_conv1")(x)
        x = ConvNormAct(filters, norm=norm, name=f"enc{level}_conv2")(x)
        skips.append(x)
        x = ConvNormAct(filters * 2, strides=2, norm=norm, name=f"enc{level}_down")(x)

    bottleneck = base_filters * 2**depth
    for block in range(residual_blocks):
        x = ResidualBlock(bottleneck, norm=norm, name=f"bottleneck_res{block}")(x)

    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"dec{level}_upsample")(x)
        x = ConvNormAct(filters, norm=norm, name=f"dec{level}_upconv")(x)
        skip = skips[level]
        if attention:
            skip = AttentionGate(max(filters // 2, 1), name=f"dec{level}_attention")([skip, x])
        x = layers.Concatenate(name=f"dec{level}_fuse")([x, skip])
        x = ConvNormAct(filters, norm=norm, name=f"dec{level}_conv1")(x)
        x = ConvNormAct(filters, norm=norm, name=f"dec{level}_conv2")(x)

    # float32 head so mixed precision never quantises the output image.
    residual = layers.Conv2D(1, 1, kernel_initializer=keras.initializers.RandomNormal(stddev=1e-4),
                             dtype="float32", name="noise")(x)
    outputs = layers.Add(dtype="float32", name="denoised")([layers.Activation("linear", dtype="float32")(inputs),
                                                            residual])
    return keras.Model(inputs, outputs, name=name)


def size_multiple(depth: int) -> int:
    """Height and width must be divisible by this."""
    return 2**depth
