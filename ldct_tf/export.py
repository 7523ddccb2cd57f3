"""``python -m ldct_tf.export``: the trained generator as a SavedModel that TF Serving (or Python) runs on HU slices.

    python -m ldct_tf.export --model-dir runs/cpu_small --output saved_models/ldct_denoiser [--version N]

Layout written (TF Serving's): ``saved_models/NAME/VERSION/`` (the next free integer version unless ``--version``),
holding ``saved_model.pb``, ``variables/``, ``metadata.json`` (what the model is: config, training step, data summary,
versions) and ``assets.extra/tf_serving_warmup_requests`` (so the server's first real request is fast).  Beside the
model folders, ``saved_models/models.config`` lists every exported model for ``--model_config_file`` and
``saved_models/batching_parameters.txt`` is a starting point for ``--batching_parameters_file``.

Signatures (callers speak HU; the graph does clipping, scaling, padding to the network's multiple and cropping back):

* ``serving_default``: input ``hu`` float32 ``[batch, height, width, 1]`` of any height and width; output
  ``denoised_hu`` float32, same shape.
* ``denoise_bytes`` (compact REST requests, ``{"b64": ...}`` instead of a megabyte of JSON floats): inputs
  ``image_bytes`` string ``[batch]`` (each a 16-bit greyscale PNG holding ``HU + 1024``, or raw little-endian int16 HU,
  row-major), ``height`` and ``width`` int32 ``[batch]`` (the raw image's size; for a PNG 0 or its own size); output
  ``denoised_bytes`` string ``[batch]``, each in the encoding of its input.  TF Serving's REST API base64-encodes
  outputs whose name ends in ``_bytes``.

Bad input (NaN or Inf, wrong rank or channel count, a byte string of the wrong length, an 8-bit PNG) fails inside the
graph with an ``InvalidArgument`` error that says what was expected, so TF Serving and Python report the same thing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ldct_tf import ct  # noqa: E402

if TYPE_CHECKING:  # keras is only needed to export, not to run a SavedModel
    import keras

#: Stored value of a 16-bit PNG = HU + PNG_HU_OFFSET (the usual CT convention: rescale intercept -1024).
PNG_HU_OFFSET = 1024
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEFAULT_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "denoise_bytes"
METADATA_FILE = "metadata.json"
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MODELS_CONFIG = "models.config"
BATCHING_FILE = "batching_parameters.txt"
_AIR_MODEL = -1.0  # ct.to_model(ct.HU_MIN): padding value on the model scale


# --- the serving graph --------------------------------------------------------------------------------------------

def infer_size_multiple(generator: "keras.Model") -> int:
    """2**(number of stride-2 layers): the generator's height/width multiple (see models/generator.py)."""
    strided = 0
    for layer in generator.layers:
        strides = getattr(layer, "strides", 1)
        if strides == 2 or (isinstance(strides, (tuple, list)) and tuple(strides) == (2, 2)):
            strided += 1
    return 2**strided


def _traceable_upsampling(layer):
    """Keras 3.15's ``UpSampling2D`` (bilinear) cannot be traced with unknown height and width: ``ops.image.resize``
    tests ``size[0] <= 0`` in Python.  This stand-in calls ``tf.image.resize`` the same way (bilinear, no
    antialiasing), so a graph with dynamic slice sizes gives the same numbers."""
    import keras

    class TraceableUpSampling2D(keras.layers.Layer):
        def __init__(self, size, interpolation, **kwargs):
            super().__init__(**kwargs)
            self.size, self.interpolation = tuple(size), interpolation

        def call(self, x):
            if self.interpolation == "nearest":
                return tf.repeat(tf.repeat(x, self.size[0], axis=1), self.size[1], axis=2)
            new_size = tf.shape(x)[1:3] * tf.constant(self.size, tf.int32)
            return tf.cast(tf.image.resize(x, new_size, method=self.interpolation, antialias=False), x.dtype)

        def compute_output_shape(self, shape):
            scale = lambda d, f: None if d is None else d * f  # noqa: E731
            return (shape[0], scale(shape[1], self.size[0]), scale(shape[2], self.size[1]), shape[3])

    if layer.data_format != "channels_last":
        raise ValueError(f"layer {layer.name}: only channels_last upsampling is supported for export")
    return TraceableUpSampling2D(layer.size, layer.interpolation, name=layer.name, dtype=layer.dtype_policy)


