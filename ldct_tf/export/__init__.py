"""``python -m ldct_tf.export``: the trained generator as a SavedModel that TF Serving (or Python) runs on HU slices.

    python -m ldct_tf.export --model-dir runs/cpu_small [--output DIR | --replace-default-model] [--version N]

Without ``--output`` the model goes to ``runs/cpu_small/export/<export.name>``; the shipped ``saved_models/`` only
with ``--replace-default-model`` (see :mod:`ldct_tf.export.paths`).

Layout written (TF Serving's): ``saved_models/NAME/VERSION/`` (the next free integer version unless ``--version``),
holding ``saved_model.pb``, ``variables/``, ``metadata.json`` (what the model is: config, training step, data summary,
versions) and ``assets.extra/tf_serving_warmup_requests`` (so the server's first real request is fast).  Beside the
model folders, ``saved_models/models.config`` lists every exported model for ``--model_config_file`` and
``saved_models/batching_parameters.txt`` is a starting point for ``--batching_parameters_file``.

Signatures (callers speak HU; the graph does clipping, scaling, padding to the network's multiple and cropping back):

* ``serving_default``: input ``hu`` float32 ``[batch, height, width, 1]``, height and width at least
  ``min_size`` (twice the network's size multiple, in ``metadata.json``; see ``serving_graph.min_input_size``);
  output ``denoised_hu`` float32, same shape.
* ``denoise_bytes`` (compact REST requests, ``{"b64": ...}`` instead of a megabyte of JSON floats): inputs
  ``image_bytes`` string ``[batch]`` (each a 16-bit greyscale PNG holding ``HU + 1024``, or raw little-endian int16 HU,
  row-major), ``height`` and ``width`` int32 ``[batch]`` (the raw image's size; for a PNG 0 or its own size); output
  ``denoised_bytes`` string ``[batch]``, each in the encoding of its input.  TF Serving's REST API base64-encodes
  outputs whose name ends in ``_bytes``.
* ``denoise_strength`` and ``denoise_bytes_strength``: the same two with a ``strength`` input, float32 scalar or
  ``[batch]`` in [0, 1]: ``output = input + strength * (network output - input)``, so 0 returns the input bit for bit
  and 1 the network output.  The two signatures without it use ``default_strength`` from ``metadata.json``
  (``--default-strength``, 1.0 unless given).  ``--default-strength`` replaces the former ``--input-blend B``: a
  blend B is the default strength 1 - B (up to the blend's clipping of the input to [-1024, 3071] HU).

Bad input (NaN or Inf, wrong rank or channel count, smaller than ``min_size``, a byte string of the wrong length, an
8-bit PNG, a strength outside [0, 1]) fails inside the graph with an ``InvalidArgument`` error that says what was expected, so TF Serving and
Python report the same thing.  The names are the contract in :mod:`ldct_tf.saved_model`, the graph is
:mod:`ldct_tf.export.graph`; this module writes versions and TF Serving's files;
``ldct_tf/export/__main__.py`` is the command line.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ldct_tf import ct, saved_model  # noqa: E402
from ldct_tf.errors import LdctError  # noqa: E402
from ldct_tf.saved_model import (BYTES_SIGNATURE, BYTES_STRENGTH_SIGNATURE, DEFAULT_SIGNATURE,  # noqa: E402,F401
                                 DEFAULT_STRENGTH, METADATA_FILE, STRENGTH_SIGNATURE, SavedModelDenoiser,
                                 resolve_version_dir)
from ldct_tf.export.graph import (COMPUTE_DTYPES, DenoiserModule, check_compute_dtype,  # noqa: E402,F401
                                  infer_size_multiple, min_input_size)

if TYPE_CHECKING:  # keras is only needed to export, not to run a SavedModel
    import keras

# SavedModelDenoiser and resolve_version_dir live in ldct_tf.saved_model; imported here too for existing callers.
__all__ = ["ExportError", "SavedModelDenoiser", "export_generator", "load_generator", "model_folders",
           "resolve_version_dir", "write_batching_parameters", "write_models_config", "write_warmup_requests"]
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MODELS_CONFIG = "models.config"
BATCHING_FILE = "batching_parameters.txt"


class ExportError(LdctError, ValueError):
    """An export that cannot be made as asked (a bad setting, a generator that does not load); names the value or
    file.  A ``ValueError`` too, as the checks raised before the project had one error base."""


# --- writing a version --------------------------------------------------------------------------------------------


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
                     serving_base: Optional[str] = "/models", min_size: Optional[int] = None,
                     default_strength: float = DEFAULT_STRENGTH, compute_dtype: str = "float32",
                     max_batch_size: int = 8) -> Path:
    """Write saved_models-style ``OUTPUT/VERSION/`` (next free integer when ``version`` is None); returns the version
    folder.

    The version is written to a hidden temporary folder beside it and renamed at the end, so a TF Serving instance
    watching ``OUTPUT`` never loads a half-written model.  An existing version is never overwritten.
    ``size_multiple`` defaults to what the generator's stride-2 layers imply, ``min_size`` (the smallest height
    and width the graph accepts) to :func:`~ldct_tf.export.graph.min_input_size` of it.  ``warmup_size`` is the
    slice size of the warm-up requests (0: none).  ``serving_base`` is the folder the server sees the models root as
    (``/models`` in the Docker image), written into ``models.config`` beside ``OUTPUT``; None skips the config files.
    ``default_strength`` is the strength of the signatures without a ``strength`` input (``graph.mix_strength``).
    ``compute_dtype`` float16 runs the network in float16 (GPUs; :func:`~ldct_tf.export.graph.float16_compute`),
    bfloat16 is refused.  ``max_batch_size`` sets the batching file's sizes, and the warm-up covers each of them.
    """
    try:
        default_strength = saved_model.check_strength(default_strength, "default_strength")
        check_compute_dtype(compute_dtype)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ExportError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    multiple = int(size_multiple or infer_size_multiple(generator))
    min_size = int(min_size or min_input_size(multiple))
    if warmup_size and warmup_size < min_size:
        raise ExportError(f"warmup_size {warmup_size} is below the model's minimum input size {min_size}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = _next_version(output)
    if not isinstance(version, int) or version < 1:
        raise ExportError(f"version must be a positive integer, got {version!r}")
    final = output / str(version)
    if final.exists():
        raise FileExistsError(f"{final}: version {version} already exists; choose another --version or omit it")

    module = DenoiserModule(generator, multiple, float16_weights, min_size, default_strength, compute_dtype)
    signatures = {
        DEFAULT_SIGNATURE: module.serve_hu.get_concrete_function(),
        BYTES_SIGNATURE: module.serve_bytes.get_concrete_function(),
        STRENGTH_SIGNATURE: module.serve_hu_strength.get_concrete_function(),
        BYTES_STRENGTH_SIGNATURE: module.serve_bytes_strength.get_concrete_function(),
    }
    info = {
        "name": output.name,
        "version": version,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ldct_tf_version": ldct_tf_version(),
        "tensorflow_version": tf.__version__,
        "keras_version": _keras_version(),
        "size_multiple": multiple,
        "min_size": min_size,
        "float16_weights": bool(float16_weights),
        "compute_dtype": compute_dtype,
        "warmup_batch_sizes": allowed_batch_sizes(max_batch_size) if warmup_size else [],
        "default_strength": default_strength,
        "parameters": int(sum(np.prod(v.shape) for v in generator.weights)),
        "hu_clip": [ct.HU_MIN, ct.HU_MAX],
        "signatures": saved_model.SIGNATURES,
        **(metadata or {}),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=output))
    try:
        tf.saved_model.save(module, str(tmp), signatures=signatures)
        (tmp / METADATA_FILE).write_text(json.dumps(info, indent=2, default=str))
        if warmup_size:
            write_warmup_requests(tmp / WARMUP_FILE, output.name, warmup_size, allowed_batch_sizes(max_batch_size))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if serving_base is not None:
        write_models_config(output.parent, serving_base)
        write_batching_parameters(output.parent / BATCHING_FILE, max_batch_size)
    return final


def _keras_version() -> str:
    try:
        import keras

        return keras.__version__
    except ImportError:  # pragma: no cover
        return "unknown"


def allowed_batch_sizes(max_batch_size: int = 8) -> list[int]:
    """The batch sizes TF Serving pads a batch up to (``allowed_batch_sizes`` in the batching file): 1, half the
    maximum and the maximum.  One list for the batching file and the warm-up, so every size the server can run is
    warmed up before the first real request."""
    return sorted({1, max(1, max_batch_size // 2), max_batch_size})


def _water_png(size: int) -> bytes:
    """A 16-bit greyscale PNG of water (0 HU, stored as HU + offset); a few hundred bytes at any size."""
    stored = tf.fill([size, size, 1], tf.constant(saved_model.PNG_HU_OFFSET, tf.uint16))
    return tf.io.encode_png(stored).numpy()


def _warmup_inputs(batch: int, size: int) -> dict:
    """Per signature, a batch of ``batch`` water slices of ``size`` x ``size``.  The HU tensor is one repeated value
    (a TensorProto with fewer values than elements repeats the last), so the file stays small at any batch."""
    water = tf.make_tensor_proto(0.0, tf.float32, shape=[batch, size, size, 1])
    inputs = {saved_model.HU_INPUT: water}
    as_bytes = {saved_model.BYTES_INPUT: tf.make_tensor_proto(np.array([_water_png(size)] * batch, dtype=object)),
                saved_model.HEIGHT_INPUT: tf.make_tensor_proto(np.full([batch], size, np.int32)),
                saved_model.WIDTH_INPUT: tf.make_tensor_proto(np.full([batch], size, np.int32))}
    strength = {saved_model.STRENGTH_INPUT: tf.make_tensor_proto(np.full([batch], 0.5, np.float32))}
    return {DEFAULT_SIGNATURE: inputs, BYTES_SIGNATURE: as_bytes, STRENGTH_SIGNATURE: {**inputs, **strength},
            BYTES_STRENGTH_SIGNATURE: {**as_bytes, **strength}}


def write_warmup_requests(path: Path, model_name: str, size: int = 512, batch_sizes: tuple[int, ...] = (1,)) -> Path:
    """TF Serving's warm-up file: a TFRecord of ``PredictionLog`` protos, one per signature and batch size, replayed
    at load time so that no real request pays for graph optimisation and kernel selection at the usual slice size,
    whatever batch size the server's batching pads it to."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in batch_sizes:
            for signature, tensors in _warmup_inputs(int(batch), size).items():
                request = predict_pb2.PredictRequest()
                request.model_spec.name = model_name
                request.model_spec.signature_name = signature
                for key, proto in tensors.items():
                    request.inputs[key].CopyFrom(proto)
                log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
                writer.write(log.SerializeToString())
    return path


