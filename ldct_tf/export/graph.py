"""The graph inside the exported SavedModel: input checks, HU <-> model scale, padding to the network's multiple and
cropping back, the strength mix, and the codecs of the ``denoise_bytes`` signatures.

Everything a caller can get wrong is checked here, in the graph, rather than in a Python wrapper: TF Serving runs the
graph without our Python, so only an in-graph ``InvalidArgument`` reaches its clients with a message that says what
was expected (the names and encodings are the contract in :mod:`ldct_tf.saved_model`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from ldct_tf import ct, keras_compat
from ldct_tf.saved_model import (BYTES_INPUT, BYTES_OUTPUT, DEFAULT_STRENGTH, HEIGHT_INPUT, HU_INPUT, HU_OUTPUT,
                                 PNG_HU_OFFSET, PNG_MAGIC, STRENGTH_INPUT, WIDTH_INPUT, check_strength)

if TYPE_CHECKING:  # keras is only needed to export, not to run a SavedModel
    import keras

_AIR_MODEL = float(ct.to_model(ct.AIR_HU))  # padding value on the model scale (-1)
_SUMMARIZE = 8  # how many values an Assert message shows (TF's default of 3 cuts a 4-D shape short)


def infer_size_multiple(generator: "keras.Model") -> int:
    """2**(number of stride-2 layers): the generator's height/width multiple (see models/generator.py)."""
    strided = 0
    for layer in generator.layers:
        strides = getattr(layer, "strides", 1)
        if strides == 2 or (isinstance(strides, (tuple, list)) and tuple(strides) == (2, 2)):
            strided += 1
    return 2**strided


COMPUTE_DTYPES = ("float32", "float16")
# Layers that stay float32 under float16 compute: the generator's head (models/generator.py), so the output image is
# never quantised to float16 (at 0.5 on the model scale float16's step is 2**-11, about 1 HU).
_FLOAT32_HEAD = ("noise", "denoised")


def check_compute_dtype(compute_dtype: str) -> str:
    """``compute_dtype`` once it is one the graph can run; bfloat16 is refused with the reason (a ValueError)."""
    if compute_dtype == "bfloat16":
        raise ValueError("compute dtype bfloat16 is refused: its 8-bit mantissa cannot hold this model's scale "
                         "(water sits at -0.5 on [-1, 1], where a bfloat16 step is about 4 HU; 5.8 HU max error "
                         "measured on v2); use float16 on GPUs")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    return compute_dtype


def float16_compute(generator: "keras.Model") -> "keras.Model":
    """A copy of ``generator`` (same float32 weights, upsampling made traceable as in
    :func:`ldct_tf.keras_compat.with_traceable_upsampling`) whose layers compute in float16 (Keras ``mixed_float16``),
    except the head named in ``_FLOAT32_HEAD`` and layers already pinned to another dtype.  Why a copy under a dtype
    policy rather than float16 weights: each layer then casts its inputs and weights itself, as in mixed-precision
    training, and normalisation statistics keep Keras' own handling."""
    import keras

    def clone(layer):
        config = layer.get_config()
        pinned = layer.name in _FLOAT32_HEAD or isinstance(layer, keras.layers.Activation)
        if not pinned and getattr(layer, "dtype_policy", None) is not None and layer.dtype_policy.name == "float32":
            config["dtype"] = "mixed_float16"
        return layer.__class__.from_config(config)

    # Blocks build their inner layers from the global policy, not their own: set it while cloning, including the
    # traceable-upsampling copy (which clones again).
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        copy = keras.models.clone_model(generator, clone_function=clone)
        copy.set_weights(generator.get_weights())
        return keras_compat.with_traceable_upsampling(copy)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def min_input_size(size_multiple: int) -> int:
    """The smallest height and width the model answers: twice its size multiple.

    At the size multiple itself the coarsest feature map is 1x1, and instance normalisation of a single pixel
    returns the same constant for every input, so the bottleneck carries nothing (tests/test_export.py shows it).
    Two pixels a side is the least that keeps information there.  Smaller images (3x3, 1x1) are mostly padding and
    came back tens of HU off for all-water input; they are refused rather than answered wrongly.
    """
    return 2 * int(size_multiple)


