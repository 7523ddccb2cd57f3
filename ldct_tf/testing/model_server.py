"""A loopback stand-in for ``tensorflow_model_server``, for tests and the quickstart notebook.

The model server binary cannot be installed on the project's machines (../shared/STACK.md), so this serves the
exported SavedModels the way TF Serving does, on 127.0.0.1 only:

* REST, TF Serving's routes and JSON: ``GET /v1/models/NAME[/versions/V]`` (status),
  ``POST /v1/models/NAME[/versions/V]:predict`` with the row (``instances`` -> ``predictions``) and columnar
  (``inputs`` -> ``outputs``) formats, ``{"b64": ...}`` for string inputs and for outputs named ``*_bytes``, errors as
  ``{"error": message}`` with TF Serving's HTTP status for the error code.
* gRPC, the real ``tensorflow.serving.PredictionService/Predict`` and ``ModelService/GetModelStatus`` services from
  ``tensorflow-serving-api`` (its servicer base classes and protos).

Each SavedModel version runs its signatures exactly as a server would: TensorFlow errors keep their code, and their
message is the op's own sentence (what TF Serving answers), without the ``Graph execution error: Detected at node``
preamble that only Python's eager call adds.  Usage::

    from ldct_tf.testing.model_server import serve
    with serve(Path("saved_models"), "ldct_denoiser") as (rest_url, grpc_target):
        ServingClient(rest_url).predict(hu)

Standalone (for trying the client by hand): ``python -m ldct_tf.testing.model_server saved_models [NAME]``.
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
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from ldct_tf.saved_model import DEFAULT_SIGNATURE, graph_error_message, versions
from ldct_tf.testing.rest_json import Fault, request_inputs, response_body

# TF Serving's HTTP status for each error code (tensorflow_serving/model_servers/http_rest_api_handler.cc).
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404,
               "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501,
               "INTERNAL": 500, "UNKNOWN": 500}
_MAX_MESSAGE = 1 << 30
_ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<verb>:predict|/metadata)?$")


class LoopbackModelServer:
    """Loads every version of ``model_root/name`` and answers REST and gRPC requests for it on loopback ports.

    ``rest_log`` and ``grpc_log`` keep each request as received (parsed JSON body / the request proto), so tests can
    check the client's wire format.  ``fail_next(n)`` makes the next n predict calls answer UNAVAILABLE (HTTP 503),
    to exercise client retries; ``delay_next(s)`` delays the next predict call, to exercise client timeouts.
    """

    def __init__(self, model_root: Path, name: str):
        self.name = name
        folder = Path(model_root) / name
        found = versions(folder)
        if not found:
            raise FileNotFoundError(f"{folder}: no SavedModel versions to serve")
        self.models = {v: tf.saved_model.load(str(folder / str(v))) for v in found}
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

    def status(self, name: str, version: Optional[int]) -> list[tuple[int, str]]:
        if name != self.name:
            raise Fault("NOT_FOUND", f"Could not find any versions of model {name}")
        if version is not None and version not in self.models:
            raise Fault("NOT_FOUND", f"Could not find version {version} of model {name}")
        return [(v, "AVAILABLE") for v in sorted(self.models) if version is None or v == version]

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> "LoopbackModelServer":
        server = self

        class Handler(_RestHandler):
            model_server = server

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="rest-fixture", daemon=True).start()
        self.rest_url = f"http://127.0.0.1:{self._http.server_address[1]}"

        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                 options=[("grpc.max_send_message_length", _MAX_MESSAGE),
                                          ("grpc.max_receive_message_length", _MAX_MESSAGE)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_Prediction(self), self._grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_Models(self), self._grpc)
        port = self._grpc.add_insecure_port("127.0.0.1:0")
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
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except json.JSONDecodeError as exc:
                    raise Fault("INVALID_ARGUMENT", f"JSON Parse error: {exc}") from None
            server.rest_log.append((method, self.path, body))
            name, version, verb = self._route()
            if method == "GET" and verb is None:
                states = server.status(name, version)
                self._answer(200, {"model_version_status": [
                    {"version": str(v), "state": state, "status": {"error_code": "OK", "error_message": ""}}
                    for v, state in states]})
            elif method == "POST" and verb == ":predict":
                if not isinstance(body, dict):
                    raise Fault("INVALID_ARGUMENT", "JSON Value: request body Is not object")
                signature = body.get("signature_name", DEFAULT_SIGNATURE)
                specs = server.input_specs(server.signature(name, version, signature))
                inputs, form = request_inputs(body, specs)
                _, outputs = server.predict(name, version, signature, inputs)
                self._answer(200, response_body(outputs, form))
            else:
                raise Fault("NOT_FOUND" if verb != "/metadata" else "UNIMPLEMENTED",
                            f"Malformed request: {method} {self.path}")
        except Fault as fault:
            self._answer(HTTP_STATUS.get(fault.code, 500), {"error": fault.message})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug here must still answer, as a server would
            self._answer(500, {"error": f"{type(exc).__name__}: {exc}"})

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
def serve(model_root: Path, name: str = "ldct_denoiser") -> Iterator[tuple[str, str]]:
    """Serve ``model_root/name/*`` on loopback; yields ``(rest_url, grpc_target)``.  The server object is reachable
    as ``serve.last`` for tests that inspect its request logs."""
    server = LoopbackModelServer(model_root, name).start()
    serve.last = server
    try:
        yield server.rest_url, server.grpc_target
    finally:
        server.stop()


serve.last = None


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m ldct_tf.testing.model_server MODELS_ROOT [NAME]", file=sys.stderr)
        return 2
    with serve(Path(args[0]), args[1] if len(args) > 1 else "ldct_denoiser") as (rest, target):
        print(f"REST {rest}  gRPC {target}  (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
