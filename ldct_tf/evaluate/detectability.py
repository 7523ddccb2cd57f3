"""Low-contrast detectability of inserted lesions: lesion CNR and a non-prewhitening matched-filter (NPW) observer.

Why beside PSNR: a denoiser can win PSNR by smoothing everything, small low-contrast lesions included.  What a reader
needs is that a 7 mm, 15 HU lesion stays visible.  With lesions inserted before the low-dose simulation
(``ldct_tf.evaluate.lesions``), every denoiser D is scored on:

- ``cnr``: |mean(disc) - mean(ring around it)| / SD(ring), on D(low dose with the lesion);
- ``dprime``: the NPW observer's detectability index.  Its template w is the lesion as the scanner renders it
  without noise (``case.signal``), made zero-mean over the ROI so a flat background gives no response.  The signal
  response is ``w . (D(with) - D(without))`` at the lesion (the same noise realisation in both, so what remains is
  what D passed of the lesion); the noise is the SD of ``w . (D(without) - reference)`` at background positions of
  the same slice (D's remaining noise plus whatever it did to the anatomy there).  ``d' = signal / noise``;
- ``contrast_kept``: the signal response relative to the ideal one ``w . signal`` (1: the lesion passes whole,
  0: erased).

Pure functions of arrays; ``ldct_tf.evaluate`` and ``python -m benchmarks.audit`` call :func:`score_case` per slice
and :func:`summarise` over slices.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ldct_tf.evaluate.lesions import Lesion, LesionCase, candidate_mask

Denoiser = Callable[[np.ndarray], np.ndarray]


def roi_slices(lesion: Lesion, spacing_mm: float, shape: tuple[int, int], scale: float = 1.6
               ) -> Optional[tuple[slice, slice]]:
    """A square of side ``2 * scale * diameter`` around the lesion, or None if it leaves the image."""
    half = int(np.ceil(scale * lesion.diameter_mm / spacing_mm))
    r, c = int(round(lesion.row)), int(round(lesion.col))
    if r - half < 0 or c - half < 0 or r + half + 1 > shape[0] or c + half + 1 > shape[1]:
        return None
    return slice(r - half, r + half + 1), slice(c - half, c + half + 1)


def npw_template(signal: np.ndarray, roi: tuple[slice, slice]) -> np.ndarray:
    """The zero-mean NPW template over ``roi``: the noise-free lesion minus its mean."""
    w = np.asarray(signal, np.float64)[roi]
    return w - w.mean()


def lesion_cnr(image: np.ndarray, lesion: Lesion, spacing_mm: float) -> float:
    """|mean inside 0.8 r - mean in the ring 1.5 r .. 2.5 r| / SD of that ring."""
    image = np.asarray(image, np.float64)
    rr, cc = np.ogrid[0:image.shape[0], 0:image.shape[1]]
    dist = np.hypot(rr - lesion.row, cc - lesion.col)
    r = lesion.radius_px(spacing_mm)
    inside = dist <= 0.8 * r
    ring = (dist >= 1.5 * r) & (dist <= 2.5 * r)
    sd = image[ring].std()
    return float(abs(image[inside].mean() - image[ring].mean()) / sd) if sd > 0 else float("nan")


def background_positions(normal_hu: np.ndarray, lesions: Sequence[Lesion], spacing_mm: float, n: int = 40,
                         seed: int = 0) -> list[tuple[int, int]]:
    """Up to ``n`` soft-tissue positions away from every lesion, where the noise of the template response is read."""
    ok = candidate_mask(normal_hu, spacing_mm)
    rows, cols = np.nonzero(ok)
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(len(rows)):
        r, c = int(rows[i]), int(cols[i])
        if all(np.hypot(r - l.row, c - l.col) > 3 * l.radius_px(spacing_mm) + 3 for l in lesions):
            out.append((r, c))
            if len(out) == n:
                break
    return out


def score_case(case: LesionCase, denoised_with: np.ndarray, denoised_without: np.ndarray,
               background: Sequence[tuple[int, int]]) -> list[dict]:
    """Per lesion of ``case``: CNR, NPW d', contrast kept and the ideal response, for one denoiser's two outputs."""
    out = []
    shape = case.low_with.shape
    error = np.asarray(denoised_without, np.float64) - case.ref_without
    passed = np.asarray(denoised_with, np.float64) - np.asarray(denoised_without, np.float64)
    for lesion in case.lesions:
        roi = roi_slices(lesion, case.spacing_mm, shape)
        if roi is None:
            continue
        w = npw_template(case.signal, roi)
        ideal = float((w * np.asarray(case.signal, np.float64)[roi]).sum())
        response = float((w * passed[roi]).sum())
        h = (roi[0].stop - roi[0].start) // 2
        noise = []
        for r, c in background:
            if r - h >= 0 and c - h >= 0 and r + h + 1 <= shape[0] and c + h + 1 <= shape[1]:
                noise.append(float((w * error[r - h:r + h + 1, c - h:c + h + 1]).sum()))
        sd = float(np.std(noise, ddof=1)) if len(noise) > 2 else float("nan")
        out.append({**lesion.as_dict(), "cnr": lesion_cnr(denoised_with, lesion, case.spacing_mm),
                    "dprime": response / sd if sd and np.isfinite(sd) and sd > 0 else float("nan"),
                    "contrast_kept": response / ideal if ideal else float("nan"), "noise_positions": len(noise)})
    return out


def run_case(case: LesionCase, denoisers: Mapping[str, Denoiser], normal_hu: np.ndarray, seed: int = 0
             ) -> dict[str, list[dict]]:
    """Every denoiser on both low-dose versions of ``case``; ``{name: score_case rows}`` (``input`` included)."""
    background = background_positions(normal_hu, case.lesions, case.spacing_mm, seed=seed)
    results = {"input": score_case(case, case.low_with, case.low_without, background)}
    for name, fn in denoisers.items():
        results[name] = score_case(case, fn(case.low_with), fn(case.low_without), background)
    return results


def summarise(rows: Mapping[str, Sequence[dict]]) -> dict:
    """Per denoiser: lesions scored, mean/median d', mean CNR, mean contrast kept, share of lesions with d' >= 2,
    and d' relative to the input on the same lesions (mean of per-lesion ratios)."""
    out = {}
    base = {(r["row"], r["col"], r["diameter_mm"]): r["dprime"] for r in rows.get("input", [])}
    for name, items in rows.items():
        d = np.array([r["dprime"] for r in items], float)
        finite = np.isfinite(d)
        ratios = [r["dprime"] / base[(r["row"], r["col"], r["diameter_mm"])] for r in items
                  if base.get((r["row"], r["col"], r["diameter_mm"])) and np.isfinite(r["dprime"])]
        out[name] = {
            "lesions": int(len(items)),
            "dprime_mean": float(d[finite].mean()) if finite.any() else None,
            "dprime_median": float(np.median(d[finite])) if finite.any() else None,
            "detectable_share": float((d[finite] >= 2.0).mean()) if finite.any() else None,
            "cnr_mean": float(np.nanmean([r["cnr"] for r in items])) if items else None,
            "contrast_kept_mean": float(np.nanmean([r["contrast_kept"] for r in items])) if items else None,
            "dprime_vs_input": float(np.mean(ratios)) if ratios else None,
        }
    return out
