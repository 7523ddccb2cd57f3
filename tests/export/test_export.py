"""``python -m ldct_tf.export``: TF Serving layout, signatures, in-graph validation, warm-up, models.config, loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from ldct_tf import config as config_lib
from ldct_tf import ct, export, saved_model
from ldct_tf.export import __main__ as export_cli
from tests.conftest import REPO
from ldct_tf.testing.model_server import LoopbackModelServer
from ldct_tf.testing.models import smoke_generator

TRAIN_STEP = 7


def keras_reference(generator, hu: np.ndarray, multiple: int) -> np.ndarray:
    """What the SavedModel must compute, done outside the graph: HU -> model scale, pad bottom/right with air to the
    multiple, generator, crop, model scale -> HU."""
    h, w = hu.shape[1:3]
    x = np.pad(ct.to_model(hu), ((0, 0), (0, -h % multiple), (0, -w % multiple)), constant_values=-1.0)
    y = np.asarray(generator(x[..., None], training=False))[:, :h, :w, 0]
    return ct.from_model(y)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A training run folder laid out as ldct_tf.train writes it, exported with the CLI."""
    run = tmp_path_factory.mktemp("run")
    generator = smoke_generator()
    cfg = config_lib.load(REPO / "configs" / "smoke.yaml")
    generator.save(run / "generator.keras")
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "training_summary.json").write_text(json.dumps({
        "steps": TRAIN_STEP, "seconds": 1.0, "strategy": "MirroredStrategy", "replicas": 1,
        "data": {"counts": {"train": {"low": 3, "normal": 3}}, "patients": {"train": {"low": 1, "normal": 1}}}}))
    root = tmp_path_factory.mktemp("saved_models")
    code = export_cli.main(["--model-dir", str(run), "--output", str(root / "ldct_denoiser"), "--warmup-size", "64"])
    assert code == 0
    return generator, root, root / "ldct_denoiser" / "1", run


