"""``ldct_tf.denoise.serving_client`` end to end against the loopback TF Serving stand-in: REST and gRPC predict, wire formats checked
against TF Serving's documented JSON and the real tensorflow-serving-api protos, status, errors, retries, timeouts."""

from __future__ import annotations

import base64
import socket

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from ldct_tf.export import SavedModelDenoiser
from ldct_tf.denoise.serving_client import ServingClient, ServingError, make_ndarray, make_tensor_proto
from ldct_tf.testing.model_server import serve
from ldct_tf.testing.models import export_test_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved_models")
    _, version_dir = export_test_model(root)
    with serve(root, "ldct_denoiser") as (rest_url, grpc_target):
        yield {"rest": rest_url, "grpc": grpc_target, "fixture": serve.last,
               "local": SavedModelDenoiser(version_dir), "root": root}


@pytest.fixture(scope="module")
def slices():
    hu = np.rint(np.random.default_rng(0).normal(40, 70, (3, 37, 50))).astype(np.float32)
    hu[:, :3] = -1000.0
    return hu


@pytest.mark.parametrize("protocol,encoding,tolerance", [
    ("rest", "float32", 1e-3), ("rest", "int16", 0.5 + 1e-3), ("grpc", "float32", 1e-3), ("grpc", "int16", 0.5 + 1e-3),
])
def test_predict_matches_the_local_savedmodel(server, slices, protocol, encoding, tolerance):
    # Batched as the client sends them (2 + 1): oneDNN's float arithmetic differs with the batch size by ~1e-3 HU.
    expected = np.concatenate([server["local"](slices[:2]), server["local"](slices[2:])])
    assert np.abs(expected - slices).mean() > 5.0  # the test model changes its input
    with ServingClient(server[protocol], encoding=encoding, batch_size=2) as client:
        assert client.protocol == protocol
        got = client.predict(slices)  # two requests: batch 2 + batch 1
        assert got.shape == slices.shape and got.dtype == np.float32
        assert np.abs(got - expected).max() <= tolerance
        one = client.predict(slices[0])
        assert one.shape == slices[0].shape


def test_rest_wire_format_is_tf_servings_json(server, slices):
    log = server["fixture"].rest_log
    ServingClient(server["rest"], encoding="float32").predict(slices[:2])
    method, path, body = log[-1]
    assert (method, path) == ("POST", "/v1/models/ldct_denoiser:predict")
    # Columnar format: {"signature_name", "inputs": {name: nested lists [batch, height, width, 1]}}.
    assert set(body) == {"signature_name", "inputs"} and body["signature_name"] == "serving_default"
    np.testing.assert_array_equal(np.asarray(body["inputs"]["hu"], np.float32), slices[:2, ..., None])

    ServingClient(server["rest"], version=1, encoding="int16").predict(slices[:2])
    method, path, body = log[-1]
    assert path == "/v1/models/ldct_denoiser/versions/1:predict"
    # Row format with base64 bytes: {"instances": [{"image_bytes": {"b64": ...}, "height": H, "width": W}, ...]}.
    assert body["signature_name"] == "denoise_bytes" and len(body["instances"]) == 2
    first = body["instances"][0]
    assert set(first) == {"image_bytes", "height", "width"} and (first["height"], first["width"]) == (37, 50)
    assert base64.b64decode(first["image_bytes"]["b64"]) == slices[0].astype("<i2").tobytes()


