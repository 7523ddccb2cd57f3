"""Training at scale without a cluster: batch checks per stream, the learning-rate rule, per-worker input, and the
simulated stream's memory."""

from __future__ import annotations

import json

import pytest
import tensorflow as tf

from ldct_tf import config, data, records
from ldct_tf.train import TrainingError, check_batches


@pytest.mark.parametrize("overrides, replicas, message", [
    (["train.batch_size=3"], 2, "train.batch_size 3 must be a multiple of the 2 replicas"),
    (["train.batch_size=1"], 2, "train.batch_size 1 must be a multiple of the 2 replicas (at least one sample"),
    (["loss.simulated=1", "train.simulated_batch_size=3"], 2, "train.simulated_batch_size 3 must be a multiple"),
    (["loss.simulated=1", "train.batch_size=2", "train.simulated_batch_size=4"], 4, "train.batch_size 2 must"),
])
def test_every_streams_batch_must_split_evenly_over_the_replicas(overrides, replicas, message):
    with pytest.raises(TrainingError, match=message.replace("(", r"\(")) as caught:
        check_batches(config.load(None, overrides), replicas)
    assert "\n" not in str(caught.value)


def test_even_batches_pass_and_the_simulated_stream_counts_only_when_used():
    check_batches(config.load(None, ["train.batch_size=4", "loss.simulated=1", "train.simulated_batch_size=2"]), 2)
    check_batches(config.load(None, ["train.batch_size=4", "train.simulated_batch_size=3"]), 2)  # simulated off
    check_batches(config.load(None, ["train.batch_size=3"]), 1)


@pytest.mark.parametrize("rule, expected", [("none", 2e-4), ("linear", 8e-4), ("sqrt", 4e-4)])
def test_learning_rate_rule_for_the_global_batch(rule, expected):
    cfg = config.load(None, [f"train.lr_scaling={rule}", "train.lr_reference_batch=4", "train.batch_size=16"])
    assert config.scaled_learning_rate(2e-4, cfg.train) == pytest.approx(expected)


def test_learning_rate_rule_reaches_the_optimizers():
    from ldct_tf.models.factory import build_cyclegan, compile_cyclegan

    cfg = config.load(None, ["train.lr_scaling=linear", "train.lr_reference_batch=2", "train.batch_size=4",
                             "model.depth=1", "model.base_filters=2", "model.residual_blocks=0", "model.disc_filters=2",
                             "model.disc_layers=1", "loss.perceptual=0", "data.patch_size=8"])
    model = compile_cyclegan(build_cyclegan(cfg), cfg)
    assert float(model.generator_optimizer.learning_rate) == pytest.approx(2 * cfg.train.generator_lr)
    assert float(model.low_critic_optimizer.learning_rate) == pytest.approx(2 * cfg.train.discriminator_lr)


@pytest.mark.parametrize("key, value", [("steps_per_execution", 0), ("lr_scaling", "cubic"),
                                        ("lr_reference_batch", 0)])
def test_new_train_keys_are_range_checked(key, value):
    with pytest.raises(config.ConfigError, match=f"train.{key} must"):
        config.load(None, [f"train.{key}={value}"])


def _files(tmp_path, count: int) -> list[str]:
    paths = []
    for f in range(count):
        path = str(tmp_path / f"s-{f}.tfrecord.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for r in range(3):
                writer.write(f"{f}:{r}".encode())
        paths.append(path)
    return paths


def _read(files, workers: int, index: int) -> list[bytes]:
    context = tf.distribute.InputContext(num_input_pipelines=workers, input_pipeline_id=index,
                                         num_replicas_in_sync=workers)
    return sorted(data.worker_records(files, context).as_numpy_iterator())


def test_worker_records_shard_by_file_when_every_worker_gets_a_file(tmp_path):
    files = _files(tmp_path, 4)
    first, second = _read(files, 2, 0), _read(files, 2, 1)
    assert {r.split(b":")[0] for r in first} == {b"0", b"2"}  # whole files: each worker reads only its own
    assert {r.split(b":")[0] for r in second} == {b"1", b"3"}
    assert sorted(first + second) == _read(files, 1, 0) and len(first) == 6


def test_worker_records_shard_by_record_with_fewer_files_than_workers(tmp_path):
    files = _files(tmp_path, 1)
    parts = [_read(files, 3, i) for i in range(3)]
    assert all(len(p) == 1 for p in parts)
    assert sorted(sum(parts, [])) == _read(files, 1, 0)


def _caches(dataset: tf.data.Dataset) -> int:
    """CacheDataset nodes in the dataset's graph (its function library included)."""
    graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return sum(n.op.startswith("CacheDataset") for n in nodes)


def test_simulated_stream_streams_from_shards_unless_cached(tmp_path):
    """The real streams cache decoded slices (data.cache); the simulated pairs only with data.cache_simulated."""
    (tmp_path / "train").mkdir()
    for name in ("low", "normal", "simulated"):
        with tf.io.TFRecordWriter(str(tmp_path / "train" / f"{name}-00000-of-00001.tfrecord.gz"), options="GZIP"):
            pass
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": records.SCHEMA_VERSION,
                                                        "counts": {"train": {"low": 1, "normal": 1}}}))
    base = ["loss.simulated=1", "data.patch_size=16"]
    streamed = _caches(data.training_dataset(str(tmp_path), config.load(None, base)))
    cached = _caches(data.training_dataset(str(tmp_path), config.load(None, base + ["data.cache_simulated=true"])))
    assert (streamed, cached) == (2, 3)
