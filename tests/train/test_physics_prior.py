"""The physics noise prior inside the CycleGAN: critics without normalisation, the simulated-pair term, the
simulated-pair Beam stage and stream, and training on it end to end."""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from ldct_tf import config
from tests.conftest import REPO, with_simulated_stream

SMOKE = REPO / "configs" / "smoke.yaml"
NORM_LAYERS = (keras.layers.GroupNormalization, keras.layers.BatchNormalization)


def _norm_layers(model: keras.Model) -> list:
    found = []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, NORM_LAYERS):
            found.append(layer)
    return found


def _build(overrides=()):
    from ldct_tf.models.factory import build_cyclegan, compile_cyclegan

    cfg = config.load(SMOKE, list(overrides))
    return compile_cyclegan(build_cyclegan(cfg), cfg), cfg


def test_disc_norm_none_in_yaml_builds_critics_without_normalisation(tmp_path):
    text = SMOKE.read_text().replace("  disc_layers: 2\n", "  disc_layers: 2\n  disc_norm: none\n")
    (tmp_path / "c.yaml").write_text(text)
    cfg = config.load(tmp_path / "c.yaml")
    assert cfg.model.disc_norm == "none" and cfg.model.critic_norm == "none"
    from ldct_tf.models.factory import build_cyclegan

    model = build_cyclegan(cfg)
    assert _norm_layers(model.normal_critic) == [] and _norm_layers(model.low_critic) == []
    assert _norm_layers(model.low_to_normal)  # the generator keeps model.norm (instance)
    same = build_cyclegan(config.load(SMOKE))  # default "same": the critics follow model.norm
    assert _norm_layers(same.normal_critic)


def _smooth_images(rng, n, size=32):
    """Smooth random "anatomy" on the model scale: the noise-free targets."""
    from scipy import ndimage

    base = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), (0, 3, 3)) * 4.0 - 0.45
    return base[..., None].astype("float32")