def serving_generator(generator: "keras.Model") -> "keras.Model":
    """A copy of the generator, with the same weights, that traces with unknown height and width (see
    :func:`_traceable_upsampling`)."""
    import keras

    def clone(layer):
        if isinstance(layer, keras.layers.UpSampling2D):
            return _traceable_upsampling(layer)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(generator, clone_function=clone)
    copy.set_weights(generator.get_weights())
    return copy


class DenoiserModule(tf.Module):
    """What the SavedModel holds: the generator's weights (its own copies, optionally float16) and the two signatures.

    The generator runs through ``keras.Model.stateless_call`` on weights cast to float32, so the SavedModel carries
    one copy of the weights in whichever dtype was chosen, and no Keras objects (loading needs only TensorFlow).
    """

    def __init__(self, generator: "keras.Model", size_multiple: int, float16_weights: bool = False):
        super().__init__(name="ldct_denoiser")
        dtype = tf.float16 if float16_weights else tf.float32
        generator = serving_generator(generator)
        # A closure, not an attribute: an attribute would make the Keras model a tracked dependency and save a
        # second copy of its weights.
        self._run_generator = lambda weights, others, x: generator.stateless_call(weights, others, x,
                                                                                  training=False)[0]
        self.trainable = [tf.Variable(np.asarray(v.numpy()), dtype=dtype, trainable=False, name=_var_name(v))
                          for v in generator.trainable_variables]
        self.non_trainable = [tf.Variable(np.asarray(v.numpy()), dtype=dtype, trainable=False, name=_var_name(v))
                              for v in generator.non_trainable_variables]
        self.size_multiple = tf.constant(int(size_multiple), tf.int32)
        self._multiple = int(size_multiple)

    def _model(self, x: tf.Tensor) -> tf.Tensor:
        weights = [tf.cast(v, tf.float32) for v in self.trainable]
        others = [tf.cast(v, tf.float32) for v in self.non_trainable]
        return tf.cast(self._run_generator(weights, others, x), tf.float32)

    def denoise(self, hu: tf.Tensor) -> tf.Tensor:
        """[N, H, W, 1] float HU (already validated) -> denoised float32 HU of the same shape."""
        shape = tf.shape(hu)
        height, width = shape[1], shape[2]
        pad_h = (-height) % self._multiple
        pad_w = (-width) % self._multiple
        x = ct.to_model(hu)
        x = tf.pad(x, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]], constant_values=_AIR_MODEL)
        y = self._model(x)[:, :height, :width, :]
        return ct.from_model(y)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="hu")])
    def serve_hu(self, hu):
        # Unknown rank in the spec on purpose: the rank and channel checks then run in the graph (TF Serving does not
        # check shapes against the signature), and their messages say what was expected.
        hu = validate_hu(hu)
        return {"denoised_hu": self.denoise(hu)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes"),
                                  tf.TensorSpec([None], tf.int32, name="height"),
                                  tf.TensorSpec([None], tf.int32, name="width")])
    def serve_bytes(self, image_bytes, height, width):
        hu, is_png = decode_images(image_bytes, height, width)
        denoised = self.denoise(hu[..., tf.newaxis])[..., 0]
        return {"denoised_bytes": encode_images(denoised, is_png)}


def _var_name(variable) -> str:
    return (getattr(variable, "path", None) or variable.name).replace("/", "_").replace(":", "_")