class DenoiserModule(tf.Module):
    """What the SavedModel holds: the generator's weights (its own copies, optionally float16) and four signatures
    (HU and bytes, each without and with a ``strength`` input; the names are in :mod:`ldct_tf.saved_model`).

    The generator runs through ``keras.Model.stateless_call`` on weights cast to float32, so the SavedModel carries
    one copy of the weights in whichever dtype was chosen, and no Keras objects (loading needs only TensorFlow).
    ``default_strength`` is what the signatures without a ``strength`` input use (a constant in their graph).
    """

    def __init__(self, generator: "keras.Model", size_multiple: int, float16_weights: bool = False,
                 min_size: int | None = None, default_strength: float = DEFAULT_STRENGTH,
                 compute_dtype: str = "float32"):
        super().__init__(name="ldct_denoiser")
        self._default_strength = check_strength(default_strength, "default_strength")
        dtype = tf.float16 if float16_weights else tf.float32
        if check_compute_dtype(compute_dtype) == "float16":
            generator = float16_compute(generator)  # also makes the upsampling traceable
        else:
            generator = keras_compat.with_traceable_upsampling(generator)
        # A closure, not an attribute: an attribute would make the Keras model a tracked dependency and save a
        # second copy of its weights.
        self._run_generator = lambda weights, others, x: generator.stateless_call(weights, others, x,
                                                                                  training=False)[0]
        self.trainable = [tf.Variable(np.asarray(v.numpy()), dtype=dtype, trainable=False, name=_var_name(v))
                          for v in generator.trainable_variables]
        self.non_trainable = [tf.Variable(np.asarray(v.numpy()), dtype=dtype, trainable=False, name=_var_name(v))
                              for v in generator.non_trainable_variables]
        self._multiple = int(size_multiple)
        self._min_size = int(min_size or min_input_size(size_multiple))
        self.size_multiple = tf.constant(self._multiple, tf.int32)
        self.min_size = tf.constant(self._min_size, tf.int32)

    def _model(self, x: tf.Tensor) -> tf.Tensor:
        weights = [tf.cast(v, tf.float32) for v in self.trainable]
        others = [tf.cast(v, tf.float32) for v in self.non_trainable]
        return tf.cast(self._run_generator(weights, others, x), tf.float32)

    def denoise(self, hu: tf.Tensor, strength: tf.Tensor | None = None, input_name: str = HU_INPUT) -> tf.Tensor:
        """[N, H, W, 1] float HU (already validated) -> denoised float32 HU of the same shape: the network's output
        mixed with the input by ``strength`` (None: the default strength; :func:`mix_strength`)."""
        hu = require_min_size(tf.ensure_shape(hu, [None, None, None, 1]), self._min_size, input_name)
        shape = tf.shape(hu)
        if strength is None:
            strength = tf.constant(self._default_strength, tf.float32)
        strength = validate_strength(strength, shape[0])
        x = ct.pad_to_multiple(ct.to_model(hu), self._multiple, value=_AIR_MODEL, axes=(1, 2))
        y = self._model(x)[:, :shape[1], :shape[2], :]
        return mix_strength(ct.from_model(y), hu, strength)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name=HU_INPUT)])
    def serve_hu(self, hu):
        # Unknown rank in the spec on purpose: the rank and channel checks then run in the graph (TF Serving does not
        # check shapes against the signature), and their messages say what was expected.
        return {HU_OUTPUT: self.denoise(validate_hu(hu))}

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name=HU_INPUT),
                                  tf.TensorSpec(None, tf.float32, name=STRENGTH_INPUT)])
    def serve_hu_strength(self, hu, strength):
        return {HU_OUTPUT: self.denoise(validate_hu(hu), strength)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT),
                                  tf.TensorSpec([None], tf.int32, name=HEIGHT_INPUT),
                                  tf.TensorSpec([None], tf.int32, name=WIDTH_INPUT)])
    def serve_bytes(self, image_bytes, height, width):
        return {BYTES_OUTPUT: self._bytes(image_bytes, height, width, None)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT),
                                  tf.TensorSpec([None], tf.int32, name=HEIGHT_INPUT),
                                  tf.TensorSpec([None], tf.int32, name=WIDTH_INPUT),
                                  tf.TensorSpec(None, tf.float32, name=STRENGTH_INPUT)])
    def serve_bytes_strength(self, image_bytes, height, width, strength):
        return {BYTES_OUTPUT: self._bytes(image_bytes, height, width, strength)}

    def _bytes(self, image_bytes, height, width, strength):
        # Slices of different sizes may share a batch (TF Serving's batching merges requests of any size here):
        # each is padded with air to the batch's largest size and cropped back to its own size after the network.
        hu, is_png, sizes = decode_images(image_bytes, height, width)
        message = (f"input '{BYTES_INPUT}' is smaller than the model's minimum of {self._min_size}x{self._min_size} "
                   f"pixels (height and width must be >= {self._min_size}; send whole slices); got [height, width] "
                   "per image")
        hu = _after([tf.debugging.Assert(tf.reduce_all(sizes >= self._min_size), [message, sizes],
                                         summarize=_SUMMARIZE)], hu)
        denoised = self.denoise(hu[..., tf.newaxis], strength, BYTES_INPUT)[..., 0]
        return encode_images(denoised, is_png, sizes)


