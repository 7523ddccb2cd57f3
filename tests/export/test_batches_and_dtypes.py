"""Serving at scale: slices of different sizes in one batch, warm-up for every batch size, float16 compute."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from ldct_tf import config as config_lib
from ldct_tf import export, saved_model
from ldct_tf.export import __main__ as export_cli
from ldct_tf.testing.models import smoke_generator
from tests.conftest import REPO


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved_models")
    version = export.export_generator(smoke_generator(), root / "m", warmup_size=16, max_batch_size=4)
    return version


def _bytes_call(version, images):
    loaded = tf.saved_model.load(str(version))
    fn = loaded.signatures[saved_model.BYTES_SIGNATURE]
    out = fn(**{saved_model.BYTES_INPUT: tf.constant([saved_model.int16_bytes(i) for i in images]),
                saved_model.HEIGHT_INPUT: tf.constant([i.shape[0] for i in images], tf.int32),
                saved_model.WIDTH_INPUT: tf.constant([i.shape[1] for i in images], tf.int32)})
    return [saved_model.from_int16_bytes(b, i.shape[0], i.shape[1])
            for b, i in zip(out[saved_model.BYTES_OUTPUT].numpy(), images)]


def test_slices_of_different_sizes_share_a_bytes_batch(model_dir):
    rng = np.random.default_rng(0)
    small = rng.normal(40, 30, (16, 24)).astype(np.int16).astype(np.float32)
    large = rng.normal(40, 30, (32, 40)).astype(np.int16).astype(np.float32)
    mixed_small, mixed_large = _bytes_call(model_dir, [small, large])
    assert mixed_small.shape == small.shape and mixed_large.shape == large.shape
    # The large slice is the batch's size: nothing changes for it.
    np.testing.assert_allclose(mixed_large, _bytes_call(model_dir, [large])[0], atol=1)  # int16 rounding
    # The small one is what it gives when padded with air to the batch's size by hand, cropped back.
    padded = np.full(large.shape, -1024.0, np.float32)
    padded[:16, :24] = small
    np.testing.assert_allclose(mixed_small, _bytes_call(model_dir, [padded])[0][:16, :24], atol=1)
    assert np.abs(mixed_small - small).max() > 1  # the network ran


def test_a_too_small_slice_in_a_mixed_batch_is_refused(model_dir):
    with pytest.raises(tf.errors.InvalidArgumentError, match="smaller than the model.*minimum of 8x8"):
        _bytes_call(model_dir, [np.zeros((4, 4), np.float32), np.zeros((32, 32), np.float32)])


def test_warmup_covers_every_allowed_batch_size(model_dir):
    from tensorflow_serving.apis import prediction_log_pb2

    batching = (model_dir.parent.parent / export.BATCHING_FILE).read_text()
    allowed = [int(line.split(":")[1]) for line in batching.splitlines() if line.startswith("allowed_batch_sizes")]
    assert allowed == [1, 2, 4] == json.loads((model_dir / saved_model.METADATA_FILE).read_text())["warmup_batch_sizes"]
    loaded = tf.saved_model.load(str(model_dir))
    seen = set()
    for record in tf.data.TFRecordDataset(str(model_dir / export.WARMUP_FILE)):
        request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        out = loaded.signatures[request.model_spec.signature_name](**inputs)
        batch = next(iter(out.values())).shape[0]
        seen.add((request.model_spec.signature_name, batch))
    assert seen == {(s, b) for s in saved_model.SIGNATURES for b in allowed}
    assert (model_dir / export.WARMUP_FILE).stat().st_size < 20_000  # repeated-value protos and PNGs stay small


def test_float16_compute_stays_close_to_float32(tmp_path):
    generator = smoke_generator()
    hu = np.random.default_rng(1).normal(0, 200, (2, 32, 32, 1)).astype(np.float32)
    results = {}
    for dtype in ("float32", "float16"):
        version = export.export_generator(generator, tmp_path / dtype, warmup_size=0, serving_base=None,
                                          compute_dtype=dtype)
        assert json.loads((version / saved_model.METADATA_FILE).read_text())["compute_dtype"] == dtype
        results[dtype] = tf.saved_model.load(str(version)).signatures["serving_default"](hu=tf.constant(hu))
    a, b = (results[d][saved_model.HU_OUTPUT].numpy() for d in ("float32", "float16"))
    assert b.dtype == np.float32
    assert 0 < np.abs(a - b).max() < 5.0  # float16 really ran, within a few HU


def test_bfloat16_is_refused_with_the_reason(tmp_path, capsys):
    with pytest.raises(export.ExportError, match="bfloat16 is refused: .*water sits at -0.5"):
        export.export_generator(smoke_generator(), tmp_path / "m", compute_dtype="bfloat16")
    assert not (tmp_path / "m").exists()
    run = tmp_path / "run"
    run.mkdir()
    smoke_generator().save(run / "generator.keras")
    (run / "config.yaml").write_text(config_lib.load(REPO / "configs" / "smoke.yaml").to_yaml())
    code = export_cli.main(["--model-dir", str(run), "--output", str(tmp_path / "o"), "--compute-dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert code == 1 and "bfloat16 is refused" in err and "Traceback" not in err
