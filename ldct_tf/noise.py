"""Noise level of a CT image, estimated from the image itself.

Why not ``skimage.restoration.estimate_sigma``: it assumes white noise, and FBP noise is spatially correlated, so it
underestimates CT noise badly (``shared/STACK.md``).  Here the level is read where CT noise is easiest to see: the
local standard deviation in small windows over the body, taken at a low percentile so that windows straddling edges
(which have a high local SD from anatomy, not noise) do not count.  The figure is biased low against the true noise
SD by a factor that depends on the noise texture, so it is a *consistent index* of the noise level, which is what
the noise-conditional denoiser (``ldct_tf.models.blocks.NoiseLevelMap``) and the input checks need.  One TensorFlow
implementation serves the exported graph, training and the numpy callers, so training and inference can never
disagree about it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

#: Local windows of this many pixels a side.
WINDOW = 5
#: Percentile of the local SD over the body (0.25: below the edges, above the chance-flat windows).
PERCENTILE = 0.25
#: A window counts as body when its mean is above this (HU): lungs and air are excluded.
BODY_MIN_HU = -600.0
#: With fewer body windows than this (a patch in air), every window counts.
MIN_BODY_WINDOWS = 64


def noise_index_hu(hu: tf.Tensor) -> tf.Tensor:
    """Noise index (HU) of each image in a batch ``[batch, height, width, 1]`` of HU values -> ``[batch]`` float32."""
    hu = tf.cast(hu, tf.float32)
    mean = tf.nn.avg_pool2d(hu, WINDOW, 1, "VALID")
    mean_sq = tf.nn.avg_pool2d(tf.square(hu), WINDOW, 1, "VALID")
    local_sd = tf.sqrt(tf.maximum(mean_sq - tf.square(mean), 0.0))
    batch = tf.shape(hu)[0]
    sd = tf.reshape(local_sd, [batch, -1])
    body = tf.reshape(mean > BODY_MIN_HU, [batch, -1])
    n_body = tf.reduce_sum(tf.cast(body, tf.int32), axis=1)
    use_all = n_body < MIN_BODY_WINDOWS
    masked = tf.where(body | use_all[:, None], sd, tf.fill(tf.shape(sd), np.float32(np.inf)))
    ordered = tf.sort(masked, axis=1)
    count = tf.where(use_all, tf.shape(sd)[1], n_body)
    index = tf.cast(tf.floor(PERCENTILE * tf.cast(count - 1, tf.float32)), tf.int32)
    return tf.gather(ordered, index, axis=1, batch_dims=1)


def coarse_noise_index_hu(hu: tf.Tensor) -> tf.Tensor:
    """Noise index (HU) of the image averaged over 2x2 pixels, times 2: ``[batch, height, width, 1]`` -> ``[batch]``.

    Why a second figure: white (sharp-kernel) noise halves under a 2x2 average, so this equals
    :func:`noise_index_hu`; noise correlated over neighbouring pixels (a smooth kernel) averages out less, so it
    reads higher.  The fine index reports a smooth kernel's noise far below a sharp kernel's at the same dose
    (``experiments/results/v3_strength.json``: 27 against 54 HU at L143's simulated 25 %), so a noisy smooth-kernel
    scan reads like a quieter sharp-kernel one; the pair is meant to tell them apart.  As a second conditioning
    channel it did not measurably help (the v4 round, ``experiments/results/v4_report.md``).  Needs at least
    ``2 * WINDOW`` pixels a side."""
    hu = tf.cast(hu, tf.float32)
    return 2.0 * noise_index_hu(tf.nn.avg_pool2d(hu, 2, 2, "VALID"))


def noise_index(hu: np.ndarray) -> float:
    """Noise index (HU) of one 2-D slice in HU (numpy in, float out)."""
    image = np.asarray(hu, np.float32)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {image.shape}")
    if min(image.shape) < WINDOW:
        raise ValueError(f"slice {image.shape} is smaller than the {WINDOW}-pixel noise window")
    return float(noise_index_hu(tf.constant(image[None, :, :, None]))[0])
