"""THE TFRecord contract: one ``tf.train.Example`` per axial slice.

Every producer (the Beam pipeline) and consumer (``ldct_tf.data``, evaluation, tuning) goes through this module, so
the feature names and types live in one place.  Bump :data:`SCHEMA_VERSION` on any change; readers check it.

The image is stored as int16 HU bytes, row-major: lossless for every CT whose HU are integers (slope 1 with an
integer intercept, which is what scanners write), half the size of float32.  No identifier is stored: ``patient``
and ``series`` are salted SHA-256 pseudonyms made by :func:`pseudonym`.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Mapping

import numpy as np

SCHEMA_VERSION = 1
DOSES = ("low", "normal")
SPLITS = ("train", "val", "test")

#: Scalar string features and scalar float features (besides image, height, width, instance, pixel spacing).
STRING_FEATURES = ("dose", "patient", "series", "kernel", "manufacturer", "split")
FLOAT_FEATURES = ("z_mm", "slice_thickness_mm", "kvp", "exposure_mas", "ctdivol")


def pseudonym(identifier: str, salt: str, kind: str) -> str:
    """Salted SHA-256 pseudonym (hex, 64 chars) of a patient ID or series UID.

    ``kind`` keeps namespaces apart so that a patient ID that happens to equal a series UID maps to different values.
    Without the salt the mapping cannot be recomputed from a list of candidate IDs.
    """
    return hashlib.sha256(f"{salt}\x00{kind}\x00{identifier}".encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SliceRecord:
    """What one Example holds, as plain Python values (HU image as int16)."""

    image: np.ndarray  # int16 [height, width]
    dose: str
    split: str
    patient: str
    series: str
    instance: int
    z_mm: float
    pixel_spacing_mm: tuple[float, float]
    slice_thickness_mm: float
    kvp: float
    exposure_mas: float
    ctdivol: float
    kernel: str
    manufacturer: str


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 as protobuf encodes it: negative numbers take ten bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bytes_feature(value: bytes) -> bytes:
    return _field(1, _field(1, value))  # Feature.bytes_list = 1 { BytesList.value = 1 }


def _float_feature(*values: float) -> bytes:
    return _field(2, _field(1, struct.pack(f"<{len(values)}f", *values)))  # float_list = 2, packed


def _int64_feature(*values: int) -> bytes:
    for value in values:  # _varint would silently wrap a larger one (issue 27: an oversized InstanceNumber)
        if not -(2**63) <= int(value) < 2**63:
            raise ValueError(f"{int(value)} does not fit a TFRecord int64 feature")
    return _field(3, _field(1, b"".join(_varint(int(v)) for v in values)))  # int64_list = 3, packed


def _example(features: dict) -> bytes:
    """``tf.train.Example`` bytes of encoded features: Example.features = 1, Features.feature = 1, one map entry
    {key = 1, value = 2} per feature."""
    entries = b"".join(_field(1, _field(1, key.encode("utf-8")) + _field(2, value)) for key, value in features.items())
    return _field(1, entries)


def encode(record: SliceRecord) -> bytes:
    """Serialise a :class:`SliceRecord` to ``tf.train.Example`` bytes; a bad field raises ``ValueError``.

    Written in the protobuf wire format directly (Example -> Features -> map<string, Feature>), so the Beam workers
    that call it never import TensorFlow: that import costs each worker about 3 s and several hundred MB.  The tests
    parse the bytes with TensorFlow's own ``tf.train.Example``.
    """
    image = np.asarray(record.image)
    if image.dtype != np.int16 or image.ndim != 2:
        raise ValueError(f"image must be a 2-D int16 HU array, got {image.dtype} with shape {image.shape}")
    if record.dose not in DOSES:
        raise ValueError(f"dose must be one of {DOSES}, got {record.dose!r}")
    if record.split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {record.split!r}")
    features = {
        "schema_version": _int64_feature(SCHEMA_VERSION),
        "image": _bytes_feature(image.astype("<i2").tobytes(order="C")),
        "height": _int64_feature(image.shape[0]),
        "width": _int64_feature(image.shape[1]),
        "instance": _int64_feature(int(record.instance)),
        "pixel_spacing_mm": _float_feature(*record.pixel_spacing_mm),
    }
    for name in STRING_FEATURES:
        features[name] = _bytes_feature(str(getattr(record, name)).encode("utf-8"))
    for name in FLOAT_FEATURES:
        features[name] = _float_feature(float(getattr(record, name)))
    return _example(features)


def feature_spec() -> dict:
    """The ``tf.io.parse_single_example`` spec of an Example."""
    import tensorflow as tf

    spec = {
        "schema_version": tf.io.FixedLenFeature([], tf.int64),
        "image": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "instance": tf.io.FixedLenFeature([], tf.int64),
        "pixel_spacing_mm": tf.io.FixedLenFeature([2], tf.float32),
    }
    spec.update({name: tf.io.FixedLenFeature([], tf.string) for name in STRING_FEATURES})
    spec.update({name: tf.io.FixedLenFeature([], tf.float32) for name in FLOAT_FEATURES})
    return spec


def parse(serialized) -> tuple:
    """Parse one serialized Example (a scalar string tensor) into ``(hu, metadata)``.

    ``hu`` is float32 [height, width, 1] in HU; ``metadata`` is a dict of the other features.  Works inside
    ``tf.data.Dataset.map``.  A record written by another schema version fails with an ``InvalidArgument`` error
    that says so, instead of being misread.
    """
    import tensorflow as tf

    features = tf.io.parse_single_example(serialized, feature_spec())
    version = features.pop("schema_version")
    tf.debugging.assert_equal(
        version,
        tf.constant(SCHEMA_VERSION, tf.int64),
        message=f"TFRecord schema_version differs from this ldct_tf's version {SCHEMA_VERSION}; re-run the pipeline",
    )
    height, width = features["height"], features["width"]
    pixels = tf.io.decode_raw(features.pop("image"), tf.int16, little_endian=True)
    hu = tf.cast(tf.reshape(pixels, tf.stack([height, width, 1])), tf.float32)
    return hu, features


def decode_numpy(serialized: bytes) -> dict:
    """Decode Example bytes without a tf.data graph (tests, notebooks): a dict with ``image`` as int16 numpy."""
    import tensorflow as tf

    example = tf.train.Example.FromString(serialized)
    feat: Mapping = example.features.feature
    height, width = feat["height"].int64_list.value[0], feat["width"].int64_list.value[0]
    out = {
        "schema_version": feat["schema_version"].int64_list.value[0],
        "image": np.frombuffer(feat["image"].bytes_list.value[0], dtype="<i2").reshape(height, width),
        "instance": feat["instance"].int64_list.value[0],
        "pixel_spacing_mm": tuple(feat["pixel_spacing_mm"].float_list.value),
    }
    out.update({name: feat[name].bytes_list.value[0].decode("utf-8") for name in STRING_FEATURES})
    out.update({name: feat[name].float_list.value[0] for name in FLOAT_FEATURES})
    return out


# --- the simulated-pair stream ------------------------------------------------------------------------------------
#: Version of the simulated-pair Example; independent of the slice schema, which it does not change.
SIMULATED_SCHEMA_VERSION = 1
SIMULATED_STRING_FEATURES = ("patient", "kernel", "filter_name", "split")
SIMULATED_FLOAT_FEATURES = ("i0", "dose_fraction")


@dataclass(frozen=True)
class SimulatedPairRecord:
    """One simulated low-dose realisation of a normal-dose slice and its reference (the slice itself, or the slice
    through the same projector without noise; ``ldct_tf.simulate.REFERENCES``): the two differ only by the inserted
    noise, which is what a pixel loss needs.  Both int16 HU."""

    low: np.ndarray
    reference: np.ndarray
    patient: str
    kernel: str
    split: str
    realisation: int
    i0: float
    dose_fraction: float
    filter_name: str
    pixel_spacing_mm: tuple[float, float]


def encode_simulated(record: SimulatedPairRecord) -> bytes:
    """Serialise a :class:`SimulatedPairRecord` (same wire-format writer as :func:`encode`)."""
    low, reference = np.asarray(record.low), np.asarray(record.reference)
    for name, image in (("low", low), ("reference", reference)):
        if image.dtype != np.int16 or image.ndim != 2:
            raise ValueError(f"{name} must be a 2-D int16 HU array, got {image.dtype} with shape {image.shape}")
    if low.shape != reference.shape:
        raise ValueError(f"low {low.shape} and reference {reference.shape} differ in shape")
    features = {
        "schema_version": _int64_feature(SIMULATED_SCHEMA_VERSION),
        "low": _bytes_feature(low.astype("<i2").tobytes(order="C")),
        "reference": _bytes_feature(reference.astype("<i2").tobytes(order="C")),
        "height": _int64_feature(low.shape[0]),
        "width": _int64_feature(low.shape[1]),
        "realisation": _int64_feature(int(record.realisation)),
        "pixel_spacing_mm": _float_feature(*record.pixel_spacing_mm),
    }
    for name in SIMULATED_STRING_FEATURES:
        features[name] = _bytes_feature(str(getattr(record, name)).encode("utf-8"))
    for name in SIMULATED_FLOAT_FEATURES:
        features[name] = _float_feature(float(getattr(record, name)))
    return _example(features)


def parse_simulated(serialized) -> tuple:
    """Parse a simulated-pair Example into ``(pair, metadata)``: ``pair`` float32 HU ``[height, width, 2]`` with the
    simulated low dose in channel 0 and its reference in channel 1 (one tensor, so crops and flips keep
    the two aligned)."""
    import tensorflow as tf

    spec = {
        "schema_version": tf.io.FixedLenFeature([], tf.int64),
        "low": tf.io.FixedLenFeature([], tf.string),
        "reference": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "realisation": tf.io.FixedLenFeature([], tf.int64),
        "pixel_spacing_mm": tf.io.FixedLenFeature([2], tf.float32),
    }
    spec.update({name: tf.io.FixedLenFeature([], tf.string) for name in SIMULATED_STRING_FEATURES})
    spec.update({name: tf.io.FixedLenFeature([], tf.float32) for name in SIMULATED_FLOAT_FEATURES})
    features = tf.io.parse_single_example(serialized, spec)
    tf.debugging.assert_equal(features.pop("schema_version"), tf.constant(SIMULATED_SCHEMA_VERSION, tf.int64),
                              message="simulated-pair schema_version differs from this ldct_tf's; re-run "
                                      "python -m ldct_tf.simulate pairs")
    shape = tf.stack([features["height"], features["width"]])
    images = [tf.cast(tf.reshape(tf.io.decode_raw(features.pop(k), tf.int16, little_endian=True), shape), tf.float32)
              for k in ("low", "reference")]
    return tf.stack(images, axis=-1), features