def model_folders(root: str | Path) -> list[Path]:
    """Model folders under a models root: sub-folders holding at least one integer version with a SavedModel."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and saved_model.versions(p))


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

    Server-side batching concatenates requests along the batch axis.  The ``denoise_bytes`` signatures (what
    ``ldct_tf.denoise`` sends) take one string per slice, so requests of any slice size share a batch: the graph pads
    each slice to the batch's largest and crops it back.  The ``hu`` tensor signatures can only be concatenated when
    their slices share a size: with ``pad_variable_length_inputs: false`` the server fails a batch that mixes sizes,
    and turning it on would return every response at the batch's largest size (padded with each tensor's first
    value), so send ``hu`` requests of one size per server or use the bytes signatures.  ``num_batch_threads``
    should match the serving machine's cores (not the exporting machine's, hence a fixed default).
    """
    threads = num_batch_threads
    path = Path(path)
    path.write_text(
        "# TF Serving batching parameters written by ldct_tf.export (use with --enable_batching).\n"
        "# Batches merge requests along the batch axis. denoise_bytes requests of any slice size share a batch\n"
        "# (padded and cropped back in the graph); hu tensor requests must share one slice size (see export docs).\n"
        "# Set num_batch_threads to the serving machine's number of cores.\n"
        f"max_batch_size {{ value: {max_batch_size} }}\n"
        f"batch_timeout_micros {{ value: {batch_timeout_micros} }}\n"
        f"num_batch_threads {{ value: {threads} }}\n"
        "max_enqueued_batches { value: 100 }\n"
        + "".join(f"allowed_batch_sizes: {n}\n" for n in allowed_batch_sizes(max_batch_size)) +
        "pad_variable_length_inputs: false\n")
    return path


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
        raise ExportError(f"{path}: cannot load the generator: {exc}") from exc
    if any(getattr(layer, "dtype_policy", None) is not None and layer.dtype_policy.name != "float32"
           for layer in generator.layers):
        m = cfg.model
        rebuilt = build_generator(m.depth, m.base_filters, m.residual_blocks, m.attention, m.norm, noise_conditional=m.noise_conditional,
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
        # The simulated-pair stream it was trained on, with the simulator calibration (physics noise prior); None
        # for a pure CycleGAN.
        "simulation_calibration": (summary.get("data") or {}).get("simulated"),
        "warm_start_from": summary.get("init_from"),
        "config": cfg.to_dict(),
    }
