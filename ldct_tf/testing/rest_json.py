"""TF Serving's REST predict JSON <-> numpy, as the model server reads and writes it: the row (``instances`` ->
``predictions``) and columnar (``inputs`` -> ``outputs``) formats, ``{"b64": ...}`` for string inputs and for outputs
whose name ends in ``_bytes``, and the server's error texts for malformed requests.

Kept apart from the server loop so the wire format can be read (and checked against TF Serving's documentation) in one
place.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import tensorflow as tf

from ldct_tf.errors import LdctError


class Fault(LdctError):
    """An error the server answers with: a gRPC status code name and a message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _json_to_array(value, dtype: tf.DType) -> np.ndarray:
    """A JSON value (nested lists; ``{"b64": ...}`` objects for strings) -> numpy array of the signature's dtype."""
    if dtype == tf.string:
        def convert(item):
            if isinstance(item, list):
                return [convert(i) for i in item]
            if isinstance(item, dict):
                if set(item) != {"b64"} or not isinstance(item["b64"], str):
                    raise Fault("INVALID_ARGUMENT", f"JSON Value: {json.dumps(item)[:80]} not formatted correctly "
                                                    "for base64 data")
                try:
                    return base64.b64decode(item["b64"], validate=True)
                except ValueError:
                    raise Fault("INVALID_ARGUMENT", "Unable to base64 decode") from None
            if isinstance(item, str):
                return item.encode("utf-8")
            raise Fault("INVALID_ARGUMENT", f"JSON Value: {item!r} is not of expected type: string")

        converted = convert(value)
        array = np.empty(np.shape(converted) if isinstance(converted, list) else (), dtype=object)
        if isinstance(converted, list):
            _fill(array, converted)
        else:
            array[()] = converted
        return array
    try:
        array = np.asarray(value, dtype=dtype.as_numpy_dtype)
    except OverflowError as exc:  # e.g. a height of 2**31 for an int32 input: the client's error, not a crash
        raise Fault("INVALID_ARGUMENT", f"JSON value out of range for {dtype.name}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise Fault("INVALID_ARGUMENT", f"JSON value is not a dense {dtype.name} tensor: {exc}") from None
    return array


def _fill(array: np.ndarray, nested: list) -> None:
    for index, item in enumerate(nested):
        if isinstance(item, list):
            _fill(array[index], item)
        else:
            array[index] = item


def _array_to_json(value, as_bytes: bool):
    """numpy value -> JSON value; strings as ``{"b64": ...}`` when the output's name ends in ``_bytes``."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_array_to_json(item, as_bytes) for item in value] if value.ndim else _array_to_json(value[()],
                                                                                                   as_bytes)
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")} if as_bytes else value.decode("utf-8", "replace")
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def request_inputs(body: dict, specs: dict) -> tuple[dict, str]:
    """The ``instances`` (row) or ``inputs`` (columnar) part of a predict request -> ({name: array}, format)."""
    if ("instances" in body) == ("inputs" in body):
        raise Fault("INVALID_ARGUMENT", "Missing 'inputs' or 'instances' key" if "instances" not in body else
                    "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist")
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise Fault("INVALID_ARGUMENT", "Expecting 'instances' to be a non-empty list")
        named = isinstance(instances[0], dict) and set(instances[0]) != {"b64"}
        if not named:
            if len(specs) > 1:
                raise Fault("INVALID_ARGUMENT", "instances is a plain list, but expecting list of objects as "
                                                "multiple input tensors required as per tensorinfo_map")
            key = next(iter(specs))
            return {key: _json_to_array(instances, specs[key].dtype)}, "row"
        columns: dict = {key: [] for key in specs}
        for index, item in enumerate(instances):
            if not isinstance(item, dict) or set(item) != set(specs):
                raise Fault("INVALID_ARGUMENT", f"Failed to process element: {index} of 'instances' list. keys must "
                                                f"be equal to: {','.join(sorted(specs))}")
            for key in specs:
                columns[key].append(item[key])
        return {key: _json_to_array(values, specs[key].dtype) for key, values in columns.items()}, "row"
    inputs = body["inputs"]
    if isinstance(inputs, dict) and set(inputs) != {"b64"}:
        missing = set(specs) - set(inputs)
        if missing:
            raise Fault("INVALID_ARGUMENT", f"Missing named input: {sorted(missing)[0]} in 'inputs' object.")
        return {key: _json_to_array(inputs[key], specs[key].dtype) for key in inputs}, "columnar"
    if len(specs) > 1:
        raise Fault("INVALID_ARGUMENT", "inputs is a plain value/list, but expecting an object as multiple input "
                                        "tensors required as per tensorinfo_map")
    key = next(iter(specs))
    return {key: _json_to_array(inputs, specs[key].dtype)}, "columnar"


def response_body(outputs: dict, form: str) -> dict:
    encoded = {k: (v, k.endswith("_bytes") and v.dtype == object) for k, v in outputs.items()}
    if form == "columnar":
        if len(encoded) == 1:
            (array, as_bytes), = encoded.values()
            return {"outputs": _array_to_json(array, as_bytes)}
        return {"outputs": {k: _array_to_json(a, b) for k, (a, b) in encoded.items()}}
    batch = {len(a) for a, _ in encoded.values()}
    if len(batch) != 1:
        raise Fault("INVALID_ARGUMENT", "outputs have inconsistent batch sizes")
    predictions = []
    for index in range(batch.pop()):
        items = {k: _array_to_json(a[index], b) for k, (a, b) in encoded.items()}
        predictions.append(next(iter(items.values())) if len(items) == 1 else items)
    return {"predictions": predictions}
