"""Is a decoded CT slice plausible?  One check shared by the pipeline and the denoise CLI.

Why it exists: a header can be perfectly valid DICOM and still describe nonsense.  ``RescaleSlope 0`` turns every
slice into a constant -1024 HU image, a slope of 1e6 saturates every pixel at the int16 limit, and a 1x1 "image"
would be written into training shards as a slice; none of these raise anywhere, so without this check they silently
poison a training set (pipeline) or crash mid-series when the derived file is written (denoise).  ``ldct_tf.dicom``
calls :func:`problem` for every slice it decodes, so both tools refuse the same slices with the same reasons.

The bounds are wide on purpose: they only catch values no CT scanner writes.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

# Stable rejection reasons (keys of the pipeline's ``rejected_by_reason`` and of Beam counters).
IMPLAUSIBLE_RESCALE = "implausible_rescale"
IMPLAUSIBLE_HU = "implausible_hu_range"
TOO_SMALL = "image_too_small"
TOO_LARGE = "image_too_large"
REASONS = (IMPLAUSIBLE_RESCALE, IMPLAUSIBLE_HU, TOO_SMALL, TOO_LARGE)

#: Smallest rows / columns accepted: a CT slice is 128 to 1024 pixels a side; below this it is no image to train on.
MIN_SIZE = 32
#: RescaleSlope must be in this range: scanners write 1 (sometimes 0.5 or 2); 0 or huge values are header errors.
SLOPE_RANGE = (1e-3, 1e3)
#: |RescaleIntercept| above this is no CT scale (real values: 0, -1000, -1024, -8192).
MAX_ABS_INTERCEPT = 32768.0
#: Decoded HU must lie in this range: air is -1000, values down to about -4000 occur outside the reconstruction circle,
#: metal on an extended HU scale stays below about 31000, and int16 storage ends at 32767.
HU_RANGE = (-8192.0, 32767.0)


def problem(rows: int, columns: int, slope: float, intercept: float,
            hu: Optional[np.ndarray] = None) -> Optional[tuple[str, str]]:
    """``(reason, detail)`` for an implausible slice, ``None`` for a plausible one.

    ``hu`` (the decoded slice) is optional so that the header checks can run before any pixel is decoded.
    """
    if rows < MIN_SIZE or columns < MIN_SIZE:
        return TOO_SMALL, f"{rows}x{columns} pixels; at least {MIN_SIZE}x{MIN_SIZE} is needed"
    if not (math.isfinite(slope) and SLOPE_RANGE[0] <= slope <= SLOPE_RANGE[1]):
        return IMPLAUSIBLE_RESCALE, (f"RescaleSlope {slope:g} is outside [{SLOPE_RANGE[0]:g}, {SLOPE_RANGE[1]:g}] "
                                     f"(a header error: HU would be meaningless)")
    if not (math.isfinite(intercept) and abs(intercept) <= MAX_ABS_INTERCEPT):
        return IMPLAUSIBLE_RESCALE, f"RescaleIntercept {intercept:g} is outside +-{MAX_ABS_INTERCEPT:g}"
    if hu is not None and hu.size:
        low, high = float(np.min(hu)), float(np.max(hu))
        if not (math.isfinite(low) and math.isfinite(high)) or low < HU_RANGE[0] or high > HU_RANGE[1]:
            return IMPLAUSIBLE_HU, (f"HU range [{low:g}, {high:g}] leaves [{HU_RANGE[0]:g}, {HU_RANGE[1]:g}] "
                                    f"(RescaleSlope {slope:g}, RescaleIntercept {intercept:g})")
        if low == high:
            return IMPLAUSIBLE_HU, f"every pixel is {low:g} HU (a blank image or a broken rescale)"
    return None
