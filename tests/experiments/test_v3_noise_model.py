"""The v3 noise model's pieces (experiments.v3_noise_model) on tiny arrays: not the full run."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import v3_noise_model as nm


@pytest.fixture(scope="module")
def low():
    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal((2, 16, 16, 1))).astype(np.float32)


def _trained_residual(seed: int = 1):
    """A residual model whose last layer is no longer zero (as after training)."""
    import keras

    keras.utils.set_random_seed(seed)
    model = nm.build_residual(filters=4)
    last = model.layers[-1]
    w, b = last.get_weights()
    last.set_weights([np.random.default_rng(seed).normal(0, 0.1, w.shape).astype(np.float32), b])
    return model


def test_untrained_residual_reproduces_the_physics_input_exactly(low):
    model = nm.build_residual(filters=4)
    hybrid, r = nm.generate(model, low, [0.25, 0.1], [1.0, 0.0])
    assert np.array_equal(np.asarray(hybrid), low) and not np.asarray(r).any()


def test_residual_is_stochastic_and_reproducible_for_a_seed(low):
    model = _trained_residual()
    a, _ = nm.generate(model, low, [0.25, 0.25], [1.0, 1.0])
    b, _ = nm.generate(model, low, [0.25, 0.25], [1.0, 1.0])
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
    c, _ = nm.generate(model, low, [0.25, 0.25], [1.0, 1.0], seed=3)
    d, _ = nm.generate(model, low, [0.25, 0.25], [1.0, 1.0], seed=3)
    assert np.array_equal(np.asarray(c), np.asarray(d))


def test_residual_depends_on_dose_and_kernel_channels(low):
    model = _trained_residual()
    base, _ = nm.generate(model, low, [0.25, 0.25], [1.0, 1.0], seed=3)
    dose, _ = nm.generate(model, low, [0.5, 0.5], [1.0, 1.0], seed=3)
    kernel, _ = nm.generate(model, low, [0.25, 0.25], [0.0, 0.0], seed=3)
    assert not np.allclose(base, dose) and not np.allclose(base, kernel)


def test_critic_input_is_high_pass():
    x = np.full((1, 32, 32, 1), 0.3, np.float32)
    x += np.linspace(0, 0.2, 32, dtype=np.float32)[None, None, :, None]  # smooth ramp: anatomy-like
    smooth = nm.critic_inputs(x, [1.0]).numpy()
    r = int(np.ceil(3 * nm.BLUR_SIGMA))  # away from the reflect-padded border
    assert np.abs(smooth[0, r:-r, r:-r, 0]).max() < 1e-3  # constant and linear trends vanish
    assert np.all(smooth[..., 1] == 1.0)  # the kernel channel
    grain = x + 0.02 * np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    hp = nm.critic_inputs(grain, [0.0]).numpy()
    assert hp[..., 0].std() > 0.3 and np.all(hp[..., 1] == 0.0)  # noise grain kept (x CRITIC_GAIN)


def test_penalty_shrinks_the_residual(low):
    import keras
    import tensorflow as tf

    model = _trained_residual()
    _, r0 = nm.generate(model, low, [0.25, 0.25], [1.0, 1.0], seed=5)
    opt = keras.optimizers.Adam(1e-2)
    for _ in range(30):
        with tf.GradientTape() as tape:
            _, r = nm.generate(model, low, [0.25, 0.25], [1.0, 1.0], training=True)
            loss = nm.residual_penalty(r)
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    _, r1 = nm.generate(model, low, [0.25, 0.25], [1.0, 1.0], seed=5)
    assert float(np.mean(np.square(r1))) < 0.25 * float(np.mean(np.square(r0)))


def test_penalty_weight_is_one_over_the_gap_squared_on_the_model_scale():
    w10, w20 = nm.penalty_weight(10.0), nm.penalty_weight(20.0)
    assert w10 == pytest.approx(4 * w20)
    assert w10 * (10.0 / nm.HU_PER_MODEL_UNIT) ** 2 == pytest.approx(1.0)


def test_spectrum_gap_is_zero_for_equal_noise_and_grows_with_extra_noise():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 10, (8, 32, 32))
    assert nm.spectrum_gap_hu(a, a, 0.7) == 0.0
    extra = a + rng.normal(0, 5, a.shape)
    assert 3.0 < nm.spectrum_gap_hu(a, extra, 0.7) < 8.0


def test_missing_pairs_folder_is_one_line_and_exit_2(tmp_path, capsys):
    code = nm.main(["hybrid", "--work", str(tmp_path / "w"), "--pairs", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "error:" in err


def _noise_entry(sd):
    return {"noise_sd_hu": sd, "nps_mean_freq": 0.3, "spectrum_gap_to_real_hu": 2.0}


def test_report_has_every_condition_kernel_and_the_hybrid_difference():
    scores = {"psnr": [30.0, 32.0], "ssim": [0.8, 0.9], "kernels": ["B30f", "D45f"]}
    per_kernel = nm._per_kernel(scores)
    assert per_kernel["B30f"] == {"slices": 1, "psnr_mean": 30.0, "ssim_mean": 0.8}
    runs = {"physics_seed0": {**scores, "psnr_mean": 31.0, "ssim_mean": 0.85},
            "physics_seed1": {**scores, "psnr": [31.0, 33.0], "psnr_mean": 32.0, "ssim_mean": 0.85}}
    arm = nm._arm_scores(runs, ["physics_seed0", "physics_seed1"])
    assert arm["psnr"] == [30.5, 32.5] and arm["psnr_mean"] == 31.5 and arm["seeds"]["physics_seed1"][0] == 32.0
    better = {**arm, "psnr": [31.0, 33.0], "psnr_mean": 32.0}
    check = {"real": _noise_entry(40.0), "physics": _noise_entry(30.0), "hybrid": _noise_entry(35.0)}
    record = {"seeds_per_arm": 2, "validation_patient": "VAL", "slices": 2,
              "arms": {"physics_seed0": {"steps": 10, "batch": 2, "patch": 96}},
              "noise_model": {"steps": 5, "penalty_weight": 100.0, "cpu_seconds": 60.0,
                              "training_patient_check_after": check},
              "hybrid_pairs": {"residual_rms_hu": {"ramp": 5.0, "hann": 0.5}},
              "validation_noise_check_25": {"B30f": check, "D45f": check},
              "results": {c: {"input": arm, "physics": arm, "hybrid": better} for c in ("real_25", "sim_10")},
              "hybrid_minus_physics": {c: {"psnr": 0.5, "ssim": 0.0, "slices_hybrid_better_psnr": 2}
                                       for c in ("real_25", "sim_10")}}
    text = nm.report(record)
    assert text.count("| | B30f (1) |") == 2 and text.count("| | D45f (1) |") == 2
    assert "real_25 +0.50 dB" in text and "| 40.0 | 30.0 | 35.0 |" in text and "physics_seed1 32.00" in text
    assert "real_25: difference +0.50 dB, widest seed range 1.00 dB: within the seed range, not evidence" in text


def test_residual_by_dose_bins_each_filter():
    rows = [("ramp", 0.06, 30.0), ("ramp", 0.08, 20.0), ("ramp", 0.5, 5.0), ("hann", 0.25, 1.0)]
    out = nm.residual_by_dose(rows)
    assert out["ramp 0.05-0.1"] == 25.0 and out["ramp 0.3-0.5"] == 5.0 and out["hann 0.2-0.3"] == 1.0
    assert out["ramp 0.2-0.3"] is None