def validate_hu(hu: tf.Tensor) -> tf.Tensor:
    """In-graph checks: rank 4, one channel, finite values; each failure is an InvalidArgument saying what was
    expected."""
    # Every check reads a padded copy of the shape, so none can fail on an out-of-range index before the rank check
    # has reported (the graph may run independent checks in any order).
    shape = tf.shape(hu)
    rank = tf.size(shape)
    dims = tf.concat([shape, tf.ones([4], tf.int32)], axis=0)
    checks = [
        tf.debugging.Assert(tf.equal(rank, 4), ["input 'hu' must be float32 HU of shape [batch, height, width, 1]; "
                                                "got shape", shape]),
        tf.debugging.Assert(tf.logical_or(tf.not_equal(rank, 4), tf.equal(dims[3], 1)),
                            ["input 'hu' must have exactly 1 channel (shape [batch, height, width, 1]); got shape",
                             shape]),
        tf.debugging.Assert(tf.logical_or(tf.not_equal(rank, 4), tf.reduce_all(dims[1:3] > 0)),
                            ["input 'hu' must have height and width >= 1; got shape", shape]),
    ]
    with tf.control_dependencies(checks):
        hu = tf.identity(hu)
    hu = tf.debugging.assert_all_finite(hu, message="input 'hu' contains NaN or Inf; expected finite HU values")
    # Checked above, so this never fails; it gives the output a static [?, ?, ?, 1] shape in the signature.
    return tf.ensure_shape(hu, [None, None, None, 1])


def _png_header_int(data: tf.Tensor, offset: int) -> tf.Tensor:
    """A big-endian uint32 field of a PNG IHDR chunk, as int32."""
    return tf.io.decode_raw(tf.strings.substr(data, offset, 4), tf.int32, little_endian=False)[0]


def _decode_one(args):
    data, height, width = args
    is_png = tf.equal(tf.strings.substr(data, 0, 8), PNG_MAGIC)

    def png():
        header_ok = tf.debugging.assert_greater_equal(
            tf.strings.length(data), 33, message="image_bytes: PNG too short to hold its header")
        with tf.control_dependencies([header_ok]):
            bit_depth = tf.io.decode_raw(tf.strings.substr(data, 24, 1), tf.uint8)[0]
            colour = tf.io.decode_raw(tf.strings.substr(data, 25, 1), tf.uint8)[0]
            png_w, png_h = _png_header_int(data, 16), _png_header_int(data, 20)
        checks = [
            tf.debugging.assert_equal(bit_depth, tf.constant(16, tf.uint8),
                                      message="image_bytes: expected a 16-bit greyscale PNG (HU + 1024); got another "
                                              "bit depth"),
            tf.debugging.assert_equal(colour, tf.constant(0, tf.uint8),
                                      message="image_bytes: expected a greyscale PNG (colour type 0)"),
            tf.debugging.Assert(tf.logical_or(tf.equal(height, 0), tf.equal(height, png_h)),
                                ["image_bytes: PNG height", png_h, "differs from the 'height' input", height]),
            tf.debugging.Assert(tf.logical_or(tf.equal(width, 0), tf.equal(width, png_w)),
                                ["image_bytes: PNG width", png_w, "differs from the 'width' input", width]),
        ]
        with tf.control_dependencies(checks):
            image = tf.io.decode_png(data, channels=1, dtype=tf.uint16)
        return tf.cast(image[..., 0], tf.float32) - float(PNG_HU_OFFSET)

    def raw():
        expected = 2 * tf.cast(height, tf.int64) * tf.cast(width, tf.int64)
        checks = [
            tf.debugging.assert_positive(tf.stack([height, width]),
                                         message="image_bytes: raw int16 input needs 'height' and 'width' >= 1"),
            tf.debugging.Assert(tf.equal(tf.cast(tf.strings.length(data), tf.int64), expected),
                                ["image_bytes: raw int16 data must be 2*height*width bytes; got",
                                 tf.strings.length(data), "bytes for height", height, "width", width]),
        ]
        with tf.control_dependencies(checks):
            values = tf.io.decode_raw(data, tf.int16, little_endian=True)
        return tf.reshape(tf.cast(values, tf.float32), tf.stack([height, width]))

    return tf.cond(is_png, png, raw), is_png


def decode_images(image_bytes: tf.Tensor, height: tf.Tensor, width: tf.Tensor):
    """[N] PNG / raw int16 strings -> ([N, H, W] float HU, [N] bool is_png).  All images must share one size."""
    count_ok = tf.debugging.assert_equal(
        tf.stack([tf.size(height), tf.size(width)]), tf.stack([tf.size(image_bytes)] * 2),
        message="'image_bytes', 'height' and 'width' must have the same batch size")
    nonempty = tf.debugging.assert_positive(tf.size(image_bytes), message="'image_bytes' is empty")
    with tf.control_dependencies([count_ok, nonempty]):
        images, is_png = tf.map_fn(
            _decode_one, (image_bytes, height, width),
            fn_output_signature=(tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([], tf.bool)),
            infer_shape=False)
    # map_fn stacks into one tensor; different sizes would fail there with a message about TensorArrays.
    return images, is_png


