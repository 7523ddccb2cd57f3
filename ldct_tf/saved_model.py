"""The exported denoiser's contract: signature and tensor names, the bytes encodings, the version layout, the metadata
file, the shapes callers may send, the strength control, and loading a version (:class:`SavedModelDenoiser`).

Strength (as vendors offer low / medium / high): ``output = input + strength * (network output - input)`` in HU, with
strength in [0, 1]; 0 returns the input bit for bit, 1 the network output bit for bit (:func:`apply_strength`).  A
SavedModel signature cannot give an input a default, so each signature comes twice: without ``strength``
(``serving_default``, ``denoise_bytes``: the model's ``default_strength`` from ``metadata.json``, 1.0 unless the
exporter chose another) and with it (``denoise_strength``, ``denoise_bytes_strength``: a float32 scalar, or one value
per slice ``[batch]``).  Versions exported before the control (``saved_models/ldct_denoiser/1`` and ``2``) have only
the first two; :class:`SavedModelDenoiser` applies the same formula to their output outside the graph.

Everything that talks to an exported model (the local denoiser, ``ldct_tf.denoise.serving_client``'s client, the loopback TF
Serving stand-in, the exporter) reads these names from here, so the writer and the readers cannot drift apart.
TensorFlow is imported only when a model is loaded: the serving client needs the contract, not TensorFlow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ldct_tf import ct

DEFAULT_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "denoise_bytes"
#: The same two with a ``strength`` input (SavedModel signatures cannot have optional inputs).
STRENGTH_SIGNATURE = "denoise_strength"
BYTES_STRENGTH_SIGNATURE = "denoise_bytes_strength"
#: Input and output tensor names of each signature.
HU_INPUT, HU_OUTPUT = "hu", "denoised_hu"
BYTES_INPUT, HEIGHT_INPUT, WIDTH_INPUT, BYTES_OUTPUT = "image_bytes", "height", "width", "denoised_bytes"
STRENGTH_INPUT = "strength"
#: The strength of a model whose metadata names none (every version exported before the control).
DEFAULT_STRENGTH = 1.0
#: Stored value of a 16-bit PNG = HU + PNG_HU_OFFSET (the usual CT convention: rescale intercept -1024).
PNG_HU_OFFSET = 1024
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METADATA_FILE = "metadata.json"

#: What each signature takes and returns, as written into ``metadata.json``.
SIGNATURES = {
    DEFAULT_SIGNATURE: {"inputs": {HU_INPUT: "float32 [batch, height, width, 1] HU"},
                        "outputs": {HU_OUTPUT: "float32 [batch, height, width, 1] HU"}},
    BYTES_SIGNATURE: {"inputs": {BYTES_INPUT: f"string [batch]: 16-bit greyscale PNG of HU + {PNG_HU_OFFSET}, or "
                                              "raw little-endian int16 HU",
                                 HEIGHT_INPUT: "int32 [batch] (raw: required; PNG: 0 or its height)",
                                 WIDTH_INPUT: "int32 [batch] (raw: required; PNG: 0 or its width)"},
                      "outputs": {BYTES_OUTPUT: "string [batch], same encoding as each input"}},
}
_STRENGTH_TEXT = "float32 scalar or [batch] in [0, 1]: 0 returns the input unchanged, 1 the full network output"
SIGNATURES[STRENGTH_SIGNATURE] = {"inputs": {**SIGNATURES[DEFAULT_SIGNATURE]["inputs"], STRENGTH_INPUT: _STRENGTH_TEXT},
                                  "outputs": SIGNATURES[DEFAULT_SIGNATURE]["outputs"]}
SIGNATURES[BYTES_STRENGTH_SIGNATURE] = {"inputs": {**SIGNATURES[BYTES_SIGNATURE]["inputs"],
                                                   STRENGTH_INPUT: _STRENGTH_TEXT},
                                        "outputs": SIGNATURES[BYTES_SIGNATURE]["outputs"]}


def check_strength(value: object, what: str = "strength") -> float:
    """``value`` as a float in [0, 1]; ValueError quoting it otherwise (NaN, Inf, out of range, not a number).

    Checked before any model runs, by every caller (export, the local denoiser, the serving client, the CLIs), so a
    wrong strength is one line and never a half-written series; the graph checks again for TF Serving's clients.
    """
    try:
        strength = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if not (np.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise ValueError(f"{what} must be a finite number in [0, 1], got {value!r}")
    return strength


def apply_strength(network_hu: np.ndarray, hu: np.ndarray, strength: float) -> np.ndarray:
    """``hu + strength * (network_hu - hu)`` in float32, with 0 giving ``hu`` and 1 giving ``network_hu`` exactly:
    the graph's formula (``ldct_tf.export.graph.mix_strength``), for versions exported without a strength input."""
    hu, network_hu = np.asarray(hu, np.float32), np.asarray(network_hu, np.float32)
    if strength == 0.0:
        return hu.copy()
    if strength == 1.0:
        return network_hu
    return hu + np.float32(strength) * (network_hu - hu)


