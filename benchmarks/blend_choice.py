"""The second stage of model v2's choice in ``benchmarks.ablation``: how much of the low-dose input to mix back.

A denoiser trained for the mean squared error smooths what it cannot tell from noise, edges included: every
simulated-pair recipe of the ablation ends with validation edge sharpness near 0.90 whatever its target (the blurred
projector round trip, the sharp slice, or its Noisier2Noise estimate).  Mixing a share of the input back
(the SavedModel's strength control, ``ldct_tf.saved_model``: a share B is strength 1 - B; as vendors blend iterative
reconstructions with FBP) trades noise for edge contrast
and noise texture, one number a site can reason about.  The share is chosen like the recipe, on validation only:
among the shares in :data:`BLENDS` whose output still beats BM3D in validation abdomen PSNR and SSIM, the one with the
highest validation edge sharpness (``ablation.choose`` on the shares).  The chosen share's test figures are reported,
never used.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import ablation, mayo_data

#: The shares tried, 0 to 0.5 in steps of 0.05 (beyond half the input the output is more input than denoiser).
BLENDS = tuple(round(0.05 * i, 2) for i in range(11))


def blend_name(weight: float) -> str:
    return f"input_blend_{weight:.2f}"


def score_blends(version: Path, root: Path, work: Path, split: str, blends=BLENDS) -> dict:
    """The SavedModel ``version`` at each share, scored on ``split`` as ``ablation.score`` scores a recipe."""
    from ldct_tf.saved_model import SavedModelDenoiser

    model = SavedModelDenoiser(version)
    denoisers = {blend_name(b): (lambda b: lambda hu: model(hu, strength=round(1.0 - b, 6)))(b) for b in blends}
    return ablation.score_rows(root, mayo_data.pairs_of(root, split), denoisers, work / "reports" / f"blend_{split}",
                               {"split": split})


def choose_blend(validation: dict, bm3d: dict, blends=BLENDS) -> dict:
    """``validation`` from :func:`score_blends`, ``bm3d`` BM3D's validation means: the rule of the module docstring."""
    names = {blend_name(b): b for b in blends}
    choice = ablation.choose({"all": {"mean": {**validation["mean"], "bm3d": bm3d}}}, list(names))
    return {"input_blend": names[choice["chosen"]], **choice}


def run(recipe: str, root: Path, work: Path, scored: dict) -> dict:
    """Score the chosen ``recipe``'s export at every share on validation, choose, and report the choice on test."""
    version = work / "export" / recipe / "1"
    validation = score_blends(version, root, work, "val")
    choice = choose_blend(validation, scored["val"]["all"]["mean"]["bm3d"])
    weight = choice["input_blend"]
    test = score_blends(version, root, work, "test", (weight,))
    name, base = blend_name(weight), scored["test"]["all"]
    merged = {"all": {"mean": {name: test["mean"][name], "bm3d": base["mean"]["bm3d"]},
                      "nps_mean_freq_distance_to_reference": {
                          name: test["nps_mean_freq_distance_to_reference"][name],
                          "bm3d": base["nps_mean_freq_distance_to_reference"]["bm3d"]}}}
    return {"recipe": recipe, "blends": list(BLENDS), "validation": validation, "choice": choice,
            "test": test["mean"][name], "test_targets": ablation.test_targets(merged, name)}