_BYTE_TABLE = [bytes([i]) for i in range(256)]


def _encode_one(args):
    hu, is_png = args

    def png():
        stored = tf.clip_by_value(tf.round(hu) + float(PNG_HU_OFFSET), 0.0, 65535.0)
        return tf.io.encode_png(tf.cast(stored, tf.uint16)[..., tf.newaxis])

    def raw():
        # Little-endian int16, built byte by byte so the result does not depend on the server's byte order.
        values = tf.cast(tf.clip_by_value(tf.round(hu), -32768.0, 32767.0), tf.int32)
        unsigned = tf.bitwise.bitwise_and(tf.reshape(values, [-1]), 0xFFFF)
        pairs = tf.stack([tf.bitwise.bitwise_and(unsigned, 0xFF), tf.bitwise.right_shift(unsigned, 8)], axis=1)
        return tf.strings.reduce_join(tf.gather(tf.constant(_BYTE_TABLE), tf.reshape(pairs, [-1])))

    return tf.cond(is_png, png, raw)


def encode_images(hu: tf.Tensor, is_png: tf.Tensor) -> tf.Tensor:
    """[N, H, W] float HU -> [N] strings, each a 16-bit PNG (HU + 1024) or raw little-endian int16 like its input."""
    return tf.map_fn(_encode_one, (hu, is_png), fn_output_signature=tf.TensorSpec([], tf.string))


# --- writing a version --------------------------------------------------------------------------------------------

