"""The CycleGAN training model on tiny fixed batches (real code paths, smoke-sized networks)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from ldct_tf import config, ct
from ldct_tf.models.cyclegan import CycleGAN
from ldct_tf.models.factory import build_cyclegan, compile_cyclegan

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def _batch(seed=0, n=2, size=32):
    rng = np.random.default_rng(seed)
    normal_hu = rng.uniform(-100, 100, (n, size, size, 1)) + np.linspace(-60, 60, size)[None, :, None, None]
    low_hu = normal_hu + rng.normal(0, 40, normal_hu.shape)
    return ct.to_model(low_hu.astype("float32")), ct.to_model(normal_hu.astype("float32"))


@pytest.fixture(scope="module")
def trained():
    cfg = config.load(SMOKE, ["train.generator_lr=1e-3", "train.discriminator_lr=1e-3"])
    keras.utils.set_random_seed(0)
    model = compile_cyclegan(build_cyclegan(cfg), cfg)
    low, normal = _batch()
    history = model.fit(tf.data.Dataset.from_tensors((low, normal)).repeat(), epochs=12, steps_per_epoch=1,
                        verbose=0, shuffle=False)
    return model, history.history, (low, normal)


def test_train_step_reports_every_term_and_lowers_losses(trained):
    model, history, _ = trained
    for name in ("generator_loss", "adversarial_loss", "cycle_loss", "identity_loss", "perceptual_loss",
                 "normal_critic_loss", "low_critic_loss"):
        assert name in history and np.isfinite(history[name]).all()
    for name in ("generator_loss", "normal_critic_loss", "low_critic_loss"):
        assert np.mean(history[name][-4:]) < history[name][0], (name, history[name])
    assert model.steps_done() == 12
    assert all(int(getattr(model, n).iterations) == 12 for n in (
        "generator_optimizer", "inverse_generator_optimizer", "normal_critic_optimizer", "low_critic_optimizer"))


def test_test_step_scores_paired_slices_in_the_abdomen_window(trained):
    model, _, (low, normal) = trained
    results = model.evaluate(tf.data.Dataset.from_tensors((low, normal, np.ones(2, "float32"))), verbose=0,
                             return_dict=True)
    window = ct.window("abdomen")
    a, b = window.to_unit(ct.from_model(low)), window.to_unit(ct.from_model(normal))
    mse = ((a - b) ** 2).reshape(2, -1).mean(axis=1)
    expected_psnr = np.mean(10 * np.log10(1.0 / mse))
    assert results["psnr_input"] == pytest.approx(expected_psnr, abs=1e-3)
    from skimage.metrics import structural_similarity

    # tf.image.ssim uses an 11x11 Gaussian window; skimage with the same settings agrees closely.
    sk = np.mean([structural_similarity(a[i, ..., 0], b[i, ..., 0], data_range=1.0, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False) for i in range(2)])
    assert results["ssim_input"] == pytest.approx(sk, abs=0.02)
    assert np.isfinite(results["psnr"]) and "generator_loss" in results


def test_unpaired_validation_has_no_pair_scores(trained):
    model, _, (low, normal) = trained
    results = model.evaluate(tf.data.Dataset.from_tensors((low, normal)), verbose=0, return_dict=True)
    assert "cycle_loss" in results


def test_call_is_the_denoiser_and_saving_round_trips(trained, tmp_path):
    model, _, (low, _) = trained
    np.testing.assert_array_equal(np.asarray(model(low)), np.asarray(model.low_to_normal(low)))
    model.save(tmp_path / "cyclegan.keras")
    loaded = keras.saving.load_model(tmp_path / "cyclegan.keras")
    assert isinstance(loaded, CycleGAN)
    np.testing.assert_array_equal(np.asarray(loaded(low)), np.asarray(model(low)))
    model.low_to_normal.save(tmp_path / "g.keras")
    np.testing.assert_array_equal(np.asarray(keras.saving.load_model(tmp_path / "g.keras")(low)),
                                  np.asarray(model(low)))


def test_checkpoint_restores_weights_and_optimizer_state(trained, tmp_path):
    from ldct_tf.train import restore_checkpoint, save_checkpoint

    model, _, (low, normal) = trained
    save_checkpoint(model, str(tmp_path / "checkpoints"))
    cfg = config.load(SMOKE)
    fresh = compile_cyclegan(build_cyclegan(cfg), cfg)
    assert restore_checkpoint(fresh, str(tmp_path)) == model.steps_done()
    np.testing.assert_array_equal(np.asarray(fresh(low)), np.asarray(model(low)))
    for a, b in zip(fresh.generator_optimizer.variables, model.generator_optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_frozen_vgg19_is_neither_a_weight_nor_checkpointed(trained, tmp_path):
    model, _, _ = trained
    vgg = model.perceptual.extractor.weights
    assert vgg  # the smoke config has a perceptual term, so there is a VGG19 to keep out
    assert {id(v) for v in vgg}.isdisjoint(id(v) for v in model.weights)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    names = [name for name, _ in tf.train.list_variables(path)]
    assert names and not [n for n in names if "perceptual" in n or "extractor" in n]
    model.save_weights(str(tmp_path / "w.weights.h5"))
    import h5py

    with h5py.File(tmp_path / "w.weights.h5") as f:
        keys: list[str] = []
        f.visit(keys.append)
    assert len([k for k in keys if k.endswith("vars")]) > 0 and not [k for k in keys if "perceptual" in k]


def test_unknown_loss_weight_is_refused():
    cfg = config.load(SMOKE)
    model = build_cyclegan(cfg)
    with pytest.raises(ValueError, match="unknown loss weight 'style'"):
        model.compile(*[keras.optimizers.Adam() for _ in range(4)], loss_weights={"style": 1.0})


def test_patch_size_must_fit_the_depth():
    with pytest.raises(ValueError, match="multiple of 2\\*\\*model.depth"):
        build_cyclegan(config.load(SMOKE, ["data.patch_size=30"]))


@pytest.mark.slow
def test_mixed_precision_step_with_loss_scaling():
    """The mixed_float16 path (meant for GPUs) on the CPU: loss-scaled optimizers, float32 outputs, finite losses."""
    cfg = config.load(SMOKE)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = compile_cyclegan(build_cyclegan(cfg), cfg, loss_scaling=True)
        assert isinstance(model.generator_optimizer, keras.optimizers.LossScaleOptimizer)
        low, normal = _batch(seed=3)
        history = model.fit(tf.data.Dataset.from_tensors((low, normal)).repeat(), epochs=2, steps_per_epoch=1,
                            verbose=0, shuffle=False).history
        assert all(np.isfinite(v).all() for v in history.values())
        assert model(low).dtype == tf.float32
        assert model.steps_done() >= 1
    finally:
        keras.mixed_precision.set_global_policy("float32")