def test_layout_metadata_and_config_files(exported):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    _, root, version_dir, _ = exported
    assert (version_dir / "saved_model.pb").exists() and (version_dir / "variables").is_dir()
    meta = json.loads((version_dir / "metadata.json").read_text())
    assert meta["name"] == "ldct_denoiser" and meta["version"] == 1
    assert meta["training"]["step"] == TRAIN_STEP
    assert meta["config"]["model"]["depth"] == 2 and meta["size_multiple"] == 4
    assert meta["data"]["counts"]["train"]["low"] == 3
    assert meta["tensorflow_version"] == tf.__version__ and "ldct_tf_version" in meta
    assert set(meta["signatures"]) == {"serving_default", "denoise_bytes", "denoise_strength",
                                       "denoise_bytes_strength"}
    assert meta["default_strength"] == 1.0 and "input_blend" not in meta
    # No half-written temporary folder is left beside the version.
    assert [p.name for p in (root / "ldct_denoiser").iterdir()] == ["1"]

    config = text_format.Parse((root / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    entries = list(config.model_config_list.config)
    assert [(e.name, e.base_path, e.model_platform) for e in entries] == [
        ("ldct_denoiser", "/models/ldct_denoiser", "tensorflow")]
    batching = (root / "batching_parameters.txt").read_text()
    for key in ("max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_enqueued_batches"):
        assert f"{key} {{ value: " in batching


def test_saved_model_matches_the_generator_on_any_size(exported):
    generator, _, version_dir, _ = exported
    denoiser = export.SavedModelDenoiser(version_dir.parent, batch_size=2)
    assert (denoiser.name, denoiser.version, denoiser.path) == ("ldct_denoiser", 1, version_dir)
    assert denoiser.metadata["training"]["step"] == TRAIN_STEP
    rng = np.random.default_rng(1)
    for shape in [(3, 37, 50), (1, 64, 64)]:  # not a multiple of 4 (padded and cropped inside), and one that is
        hu = rng.normal(40, 60, shape).astype(np.float32)
        hu[:, :4] = -1000.0  # air at the top
        out = denoiser(hu)
        assert out.shape == shape and out.dtype == np.float32
        np.testing.assert_allclose(out, keras_reference(generator, hu, 4), atol=0.05)
        # The network does something (an identity export would pass the comparison above only if it were skipped).
        assert np.abs(out - hu).mean() > 5.0
    single = rng.normal(0, 50, (37, 50)).astype(np.float32)
    np.testing.assert_allclose(denoiser(single), denoiser(single[None, ..., None])[0, ..., 0], atol=1e-4)
    assert denoiser(single[None]).shape == (1, 37, 50)


def test_bad_input_is_an_invalid_argument_inside_the_graph(exported):
    _, _, version_dir, _ = exported
    serve = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    cases = {
        "NaN or Inf": np.array([[[[np.nan]], [[0.0]]]], np.float32),
        "exactly 1 channel": np.zeros((1, 4, 4, 2), np.float32),
        "shape [batch, height, width, 1]": np.zeros((4, 4), np.float32),
        "must be float32 HU of shape": np.zeros((1, 4, 4, 1, 1), np.float32),
        "height and width >= 1": np.zeros((1, 0, 4, 1), np.float32),
    }
    infinite = np.zeros((1, 4, 4, 1), np.float32)
    infinite[0, 1, 1, 0] = np.inf
    cases["NaN or Inf "] = infinite
    for expected, value in cases.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=expected.strip().replace("[", r"\[")):
            serve(hu=tf.constant(value))
    denoiser = export.SavedModelDenoiser(version_dir)
    with pytest.raises(ValueError, match="NaN or Inf") as info:
        denoiser(np.full((8, 8), np.nan, np.float32))
    assert str(version_dir) in str(info.value)
    with pytest.raises(ValueError, match=r"\[H, W\], \[N, H, W\] or \[N, H, W, 1\]"):
        denoiser(np.zeros((1, 8, 8, 3), np.float32))


def test_bytes_signature_raw_int16_and_16bit_png(exported):
    _, _, version_dir, _ = exported
    loaded = tf.saved_model.load(str(version_dir))
    denoise_bytes = loaded.signatures["denoise_bytes"]
    hu = np.rint(np.random.default_rng(2).normal(30, 80, (2, 37, 50))).astype(np.float32)
    expected = loaded.signatures["serving_default"](hu=tf.constant(hu[..., None]))["denoised_hu"].numpy()[..., 0]

    raw = [image.astype("<i2").tobytes() for image in hu]
    out = denoise_bytes(image_bytes=tf.constant(raw), height=tf.constant([37, 37]), width=tf.constant([50, 50]))
    got = np.stack([np.frombuffer(b, "<i2").reshape(37, 50) for b in out["denoised_bytes"].numpy()])
    assert np.abs(got - expected).max() <= 0.5 + 1e-3  # rounding only

    pngs = [tf.io.encode_png((image + saved_model.PNG_HU_OFFSET).astype(np.uint16)[..., None]).numpy()
            for image in hu]
    out = denoise_bytes(image_bytes=tf.constant(pngs), height=tf.constant([0, 37]), width=tf.constant([0, 50]))
    decoded = [tf.io.decode_png(b, dtype=tf.uint16).numpy()[..., 0] for b in out["denoised_bytes"].numpy()]
    got = np.stack(decoded).astype(np.float32) - saved_model.PNG_HU_OFFSET
    assert np.abs(got - expected).max() <= 0.5 + 1e-3

    bad = {
        "2\\*height\\*width bytes": dict(image_bytes=[raw[0][:-2]], height=[37], width=[50]),
        "16-bit greyscale PNG": dict(image_bytes=[tf.io.encode_png(np.zeros((4, 4, 1), np.uint8)).numpy()],
                                     height=[0], width=[0]),
        "PNG height": dict(image_bytes=[pngs[0]], height=[36], width=[50]),
        "same batch size": dict(image_bytes=raw, height=[37], width=[50, 50]),
    }
    for message, args in bad.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            denoise_bytes(image_bytes=tf.constant(args["image_bytes"]), height=tf.constant(args["height"]),
                          width=tf.constant(args["width"]))


def test_warmup_requests_replay_against_the_model(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    _, root, version_dir, _ = exported
    path = version_dir / "assets.extra" / "tf_serving_warmup_requests"
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    signatures = ["serving_default", "denoise_bytes", "denoise_strength", "denoise_bytes_strength"]
    batches = export.allowed_batch_sizes(8)  # the CLI's default --max-batch-size
    assert [log.predict_log.request.model_spec.signature_name for log in logs] == signatures * len(batches)
    server = LoopbackModelServer(root, "ldct_denoiser")
    for i, log in enumerate(logs):
        request = log.predict_log.request
        inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
        _, outputs = server.predict(request.model_spec.name, None, request.model_spec.signature_name, inputs)
        assert all(value.shape[0] == batches[i // len(signatures)] for value in outputs.values())


def test_saved_model_cli_shows_both_signatures(exported):
    _, _, version_dir, _ = exported
    cli = Path(sys.executable).parent / "saved_model_cli"
    if not cli.exists():
        pytest.skip(f"{cli} not installed")
    done = subprocess.run([str(cli), "show", "--all", "--dir", str(version_dir)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    for needle in ("signature_def['serving_default']", "inputs['hu']", "outputs['denoised_hu']",
                   "signature_def['denoise_bytes']", "inputs['image_bytes']", "inputs['height']",
                   "outputs['denoised_bytes']", "DT_STRING", "DT_FLOAT", "DT_INT32",
                   "signature_def['denoise_strength']", "signature_def['denoise_bytes_strength']",
                   "inputs['strength']"):
        assert needle in text, needle
    served = text.split("signature_def['serving_default']")[1].split("Method name")[0]
    assert "shape: (-1, -1, -1, 1)" in served  # denoised_hu: [batch, height, width, 1]


def test_versions_float16_weights_and_resolution(exported, tmp_path):
    generator, root, version_dir, run = exported
    model_folder = version_dir.parent
    # An explicit version that exists is refused (never overwritten).
    assert export_cli.main(["--model-dir", str(run), "--output", str(model_folder), "--version", "1",
                            "--warmup-size", "0"]) == 1
    # Next free version; float16 weights halve the variables and stay within a few HU of float32.
    second = export.export_generator(generator, model_folder, metadata={"note": "half"}, float16_weights=True,
                                     warmup_size=0)
    try:
        assert second == model_folder / "2"
        assert export.resolve_version_dir(model_folder) == second
        assert export.resolve_version_dir(version_dir) == version_dir

        def size(folder: Path) -> int:
            return sum(p.stat().st_size for p in (folder / "variables").iterdir())

        assert size(second) < 0.6 * size(version_dir)
        hu = np.random.default_rng(3).normal(0, 60, (1, 32, 40)).astype(np.float32)
        half, full = export.SavedModelDenoiser(second), export.SavedModelDenoiser(version_dir)
        assert half.version == 2 and half.metadata["float16_weights"] and half.metadata["note"] == "half"
        assert np.abs(half(hu) - full(hu)).max() < 5.0
    finally:
        shutil.rmtree(second, ignore_errors=True)  # keep the module's model folder at one version

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        export.resolve_version_dir(empty)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        export.resolve_version_dir(tmp_path / "missing")


def test_cli_reports_a_run_without_a_generator(tmp_path, capsys):
    assert export_cli.main(["--model-dir", str(tmp_path), "--output", str(tmp_path / "out")]) == 1
    assert "generator.keras" in capsys.readouterr().err


def test_real_ct_slice(exported, shared_data):
    from ldct_tf import dicom

    generator, _, version_dir, _ = exported
    pairs = (shared_data / "mayo_pairs" / "pairs.csv").read_text().splitlines()
    header = pairs[0].split(",")
    row = dict(zip(header, pairs[1].split(",")))
    hu, _ = dicom.read_slice(shared_data / "mayo_pairs" / row["quarter_dose"])
    out = export.SavedModelDenoiser(version_dir)(hu)
    assert out.shape == hu.shape == (512, 512)
    np.testing.assert_allclose(out, keras_reference(generator, hu[None], 4)[0], atol=0.05)


def test_inputs_below_the_minimum_size_are_refused_in_both_signatures(exported):
    _, _, version_dir, _ = exported
    meta = json.loads((version_dir / "metadata.json").read_text())
    assert meta["min_size"] == 8 == 2 * meta["size_multiple"]
    loaded = tf.saved_model.load(str(version_dir))
    serve, denoise_bytes = loaded.signatures["serving_default"], loaded.signatures["denoise_bytes"]
    for shape in [(1, 3, 3, 1), (1, 1, 1, 1), (2, 7, 40, 1), (1, 40, 7, 1)]:
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            serve(hu=tf.zeros(shape))
        assert saved_model.graph_error_message(info.value.message) == (
            "input 'hu' is smaller than the model's minimum of 8x8 pixels (height and width must be >= 8; send whole "
            f"slices); got shape [{' '.join(map(str, shape))}]")
    assert serve(hu=tf.zeros((1, 8, 8, 1)))["denoised_hu"].shape == (1, 8, 8, 1)
    raw = np.zeros((3, 3), "<i2").tobytes()
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        denoise_bytes(image_bytes=tf.constant([raw]), height=tf.constant([3]), width=tf.constant([3]))
    assert saved_model.graph_error_message(info.value.message).startswith(
        "input 'image_bytes' is smaller than the model's minimum of 8x8 pixels")
    with pytest.raises(ValueError, match="smaller than the model's minimum of 8x8 pixels") as info:
        export.SavedModelDenoiser(version_dir)(np.zeros((3, 3), np.float32))
    assert "Graph execution error" not in str(info.value) and "assertion failed" not in str(info.value)


def test_at_the_size_multiple_the_bottleneck_sees_nothing():
    """Why the minimum is twice the size multiple: at the multiple the coarsest map is 1x1 and instance normalisation
    turns every input into the same features; one level larger they differ."""
    import keras

    generator = smoke_generator()
    bottleneck = keras.Model(generator.input, generator.get_layer("enc1_down").output)  # smoke: depth 2, multiple 4
    rng = np.random.default_rng(4)
    for size, same in ((4, True), (8, False)):
        a, b = (rng.uniform(-1, 1, (1, size, size, 1)).astype(np.float32) for _ in range(2))
        fa, fb = np.asarray(bottleneck(a)), np.asarray(bottleneck(b))
        assert fa.shape[1:3] == (size // 4, size // 4)
        assert np.allclose(fa, fb, atol=1e-5) == same, size


def test_warmup_size_below_the_minimum_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="warmup_size 4 is below the model's minimum input size 8"):
        export.export_generator(smoke_generator(), tmp_path / "m", warmup_size=4)
    assert not (tmp_path / "m").exists()


def _strength_input(rng) -> np.ndarray:
    """HU slices with padding outside the scan circle (-3024, below the clip range) and a value that float32
    arithmetic would round (strength 0 must return every value bit for bit)."""
    hu = rng.normal(40, 60, (2, 32, 40, 1)).astype(np.float32)
    hu[:, :3] = -3024.0
    hu[0, 10, 10, 0] = np.float32(1234.5678)
    return hu


def test_strength_0_is_the_input_1_the_network_output_and_between_a_mix(exported):
    _, _, version_dir, _ = exported
    loaded = tf.saved_model.load(str(version_dir))
    serve, with_strength = loaded.signatures["serving_default"], loaded.signatures["denoise_strength"]
    hu = _strength_input(np.random.default_rng(5))
    network = serve(hu=tf.constant(hu))["denoised_hu"].numpy()
    assert np.abs(network - hu).mean() > 5.0  # the network changes the image, so 0 and 1 differ

    def run(strength):
        return with_strength(hu=tf.constant(hu), strength=tf.constant(strength, tf.float32))["denoised_hu"].numpy()

    assert run(0.0).tobytes() == hu.tobytes()  # bit for bit, padding included
    assert run(1.0).tobytes() == network.tobytes()
    np.testing.assert_allclose(run(0.5), (hu + network) / 2, atol=1e-3)
    np.testing.assert_allclose(run(0.25), hu + 0.25 * (network - hu), atol=1e-3)
    per_slice = run([0.0, 1.0])  # one strength per slice
    assert per_slice[0].tobytes() == hu[0].tobytes() and per_slice[1].tobytes() == network[1].tobytes()
    # The bytes signature: strength 0 returns the int16 input unchanged.
    raw = [image.astype("<i2").tobytes() for image in np.rint(hu[..., 0]).astype(np.int16)]
    out = loaded.signatures["denoise_bytes_strength"](image_bytes=tf.constant(raw), height=tf.constant([32, 32]),
                                                      width=tf.constant([40, 40]), strength=tf.constant(0.0))
    assert list(out["denoised_bytes"].numpy()) == raw
    # The Python denoiser: the same figures, with the strength per denoiser or per call.
    denoiser = export.SavedModelDenoiser(version_dir, strength=0.0)
    assert denoiser.default_strength == 1.0 and denoiser.strength == 0.0
    assert denoiser(hu).tobytes() == hu.tobytes()
    assert denoiser(hu, strength=1.0).tobytes() == network.tobytes()
    np.testing.assert_allclose(denoiser(hu, strength=0.5), run(0.5), atol=1e-4)


def test_strength_outside_0_1_is_refused(exported):
    _, _, version_dir, _ = exported
    loaded = tf.saved_model.load(str(version_dir))
    with_strength = loaded.signatures["denoise_strength"]
    hu = tf.zeros((2, 8, 8, 1))
    for bad in (1.5, -0.1, np.nan, np.inf, [0.5, 0.5, 0.5], [[0.5]]):
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            with_strength(hu=hu, strength=tf.constant(bad, tf.float32))
        assert saved_model.graph_error_message(info.value.message).startswith(
            "input 'strength' must be a finite float32 in [0, 1], a scalar or one per slice [batch]; got"), bad
    for bad in (1.5, -0.1, float("nan"), float("inf"), "high"):
        with pytest.raises(ValueError, match=r"strength must be a (finite )?number in \[0, 1\], got"):
            export.SavedModelDenoiser(version_dir, strength=bad)
        with pytest.raises(ValueError, match=r"strength must be a (finite )?number in \[0, 1\], got"):
            export.SavedModelDenoiser(version_dir)(np.zeros((8, 8), np.float32), strength=bad)


def test_default_strength_replaces_the_input_blend(exported, tmp_path, capsys):
    _, _, version_dir, run = exported
    full = export.SavedModelDenoiser(version_dir)
    code = export_cli.main(["--model-dir", str(run), "--output", str(tmp_path / "soft"), "--warmup-size", "0",
                        "--serving-base", str(tmp_path), "--default-strength", "0.75"])
    assert code == 0
    soft = export.SavedModelDenoiser(tmp_path / "soft")
    assert soft.metadata["default_strength"] == 0.75 == soft.strength
    hu = _strength_input(np.random.default_rng(6))[..., 0]
    np.testing.assert_allclose(soft(hu), full(hu, strength=0.75), atol=1e-3)
    assert np.abs(soft(hu) - full(hu)).mean() > 1.0
    assert soft(hu, strength=1.0).tobytes() == full(hu).tobytes()  # the other strengths stay reachable
    # A default outside [0, 1] is one line and writes nothing; the old flag is gone (a usage error).
    assert export_cli.main(["--model-dir", str(run), "--output", str(tmp_path / "bad"), "--default-strength", "1.2"]) == 1
    assert "default_strength must be a finite number in [0, 1], got 1.2" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as info:
        export_cli.main(["--model-dir", str(run), "--output", str(tmp_path / "bad"), "--input-blend", "0.25"])
    assert info.value.code == 2 and "--input-blend" in capsys.readouterr().err


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_the_default_output_is_inside_the_run_and_never_touches_saved_models(exported, capsys):
    from ldct_tf.export import paths

    _, _, _, run = exported
    before = _tree(paths.SHIPPED_ROOT)
    capsys.readouterr()
    assert export_cli.main(["--model-dir", str(run), "--warmup-size", "0"]) == 0
    out = capsys.readouterr().out
    assert (run / "export" / "ldct_denoiser" / "1" / "saved_model.pb").exists()
    assert (run / "export" / "models.config").exists()
    assert _tree(paths.SHIPPED_ROOT) == before
    assert "Resolved config" not in out  # only with --verbose


def test_an_output_inside_saved_models_needs_replace_default_model(exported, capsys):
    from ldct_tf.export import paths

    _, _, _, run = exported
    target = paths.SHIPPED_ROOT / "nu_cli_test_model"
    assert export_cli.main(["--model-dir", str(run), "--output", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--replace-default-model" in err and str(target) in err
    assert not target.exists()


def test_output_folder_rule(tmp_path):
    from ldct_tf.export.paths import ExportTargetError, output_folder

    shipped = tmp_path / "saved_models"
    assert output_folder("runs/a", "m", shipped_root=shipped) == Path("runs/a/export/m")
    assert output_folder("runs/a", "m", tmp_path / "elsewhere", shipped_root=shipped) == tmp_path / "elsewhere"
    assert output_folder("runs/a", "m", replace_default_model=True, shipped_root=shipped) == shipped / "m"
    with pytest.raises(ExportTargetError, match="replace-default-model"):
        output_folder("runs/a", "m", shipped / "m", shipped_root=shipped)
