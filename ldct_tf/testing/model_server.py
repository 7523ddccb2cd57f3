"""A loopback stand-in for ``tensorflow_model_server``, for tests and for trying TF Serving clients without TF Serving.

The model server binary cannot be installed on the project's machines (../shared/STACK.md), so this serves the
exported SavedModels the way TF Serving does, on 127.0.0.1 only:

* REST, TF Serving's routes and JSON: ``GET /v1/models/NAME[/versions/V]`` (status),
  ``GET /v1/models/NAME[/versions/V]/metadata`` (the signature_defs, as TF Serving's metadata answer),
  ``POST /v1/models/NAME[/versions/V]:predict`` with the row (``instances`` -> ``predictions``) and columnar
  (``inputs`` -> ``outputs``) formats, ``{"b64": ...}`` for string inputs and for outputs named ``*_bytes``, errors as
  ``{"error": message}`` with TF Serving's HTTP status for the error code.
* gRPC, the real ``tensorflow.serving.PredictionService/Predict`` and ``GetModelMetadata`` and
  ``ModelService/GetModelStatus`` services from ``tensorflow-serving-api`` (its servicer base classes and protos).

Which versions are served follows the model's ``model_version_policy`` in ``MODELS_ROOT/models.config`` (what
``export`` writes and TF Serving reads): ``latest { num_versions: N }``, ``specific { versions: ... }`` or ``all {}``;
without a config, or without a policy, TF Serving's default, the latest version only.

Each SavedModel version runs its signatures exactly as a server would: TensorFlow errors keep their code, and their
message is the op's own sentence (what TF Serving answers), without the ``Graph execution error: Detected at node``
preamble that only Python's eager call adds.  Usage::

    from ldct_tf.testing.model_server import serve
    with serve(Path("saved_models"), "ldct_denoiser") as (rest_url, grpc_target):
        ServingClient(rest_url).predict(hu)

Standalone (for trying the client by hand): ``python -m ldct_tf.testing saved_models`` listens on TF Serving's
ports, 8500 (gRPC) and 8501 (REST); ``--help`` lists the options.  :func:`serve` picks free ports unless given some,
so tests can run side by side.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional

import grpc
import tensorflow as tf
from google.protobuf import json_format, text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)
from tensorflow_serving.config import model_server_config_pb2

from ldct_tf.saved_model import DEFAULT_SIGNATURE, graph_error_message, versions
from ldct_tf.testing.rest_json import Fault, request_inputs, response_body

# TF Serving's HTTP status for each error code (tensorflow_serving/model_servers/http_rest_api_handler.cc).
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404,
               "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501,
               "INTERNAL": 500, "UNKNOWN": 500}
_MAX_MESSAGE = 1 << 30
#: TF Serving's own default ports (``--port`` for gRPC, ``--rest_api_port`` for REST).
DEFAULT_GRPC_PORT, DEFAULT_REST_PORT = 8500, 8501
MODELS_CONFIG = "models.config"
_ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<verb>:predict|/metadata)?$")


def version_policy(config_file: Optional[Path], name: str):
    """The ``model_version_policy`` of model ``name`` in a ``models.config`` (TF Serving's ``ModelServerConfig``,
    text format); None when there is no config file.  ValueError naming the file when it does not parse or does not
    list the model (TF Serving would not serve it either)."""
    if config_file is None or not Path(config_file).is_file():
        return None
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(Path(config_file).read_text(), config)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_file}: not a TF Serving model config: {exc}") from None
    entries = {entry.name: entry for entry in config.model_config_list.config}
    if name not in entries:
        raise ValueError(f"{config_file}: lists no model named {name!r} (it lists: {', '.join(entries) or 'none'})")
    return entries[name].model_version_policy


def served_versions(available: list[int], policy=None) -> list[int]:
    """The versions TF Serving serves out of ``available`` under a ``ServableVersionPolicy``: the newest N for
    ``latest`` (N at least 1, TF Serving's default when the policy is absent), the listed ones for ``specific``,
    every one for ``all``."""
    available = sorted(available)
    choice = policy.WhichOneof("policy_choice") if policy is not None else None
    if choice == "all":
        return available
    if choice == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in available if v in wanted]
    keep = max(policy.latest.num_versions, 1) if choice == "latest" else 1
    return available[-keep:]


def _signature_defs(version_dir: Path):
    """The SignatureDefMap of a SavedModel's serving meta graph (tag ``serve``), as TF Serving's metadata answers
    it: read from ``saved_model.pb`` itself, so it lists exactly what the real server would."""
    saved = saved_model_pb2.SavedModel.FromString((version_dir / "saved_model.pb").read_bytes())
    graphs = [g for g in saved.meta_graphs if "serve" in g.meta_info_def.tags] or list(saved.meta_graphs)
    result = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in graphs[0].signature_def.items():
        result.signature_def[key].CopyFrom(signature)
    return result


class LoopbackModelServer:
    """Loads the versions of ``model_root/name`` that the model's version policy in ``config`` (default
    ``model_root/models.config``; see :func:`served_versions`) selects, and answers REST and gRPC requests for them
    on loopback ports.

    ``rest_log`` and ``grpc_log`` keep each request as received (parsed JSON body / the request proto), so tests can
    check the client's wire format.  ``fail_next(n)`` makes the next n predict calls answer UNAVAILABLE (HTTP 503),
    to exercise client retries; ``delay_next(s)`` delays the next predict call, to exercise client timeouts.
    """

    def __init__(self, model_root: Path, name: str, config: Optional[Path] = None):
        self.name = name
        folder = Path(model_root) / name
        config = Path(model_root) / MODELS_CONFIG if config is None else Path(config)
        found = versions(folder)
        if not found:
            raise FileNotFoundError(f"{folder}: no SavedModel versions to serve")
        chosen = served_versions(found, version_policy(config, name))
        if not chosen:
            raise FileNotFoundError(f"{folder}: none of its versions ({', '.join(map(str, found))}) is one that the "
                                    f"version policy in {config} asks for")
        self.models = {v: tf.saved_model.load(str(folder / str(v))) for v in chosen}
        self.signature_defs = {v: _signature_defs(folder / str(v)) for v in chosen}
        self.rest_log: list[tuple[str, str, Optional[dict]]] = []
        self.grpc_log: list = []
        self._failures = 0
        self._delay_s = 0.0
        self._lock = threading.Lock()
        self._http: Optional[ThreadingHTTPServer] = None
        self._grpc: Optional[grpc.Server] = None
        self.rest_url = self.grpc_target = ""

    # --- the model ------------------------------------------------------------------------------------------------

    def fail_next(self, count: int) -> None:
        with self._lock:
            self._failures = count

    def delay_next(self, seconds: float) -> None:
        """Make the next predict call wait this long before answering (to exercise client timeouts)."""
        with self._lock:
            self._delay_s = seconds

    def _maybe_fail(self) -> None:
        with self._lock:
            delay, self._delay_s = self._delay_s, 0.0
        if delay:
            time.sleep(delay)
        with self._lock:
            if self._failures > 0:
                self._failures -= 1
                raise Fault("UNAVAILABLE", "injected failure: server temporarily unavailable")

    def _version(self, name: str, version: Optional[int]) -> int:
        if name != self.name:
            raise Fault("NOT_FOUND", f"Servable not found for request: Latest({name})")
        if version is None:
            return max(self.models)
        if version not in self.models:
            raise Fault("NOT_FOUND", f"Servable not found for request: Specific({name}, {version})")
        return version

    def signature(self, name: str, version: Optional[int], signature: str):
        loaded = self.models[self._version(name, version)]
        signature = signature or DEFAULT_SIGNATURE
        if signature not in loaded.signatures:
            raise Fault("FAILED_PRECONDITION",
                        f"Serving signature key \"{signature}\" not found.")
        return loaded.signatures[signature]

    @staticmethod
    def input_specs(function) -> dict:
        return dict(function.structured_input_signature[1])

    def predict(self, name: str, version: Optional[int], signature: str, inputs: dict,
                output_filter: tuple = ()) -> tuple[int, dict]:
        """Run one signature on numpy inputs; returns (version, {output name: numpy array})."""
        self._maybe_fail()
        version = self._version(name, version)
        function = self.signature(name, version, signature)
        specs = self.input_specs(function)
        if set(inputs) != set(specs):
            got, want = ",".join(sorted(inputs)), ",".join(sorted(specs))
            raise Fault("INVALID_ARGUMENT", f"input size does not match signature: {len(inputs)}!={len(specs)} "
                                            f"len({{{got}}}) != len({{{want}}})")
        tensors = {}
        for key, value in inputs.items():
            try:
                tensors[key] = tf.constant(value, dtype=specs[key].dtype)
            except (TypeError, ValueError) as exc:
                raise Fault("INVALID_ARGUMENT", f"input {key!r}: {exc}") from None
        try:
            outputs = function(**tensors)
        except tf.errors.OpError as exc:
            raise Fault(_code_name(exc.error_code), graph_error_message(exc.message)) from None
        except (TypeError, ValueError) as exc:  # shape incompatible with a fixed-shape spec
            raise Fault("INVALID_ARGUMENT", str(exc)) from None
        result = {k: v.numpy() for k, v in outputs.items() if not output_filter or k in output_filter}
        return version, result

    def metadata(self, name: str, version: Optional[int]) -> tuple[int, object]:
        """(version, SignatureDefMap) for a metadata request; NOT_FOUND as TF Serving answers it."""
        version = self._version(name, version)
        return version, self.signature_defs[version]

    def status(self, name: str, version: Optional[int]) -> list[tuple[int, str]]:
        if name != self.name:
            raise Fault("NOT_FOUND", f"Could not find any versions of model {name}")
        if version is not None and version not in self.models:
            raise Fault("NOT_FOUND", f"Could not find version {version} of model {name}")
        return [(v, "AVAILABLE") for v in sorted(self.models) if version is None or v == version]

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def start(self, rest_port: int = 0, grpc_port: int = 0) -> "LoopbackModelServer":
        """Listen on 127.0.0.1; port 0 picks a free one.  OSError naming the port when one is taken."""
        server = self

        class Handler(_RestHandler):
            model_server = server

        try:
            self._http = ThreadingHTTPServer(("127.0.0.1", rest_port), Handler)
        except OSError as exc:
            raise OSError(f"cannot listen on 127.0.0.1:{rest_port} for REST: {exc.strerror or exc}") from None
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="rest-fixture", daemon=True).start()
        self.rest_url = f"http://127.0.0.1:{self._http.server_address[1]}"

        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                 options=[("grpc.max_send_message_length", _MAX_MESSAGE),
                                          ("grpc.max_receive_message_length", _MAX_MESSAGE),
                                          ("grpc.so_reuseport", 0)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_Prediction(self), self._grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_Models(self), self._grpc)
        try:
            port = self._grpc.add_insecure_port(f"127.0.0.1:{grpc_port}")
        except RuntimeError:  # newer grpc raises, older ones return 0
            port = 0
        if not port:
            self.stop()
            raise OSError(f"cannot listen on 127.0.0.1:{grpc_port} for gRPC: address already in use")
        self._grpc.start()
        self.grpc_target = f"127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._grpc is not None:
            self._grpc.stop(grace=None)


def _code_name(code: int) -> str:
    """TensorFlow's error code number -> the gRPC status name (the two share the numbering)."""
    return next((status.name for status in grpc.StatusCode if status.value[0] == code), "UNKNOWN")