def versions(model_folder: Path) -> list[int]:
    """The integer versions under a model folder that hold a SavedModel (TF Serving's layout), ascending."""
    model_folder = Path(model_folder)
    if not model_folder.is_dir():
        return []
    return sorted(int(p.name) for p in model_folder.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").exists())


def resolve_version_dir(path: str | Path) -> Path:
    """A model folder (OUTPUT, holding integer version subfolders) -> its newest version folder; a version folder ->
    itself.  Raises FileNotFoundError naming the path when there is no SavedModel."""
    path = Path(path)
    if (path / "saved_model.pb").exists():
        return path
    found = versions(path)
    if found:
        return path / str(found[-1])
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


def int16_bytes(image: np.ndarray) -> bytes:
    """float HU [H, W] -> the raw encoding of ``denoise_bytes``: little-endian int16, rounded and clipped."""
    return ct.hu_to_int16(image).astype("<i2", copy=False).tobytes()


def from_int16_bytes(data: bytes, height: int, width: int) -> np.ndarray:
    """The raw encoding back to float32 HU [height, width]; ValueError when the length does not match."""
    if len(data) != 2 * height * width:
        raise ValueError(f"expected {2 * height * width} bytes of int16 for {height}x{width}, got {len(data)}")
    return np.frombuffer(data, "<i2").reshape(height, width).astype(np.float32)


_NOISE_LINES = ("Graph execution error", "Detected at node", "<stack traces", "[[{{", "[[")


def graph_error_message(message: str) -> str:
    """The sentence of a TensorFlow runtime error that says what went wrong.

    Python's ``Graph execution error: Detected at node ...`` preamble, node names and ``[Op:...]`` tails are dropped,
    and an ``Assert`` op's ``assertion failed: [text] [values]`` becomes ``text values``, so the same failure reads
    the same from Python, from the stand-in and from a real TF Serving.
    """
    for line in message.splitlines():
        line = line.strip()
        if not line or line.startswith(_NOISE_LINES):
            continue
        line = line.split("\t [[")[0].split(" [[{{")[0].split(" [Op:")[0].strip()
        if line.startswith("assertion failed: "):
            line = " ".join(_assert_items(line[len("assertion failed: "):]))
        return line
    return message.strip()


def _assert_items(text: str) -> list[str]:
    """``[a] [b c]`` (an Assert op's data, each item bracketed, string quotes escaped) -> ``["a", "[b c]"]``:
    string items lose their brackets, tensor values keep them."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth, start = depth + 1, index if depth == 0 else start
        elif char == "]" and depth:
            depth -= 1
            if depth == 0:
                item = text[start + 1:index].replace("\\'", "'")
                numeric = all(c in "0123456789.-+e []" for c in item)
                items.append(f"[{item}]" if numeric else item)
    return items or [text]


class SavedModelDenoiser:
    """Loads a SavedModel version folder (or model folder -> newest version) and denoises HU slices.

    Calls the ``serving_default`` signature directly (one graph for any size; no retracing), batch by batch; at a
    strength other than the model's default, ``denoise_strength``.  ``strength`` None is the model's
    ``default_strength`` (1.0 for versions exported before the control, whose output as exported is their "network
    output"; another strength on those is applied outside the graph with the same formula, :func:`apply_strength`).
    """

    def __init__(self, path: str | Path, batch_size: int = 8, strength: float | None = None):
        import tensorflow as tf

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.path = resolve_version_dir(path)
        self.batch_size = int(batch_size)
        meta_file = self.path / METADATA_FILE
        try:
            self.metadata: dict = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_file}: not valid JSON: {exc}") from None
        self.default_strength = check_strength(self.metadata.get("default_strength", DEFAULT_STRENGTH),
                                               f"{meta_file}: default_strength")
        self.strength = self.default_strength if strength is None else check_strength(strength)
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
        self._serve_strength = self._loaded.signatures.get(STRENGTH_SIGNATURE)  # None before the control
        if self._serve_strength is None and self.default_strength != DEFAULT_STRENGTH:
            raise ValueError(f"{self.path}: metadata says default_strength {self.default_strength:g} but the "
                             f"SavedModel has no {STRENGTH_SIGNATURE!r} signature")

    def __repr__(self) -> str:
        return (f"SavedModelDenoiser({self.name!r}, version={self.version}, path={str(self.path)!r}, "
                f"strength={self.strength:g})")

    def __call__(self, hu: np.ndarray, strength: float | None = None) -> np.ndarray:
        """float HU [H,W], [N,H,W] or [N,H,W,1] -> denoised float32 HU of the same shape, batched by batch_size;
        ``strength`` None is this denoiser's ``strength``."""
        strength = self.strength if strength is None else check_strength(strength)
        batch, restore = as_batch(hu)
        outputs = [self._run(batch[start:start + self.batch_size], strength)
                   for start in range(0, len(batch), self.batch_size)]
        if not outputs:
            return restore(np.zeros((0,) + batch.shape[1:], np.float32))
        return restore(np.concatenate(outputs))

    def _run(self, chunk: np.ndarray, strength: float) -> np.ndarray:
        import tensorflow as tf

        try:
            if strength == self.default_strength:
                return self._serve(**{HU_INPUT: tf.constant(chunk)})[HU_OUTPUT].numpy()
            if self._serve_strength is not None:
                return self._serve_strength(**{HU_INPUT: tf.constant(chunk),
                                               STRENGTH_INPUT: tf.constant(strength, tf.float32)})[HU_OUTPUT].numpy()
            # Exported before the control: its default (1.0) output is the network output; mix it here.
            return apply_strength(self._serve(**{HU_INPUT: tf.constant(chunk)})[HU_OUTPUT].numpy(), chunk, strength)
        except tf.errors.InvalidArgumentError as exc:
            raise ValueError(f"{self.path}: {graph_error_message(exc.message)}") from None