def validate_strength(strength: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
    """A scalar or ``[batch]`` strength -> ``[batch, 1, 1, 1]`` once it is finite and in [0, 1]; otherwise an
    InvalidArgument that says what was expected (TF Serving's clients get no Python check)."""
    strength = tf.convert_to_tensor(strength, tf.float32)
    shape = tf.shape(strength)
    rank = tf.size(shape)
    size = tf.size(strength)
    message = f"input '{STRENGTH_INPUT}' must be a finite float32 in [0, 1], a scalar or one per slice [batch]; got"
    checks = [
        tf.debugging.Assert(tf.logical_or(tf.equal(rank, 0), tf.logical_and(tf.equal(rank, 1),
                                                                              tf.equal(size, batch))),
                            [message, "shape", shape, "for a batch of", batch], summarize=_SUMMARIZE),
        tf.debugging.Assert(tf.reduce_all(tf.logical_and(strength >= 0.0, strength <= 1.0)),  # False for NaN
                            [message, strength], summarize=_SUMMARIZE),
    ]
    flat = tf.reshape(_after(checks, strength), [-1, 1, 1, 1])
    return tf.broadcast_to(flat, tf.stack([batch, 1, 1, 1]))


def mix_strength(network_hu: tf.Tensor, hu: tf.Tensor, strength: tf.Tensor) -> tf.Tensor:
    """``hu + strength * (network_hu - hu)``, with strength 0 giving ``hu`` and 1 ``network_hu`` bit for bit
    (padding values outside the scanner range included: the arithmetic would round them).

    Why a mix with the input rather than a second network: as vendors blend iterative reconstructions with FBP, a
    reader who finds the full output too smooth gets back edge contrast and noise texture at a known cost in noise,
    per request, without re-exporting (the same formula as :func:`ldct_tf.saved_model.apply_strength`).
    """
    mixed = hu + strength * (network_hu - hu)
    return tf.where(tf.equal(strength, 0.0), hu, tf.where(tf.equal(strength, 1.0), network_hu, mixed))


def _var_name(variable) -> str:
    return (getattr(variable, "path", None) or variable.name).replace("/", "_").replace(":", "_")


def _after(checks: list, tensor: tf.Tensor) -> tf.Tensor:
    """``tensor``, available only once every check has passed."""
    with tf.control_dependencies(checks):
        return tf.identity(tensor)


def validate_hu(hu: tf.Tensor) -> tf.Tensor:
    """In-graph checks: rank 4, one channel, finite values; each failure is an InvalidArgument saying what was
    expected."""
    # Every check reads a padded copy of the shape, so none can fail on an out-of-range index before the rank check
    # has reported (the graph may run independent checks in any order).
    shape = tf.shape(hu)
    rank = tf.size(shape)
    dims = tf.concat([shape, tf.ones([4], tf.int32)], axis=0)
    not_4d = tf.not_equal(rank, 4)
    hu = _after([
        tf.debugging.Assert(tf.equal(rank, 4), [f"input '{HU_INPUT}' must be float32 HU of shape "
                                                "[batch, height, width, 1]; got shape", shape], summarize=_SUMMARIZE),
        tf.debugging.Assert(tf.logical_or(not_4d, tf.equal(dims[3], 1)),
                            [f"input '{HU_INPUT}' must have exactly 1 channel (shape [batch, height, width, 1]); got "
                             "shape", shape], summarize=_SUMMARIZE),
        tf.debugging.Assert(tf.logical_or(not_4d, tf.reduce_all(dims[1:3] > 0)),
                            [f"input '{HU_INPUT}' must have height and width >= 1; got shape", shape],
                            summarize=_SUMMARIZE),
    ], hu)
    hu = tf.debugging.assert_all_finite(hu, message=f"input '{HU_INPUT}' contains NaN or Inf; expected finite HU "
                                                    "values")
    # Checked above, so this never fails; it gives the output a static [?, ?, ?, 1] shape in the signature.
    return tf.ensure_shape(hu, [None, None, None, 1])


def require_min_size(hu: tf.Tensor, min_size: int, input_name: str) -> tf.Tensor:
    """[N, H, W, C] -> itself once H and W are >= ``min_size`` (see :func:`min_input_size`); otherwise an
    InvalidArgument that names the minimum.  Runs after the other checks, so a NaN or a wrong rank is reported
    first."""
    shape = tf.shape(hu)
    message = (f"input '{input_name}' is smaller than the model's minimum of {min_size}x{min_size} pixels (height "
               f"and width must be >= {min_size}; send whole slices); got shape")
    return _after([tf.debugging.Assert(tf.reduce_all(shape[1:3] >= min_size), [message, shape],
                                       summarize=_SUMMARIZE)], hu)


def _png_header_int(data: tf.Tensor, offset: int) -> tf.Tensor:
    """A big-endian uint32 field of a PNG IHDR chunk, as int32."""
    return tf.io.decode_raw(tf.strings.substr(data, offset, 4), tf.int32, little_endian=False)[0]


def _size_one(args):
    """The [height, width] an encoded image will decode to: a PNG's header (when it is long enough to hold one; the
    decoder reports a short one), else the ``height`` and ``width`` inputs."""
    data, height, width = args
    is_png = tf.logical_and(tf.equal(tf.strings.substr(data, 0, 8), PNG_MAGIC), tf.strings.length(data) >= 33)
    return tf.cond(is_png, lambda: tf.stack([_png_header_int(data, 20), _png_header_int(data, 16)]),
                   lambda: tf.stack([height, width]))


def _decode_one(args):
    data, height, width, target = args
    is_png = tf.equal(tf.strings.substr(data, 0, 8), PNG_MAGIC)

    def png():
        header_ok = tf.debugging.assert_greater_equal(
            tf.strings.length(data), 33, message=f"{BYTES_INPUT}: PNG too short to hold its header")
        with tf.control_dependencies([header_ok]):
            bit_depth = tf.io.decode_raw(tf.strings.substr(data, 24, 1), tf.uint8)[0]
            colour = tf.io.decode_raw(tf.strings.substr(data, 25, 1), tf.uint8)[0]
            png_w, png_h = _png_header_int(data, 16), _png_header_int(data, 20)
        checks = [
            tf.debugging.assert_equal(bit_depth, tf.constant(16, tf.uint8),
                                      message=f"{BYTES_INPUT}: expected a 16-bit greyscale PNG (HU + "
                                              f"{PNG_HU_OFFSET}); got another bit depth"),
            tf.debugging.assert_equal(colour, tf.constant(0, tf.uint8),
                                      message=f"{BYTES_INPUT}: expected a greyscale PNG (colour type 0)"),
            tf.debugging.Assert(tf.logical_or(tf.equal(height, 0), tf.equal(height, png_h)),
                                [f"{BYTES_INPUT}: PNG height", png_h, f"differs from the '{HEIGHT_INPUT}' input",
                                 height]),
            tf.debugging.Assert(tf.logical_or(tf.equal(width, 0), tf.equal(width, png_w)),
                                [f"{BYTES_INPUT}: PNG width", png_w, f"differs from the '{WIDTH_INPUT}' input",
                                 width]),
        ]
        image = tf.io.decode_png(_after(checks, data), channels=1, dtype=tf.uint16)
        return tf.cast(image[..., 0], tf.float32) - float(PNG_HU_OFFSET)

    def raw():
        expected = 2 * tf.cast(height, tf.int64) * tf.cast(width, tf.int64)
        checks = [
            tf.debugging.assert_positive(tf.stack([height, width]),
                                         message=f"{BYTES_INPUT}: raw int16 input needs '{HEIGHT_INPUT}' and "
                                                 f"'{WIDTH_INPUT}' >= 1"),
            tf.debugging.Assert(tf.equal(tf.cast(tf.strings.length(data), tf.int64), expected),
                                [f"{BYTES_INPUT}: raw int16 data must be 2*height*width bytes; got",
                                 tf.strings.length(data), "bytes for height", height, "width", width]),
        ]
        values = tf.io.decode_raw(_after(checks, data), tf.int16, little_endian=True)
        return tf.reshape(tf.cast(values, tf.float32), tf.stack([height, width]))

    image = tf.cond(is_png, png, raw)
    pad = target - tf.shape(image)
    return tf.pad(image, [[0, pad[0]], [0, pad[1]]], constant_values=ct.AIR_HU), is_png


def decode_images(image_bytes: tf.Tensor, height: tf.Tensor, width: tf.Tensor):
    """[N] PNG / raw int16 strings -> ([N, H, W] float HU, [N] bool is_png, [N, 2] int32 sizes).  Images may differ
    in size: each is padded at the bottom and right with air to the largest height and width (H, W) in the batch,
    and ``sizes`` holds each one's own [height, width] for :func:`encode_images` to crop back."""
    count_ok = tf.debugging.assert_equal(
        tf.stack([tf.size(height), tf.size(width)]), tf.stack([tf.size(image_bytes)] * 2),
        message=f"'{BYTES_INPUT}', '{HEIGHT_INPUT}' and '{WIDTH_INPUT}' must have the same batch size")
    nonempty = tf.debugging.assert_positive(tf.size(image_bytes), message=f"'{BYTES_INPUT}' is empty")
    with tf.control_dependencies([count_ok, nonempty]):
        sizes = tf.map_fn(_size_one, (image_bytes, height, width), fn_output_signature=tf.TensorSpec([2], tf.int32))
        target = tf.reduce_max(sizes, axis=0)
        targets = tf.broadcast_to(target, tf.shape(sizes))
        images, is_png = tf.map_fn(
            _decode_one, (image_bytes, height, width, targets),
            fn_output_signature=(tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([], tf.bool)),
            infer_shape=False)
    return images, is_png, sizes


_BYTE_TABLE = [bytes([i]) for i in range(256)]


def _encode_one(args):
    hu, is_png, size = args
    hu = hu[:size[0], :size[1]]

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


def encode_images(hu: tf.Tensor, is_png: tf.Tensor, sizes: tf.Tensor | None = None) -> tf.Tensor:
    """[N, H, W] float HU -> [N] strings, each a 16-bit PNG (HU + 1024) or raw little-endian int16 like its input,
    each cropped to its own ``sizes`` row ([height, width]; None: the whole H x W)."""
    if sizes is None:
        sizes = tf.broadcast_to(tf.shape(hu)[1:3], tf.stack([tf.shape(hu)[0], 2]))
    return tf.map_fn(_encode_one, (hu, is_png, sizes), fn_output_signature=tf.TensorSpec([], tf.string))
