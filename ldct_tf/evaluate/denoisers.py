"""Denoisers for the evaluation by name: the classical baselines and exported SavedModels, all ``HU -> HU``.

Why a module of its own: the evaluation, the reader study and the benchmarks compare denoisers given as short specs
(``none``, ``bm3d``, ``model:PATH``); this is the one place a spec becomes a function.  TensorFlow is imported only
for ``model:`` specs, so scoring the baselines stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ldct_tf import baselines
from ldct_tf.evaluate.pairs import EvaluateInputError

SliceDenoiser = Callable[[np.ndarray], np.ndarray]


def model_denoiser(path: str | Path) -> SliceDenoiser:
    """A SavedModel (``ldct_tf.export``) as ``HU slice -> HU slice``; TensorFlow is imported only here."""
    from ldct_tf.export import SavedModelDenoiser

    model = SavedModelDenoiser(path)
    return lambda hu: np.asarray(model(np.asarray(hu, np.float32)), np.float32).reshape(np.shape(hu))


def make_denoisers(specs: Sequence[str]) -> dict[str, SliceDenoiser]:
    """``{name given: function}`` for specs ``none``, ``gaussian``, ``nlm``, ``tv``, ``bm3d``, ``model:PATH``."""
    out: dict[str, SliceDenoiser] = {}
    for spec in specs:
        if spec in out:
            raise EvaluateInputError(f"denoiser {spec!r} given twice")
        if spec.startswith("model:"):
            if not spec[len("model:"):]:
                raise EvaluateInputError("model: needs a path, e.g. model:saved_models/ldct_denoiser")
            out[spec] = model_denoiser(spec[len("model:"):])
        else:
            out[spec] = baselines.get(spec)
    return out
