"""Hounsfield-unit helpers shared by every stage.

HU is the only unit that crosses module boundaries (ARCHITECTURE.md, "Data contracts"). The model alone works on a
scaled copy: HU clipped to the scanner's representable range [-1024, 3071] and mapped linearly to [-1, 1].  Keeping
both conversions here means the pipeline, training, export and evaluation can never disagree about them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

#: Lowest and highest HU the model sees; air is -1000, the 12-bit scanner range tops out at 3071.
HU_MIN: float = -1024.0
HU_MAX: float = 3071.0
#: Value written for pixels outside the scan field of view (padding): air.
AIR_HU: float = -1024.0


@dataclass(frozen=True)
class Window:
    """A named HU display / scoring window ``[low, high]``."""

    name: str
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def center(self) -> float:
        return (self.high + self.low) / 2.0

    def clip(self, hu: np.ndarray) -> np.ndarray:
        return np.clip(hu, self.low, self.high)

    def to_unit(self, hu: np.ndarray) -> np.ndarray:
        """Map the window to [0, 1] (for display and windowed metrics)."""
        return (self.clip(np.asarray(hu, dtype=np.float32)) - self.low) / self.width

    def model_to_unit(self, x):
        """The TF version for tensors on the MODEL scale (``to_model``): this window of their HU mapped to [0, 1]
        (validation scores, the perceptual loss's input, TensorBoard images)."""
        import tensorflow as tf

        return (tf.clip_by_value(from_model(x), self.low, self.high) - self.low) / self.width


#: Named windows. ``abdomen`` is the RED-CNN scoring convention (data range 400); ``wide`` is the convention of the
#: 2024 ldct-benchmark study (data range 2924); ``liver`` is a narrow reading window for lesions.
WINDOWS: dict[str, Window] = {
    "abdomen": Window("abdomen", -160.0, 240.0),
    "liver": Window("liver", -45.0, 205.0),  # W 250 / L 80
    "brain": Window("brain", 0.0, 80.0),  # W 80 / L 40: a head slice in the liver window shows nothing of the brain
    "wide": Window("wide", -1024.0, 1900.0),
    "lung": Window("lung", -1350.0, 150.0),  # W 1500 / L -600
    "bone": Window("bone", -450.0, 1050.0),  # W 1500 / L 300
    "full": Window("full", HU_MIN, HU_MAX),
}


def window(name: str) -> Window:
    """Return the named window; a bad name raises ``ValueError`` listing the known ones."""
    try:
        return WINDOWS[name]
    except KeyError:
        raise ValueError(f"unknown HU window {name!r}; known windows: {sorted(WINDOWS)}") from None


def to_hu(
    stored: np.ndarray,
    slope: float = 1.0,
    intercept: float = 0.0,
    padding_value: Optional[float] = None,
    padding_range_limit: Optional[float] = None,
) -> np.ndarray:
    """Stored pixel values -> float32 HU.

    ``padding_value`` (PixelPaddingValue) marks pixels outside the reconstruction circle; when
    ``padding_range_limit`` is also given, every stored value between the two (inclusive) is padding, as the DICOM
    standard defines.  Padding becomes air rather than whatever HU the raw value would decode to (often -2000 or
    -3024), which would otherwise dominate HU statistics and the model's input range.
    """
    raw = np.asarray(stored)
    hu = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if padding_value is not None:
        if padding_range_limit is not None:
            lo, hi = sorted((float(padding_value), float(padding_range_limit)))
            mask = (raw >= lo) & (raw <= hi)
        else:
            mask = raw == padding_value
        hu[mask] = AIR_HU
    return hu


def to_model(hu):
    """HU -> model scale: clip to [HU_MIN, HU_MAX], map linearly to [-1, 1]. Works on numpy arrays and tensors."""
    span = HU_MAX - HU_MIN
    if isinstance(hu, np.ndarray) or np.isscalar(hu):
        return (np.clip(np.asarray(hu, np.float32), HU_MIN, HU_MAX) - HU_MIN) / span * 2.0 - 1.0
    import tensorflow as tf  # lazy: the pipeline workers should not pay for TF on numpy-only paths

    hu = tf.cast(hu, tf.float32)
    return (tf.clip_by_value(hu, HU_MIN, HU_MAX) - HU_MIN) / span * 2.0 - 1.0


def from_model(x):
    """Model scale -> HU (inverse of :func:`to_model` on its range)."""
    span = HU_MAX - HU_MIN
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return (np.asarray(x, np.float32) + 1.0) / 2.0 * span + HU_MIN
    import tensorflow as tf

    return (tf.cast(x, tf.float32) + 1.0) / 2.0 * span + HU_MIN


def hu_to_int16(hu: np.ndarray) -> np.ndarray:
    """Round HU to int16 for storage; HU outside int16 is clipped (real CT never leaves [-32768, 32767])."""
    hu = np.asarray(hu)
    if hu.dtype == np.int16:
        return hu
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


def padded_size(size, multiple: int):
    """The smallest multiple of ``multiple`` that is >= ``size`` (a Python int or an integer tensor)."""
    return size + (-size) % multiple


def pad_to_multiple(image, multiple: int, value: float = AIR_HU, axes: tuple[int, int] = (0, 1)):
    """Pad ``image`` at the bottom and right of ``axes`` with ``value`` (air) up to the next multiple of ``multiple``.

    The generator only takes sizes divisible by ``2**depth``; padding at the far edges (not centred) means the result
    is cropped back with a plain ``[:height, :width]``.  Works on numpy arrays and tensors (the serving graph uses it
    with ``value=to_model(AIR_HU)`` on the model scale); a tensor's rank must be known.
    """
    if isinstance(image, np.ndarray):
        widths = [(0, 0)] * image.ndim
        for axis in axes:
            widths[axis] = (0, padded_size(image.shape[axis], multiple) - image.shape[axis])
        return np.pad(image, widths, constant_values=value)
    import tensorflow as tf

    rank = image.shape.rank
    if rank is None:
        raise ValueError("pad_to_multiple needs a tensor of known rank")
    shape = tf.shape(image)
    paddings = [[0, 0]] * rank
    for axis in axes:
        paddings[axis % rank] = [0, (-shape[axis]) % multiple]
    return tf.pad(image, paddings, constant_values=value)