def test_grpc_wire_format_is_the_real_predict_request(server, slices):
    log = server["fixture"].grpc_log
    ServingClient(server["grpc"], version=1).predict(slices[:2])
    request = log[-1]
    assert isinstance(request, predict_pb2.PredictRequest)
    assert request.model_spec.name == "ldct_denoiser" and request.model_spec.version.value == 1
    assert request.model_spec.signature_name == "serving_default"
    tensor = request.inputs["hu"]
    assert tf.dtypes.as_dtype(tensor.dtype) == tf.float32
    assert [d.size for d in tensor.tensor_shape.dim] == [2, 37, 50, 1]
    np.testing.assert_array_equal(tf.make_ndarray(tensor), slices[:2, ..., None])  # TensorFlow's own decoder
    assert list(request.output_filter) == ["denoised_hu"]

    ServingClient(server["grpc"], encoding="int16").predict(slices[:1])
    request = log[-1]
    assert request.model_spec.signature_name == "denoise_bytes" and not request.model_spec.HasField("version")
    assert tf.make_ndarray(request.inputs["image_bytes"])[0] == slices[0].astype("<i2").tobytes()
    assert tf.make_ndarray(request.inputs["height"]).tolist() == [37]


def test_tensor_proto_codec_agrees_with_tensorflow():
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1) - 7.5
    np.testing.assert_array_equal(tf.make_ndarray(make_tensor_proto(values)), values)
    np.testing.assert_array_equal(make_ndarray(tf.make_tensor_proto(values)), values)
    # A server may answer with the typed value fields instead of tensor_content; one value fills the shape.
    proto = tf.make_tensor_proto(values)
    proto.ClearField("tensor_content")
    proto.float_val.extend(values.ravel().tolist())
    np.testing.assert_array_equal(make_ndarray(proto), values)
    filled = tf.make_tensor_proto(np.float32(2.5), shape=[2, 2])
    np.testing.assert_array_equal(make_ndarray(filled), np.full((2, 2), 2.5, np.float32))
    strings = make_tensor_proto([b"\x00\x01", b"ab"])
    assert tf.make_ndarray(strings).tolist() == [b"\x00\x01", b"ab"]
    np.testing.assert_array_equal(make_ndarray(make_tensor_proto(np.array([5, -3], np.int32))), [5, -3])


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_status(server, protocol):
    assert ServingClient(server[protocol]).status() == {
        "model": "ldct_denoiser",
        "versions": [{"version": 1, "state": "AVAILABLE", "error_code": "OK", "error_message": ""}]}
    assert ServingClient(server[protocol], version=1).wait_until_available(timeout_s=5)["versions"][0]["version"] == 1
    with pytest.raises(ServingError) as info:
        ServingClient(server[protocol], model="no_such_model").status()
    assert info.value.code in ("404", "NOT_FOUND") and "no_such_model" in info.value.message


@pytest.mark.parametrize("protocol,code", [("rest", "400"), ("grpc", "INVALID_ARGUMENT")])
def test_errors_carry_the_servers_message(server, protocol, code):
    bad = np.zeros((1, 8, 8), np.float32)
    bad[0, 2, 2] = np.nan
    with pytest.raises(ServingError) as info:
        ServingClient(server[protocol], encoding="float32").predict(bad)
    assert info.value.code == code
    assert "contains NaN or Inf; expected finite HU values" in info.value.message
    assert "NaN or Inf" in str(info.value) and "Graph execution error" not in str(info.value)
    assert info.value.message.startswith("input 'hu' contains NaN or Inf")  # the useful sentence first
    with pytest.raises(ServingError) as info:
        ServingClient(server[protocol], version=7).predict(np.zeros((4, 4), np.float32))
    assert info.value.code in ("404", "NOT_FOUND") and "7" in info.value.message
    # int16 transport would turn NaN into a number the server never sees as NaN: refused before sending.
    with pytest.raises(ValueError, match="NaN or Inf"):
        ServingClient(server[protocol], encoding="int16").predict(bad)


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_transient_failures_are_retried(server, slices, protocol):
    fixture = server["fixture"]
    client = ServingClient(server[protocol], retries=2, backoff_s=0.01)
    fixture.fail_next(2)
    np.testing.assert_allclose(client.predict(slices[0]), ServingClient(server[protocol]).predict(slices[0]))
    fixture.fail_next(3)
    with pytest.raises(ServingError) as info:
        client.predict(slices[0])
    assert info.value.code in ("503", "UNAVAILABLE") and "temporarily unavailable" in info.value.message
    fixture.fail_next(0)


