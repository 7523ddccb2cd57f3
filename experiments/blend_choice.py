"""The second stage of model v2's choice in ``experiments.ablation``: how much of the low-dose input to mix back.

A denoiser trained for the mean squared error smooths what it cannot tell from noise, edges included: every
simulated-pair recipe of the ablation ends with validation edge sharpness near 0.90 whatever its target (the blurred
projector round trip, the sharp slice, or its Noisier2Noise estimate).  Mixing a share of the input back
(the SavedModel's strength control, ``ldct_tf.saved_model``: a share B is strength 1 - B; as vendors blend iterative
reconstructions with FBP) trades noise for edge
contrast and noise texture, one number a site can reason about.  The shares tried are
``configs/experiments/blend_choice.yaml``; the share is chosen like the recipe, on validation only, by
``ldct_tf.evaluate.selection.choose_blend``.  The chosen share's test figures are reported, never used.

No command of its own: ``python -m experiments.ablation`` runs it after choosing the recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from benchmarks import harness
from experiments import arms as arms_lib
from ldct_tf.evaluate import selection

#: The shares tried (configs/experiments/blend_choice.yaml).
BLENDS = tuple(float(b) for b in arms_lib.load_arms("blend_choice", ("blends",))["blends"])


def score_blends(version: Path, root: Path, work: Path, split: str, blends: Sequence[float] = BLENDS) -> dict:
    """The SavedModel ``version`` at each share, scored on ``split`` as ``arms.score`` scores a recipe."""
    from ldct_tf.saved_model import SavedModelDenoiser

    model = SavedModelDenoiser(version)
    denoisers = {selection.blend_name(b): (lambda b: lambda hu: model(hu, strength=round(1.0 - b, 6)))(b) for b in blends}
    return arms_lib.score_rows(root, harness.pairs_of(root, split), denoisers, work / "reports" / f"blend_{split}",
                               {"split": split})


def run(recipe: str, root: Path, work: Path, scored: dict) -> dict:
    """Score the chosen ``recipe``'s export at every share on validation, choose, and report the choice on test."""
    version = work / "export" / recipe / "1"
    validation = score_blends(version, root, work, "val")
    choice = selection.choose_blend(validation, scored["val"]["all"]["mean"]["bm3d"], BLENDS)
    weight = choice["input_blend"]
    test = score_blends(version, root, work, "test", (weight,))
    name, base = selection.blend_name(weight), scored["test"]["all"]
    merged = {"all": {"mean": {name: test["mean"][name], "bm3d": base["mean"]["bm3d"]},
                      "nps_mean_freq_distance_to_reference": {
                          name: test["nps_mean_freq_distance_to_reference"][name],
                          "bm3d": base["nps_mean_freq_distance_to_reference"]["bm3d"]}}}
    return {"recipe": recipe, "blends": list(BLENDS), "validation": validation, "choice": choice,
            "test": test["mean"][name], "test_targets": selection.targets_on_test(merged, name)}