def _versions(model_folder: Path) -> list[int]:
    if not model_folder.is_dir():
        return []
    return sorted(int(p.name) for p in model_folder.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").exists())


def _next_version(model_folder: Path) -> int:
    taken = [int(p.name) for p in model_folder.iterdir() if p.is_dir() and p.name.isdigit()] \
        if model_folder.is_dir() else []
    return max(taken, default=0) + 1


def ldct_tf_version() -> str:
    try:
        from importlib.metadata import version

        return version("ldct_tf")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


def export_generator(generator: "keras.Model", output: str | Path, *, version: Optional[int] = None,
                     metadata: Optional[dict] = None, float16_weights: bool = False,
                     size_multiple: Optional[int] = None, warmup_size: int = 512,
                     serving_base: Optional[str] = "/models") -> Path:
    """Write saved_models-style ``OUTPUT/VERSION/`` (next free integer when ``version`` is None); returns the version
    folder.

    The version is written to a hidden temporary folder beside it and renamed at the end, so a TF Serving instance
    watching ``OUTPUT`` never loads a half-written model.  An existing version is never overwritten.
    ``size_multiple`` defaults to what the generator's stride-2 layers imply.  ``warmup_size`` is the slice size of the
    warm-up requests (0: none).  ``serving_base`` is the folder the server sees the models root as (``/models`` in
    the Docker image), written into ``models.config`` beside ``OUTPUT``; None skips the config files.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = _next_version(output)
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer, got {version!r}")
    final = output / str(version)
    if final.exists():
        raise FileExistsError(f"{final}: version {version} already exists; choose another --version or omit it")
    multiple = int(size_multiple or infer_size_multiple(generator))

    module = DenoiserModule(generator, multiple, float16_weights)
    signatures = {
        DEFAULT_SIGNATURE: module.serve_hu.get_concrete_function(),
        BYTES_SIGNATURE: module.serve_bytes.get_concrete_function(),
    }
    info = {
        "name": output.name,
        "version": version,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ldct_tf_version": ldct_tf_version(),
        "tensorflow_version": tf.__version__,
        "keras_version": _keras_version(),
        "size_multiple": multiple,
        "float16_weights": bool(float16_weights),
        "parameters": int(sum(np.prod(v.shape) for v in generator.weights)),
        "hu_clip": [ct.HU_MIN, ct.HU_MAX],
        "signatures": {
            DEFAULT_SIGNATURE: {"inputs": {"hu": "float32 [batch, height, width, 1] HU"},
                                "outputs": {"denoised_hu": "float32 [batch, height, width, 1] HU"}},
            BYTES_SIGNATURE: {"inputs": {"image_bytes": f"string [batch]: 16-bit greyscale PNG of HU + "
                                                        f"{PNG_HU_OFFSET}, or raw little-endian int16 HU",
                                         "height": "int32 [batch] (raw: required; PNG: 0 or its height)",
                                         "width": "int32 [batch] (raw: required; PNG: 0 or its width)"},
                              "outputs": {"denoised_bytes": "string [batch], same encoding as each input"}},
        },
        **(metadata or {}),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=output))
    try:
        tf.saved_model.save(module, str(tmp), signatures=signatures)
        (tmp / METADATA_FILE).write_text(json.dumps(info, indent=2, default=str))
        if warmup_size:
            write_warmup_requests(tmp / WARMUP_FILE, output.name, warmup_size)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if serving_base is not None:
        write_models_config(output.parent, serving_base)
        write_batching_parameters(output.parent / BATCHING_FILE)
    return final


def _keras_version() -> str:
    try:
        import keras

        return keras.__version__
    except ImportError:  # pragma: no cover
        return "unknown"


def write_warmup_requests(path: Path, model_name: str, size: int = 512) -> Path:
    """TF Serving's warm-up file: a TFRecord of ``PredictionLog`` protos, one per signature, replayed at load time so
    the first real request does not pay for graph optimisation and kernel selection at the usual slice size."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    path.parent.mkdir(parents=True, exist_ok=True)
    water = np.zeros((1, size, size, 1), np.float32)  # 0 HU
    requests = []
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = DEFAULT_SIGNATURE
    request.inputs["hu"].CopyFrom(tf.make_tensor_proto(water))
    requests.append(request)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = BYTES_SIGNATURE
    request.inputs["image_bytes"].CopyFrom(
        tf.make_tensor_proto(np.array([water[0, ..., 0].astype("<i2").tobytes()], dtype=object)))
    request.inputs["height"].CopyFrom(tf.make_tensor_proto(np.array([size], np.int32)))
    request.inputs["width"].CopyFrom(tf.make_tensor_proto(np.array([size], np.int32)))
    requests.append(request)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def model_folders(root: str | Path) -> list[Path]:
    """Model folders under a models root: sub-folders holding at least one integer version with a SavedModel."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _versions(p))


def write_models_config(root: str | Path, serving_base: str = "/models") -> Path:
    """``ROOT/models.config``: TF Serving's ``ModelServerConfig`` (text format) listing every model under ROOT.

    ``serving_base`` is where the server sees ROOT: ``/models`` when ROOT is mounted there in the Docker image, or
    ROOT's absolute path for a locally installed ``tensorflow_model_server``.  Written with the real proto, so the
    file is what the server parses.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    root = Path(root)
    config = model_server_config_pb2.ModelServerConfig()
    for folder in model_folders(root):
        entry = config.model_config_list.config.add()
        entry.name = folder.name
        entry.base_path = f"{serving_base.rstrip('/')}/{folder.name}"
        entry.model_platform = "tensorflow"
        entry.model_version_policy.latest.num_versions = 1
    path = root / MODELS_CONFIG
    header = (f"# TF Serving model config written by ldct_tf.export; base paths as the server sees {root}: "
              f"{serving_base}\n")
    path.write_text(header + text_format.MessageToString(config))
    return path


def write_batching_parameters(path: str | Path, max_batch_size: int = 8, batch_timeout_micros: int = 5000,
                              num_batch_threads: int = 4) -> Path:
    """A ``--batching_parameters_file`` for ``--enable_batching`` (TF Serving's ``BatchingParameters``, text format).

    Server-side batching merges requests along the batch axis, so it only helps when clients send slices of one size
    (512x512 for most CT); requests of other sizes should not be mixed into the same batches.  ``num_batch_threads``
    should match the serving machine's cores (not the exporting machine's, hence a fixed default).
    """
    threads = num_batch_threads
    path = Path(path)
    path.write_text(
        "# TF Serving batching parameters written by ldct_tf.export (use with --enable_batching).\n"
        "# Batches merge requests along the batch axis: send slices of one size (e.g. 512x512).\n"
        "# Set num_batch_threads to the serving machine's number of cores.\n"
        f"max_batch_size {{ value: {max_batch_size} }}\n"
        f"batch_timeout_micros {{ value: {batch_timeout_micros} }}\n"
        f"num_batch_threads {{ value: {threads} }}\n"
        "max_enqueued_batches { value: 100 }\n"
        f"allowed_batch_sizes: 1\nallowed_batch_sizes: {max(2, max_batch_size // 2)}\n"
        f"allowed_batch_sizes: {max_batch_size}\n"
        "pad_variable_length_inputs: false\n")
    return path


# --- loading a version --------------------------------------------------------------------------------------------

def resolve_version_dir(path: str | Path) -> Path:
    """A model folder (OUTPUT, holding integer version subfolders) -> its newest version folder; a version folder ->
    itself.  Raises FileNotFoundError naming the path when there is no SavedModel."""
    path = Path(path)
    if (path / "saved_model.pb").exists():
        return path
    versions = _versions(path)
    if versions:
        return path / str(versions[-1])
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder")
    raise FileNotFoundError(f"{path}: no SavedModel here (expected saved_model.pb, or integer version folders "
                            f"holding one, as written by python -m ldct_tf.export)")


def as_batch(hu: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """float HU [H,W], [N,H,W] or [N,H,W,1] -> (float32 [N,H,W,1], a function giving a result back the input's shape).

    Shared by the local denoiser and the serving client so both accept exactly the same inputs.
    """
    array = np.asarray(hu)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"expected numeric HU values, got dtype {array.dtype}")
    shape = array.shape
    if array.ndim == 2:
        batch = array[np.newaxis, ..., np.newaxis]
    elif array.ndim == 3:
        batch = array[..., np.newaxis]
    elif array.ndim == 4 and shape[-1] == 1:
        batch = array
    else:
        raise ValueError(f"expected HU of shape [H, W], [N, H, W] or [N, H, W, 1]; got {shape}")
    return np.ascontiguousarray(batch, dtype=np.float32), lambda out: np.asarray(out, np.float32).reshape(shape)


def graph_error_message(message: str) -> str:
    """The line of a TensorFlow runtime error that says what went wrong (drops 'Graph execution error:', node names
    and stack-trace placeholders)."""
    for line in message.splitlines():
        line = line.strip()
        if not line or line.startswith(("Graph execution error", "Detected at node", "<stack traces", "[[{{")):
            continue
        return line.split("\t [[")[0].strip()
    return message.strip()


class SavedModelDenoiser:
    """Loads a SavedModel version folder (or model folder -> newest version) and denoises HU slices.

    Calls the ``serving_default`` signature directly (one graph for any size; no retracing), batch by batch.
    """

    def __init__(self, path: str | Path, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.path = resolve_version_dir(path)
        self.batch_size = int(batch_size)
        meta_file = self.path / METADATA_FILE
        try:
            self.metadata: dict = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_file}: not valid JSON: {exc}") from None
        self.name: str = self.path.parent.name if self.path.name.isdigit() else self.metadata.get("name",
                                                                                                  self.path.name)
        self.version: int = int(self.path.name) if self.path.name.isdigit() else int(self.metadata.get("version", 0))
        try:
            self._loaded = tf.saved_model.load(str(self.path))
        except Exception as exc:  # corrupt or foreign SavedModel
            raise ValueError(f"{self.path}: cannot load the SavedModel: {exc}") from exc
        if DEFAULT_SIGNATURE not in self._loaded.signatures:
            raise ValueError(f"{self.path}: SavedModel has no {DEFAULT_SIGNATURE!r} signature "
                             f"(has {sorted(self._loaded.signatures)})")
        self._serve = self._loaded.signatures[DEFAULT_SIGNATURE]

    def __repr__(self) -> str:
        return f"SavedModelDenoiser({self.name!r}, version={self.version}, path={str(self.path)!r})"

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        """float HU [H,W], [N,H,W] or [N,H,W,1] -> denoised float32 HU of the same shape, batched by batch_size."""
        batch, restore = as_batch(hu)
        outputs = []
        for start in range(0, len(batch), self.batch_size):
            chunk = tf.constant(batch[start:start + self.batch_size])
            try:
                outputs.append(self._serve(hu=chunk)["denoised_hu"].numpy())
            except tf.errors.InvalidArgumentError as exc:
                raise ValueError(f"{self.path}: {graph_error_message(exc.message)}") from None
        if not outputs:
            return restore(np.zeros((0,) + batch.shape[1:], np.float32))
        return restore(np.concatenate(outputs))


# --- CLI ----------------------------------------------------------------------------------------------------------

def load_generator(model_dir: Path, cfg) -> "keras.Model":
    """``MODEL_DIR/generator.keras``, rebuilt in float32 when it was trained under mixed precision."""
    import keras

    from ldct_tf.models.generator import build_generator

    path = model_dir / "generator.keras"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained generator (python -m ldct_tf.train writes it at the end)")
    try:
        generator = keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise ValueError(f"{path}: cannot load the generator: {exc}") from exc
    if any(getattr(layer, "dtype_policy", None) is not None and layer.dtype_policy.name != "float32"
           for layer in generator.layers):
        m = cfg.model
        rebuilt = build_generator(m.depth, m.base_filters, m.residual_blocks, m.attention, m.norm,
                                  name=generator.name)
        rebuilt.set_weights(generator.get_weights())
        generator = rebuilt
    return generator


def training_metadata(model_dir: Path, cfg) -> dict:
    """Config, training step and data summary from a training run folder (no patient identifiers are stored there)."""
    summary_file = model_dir / "training_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    step = summary.get("steps")
    checkpoint = model_dir / "checkpoints" / "checkpoint.json"
    if step is None and checkpoint.exists():
        step = json.loads(checkpoint.read_text()).get("step")
    return {
        "source_model_dir": str(model_dir),
        "training": {"step": step,
                     **{k: summary[k] for k in ("seconds", "strategy", "replicas", "mixed_precision",
                                                "final_metrics", "vgg19_pretrained", "validation") if k in summary}},
        "data": summary.get("data", {}),
        "config": cfg.to_dict(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldct_tf.export", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="a training run folder (python -m ldct_tf.train)")
    parser.add_argument("--output", help="model folder, saved_models/NAME (default: saved_models/<export.name>)")
    parser.add_argument("--version", type=int, help="version number (default: the next free integer)")
    parser.add_argument("--float16-weights", action="store_true",
                        help="store the weights as float16 (half the size; computed in float32)")
    parser.add_argument("--config", help="config YAML (default: MODEL_DIR/config.yaml)")
    parser.add_argument("--serving-base", default="/models",
                        help="where TF Serving sees the models root, written into models.config (default /models, "
                             "the Docker image's; give the absolute path for a local tensorflow_model_server)")
    parser.add_argument("--warmup-size", type=int, default=512, help="slice size of the warm-up requests (0: none)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. export.name=my_model")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ldct_tf import config as config_lib

    args = build_parser().parse_args(argv)
    model_dir = Path(args.model_dir)
    config_path = args.config or (model_dir / "config.yaml" if (model_dir / "config.yaml").exists() else None)
    try:
        cfg = config_lib.load(config_path, args.overrides)
    except config_lib.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.float16_weights:
        cfg.export.float16_weights = True
    print("Resolved config:\n" + cfg.to_yaml(), flush=True)
    output = Path(args.output) if args.output else Path("saved_models") / cfg.export.name
    try:
        generator = load_generator(model_dir, cfg)
        version_dir = export_generator(
            generator, output, version=args.version, metadata=training_metadata(model_dir, cfg),
            float16_weights=cfg.export.float16_weights, size_multiple=2**cfg.model.depth,
            warmup_size=args.warmup_size, serving_base=args.serving_base)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Exported {output.name} version {version_dir.name} to {version_dir}")
    print(f"Models config: {output.parent / MODELS_CONFIG}; batching parameters: {output.parent / BATCHING_FILE}")
    print(f"Inspect: saved_model_cli show --all --dir {version_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