# --- REST ---------------------------------------------------------------------------------------------------------

def _proto_json(message) -> dict:
    """A proto as TF Serving's REST API prints it: proto field names, default values printed (``"unknown_rank":
    false``, ``"name": ""``), int64 as strings."""
    try:
        return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf before 5.26 names the option differently
        return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         including_default_value_fields=True)


def _parse_json(payload: bytes):
    """A request body -> JSON value; malformed or absurdly nested JSON is the client's error (400), never a crash:
    Python's parser gives up on deep nesting with RecursionError, which would otherwise surface as a 500."""
    try:
        return json.loads(payload or b"null")
    except json.JSONDecodeError as exc:
        raise Fault("INVALID_ARGUMENT", f"JSON Parse error: {exc}") from None
    except RecursionError:
        raise Fault("INVALID_ARGUMENT", "JSON Parse error: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise Fault("INVALID_ARGUMENT", f"JSON Parse error: not UTF-8 text ({exc.reason})") from None


class _RestHandler(BaseHTTPRequestHandler):
    model_server: LoopbackModelServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _answer(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): nothing to answer
            self.close_connection = True

    def _route(self):
        match = _ROUTE.match(self.path)
        if not match:
            raise Fault("NOT_FOUND", f"Malformed request: {self.command} {self.path}")
        version = int(match["version"]) if match["version"] else None
        return match["name"], version, match["verb"]

    def _handle(self, method: str) -> None:
        server = self.model_server
        try:
            body = None
            if method == "POST":
                length = int(self.headers.get("Content-Length", 0))
                body = _parse_json(self.rfile.read(length))
            server.rest_log.append((method, self.path, body))
            name, version, verb = self._route()
            if method == "GET" and verb is None:
                states = server.status(name, version)
                self._answer(200, {"model_version_status": [
                    {"version": str(v), "state": state, "status": {"error_code": "OK", "error_message": ""}}
                    for v, state in states]})
            elif method == "GET" and verb == "/metadata":
                served, signatures = server.metadata(name, version)
                self._answer(200, {"model_spec": {"name": name, "signature_name": "", "version": str(served)},
                                   "metadata": {"signature_def": _proto_json(signatures)}})
            elif method == "POST" and verb == ":predict":
                self._predict(name, version, body)
            else:
                raise Fault("NOT_FOUND", f"Malformed request: {method} {self.path}")
        except RecursionError:  # nesting deep enough to pass the parser but not the conversion to a tensor
            self._answer(400, {"error": "JSON Value: nested too deeply to be a tensor"})
        except Fault as fault:
            self._answer(HTTP_STATUS.get(fault.code, 500), {"error": fault.message})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug here must still answer, as a server would
            self._answer(500, {"error": f"{type(exc).__name__}: {exc}"})

    def _predict(self, name: str, version: Optional[int], body) -> None:
        server = self.model_server
        if not isinstance(body, dict):
            raise Fault("INVALID_ARGUMENT", "JSON Value: request body Is not object")
        signature = body.get("signature_name", DEFAULT_SIGNATURE)
        specs = server.input_specs(server.signature(name, version, signature))
        inputs, form = request_inputs(body, specs)
        _, outputs = server.predict(name, version, signature, inputs)
        self._answer(200, response_body(outputs, form))

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")


# --- gRPC ---------------------------------------------------------------------------------------------------------

class _Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server: LoopbackModelServer):
        self.server = server

    def Predict(self, request, context):  # noqa: N802 (the service's method name)
        self.server.grpc_log.append(request)
        spec = request.model_spec
        version = spec.version.value if spec.HasField("version") else None
        try:
            inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
            version, outputs = self.server.predict(spec.name, version, spec.signature_name, inputs,
                                                   tuple(request.output_filter))
        except Fault as fault:
            context.abort(getattr(grpc.StatusCode, fault.code, grpc.StatusCode.UNKNOWN), fault.message)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = version
        response.model_spec.signature_name = spec.signature_name or DEFAULT_SIGNATURE
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response


    def GetModelMetadata(self, request, context):  # noqa: N802
        self.server.grpc_log.append(request)
        spec = request.model_spec
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"Metadata field {','.join(request.metadata_field) or '(none)'} is not supported; "
                          f"ask for signature_def")
        try:
            version, signatures = self.server.metadata(spec.name, spec.version.value if spec.HasField("version")
                                                       else None)
        except Fault as fault:
            context.abort(getattr(grpc.StatusCode, fault.code, grpc.StatusCode.UNKNOWN), fault.message)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = version
        response.metadata["signature_def"].Pack(signatures)
        return response