@pytest.mark.parametrize("pixel_loss", ["mse", "mse_gradient"])
def test_simulated_term_alone_trains_a_tiny_denoiser_on_synthetic_noise(pixel_loss):
    model, _ = _build(["loss.adversarial=0", "loss.cycle=0", "loss.identity=0", "loss.perceptual=0",
                       "loss.simulated=1", f"loss.simulated_loss={pixel_loss}", "train.generator_lr=3e-3",
                       "train.beta_1=0.9"])
    assert model.supervised_only
    rng = np.random.default_rng(0)
    critic_before = [w.copy() for w in model.normal_critic.get_weights()]
    inverse_before = [w.copy() for w in model.normal_to_low.get_weights()]
    step = tf.function(model.train_step)
    unused = tf.zeros((4, 32, 32, 1))
    for _ in range(150):
        clean = _smooth_images(rng, 8)
        noisy = clean + rng.normal(0, 0.05, clean.shape).astype("float32")
        logs = step((unused, unused, tf.constant(noisy), tf.constant(clean)))
    assert float(logs["simulated_loss"]) > 0 and float(logs["adversarial_loss"]) == 0
    clean = _smooth_images(np.random.default_rng(99), 8)
    noisy = clean + np.random.default_rng(98).normal(0, 0.05, clean.shape).astype("float32")
    denoised = model.low_to_normal(noisy).numpy()
    assert np.mean((denoised - clean) ** 2) < 0.5 * np.mean((noisy - clean) ** 2)
    # Supervised-only: the inverse generator and the critics are never updated.
    for a, b in zip(critic_before, model.normal_critic.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(inverse_before, model.normal_to_low.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_gradient_term_charges_blur_more_than_an_offset_of_equal_mse():
    """The ``mse_gradient`` loss's extra term: zero for equal images, and a blurred edge costs more than a uniform
    offset with the same MSE, which plain MSE cannot tell apart."""
    from scipy import ndimage

    from ldct_tf.models.losses import gradient_mse_loss, mse_loss

    edge = np.zeros((1, 32, 32, 1), np.float32)
    edge[:, :, 16:] = 1.0
    blurred = ndimage.gaussian_filter1d(edge, 1.5, axis=2).astype(np.float32)
    offset = edge + np.sqrt(np.mean((blurred - edge) ** 2)).astype(np.float32)
    assert float(mse_loss(edge, blurred)) == pytest.approx(float(mse_loss(edge, offset)), rel=1e-4)
    assert float(gradient_mse_loss(edge, edge)) == 0.0
    assert float(gradient_mse_loss(edge, offset)) < 1e-6 < float(gradient_mse_loss(edge, blurred))


def test_gradient_weight_scales_only_the_gradient_part_of_mse_gradient():
    """``loss.gradient_weight`` w makes the simulated term MSE + w x gradient MSE (0 = plain MSE), computed on the
    generator's own output for the same simulated batch."""
    from ldct_tf.models.losses import gradient_mse_loss, mse_loss

    rng = np.random.default_rng(2)
    low, ref = (tf.constant(_smooth_images(rng, 2)) for _ in range(2))
    plain, _ = _build(["loss.simulated=1", "loss.simulated_loss=mse_gradient", "loss.gradient_weight=0"])
    weighted, _ = _build(["loss.simulated=1", "loss.simulated_loss=mse_gradient", "loss.gradient_weight=3"])
    weighted.low_to_normal.set_weights(plain.low_to_normal.get_weights())
    denoised = plain.low_to_normal(low, training=False)
    mse, grad = float(mse_loss(ref, denoised)), float(gradient_mse_loss(ref, denoised))
    terms = {w: float(m._simulated_term(low, ref, training=False)) for w, m in ((0.0, plain), (3.0, weighted))}
    assert grad > 0
    assert terms[0.0] == pytest.approx(mse, rel=1e-5)
    assert terms[3.0] == pytest.approx(mse + 3 * grad, rel=1e-5)


def test_hybrid_step_adds_the_simulated_term_to_the_unpaired_terms():
    model, _ = _build(["loss.perceptual=0", "loss.simulated=2"])
    assert not model.supervised_only
    rng = np.random.default_rng(1)
    batch = [tf.constant(_smooth_images(rng, 2)) for _ in range(4)]
    inverse_before = [w.copy() for w in model.normal_to_low.get_weights()]
    logs = {k: float(v) for k, v in model.train_step(tuple(batch)).items()}
    assert logs["simulated_loss"] > 0 and logs["cycle_loss"] > 0 and logs["adversarial_loss"] > 0
    expected = (logs["adversarial_loss"] + 10 * logs["cycle_loss"] + 5 * logs["identity_loss"]
                + 2 * logs["simulated_loss"])
    assert logs["generator_loss"] == pytest.approx(expected, rel=1e-4)
    assert any(not np.array_equal(a, b) for a, b in zip(inverse_before, model.normal_to_low.get_weights()))
    # Without simulated pairs in the batch the term is 0, the rest unchanged in kind: the pure CycleGAN.
    model.reset_metrics()  # the trackers are running means
    logs2 = {k: float(v) for k, v in model.train_step(tuple(batch[:2])).items()}
    assert logs2["simulated_loss"] == 0 and logs2["cycle_loss"] > 0


def test_supervised_only_without_pairs_is_refused():
    model, _ = _build(["loss.adversarial=0", "loss.cycle=0", "loss.identity=0", "loss.perceptual=0",
                       "loss.simulated=1"])
    x = tf.zeros((2, 32, 32, 1))
    with pytest.raises(ValueError, match="simulated pairs"):
        model.train_step((x, x))


@pytest.fixture(scope="module")
def simulated_shards(sample_run, tmp_path_factory):
    """A copy of the session's pipeline output (never modify the shared one) with a simulated stream."""
    from ldct_tf.pipeline import simulate_pairs  # noqa: F401

    source, _ = sample_run
    return with_simulated_stream(source, tmp_path_factory.mktemp("sim"), realisations=2)


def test_simulate_pairs_stage_writes_a_readable_deterministic_stream(simulated_shards):
    from ldct_tf import data, records
    from ldct_tf.pipeline import simulate_pairs  # noqa: F401
    from ldct_tf.simulate import __main__ as simulate_cli

    shards, entry, cal = simulated_shards
    manifest = data.read_manifest(str(shards))
    normal = data.slice_count(manifest, "train", "normal")
    assert entry["pairs"] == 2 * normal and data.simulated_pair_count(manifest) == 2 * normal
    assert manifest["simulated"]["train"]["realisations"] == 2
    files = sorted((shards / "train").glob("simulated-*.tfrecord.gz"))
    pairs = [records.parse_simulated(x)[0].numpy() for x in tf.data.TFRecordDataset([str(f) for f in files], "GZIP")]
    assert len(pairs) == 2 * normal
    for pair in pairs:
        added = pair[..., 0] - pair[..., 1]
        assert 1.0 < added[pair[..., 1] > -500].std() < 500.0  # noise was added inside the body, only noise
    i0s = {float(m["i0"]) for _, m in (records.parse_simulated(x) for x in
                                        tf.data.TFRecordDataset([str(f) for f in files], "GZIP"))}
    assert len(i0s) > 1 and all(1e5 <= v <= 4e5 for v in i0s)  # drawn across the calibrated range
    # By default the reference is the normal-dose slice itself (noise insertion), not its blurred projector round trip.
    normal_files = sorted((shards / "train").glob("normal-*.tfrecord.gz"))
    sources = {records.decode_numpy(x.numpy())["image"].astype(np.int16).tobytes()
               for x in tf.data.TFRecordDataset([str(f) for f in normal_files], "GZIP")}
    assert manifest["simulated"]["train"]["reference"] == "original"
    assert all(p[..., 1].astype(np.int16).tobytes() in sources for p in pairs)
    first = sorted(p.tobytes() for p in pairs)
    # A second run refuses to mix streams without --overwrite, and with it writes the same pairs again.
    with pytest.raises(ValueError, match="--overwrite"):
        simulate_cli.pairs(["--data", str(shards), "--calibration", str(cal), "--realisations", "2"])
    simulate_cli.pairs(["--data", str(shards), "--calibration", str(cal), "--realisations", "2", "--overwrite"])
    files = sorted((shards / "train").glob("simulated-*.tfrecord.gz"))
    again = sorted(records.parse_simulated(x)[0].numpy().tobytes()
                   for x in tf.data.TFRecordDataset([str(f) for f in files], "GZIP"))
    assert again == first
    # The stream: aligned (low, reference) patches.
    low, ref = next(iter(data.simulated_pair_stream(str(shards), 32, 4, min_tissue_fraction=0.0, seed=0)))
    assert low.shape == ref.shape == (4, 32, 32, 1)
    assert float(tf.reduce_max(tf.abs(low - ref))) > 0


def test_training_with_the_simulated_term_and_a_warm_start(simulated_shards, tmp_path):
    from ldct_tf import train
    from ldct_tf.pipeline import simulate_pairs  # noqa: F401
    from ldct_tf.simulate import __main__ as simulate_cli

    shards, _, cal = simulated_shards
    pre = config.load(SMOKE, ["loss.adversarial=0", "loss.cycle=0", "loss.identity=0", "loss.perceptual=0",
                              "loss.simulated=1", "train.steps=2", "train.simulated_batch_size=4"])
    first = train.run(pre, str(shards), str(tmp_path / "pre"), verbose=0)
    assert first["steps"] == 2 and first["data"]["simulated"]["train"]["pairs"] > 0
    assert first["final_metrics"]["train"]["simulated_loss"] > 0
    # Noisier2Noise targets train on a single-texture stream of the slices themselves; the mixed stream is refused.
    n2n = config.load(SMOKE, ["loss.adversarial=0", "loss.cycle=0", "loss.identity=0", "loss.perceptual=0",
                              "loss.simulated=1", "train.steps=1", "train.simulated_batch_size=4",
                              "loss.noisier2noise_i0=4e5"])
    with pytest.raises(train.TrainingError, match="--textures fitted"):
        train.run(n2n, str(shards), str(tmp_path / "n2n_mixed"), verbose=0)
    assert not (tmp_path / "n2n_mixed").exists()  # refused before the model folder is made
    fitted = shards.parent / "fitted"
    shutil.copytree(shards, fitted)
    simulate_cli.pairs(["--data", str(fitted), "--calibration", str(cal), "--realisations", "2", "--textures", "fitted",
                        "--overwrite"])
    summary = train.run(n2n, str(fitted), str(tmp_path / "n2n"), verbose=0)
    assert summary["final_metrics"]["train"]["simulated_loss"] > 0
    hybrid = config.load(SMOKE, ["loss.perceptual=0", "loss.simulated=1", "train.steps=1", "data.kernel_matched=true",
                                 f"train.init_from={tmp_path / 'pre'}"])
    second = train.run(hybrid, str(shards), str(tmp_path / "hybrid"), verbose=0)
    assert second["init_from"] == str(tmp_path / "pre")
    assert second["final_metrics"]["train"]["cycle_loss"] > 0
    # Without simulated pairs a simulated weight is refused with one line.
    source = shards.parent / "plain"
    shutil.copytree(shards, source)
    for f in (source / "train").glob("simulated-*"):
        f.unlink()
    manifest = json.loads((source / "manifest.json").read_text())
    manifest.pop("simulated")
    (source / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(train.TrainingError, match="simulate pairs"):
        train.run(hybrid, str(source), str(tmp_path / "none"), verbose=0)
    # Noisier2Noise targets need the original slice as the reference: a projected stream is refused with one line.
    projected = shards.parent / "projected"
    shutil.copytree(fitted, projected)
    simulate_cli.pairs(["--data", str(projected), "--calibration", str(cal), "--realisations", "1", "--textures",
                        "fitted", "--reference", "projected", "--overwrite"])
    with pytest.raises(train.TrainingError, match="these have --reference projected"):
        train.run(n2n, str(projected), str(tmp_path / "n2n_projected"), verbose=0)


def test_evaluate_simulate_uses_the_calibrated_level(sample, tmp_path):
    """``evaluate --simulate`` simulates with the calibration's i0 (the shipped file by default), not 1e5."""
    from ldct_tf import evaluate
    from ldct_tf.evaluate import __main__ as evaluate_cli
    from ldct_tf.simulate import calibration

    shipped = calibration.load(evaluate.DEFAULT_CALIBRATION)
    assert evaluate_cli.build_parser().parse_args(["--normal", "x", "--simulate", "0.25"]).calibration == str(
        evaluate.DEFAULT_CALIBRATION)
    path = sample.files["normal"][0]
    plain = evaluate.simulated_pairs([path], 0.25, seed=0)[0]
    calibrated = evaluate.simulated_pairs([path], 0.25, seed=0, calibration=shipped)[0]
    ratio = np.std(plain.low - plain.normal) / np.std(calibrated.low - calibrated.normal)
    i0 = calibration.simulation_parameters(shipped, "unknown kernel")["i0"]
    assert i0 > 2e5 and ratio == pytest.approx(np.sqrt(i0 / 1e5), rel=0.2)


def test_mixed_textures_alternate_the_fitted_filter_with_the_other_calibrated_ones():
    from ldct_tf.simulate import calibration
    from ldct_tf.pipeline.simulate_pairs import texture_of

    base = {"i0": 4e5, "i0_range": [1e5, 6e5], "filter_name": "ramp", "dose_fraction": 0.25,
            "electronic_noise": 10.0, "noise_model": "insert"}
    cal = {"kernels": {"D45f": {**base, "filters": {"ramp": {"i0": 4e5, "i0_range": [1e5, 6e5]},
                                                    "hann": {"i0": 2e5, "i0_range": [5e4, 3e5]},
                                                    "cosine": {"i0": 3e5, "i0_range": [7e4, 4e5]}}}},
           "default_kernel": "D45f"}
    variants = calibration.texture_variants(cal, "B30f")  # not calibrated: the default kernel's textures
    assert [v["filter_name"] for v in variants] == ["ramp", "cosine", "hann"]
    assert variants[2]["i0"] == 2e5 and variants[2]["i0_range"] == [5e4, 3e5]
    assert [texture_of(variants, k)["filter_name"] for k in range(6)] == ["ramp", "cosine", "ramp", "hann", "ramp",
                                                                          "cosine"]
    single = calibration.texture_variants({"kernels": {"D45f": base}, "default_kernel": "D45f"}, "D45f")
    assert [texture_of(single, k)["filter_name"] for k in range(3)] == ["ramp"] * 3
