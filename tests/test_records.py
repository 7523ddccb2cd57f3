import numpy as np
import pytest
import tensorflow as tf

from ldct_tf import records


def _record(**overrides):
    rng = np.random.default_rng(0)
    fields = dict(image=rng.integers(-1024, 3071, size=(6, 5)).astype(np.int16), dose="low", split="val",
                  patient="p" * 64, series="s" * 64, instance=12, z_mm=-101.5, pixel_spacing_mm=(0.68, 0.7),
                  slice_thickness_mm=3.0, kvp=120.0, exposure_mas=55.0, ctdivol=3.1, kernel="B30f",
                  manufacturer="SIEMENS")
    fields.update(overrides)
    return records.SliceRecord(**fields)


def test_round_trip_through_tf_parse():
    rec = _record()
    hu, meta = records.parse(tf.constant(records.encode(rec)))
    assert hu.dtype == tf.float32 and hu.shape == (6, 5, 1)
    np.testing.assert_array_equal(hu.numpy()[..., 0], rec.image)
    assert meta["dose"].numpy() == b"low" and meta["split"].numpy() == b"val"
    assert int(meta["instance"]) == 12 and int(meta["height"]) == 6 and int(meta["width"]) == 5
    np.testing.assert_allclose(meta["pixel_spacing_mm"].numpy(), [0.68, 0.7], rtol=1e-6)
    np.testing.assert_allclose(float(meta["z_mm"]), -101.5)
    assert meta["kernel"].numpy() == b"B30f"


def test_round_trip_numpy_and_extremes():
    image = np.array([[-32768, 32767], [0, -1]], np.int16)
    out = records.decode_numpy(records.encode(_record(image=image)))
    np.testing.assert_array_equal(out["image"], image)
    assert out["schema_version"] == records.SCHEMA_VERSION


@pytest.mark.parametrize("bad, match", [
    (dict(image=np.zeros((4, 4), np.float32)), "int16"),
    (dict(image=np.zeros((4,), np.int16)), "2-D"),
    (dict(dose="quarter"), "dose"),
    (dict(split="holdout"), "split"),
])
def test_encode_rejects_bad_fields(bad, match):
    with pytest.raises(ValueError, match=match):
        records.encode(_record(**bad))


def test_parse_refuses_other_schema_version():
    example = tf.train.Example.FromString(records.encode(_record()))
    example.features.feature["schema_version"].int64_list.value[0] = records.SCHEMA_VERSION + 1
    with pytest.raises(tf.errors.InvalidArgumentError, match="schema_version"):
        records.parse(tf.constant(example.SerializeToString()))


def test_pseudonym_is_salted_and_namespaced():
    a = records.pseudonym("MRN1", "salt1", "patient")
    assert len(a) == 64 and "MRN1" not in a
    assert a == records.pseudonym("MRN1", "salt1", "patient")
    assert a != records.pseudonym("MRN1", "salt2", "patient")
    assert a != records.pseudonym("MRN1", "salt1", "series")


def _tf_built_example(rec):
    """The same record built with TensorFlow's own protos, to check the hand-written wire format against."""
    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(*v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(v)))

    def f(*v):
        return tf.train.Feature(float_list=tf.train.FloatList(value=list(v)))

    feats = {"schema_version": i(records.SCHEMA_VERSION), "image": b(rec.image.astype("<i2").tobytes()),
             "height": i(rec.image.shape[0]), "width": i(rec.image.shape[1]), "instance": i(rec.instance),
             "pixel_spacing_mm": f(*rec.pixel_spacing_mm)}
    feats.update({n: b(str(getattr(rec, n)).encode()) for n in records.STRING_FEATURES})
    feats.update({n: f(float(getattr(rec, n))) for n in records.FLOAT_FEATURES})
    return tf.train.Example(features=tf.train.Features(feature=feats))


@pytest.mark.parametrize("overrides", [{}, dict(instance=-3, kvp=float("nan"), kernel="", z_mm=-1e6),
                                       dict(image=np.zeros((0, 0), np.int16).reshape(0, 0) + np.int16(0),
                                            instance=2**40)])
def test_wire_format_equals_tensorflow_protos(overrides):
    rec = _record(**overrides)
    ours = tf.train.Example.FromString(records.encode(rec))
    theirs = _tf_built_example(rec)
    # NaN != NaN in proto equality: compare the serialised canonical forms instead.
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
