"""Small real models for tests and the quickstart: the smoke-config generator, made to change its input visibly, and
its export.  Needs a repository checkout (it reads ``configs/smoke.yaml``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def smoke_generator(seed: int = 0):
    """The generator of ``configs/smoke.yaml`` with a noise head strong enough that its output differs from its input
    by tens of HU (an untrained generator is almost the identity, which would let a test pass with the network
    skipped)."""
    import keras

    from ldct_tf import config as config_lib
    from ldct_tf.models.generator import build_generator

    keras.utils.set_random_seed(seed)
    m = config_lib.load(REPO / "configs" / "smoke.yaml").model
    generator = build_generator(m.depth, m.base_filters, m.residual_blocks, m.attention, m.norm, noise_conditional=m.noise_conditional, name="low_to_normal")
    head = generator.get_layer("noise")
    kernel, bias = head.get_weights()
    head.set_weights([np.random.default_rng(seed).normal(0.0, 0.05, kernel.shape).astype(np.float32), bias])
    return generator


def export_test_model(root: Path, name: str = "ldct_denoiser", **kwargs):
    """Export :func:`smoke_generator` to ``root/name/VERSION`` (small warm-up requests); returns (generator,
    version folder).  For tests of anything that needs a real SavedModel (denoise, serving, the notebook)."""
    from ldct_tf.export import export_generator

    generator = smoke_generator()
    kwargs.setdefault("warmup_size", 64)
    kwargs.setdefault("metadata", {"purpose": "test model (smoke config, untrained)"})
    return generator, export_generator(generator, Path(root) / name, **kwargs)
