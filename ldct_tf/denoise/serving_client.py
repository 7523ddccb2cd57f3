"""Client for a TF Serving model server running the exported denoiser (REST or gRPC).

    client = ServingClient("http://localhost:8501")          # REST
    client = ServingClient("localhost:8500")                 # gRPC (also "grpc://localhost:8500")
    denoised = client.predict(hu_slices)                     # same shapes and contract as SavedModelDenoiser
    client.status()                                          # {"model": ..., "versions": [{"version": 1, ...}]}

Wire formats (TF Serving's documented ones):

* REST ``POST /v1/models/NAME[/versions/V]:predict``.  ``encoding="float32"``: the columnar request
  ``{"signature_name": "serving_default", "inputs": {"hu": [[[[...]]]]}}`` answered with ``{"outputs": ...}``.
  ``encoding="int16"`` (the REST default): the ``denoise_bytes`` signature in row format,
  ``{"instances": [{"image_bytes": {"b64": <raw little-endian int16>}, "height": H, "width": W}, ...]}``, answered
  with ``{"predictions": [{"b64": ...}, ...]}``; about ten times smaller than JSON floats, at the cost of rounding HU
  to integers in and out (what a DICOM stores anyway).  Errors come back as ``{"error": message}``.
* gRPC ``tensorflow.serving.PredictionService/Predict`` with ``TensorProto`` tensors (binary, so float32 is the
  default there) and ``ModelService/GetModelStatus``.
* ``strength`` given: the same requests to ``denoise_strength`` / ``denoise_bytes_strength`` with a ``strength``
  input (a scalar; in REST row format one per instance); None: the signatures above, at the model's default.

Transient failures (connection refused or reset, HTTP 502/503/504/429, gRPC UNAVAILABLE, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED) are retried ``retries`` times with exponential backoff; anything else raises
:class:`ServingError` at once, carrying the server's own message.  An answer whose slice has every pixel at the
model's clip limits (HU_MIN / HU_MAX) while its input had not is refused (``BAD_RESPONSE``): that is a broken model,
never a denoised image.  Names, encodings and accepted shapes are the
model's contract in :mod:`ldct_tf.saved_model` (imported, not copied).
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Optional
from urllib.parse import urlparse

import numpy as np

from ldct_tf.ct import HU_MAX, HU_MIN
from ldct_tf.errors import LdctError
from ldct_tf.saved_model import (BYTES_INPUT, BYTES_OUTPUT, BYTES_SIGNATURE, BYTES_STRENGTH_SIGNATURE,
                                 DEFAULT_SIGNATURE, HEIGHT_INPUT, HU_INPUT, HU_OUTPUT, STRENGTH_INPUT,
                                 STRENGTH_SIGNATURE, WIDTH_INPUT, as_batch, check_strength, from_int16_bytes,
                                 graph_error_message, int16_bytes)

ENCODINGS = ("float32", "int16")
_RETRY_HTTP = {429, 502, 503, 504}
_MAX_MESSAGE = 1 << 30  # gRPC default is 4 MB: one batch of 512x512 float32 slices is 1 MB per slice
#: How close to a clip limit (HU) an output pixel counts as saturated: int16 transport rounds to whole HU, and a
#: saturated tanh head gives HU_MIN or HU_MAX to within a fraction of 1 HU.
_SATURATION_HU = 1.0


class ServingError(LdctError, RuntimeError):
    """A request the server refused or could not answer.  ``message`` is the sentence of the server's answer that
    says what went wrong (node names and TensorFlow's preamble dropped), ``details`` the server's full text, ``code``
    its status (gRPC status name, or the HTTP status as a string), ``url`` what was called."""

    def __init__(self, message: str, code: Optional[str] = None, url: Optional[str] = None):
        self.details, self.code, self.url = message, code, url
        self.message = graph_error_message(message)
        where = f" ({url})" if url else ""
        super().__init__(f"{code or 'error'}{where}: {self.message}")


class ServingClient:
    """Predict and model status against a TF Serving endpoint, over REST or gRPC.

    ``url``: ``http(s)://host:port`` -> REST; ``grpc://host:port``, ``grpcs://host:port`` (TLS) or a bare
    ``host:port`` -> gRPC; ``protocol`` ("rest" / "grpc") overrides the guess.  ``version`` pins a model version
    (default: the server's newest).  ``encoding`` is "float32" or "int16" (see the module docstring); default float32
    over gRPC, int16 over REST.  Slices are sent ``batch_size`` at a time.  ``strength`` (in [0, 1]) is sent with
    every request when given; None leaves the server's model at its default strength.
    """

    def __init__(self, url: str, model: str = "ldct_denoiser", version: Optional[int] = None, *,
                 protocol: Optional[str] = None, timeout_s: float = 60.0, retries: int = 2, batch_size: int = 8,
                 encoding: Optional[str] = None, backoff_s: float = 0.5, strength: Optional[float] = None):
        parsed = urlparse(url if "://" in url else f"//{url}")
        scheme = parsed.scheme.lower()
        if protocol is None:
            protocol = "rest" if scheme in ("http", "https") else "grpc"
        protocol = protocol.lower()
        if protocol not in ("rest", "grpc"):
            raise ValueError(f"protocol must be 'rest' or 'grpc', got {protocol!r}")
        if scheme not in ("", "http", "https", "grpc", "grpcs"):
            raise ValueError(f"unsupported URL scheme in {url!r}: use http(s)://, grpc(s):// or host:port")
        if not parsed.hostname:
            raise ValueError(f"no host in serving URL {url!r}")
        if encoding is None:
            encoding = "float32" if protocol == "grpc" else "int16"
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if batch_size < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError(f"need batch_size >= 1, retries >= 0, timeout_s > 0; got {batch_size}, {retries}, "
                             f"{timeout_s}")
        self.strength = None if strength is None else check_strength(strength)
        self.url, self.model, self.version = url, model, version
        self.protocol, self.encoding = protocol, encoding
        self.timeout_s, self.retries, self.batch_size, self.backoff_s = timeout_s, retries, batch_size, backoff_s
        if protocol == "rest":
            rest_scheme = scheme if scheme in ("http", "https") else "http"
            self._base = f"{rest_scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
            self._channel = None
        else:
            self._base = parsed.netloc
            self._tls = scheme == "grpcs"
            self._channel = None  # opened on first use

    def __repr__(self) -> str:
        return (f"ServingClient({self.url!r}, model={self.model!r}, version={self.version}, "
                f"protocol={self.protocol!r}, encoding={self.encoding!r}, strength={self.strength})")

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> "ServingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- public API -----------------------------------------------------------------------------------------------

    def predict(self, hu: np.ndarray) -> np.ndarray:
        """float HU [H,W], [N,H,W] or [N,H,W,1] -> denoised float32 HU of the same shape (batched by batch_size)."""
        batch, restore = as_batch(hu)
        if self.encoding == "int16" and not np.isfinite(batch).all():
            # The server would never see a NaN once it is cast to int16: refuse here instead of a silent wrong answer.
            raise ValueError("HU input contains NaN or Inf; expected finite HU values")
        outputs = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            call = self._predict_rest if self.protocol == "rest" else self._predict_grpc
            out = self._with_retries(lambda: self._missing_strength_signature(call, chunk))
            if out.shape != chunk.shape:
                raise ServingError(f"server returned shape {out.shape} for a request of shape {chunk.shape}",
                                   "BAD_RESPONSE", self.url)
            self._refuse_saturated(out, chunk, start)
            outputs.append(out)
        if not outputs:
            return restore(np.zeros((0,) + batch.shape[1:], np.float32))
        return restore(np.concatenate(outputs))

    def _signature(self, plain: str, with_strength: str) -> str:
        return plain if self.strength is None else with_strength

    def _missing_strength_signature(self, call, chunk: np.ndarray) -> np.ndarray:
        """``call(chunk)``; a model exported before the strength control answers that the signature does not exist:
        say so in one line rather than in the server's words."""
        try:
            return call(chunk)
        except ServingError as exc:
            missing = "not found" in exc.message and any(name in exc.message for name in (STRENGTH_SIGNATURE,
                                                                                         BYTES_STRENGTH_SIGNATURE))
            if self.strength is not None and missing:
                raise ServingError(f"model {self.model!r} has no strength input (exported before the strength "
                                   f"control); leave the strength at the model's default", exc.code, exc.url) from None
            raise

    def _refuse_saturated(self, out: np.ndarray, chunk: np.ndarray, start: int) -> None:
        """Raise when a slice comes back with every pixel at the model's clip limits (HU_MIN / HU_MAX) although its
        input was not: a model whose output head saturates everywhere is broken (diverged training, wrong weights),
        and writing its answer into a derived series would replace a patient's image with a flat one."""
        saturated = ((np.abs(out - HU_MIN) <= _SATURATION_HU) | (np.abs(out - HU_MAX) <= _SATURATION_HU)).all(
            axis=(1, 2, 3))
        clipped_input = ((chunk <= HU_MIN + _SATURATION_HU) | (chunk >= HU_MAX - _SATURATION_HU)).all(axis=(1, 2, 3))
        broken = np.flatnonzero(saturated & ~clipped_input)
        if broken.size:
            raise ServingError(f"the served model answered slice {start + int(broken[0])} with every pixel at its "
                               f"clip limits ({HU_MIN:g} / {HU_MAX:g} HU) although the input is not: the model looks "
                               f"broken (diverged or wrong weights); its output was refused", "BAD_RESPONSE", self.url)

    def status(self) -> dict:
        """The model's version states: ``{"model": NAME, "versions": [{"version": int, "state": "AVAILABLE",
        "error_code": "OK", "error_message": ""}, ...]}`` (``version`` given: only that one)."""
        if self.protocol == "rest":
            answer = self._with_retries(lambda: self._http("GET", self._model_path()))
            versions = [{"version": int(v["version"]), "state": v.get("state", "UNKNOWN"),
                         "error_code": v.get("status", {}).get("error_code", "OK"),
                         "error_message": v.get("status", {}).get("error_message", "")}
                        for v in answer.get("model_version_status", [])]
        else:
            from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

            request = get_model_status_pb2.GetModelStatusRequest()
            self._fill_spec(request.model_spec, signature=None)
            stub = model_service_pb2_grpc.ModelServiceStub(self._grpc_channel())
            answer = self._with_retries(lambda: self._grpc_call(stub.GetModelStatus, request))
            states = get_model_status_pb2.ModelVersionStatus.State
            versions = [{"version": int(v.version), "state": states.Name(v.state),
                         "error_code": _grpc_code_name(v.status.error_code),
                         "error_message": v.status.error_message}
                        for v in answer.model_version_status]
        return {"model": self.model, "versions": sorted(versions, key=lambda v: v["version"])}

    def wait_until_available(self, timeout_s: float = 60.0, poll_s: float = 0.5) -> dict:
        """Poll :meth:`status` until a version is AVAILABLE (a server loading its models answers UNAVAILABLE or
        NOT_FOUND at first); returns the status, or raises the last error after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = self.status()
                if any(v["state"] == "AVAILABLE" for v in status["versions"]):
                    return status
                last: Exception = ServingError(f"no AVAILABLE version yet: {status['versions']}", "UNAVAILABLE",
                                               self.url)
            except (ServingError, OSError) as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise last
            time.sleep(poll_s)

    # --- REST -----------------------------------------------------------------------------------------------------

    def _model_path(self) -> str:
        path = f"/v1/models/{self.model}"
        return path + (f"/versions/{int(self.version)}" if self.version is not None else "")

    def _predict_rest(self, batch: np.ndarray) -> np.ndarray:
        if self.encoding == "float32":
            inputs = {HU_INPUT: batch.tolist(), **self._strength_inputs()}
            body = {"signature_name": self._signature(DEFAULT_SIGNATURE, STRENGTH_SIGNATURE), "inputs": inputs}
            answer = self._http("POST", self._model_path() + ":predict", body)
            if "outputs" not in answer:
                raise ServingError(f"response has no 'outputs': keys {sorted(answer)}", "BAD_RESPONSE", self.url)
            outputs = answer["outputs"]
            if isinstance(outputs, dict):  # several outputs: keyed by name
                outputs = outputs[HU_OUTPUT]
            return np.asarray(outputs, np.float32)
        _, height, width, _ = batch.shape
        instances = [{BYTES_INPUT: {"b64": base64.b64encode(int16_bytes(image)).decode("ascii")},
                      HEIGHT_INPUT: int(height), WIDTH_INPUT: int(width), **self._strength_inputs()}
                     for image in batch[..., 0]]
        answer = self._http("POST", self._model_path() + ":predict",
                            {"signature_name": self._signature(BYTES_SIGNATURE, BYTES_STRENGTH_SIGNATURE),
                             "instances": instances})
        if "predictions" not in answer:
            raise ServingError(f"response has no 'predictions': keys {sorted(answer)}", "BAD_RESPONSE", self.url)
        images = []
        for item in answer["predictions"]:
            if isinstance(item, dict) and BYTES_OUTPUT in item:
                item = item[BYTES_OUTPUT]
            if not (isinstance(item, dict) and "b64" in item):
                raise ServingError("expected {'b64': ...} predictions from the denoise_bytes signature",
                                   "BAD_RESPONSE", self.url)
            images.append(self._from_int16_bytes(base64.b64decode(item["b64"]), height, width))
        return np.stack(images)[..., np.newaxis]

    def _strength_inputs(self) -> dict:
        return {} if self.strength is None else {STRENGTH_INPUT: self.strength}

    def _http(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        url = self._base + path
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            try:
                message = json.loads(text).get("error", text)
            except (json.JSONDecodeError, AttributeError):
                message = text or exc.reason
            raise ServingError(str(message), str(exc.code), url) from None
        except (socket.timeout, TimeoutError):
            raise ServingError(f"no answer within {self.timeout_s} s", "DEADLINE_EXCEEDED", url) from None
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise ServingError(f"no answer within {self.timeout_s} s", "DEADLINE_EXCEEDED", url) from None
            raise ServingError(f"cannot reach the server: {reason}", "UNAVAILABLE", url) from None
        try:
            return json.loads(payload)
        except json.JSONDecodeError as exc:
            raise ServingError(f"response is not JSON: {exc}", "BAD_RESPONSE", url) from None

    # --- gRPC -----------------------------------------------------------------------------------------------------

    def _grpc_channel(self):
        if self._channel is None:
            import grpc

            options = [("grpc.max_send_message_length", _MAX_MESSAGE),
                       ("grpc.max_receive_message_length", _MAX_MESSAGE)]
            if self._tls:
                self._channel = grpc.secure_channel(self._base, grpc.ssl_channel_credentials(), options=options)
            else:
                self._channel = grpc.insecure_channel(self._base, options=options)
        return self._channel

    def _fill_spec(self, spec, signature: Optional[str]) -> None:
        spec.name = self.model
        if self.version is not None:
            spec.version.value = int(self.version)
        if signature:
            spec.signature_name = signature

    def _grpc_call(self, method, request):
        import grpc

        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") and exc.code() else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise ServingError(details or code, code, f"grpc://{self._base}") from None

    def _predict_grpc(self, batch: np.ndarray) -> np.ndarray:
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        request = predict_pb2.PredictRequest()
        _, height, width, _ = batch.shape
        if self.encoding == "float32":
            self._fill_spec(request.model_spec, self._signature(DEFAULT_SIGNATURE, STRENGTH_SIGNATURE))
            request.inputs[HU_INPUT].CopyFrom(make_tensor_proto(batch))
            request.output_filter.append(HU_OUTPUT)
        else:
            self._fill_spec(request.model_spec, self._signature(BYTES_SIGNATURE, BYTES_STRENGTH_SIGNATURE))
            request.inputs[BYTES_INPUT].CopyFrom(
                make_tensor_proto([int16_bytes(image) for image in batch[..., 0]]))
            request.inputs[HEIGHT_INPUT].CopyFrom(make_tensor_proto(np.full(len(batch), height, np.int32)))
            request.inputs[WIDTH_INPUT].CopyFrom(make_tensor_proto(np.full(len(batch), width, np.int32)))
        if self.strength is not None:
            request.inputs[STRENGTH_INPUT].CopyFrom(make_tensor_proto(np.float32(self.strength)))
        stub = prediction_service_pb2_grpc.PredictionServiceStub(self._grpc_channel())
        response = self._grpc_call(stub.Predict, request)
        if self.encoding == "float32":
            if HU_OUTPUT not in response.outputs:
                raise ServingError(f"response has no {HU_OUTPUT!r}: {sorted(response.outputs)}", "BAD_RESPONSE",
                                   f"grpc://{self._base}")
            return make_ndarray(response.outputs[HU_OUTPUT]).astype(np.float32)
        strings = make_ndarray(response.outputs[BYTES_OUTPUT])
        return np.stack([self._from_int16_bytes(s, height, width) for s in strings])[..., np.newaxis]

    def _from_int16_bytes(self, data: bytes, height: int, width: int) -> np.ndarray:
        try:
            return from_int16_bytes(data, height, width)
        except ValueError as exc:
            raise ServingError(str(exc), "BAD_RESPONSE", self.url) from None

    # --- retries --------------------------------------------------------------------------------------------------

    def _with_retries(self, call):
        for attempt in range(self.retries + 1):
            try:
                return call()
            except ServingError as exc:
                transient = exc.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED") or (
                    exc.code is not None and exc.code.isdigit() and int(exc.code) in _RETRY_HTTP)
                if not transient or attempt == self.retries:
                    raise
                time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover


# --- TensorProto <-> numpy without TensorFlow ops -----------------------------------------------------------------

_DTYPES = {  # numpy dtype -> (DataType enum name, repeated field for the values when tensor_content is absent)
    np.dtype(np.float32): ("DT_FLOAT", "float_val"),
    np.dtype(np.float64): ("DT_DOUBLE", "double_val"),
    np.dtype(np.int32): ("DT_INT32", "int_val"),
    np.dtype(np.int16): ("DT_INT16", "int_val"),
    np.dtype(np.int64): ("DT_INT64", "int64_val"),
}


def make_tensor_proto(values: Any):
    """numpy array (float32/64, int16/32/64) or a list of ``bytes`` -> ``tensorflow.TensorProto`` (little-endian
    ``tensor_content`` for numbers, ``string_val`` for bytes), the encoding TF Serving reads."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    proto = tensor_pb2.TensorProto()
    if isinstance(values, (list, tuple)) or (isinstance(values, np.ndarray) and values.dtype == object):
        items = list(np.asarray(values, dtype=object).ravel()) if isinstance(values, np.ndarray) else list(values)
        if not all(isinstance(v, (bytes, bytearray)) for v in items):
            raise TypeError("a list input must hold bytes")
        proto.dtype = types_pb2.DT_STRING
        shape = np.shape(values) if isinstance(values, np.ndarray) else (len(items),)
        proto.tensor_shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in shape]))
        proto.string_val.extend(bytes(v) for v in items)
        return proto
    array = np.asarray(values)
    if array.dtype not in _DTYPES:
        raise TypeError(f"unsupported dtype for a TensorProto: {array.dtype}")
    proto.dtype = types_pb2.DataType.Value(_DTYPES[array.dtype][0])
    proto.tensor_shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in array.shape]))
    proto.tensor_content = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return proto