@pytest.mark.parametrize("protocol,code", [("rest", "DEADLINE_EXCEEDED"), ("grpc", "DEADLINE_EXCEEDED")])
def test_timeout(server, slices, protocol, code):
    server["fixture"].delay_next(2.0)
    with pytest.raises(ServingError) as info:
        ServingClient(server[protocol], timeout_s=0.3, retries=0).predict(slices[0])
    assert info.value.code == code


def test_unreachable_server_is_unavailable_after_retries():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for url in (f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"):
        with pytest.raises(ServingError) as info:
            ServingClient(url, retries=1, backoff_s=0.01, timeout_s=2).status()
        assert info.value.code == "UNAVAILABLE"


def test_url_and_argument_parsing():
    assert ServingClient("https://example.org:8501/").protocol == "rest"
    assert ServingClient("grpc://example.org:8500").protocol == "grpc"
    assert ServingClient("example.org:8500").protocol == "grpc"
    assert ServingClient("example.org:8500", protocol="rest").encoding == "int16"
    assert ServingClient("http://h:1").encoding == "int16" and ServingClient("h:1").encoding == "float32"
    for bad in (dict(url="ftp://h:1"), dict(url="h:1", protocol="soap"), dict(url="h:1", encoding="png"),
                dict(url="h:1", batch_size=0)):
        with pytest.raises(ValueError):
            ServingClient(**bad)
    with pytest.raises(ValueError, match=r"\[N, H, W, 1\]"):
        ServingClient("h:1").predict(np.zeros((1, 2, 2, 2), np.float32))


def test_rest_400_body_starts_with_the_useful_sentence(server):
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"signature_name": "serving_default", "inputs": {"hu": np.zeros((1, 3, 3, 1)).tolist()}})
    request = urllib.request.Request(server["rest"] + "/v1/models/ldct_denoiser:predict", data=body.encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 400
    error = json.loads(info.value.read())["error"]
    assert error.startswith("input 'hu' is smaller than the model's minimum of 8x8 pixels"), error


@pytest.mark.parametrize("protocol,encoding,code", [("rest", "float32", "400"), ("rest", "int16", "400"),
                                                    ("grpc", "float32", "INVALID_ARGUMENT"),
                                                    ("grpc", "int16", "INVALID_ARGUMENT")])
def test_too_small_inputs_are_refused_with_the_minimum(server, protocol, encoding, code):
    name = "hu" if encoding == "float32" else "image_bytes"
    with pytest.raises(ServingError) as info:
        ServingClient(server[protocol], encoding=encoding).predict(np.zeros((3, 3), np.float32))
    assert info.value.code == code
    assert info.value.message.startswith(f"input '{name}' is smaller than the model's minimum of 8x8 pixels")
    assert str(info.value).endswith(info.value.message)


def test_serving_error_leads_with_the_sentence_of_a_real_servers_answer():
    text = ("assertion failed: [input \\'hu\\' is smaller than the model\\'s minimum of 16x16 pixels (height and width "
            "must be >= 16; send whole slices); got shape] [1 3 3 1]\n\t [[{{node Assert_3/Assert}}]]")
    error = ServingError(text, "400", "http://h:1")
    assert error.message == ("input 'hu' is smaller than the model's minimum of 16x16 pixels (height and width must "
                             "be >= 16; send whole slices); got shape [1 3 3 1]")
    assert error.details == text and str(error) == f"400 (http://h:1): {error.message}"


# --- the TF Serving stand-in itself: its command, ports, metadata route, version policy, malformed requests ---------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(url: str, data: bytes | None = None) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_stand_in_command_help_and_tf_serving_default_ports():
    import subprocess
    import sys

    from ldct_tf.testing import model_server
    from ldct_tf.testing.__main__ import build_parser

    done = subprocess.run([sys.executable, "-m", "ldct_tf.testing", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.startswith("usage: python -m ldct_tf.testing")
    assert "8500" in done.stdout and "8501" in done.stdout
    args = build_parser().parse_args([])
    assert (args.grpc_port, args.rest_port) == (8500, 8501)
    assert (model_server.DEFAULT_GRPC_PORT, model_server.DEFAULT_REST_PORT) == (8500, 8501)
    args = build_parser().parse_args(["m", "--port", "9500", "--rest_api_port", "9501", "--model_name", "x"])
    assert (args.grpc_port, args.rest_port, args.name, str(args.models_root)) == (9500, 9501, "x", "m")


def test_stand_in_listens_on_the_ports_asked_and_names_a_taken_one(server, capsys):
    from ldct_tf.testing.__main__ import main

    rest_port, grpc_port = _free_port(), _free_port()
    with serve(server["root"], rest_port=rest_port, grpc_port=grpc_port) as (rest_url, grpc_target):
        assert rest_url == f"http://127.0.0.1:{rest_port}" and grpc_target == f"127.0.0.1:{grpc_port}"
        assert ServingClient(rest_url).status()["versions"][0]["state"] == "AVAILABLE"
        for flags, port in ((["--rest_api_port", str(rest_port), "--port", "0"], rest_port),
                            (["--rest_api_port", "0", "--port", str(grpc_port)], grpc_port)):
            assert main([str(server["root"]), *flags]) == 1
            err = capsys.readouterr().err
            assert f"127.0.0.1:{port}" in err and "Traceback" not in err and err.count("\n") == 1, err


def test_metadata_route_answers_the_signature_defs(server):
    status, body = _request(server["rest"] + "/v1/models/ldct_denoiser/metadata")
    assert status == 200, body
    assert body["model_spec"] == {"name": "ldct_denoiser", "signature_name": "", "version": "1"}
    signatures = body["metadata"]["signature_def"]["signature_def"]
    default = signatures["serving_default"]
    assert default["method_name"] == "tensorflow/serving/predict"
    assert default["inputs"]["hu"]["dtype"] == "DT_FLOAT"
    assert default["inputs"]["hu"]["tensor_shape"] == {"dim": [], "unknown_rank": True}  # any rank: checked inside
    output = default["outputs"]["denoised_hu"]
    assert output["dtype"] == "DT_FLOAT" and output["tensor_shape"]["unknown_rank"] is False
    assert output["tensor_shape"]["dim"] == [{"size": s, "name": ""} for s in ("-1", "-1", "-1", "1")]
    assert set(signatures["denoise_bytes"]["inputs"]) == {"image_bytes", "height", "width"}
    assert signatures["denoise_bytes"]["outputs"]["denoised_bytes"]["dtype"] == "DT_STRING"
    status, body = _request(server["rest"] + "/v1/models/ldct_denoiser/versions/1/metadata")
    assert status == 200 and body["model_spec"]["version"] == "1"
    status, body = _request(server["rest"] + "/v1/models/ldct_denoiser/versions/7/metadata")
    assert status == 404 and "7" in body["error"]

    import grpc
    from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "ldct_denoiser"
    request.metadata_field.append("signature_def")
    with grpc.insecure_channel(server["grpc"]) as channel:
        answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=60)
    unpacked = get_model_metadata_pb2.SignatureDefMap()
    assert answer.metadata["signature_def"].Unpack(unpacked) and answer.model_spec.version.value == 1
    assert set(unpacked.signature_def["serving_default"].inputs) == {"hu"}


def test_version_policy_follows_models_config(server, tmp_path):
    import shutil

    from tensorflow_serving.config import file_system_storage_path_source_pb2 as policies

    from ldct_tf.testing.model_server import LoopbackModelServer, served_versions, version_policy

    policy = policies.FileSystemStoragePathSourceConfig.ServableVersionPolicy
    assert served_versions([1, 2, 3]) == [3]  # no config: TF Serving's default, the latest only
    assert served_versions([1, 2, 3], policy(latest=policy.Latest(num_versions=2))) == [2, 3]
    assert served_versions([1, 2, 3], policy(latest=policy.Latest())) == [3]
    assert served_versions([1, 2, 3], policy(specific=policy.Specific(versions=[1, 3, 9]))) == [1, 3]
    assert served_versions([1, 2, 3], policy(all=policy.All())) == [1, 2, 3]

    model = tmp_path / "ldct_denoiser"
    for version in (1, 2, 3):
        shutil.copytree(server["root"] / "ldct_denoiser" / "1", model / str(version))
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "ldct_denoiser" base_path: "/models/ldct_denoiser" '
                      'model_platform: "tensorflow" model_version_policy { latest { num_versions: 2 } } } }')
    stand_in = LoopbackModelServer(tmp_path, "ldct_denoiser")
    assert sorted(stand_in.models) == [2, 3] and stand_in.status("ldct_denoiser", None) == [(2, "AVAILABLE"),
                                                                                           (3, "AVAILABLE")]
    with pytest.raises(ValueError, match="lists no model named 'other'"):
        version_policy(config, "other")
    config.write_text("model_config_list { config { name: ")
    with pytest.raises(ValueError, match="models.config: not a TF Serving model config"):
        LoopbackModelServer(tmp_path, "ldct_denoiser")


@pytest.mark.parametrize("body,message", [
    (b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
    (b'{"inputs": {"hu": ' + b"[" * 900 + b"0" + b"]" * 900 + b"}}", ""),
    (b'{"signature_name": "denoise_bytes", "instances": [{"image_bytes": ' + b"[" * 900 + b'"x"' + b"]" * 900
     + b', "height": 1, "width": 1}]}', ""),
    (b'{"signature_name": "denoise_bytes", "instances": [{"image_bytes": {"b64": "AAAA"}, "height": 2147483648, '
     b'"width": 1}]}', "out of range for int32"),
    (b'{"signature_name": "denoise_bytes", "instances": [{"image_bytes": {"b64": "AAAA"}, "height": 2147483647, '
     b'"width": 2}]}', ""),
])
def test_malformed_requests_answer_400_never_500(server, body, message):
    status, answer = _request(server["rest"] + "/v1/models/ldct_denoiser:predict", body)
    assert status == 400, answer
    assert message in answer["error"] and "Error:" not in answer["error"][:20], answer


def _saturate(outputs: dict) -> dict:
    """What a broken model answers: every pixel at a clip limit (both limits, in a checkerboard)."""
    result = {}
    for key, value in outputs.items():
        if key == "denoised_hu":
            checker = (np.indices(value.shape).sum(axis=0) % 2).astype(bool)
            result[key] = np.where(checker, -1024.0, 3071.0).astype(np.float32)
        else:
            result[key] = np.array([np.where(np.arange(len(item) // 2) % 2, -1024, 3071).astype("<i2").tobytes()
                                    for item in value], dtype=object)
    return result


@pytest.mark.parametrize("protocol,encoding", [("rest", "int16"), ("grpc", "float32")])
def test_client_refuses_an_all_saturated_answer(server, slices, monkeypatch, protocol, encoding):
    fixture = server["fixture"]
    real_predict = fixture.predict

    def broken(*args, **kwargs):
        version, outputs = real_predict(*args, **kwargs)
        return version, _saturate(outputs)

    monkeypatch.setattr(fixture, "predict", broken)
    client = ServingClient(server[protocol], encoding=encoding, batch_size=2)
    with pytest.raises(ServingError) as info:
        client.predict(slices)
    assert info.value.code == "BAD_RESPONSE"
    assert "every pixel at its clip limits (-1024 / 3071 HU)" in info.value.message
    assert "looks broken" in info.value.message
    # An input that is itself all at the limits (padding outside the scanner's field of view) comes back clipped.
    padding = np.full((1, 16, 16), -3024.0, np.float32)
    assert client.predict(padding).shape == padding.shape
