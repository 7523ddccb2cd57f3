import numpy as np
import pytest
import tensorflow as tf

from ldct_tf.pipeline import tfrecord_sink


@pytest.mark.parametrize("level", [1, 6])
def test_tensorflow_reads_what_the_sink_writes(tmp_path, level):
    rng = np.random.default_rng(0)
    records = [rng.bytes(n) for n in (0, 1, 100, 70_000)]
    path = tmp_path / "x.tfrecord.gz"
    assert tfrecord_sink.write_tfrecord_gzip(str(path), records, level) == 4
    read = [r.numpy() for r in tf.data.TFRecordDataset(str(path), compression_type="GZIP")]
    assert read == records


def test_empty_file_is_a_valid_tfrecord(tmp_path):
    path = tmp_path / "empty.tfrecord.gz"
    tfrecord_sink.write_tfrecord_gzip(str(path), [])
    assert list(tf.data.TFRecordDataset(str(path), compression_type="GZIP")) == []


def test_checksum_matches_tensorflow_writer(tmp_path):
    path = tmp_path / "tf.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(b"hello ct")
    assert path.read_bytes() == tfrecord_sink.frame(b"hello ct")


def test_bad_level():
    with pytest.raises(ValueError, match="0-9"):
        tfrecord_sink.write_tfrecord_gzip("/tmp/never", [], 11)
