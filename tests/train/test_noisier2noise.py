"""Noisier2Noise targets for the simulated term: an MSE fit on them learns what an MSE fit on the noise-free slice
would, although the reference the stream holds carries the normal dose's own noise."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from ldct_tf import data


def _gain(target: np.ndarray, low: np.ndarray) -> float:
    """The least-squares gain of ``target`` on ``low`` (both zero mean): what an MSE-trained linear denoiser learns."""
    return float(np.mean(target * low) / np.mean(low * low))


@pytest.mark.parametrize("i0", [1.5e5, 6e5])
def test_an_mse_fit_on_noisier2noise_targets_learns_the_noise_free_wiener_gain(i0):
    rng = np.random.default_rng(0)
    dose, normal_i0, shape = 0.25, 5e5, (256, 256)
    ratio = (1 - dose) * normal_i0 / (dose * i0)  # inserted variance over the reference's own
    signal, sigma = 30.0, 20.0
    x = rng.normal(0.0, signal, shape)  # the noise-free slice, never seen by the target
    reference = x + rng.normal(0.0, sigma, shape)  # a normal-dose slice: x plus its own noise
    low = reference + rng.normal(0.0, sigma * np.sqrt(ratio), shape)  # noise inserted by the simulator
    pair = tf.constant(np.stack([low, reference], -1), tf.float32)
    out = data.noisier2noise_target(pair, tf.constant(i0, tf.float32), tf.constant(dose, tf.float32), normal_i0)
    out = out.numpy()
    np.testing.assert_array_equal(out[..., 0], pair.numpy()[..., 0])  # the input is left alone
    wiener = signal ** 2 / (signal ** 2 + sigma ** 2 * (1 + ratio))  # the MSE-optimal gain towards x
    assert _gain(out[..., 1], low) == pytest.approx(wiener, rel=0.03)
    # The plain reference teaches the denoiser to keep the normal dose's own noise: a gain too high by that much.
    kept = (signal ** 2 + sigma ** 2) / (signal ** 2 + sigma ** 2 * (1 + ratio))
    assert _gain(reference, low) == pytest.approx(kept, rel=0.03) and kept > 1.1 * wiener
