"""How a trial is scored: the validation slices, the objective (paired PSNR/SSIM in the abdomen window, or an
unpaired criterion when the validation split holds no pairs), and the two scores to compare it with: the low-dose
input's own and a classical denoiser's on the same slices (the noise-adaptive BM3D, or non-local means without the
optional ``bm3d`` package).

Scoring runs the trial's denoiser on whole slices in HU, as the evaluation does, rather than reading the training
loop's patch metrics: the search should pick what denoises best, not what lowers a GAN loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import keras
import keras_tuner
import numpy as np
from scipy import ndimage

from ldct_tf import ct, data, metrics
from ldct_tf.config import TuningError

SCORE_WINDOW = "abdomen"

#: How results and the console name each classical comparator.
BASELINE_LABELS = {"bm3d_adaptive": "BM3D", "nlm": "NLM"}

#: Immerkaer's (1996) operator: the difference of two Laplacians, blind to planes and (nearly) to smooth anatomy;
#: on white noise of SD s its output has SD 6 s.
_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)


def unpaired_scores(low_hu: np.ndarray, denoised_hu: np.ndarray) -> dict[str, float]:
    """The unpaired criterion on one slice, in HU, lower is better: ``noise_hu + residual_hu``.

    * ``noise_hu``: the noise SD left in the denoised slice, from Immerkaer's operator as a robust SD (1.4826 x the
      median absolute response / 6) over soft tissue, where the low-dose slice (smoothed) lies inside the abdomen
      window, away from air and bone edges.  Low for a good denoiser, also for one that blurs.
    * ``residual_hu``: the mean absolute value, over the same pixels, of what the denoiser removed (low - denoised)
      after a Gaussian blur of 2 px: noise averages out under the blur, removed anatomy, blurred edges and HU shifts
      do not.  Zero for the identity, which keeps all of its noise.

    A proxy for the paired PSNR, used only when the validation split has no paired slices; it cannot see
    hallucinated texture that looks like anatomy.
    """
    low = np.asarray(low_hu, np.float64)
    out = np.asarray(denoised_hu, np.float64)
    w = ct.window(SCORE_WINDOW)
    smooth = ndimage.gaussian_filter(low, 2.0)
    tissue = ndimage.binary_erosion((smooth > w.low) & (smooth < w.high), iterations=2)
    if tissue.sum() < 64:
        tissue = np.ones_like(low, bool)
    response = ndimage.convolve(out, _NOISE_KERNEL, mode="reflect")
    noise = 1.4826 * float(np.median(np.abs(response[tissue]))) / 6.0
    residual = float(np.mean(np.abs(ndimage.gaussian_filter(low - out, 2.0)[tissue])))
    return {"noise_hu": noise, "residual_hu": residual, "unpaired": noise + residual}


def denoise_hu(generator: keras.Model, hu: np.ndarray, multiple: int) -> np.ndarray:
    """Run the generator on one HU slice ``[H, W]``: padded with air to ``multiple``, cropped back, HU out."""
    h, w = hu.shape
    padded = ct.pad_to_multiple(np.asarray(hu, np.float32), multiple)
    out = generator(ct.to_model(padded)[None, ..., None], training=False)
    return ct.from_model(keras.ops.convert_to_numpy(out))[0, :h, :w, 0]


@dataclass
class Validation:
    """Validation slices (HU): low-dose inputs, their normal-dose slices when ``paired``."""

    low: list
    normal: list
    paired: bool

    @classmethod
    def load(cls, data_dir: str, max_slices: int) -> "Validation":
        pairs, paired = data.validation_examples(data_dir, max_slices)
        if paired:
            return cls([p[0][..., 0] for p in pairs], [p[1][..., 0] for p in pairs], True)
        lows = [p[0][..., 0] for p in pairs]
        if not lows:
            try:
                lows = [hu.numpy()[..., 0] for hu, _ in data.slice_dataset(data_dir, "val", "low").take(max_slices)]
            except ValueError:
                lows = []
        if not lows:
            raise TuningError(f"{data_dir}: the val split has no low-dose slices to score trials on; run the pipeline "
                              "with a val split (--splits train=...,val=...)")
        return cls(lows, [], False)

    def input_scores(self) -> dict[str, float]:
        """The low-dose input's own scores: what a trial has to beat."""
        return self._scores(self.low)

    def baseline_scores(self, name: str) -> dict[str, float]:
        """The scores of the classical denoiser ``name`` (:func:`ldct_tf.baselines.get`) on the same slices: what a
        trial should beat to be worth its training."""
        from ldct_tf import baselines

        denoiser = baselines.get(name)
        return self._scores([np.asarray(denoiser(hu), np.float32) for hu in self.low])

    def score(self, generator: keras.Model, multiple: int) -> dict[str, float]:
        return self._scores([denoise_hu(generator, hu, multiple) for hu in self.low])

    def _scores(self, outputs: list) -> dict[str, float]:
        if self.paired:
            pairs = list(zip(outputs, self.normal))
            return {"val_psnr": float(np.mean([metrics.psnr(o, n, SCORE_WINDOW) for o, n in pairs])),
                    "val_ssim": float(np.mean([metrics.ssim(o, n, SCORE_WINDOW) for o, n in pairs]))}
        per_slice = [unpaired_scores(l, o) for l, o in zip(self.low, outputs)]
        return {f"val_{k}": float(np.mean([s[k] for s in per_slice])) for k in per_slice[0]}


def choose_objective(setting: str, paired: bool) -> keras_tuner.Objective:
    """``auto``: PSNR when the validation slices are true pairs, else the unpaired criterion."""
    if setting in ("psnr", "ssim") and not paired:
        raise TuningError(f"tuning.objective={setting} needs paired validation slices (the same slice at both doses); "
                          "the val split has none: use tuning.objective=unpaired or auto")
    if setting == "auto":
        setting = "psnr" if paired else "unpaired"
    return keras_tuner.Objective(f"val_{setting}", "min" if setting == "unpaired" else "max")


def choose_baseline() -> tuple[str, Optional[str]]:
    """The classical comparator: the noise-adaptive BM3D when the optional ``bm3d`` package is installed, else
    non-local means (as the demo does), with the one line that says so (None when BM3D is there)."""
    from ldct_tf import baselines

    if baselines.bm3d_available():
        return "bm3d_adaptive", None
    return "nlm", ("BM3D is not installed (optional: pip install 'ldct_tf[baselines]'); trials are compared with "
                   "non-local means instead")