def make_ndarray(proto) -> np.ndarray:
    """``tensorflow.TensorProto`` -> numpy array; reads ``tensor_content`` or the typed ``*_val`` fields (a server may
    use either; a single value in ``*_val`` fills the whole shape, as TensorFlow defines)."""
    from tensorflow.core.framework import types_pb2

    shape = tuple(int(d.size) for d in proto.tensor_shape.dim)
    name = types_pb2.DataType.Name(proto.dtype)
    if name == "DT_STRING":
        return np.array(list(proto.string_val), dtype=object).reshape(shape)
    matches = [(dtype, field) for dtype, (dt, field) in _DTYPES.items() if dt == name]
    if not matches:
        raise ServingError(f"unsupported tensor dtype in the response: {name}", "BAD_RESPONSE")
    dtype, field = matches[0]
    count = int(np.prod(shape)) if shape else 1
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    values = np.asarray(getattr(proto, field), dtype=dtype)
    if values.size == 1 and count != 1:
        values = np.full(count, values[0], dtype)
    if values.size != count:
        raise ServingError(f"tensor has {values.size} values for shape {shape}", "BAD_RESPONSE")
    return values.reshape(shape)


def _grpc_code_name(code: int) -> str:
    try:
        import grpc

        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    except ImportError:  # pragma: no cover
        pass
    return str(code)