class _Models(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, server: LoopbackModelServer):
        self.server = server

    def GetModelStatus(self, request, context):  # noqa: N802
        self.server.grpc_log.append(request)
        spec = request.model_spec
        try:
            states = self.server.status(spec.name, spec.version.value if spec.HasField("version") else None)
        except Fault as fault:
            context.abort(getattr(grpc.StatusCode, fault.code, grpc.StatusCode.UNKNOWN), fault.message)
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state in states:
            entry = response.model_version_status.add()
            entry.version = version
            entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
        return response


@contextmanager
def serve(model_root: Path, name: str = "ldct_denoiser", rest_port: int = 0, grpc_port: int = 0,
          config: Optional[Path] = None) -> Iterator[tuple[str, str]]:
    """Serve ``model_root/name/*`` on loopback; yields ``(rest_url, grpc_target)``.  Ports 0 (the default) pick free
    ones, so tests can run side by side; the command (``python -m ldct_tf.testing``) uses TF Serving's 8500/8501.
    ``config``: the ``models.config`` whose version policy applies (default ``model_root/models.config``).  The
    server object is reachable as ``serve.last`` for tests that inspect its request logs."""
    server = LoopbackModelServer(model_root, name, config).start(rest_port, grpc_port)
    serve.last = server
    try:
        yield server.rest_url, server.grpc_target
    finally:
        server.stop()


serve.last = None

