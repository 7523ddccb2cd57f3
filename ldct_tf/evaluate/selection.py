"""The rules that choose what ships: a recipe among trained arms, and the share of the input its export mixes back.

They live here, beside the scoring they read, and not in the runs that apply them (``experiments/``), so that a rule is
one tested function whatever run, notebook or site applies it, and a benchmark can only measure.  Every rule reads
VALIDATION figures only; test figures are reported beside a choice (:func:`targets_on_test`), never used to make it.

The recipe rule: among the arms that beat BM3D in mean validation abdomen PSNR and SSIM, the one with the highest
validation edge sharpness; the highest validation abdomen PSNR if none beats BM3D.  It mirrors the targets (beat BM3D,
keep edges).  The first rule tried, the highest PSNR among arms with validation edge sharpness >= 0.95, could not
work: the quarter-dose input itself scores 0.96 on the validation slices of the AAPM-Mayo development split, so only
near-identity recipes could pass it.

The blend rule is the same rule on the shares: a denoiser trained for the mean squared error smooths what it cannot
tell from noise, edges included, and mixing a share of the input back (``ldct_tf.export.graph.blend_input``, as
vendors blend iterative reconstructions with FBP) trades noise for edge contrast and noise texture.  Among the shares
whose output still beats BM3D on validation, the sharpest.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

#: Scored beside every arm, never chosen: the reference baselines of the figures a rule reads.
BASELINES = ("bm3d", "nlm", "none")
RECIPE_RULE = ("among recipes that beat BM3D in validation abdomen PSNR and SSIM, the highest validation edge "
               "sharpness (the highest validation abdomen PSNR if none does)")


def choose_recipe(validation: Mapping, arms: Optional[Sequence[str]] = None) -> dict:
    """The recipe rule (module docstring) on ``validation`` (``{"all": {"mean": {name: {metric: value}}}}``, BM3D
    among the names), among ``arms`` (default: every scored name but the baselines, in their order).

    Returns the chosen name, the rule in words, the arms that beat BM3D and every arm's validation figures the rule
    read, so that a results file shows why.
    """
    mean = validation["all"]["mean"]
    if "bm3d" not in mean:
        raise ValueError(f"validation figures without BM3D's (the rule compares with it); got {sorted(mean)}")
    bm3d = mean["bm3d"]
    candidates = [a for a in (arms if arms is not None else [n for n in mean if n not in BASELINES]) if a in mean]
    if not candidates:
        raise ValueError(f"no arm to choose from: none of {list(arms or [])} has validation figures")
    beats = [a for a in candidates if mean[a]["psnr_abdomen"] > bm3d["psnr_abdomen"]
             and mean[a]["ssim_abdomen"] > bm3d["ssim_abdomen"]]
    if beats:
        best = max(beats, key=lambda a: mean[a]["edge_sharpness"])
    else:
        best = max(candidates, key=lambda a: mean[a]["psnr_abdomen"])
    return {"chosen": best, "rule": RECIPE_RULE, "beat_bm3d_on_validation": beats,
            "validation_psnr_abdomen": {a: mean[a]["psnr_abdomen"] for a in candidates},
            "validation_edge_sharpness": {a: mean[a]["edge_sharpness"] for a in candidates}}


def blend_name(weight: float) -> str:
    """The name a blend share is scored under (``input_blend_0.30``)."""
    return f"input_blend_{weight:.2f}"


def choose_blend(validation: Mapping, bm3d: Mapping, blends: Sequence[float]) -> dict:
    """The blend rule (module docstring): ``validation`` holds ``{"mean": {blend_name(b): figures}}`` for each share
    in ``blends``, ``bm3d`` BM3D's validation means.  Returns the chosen ``input_blend`` with the recipe rule's
    record."""
    names = {blend_name(b): b for b in blends}
    choice = choose_recipe({"all": {"mean": {**validation["mean"], "bm3d": bm3d}}}, list(names))
    return {"input_blend": names[choice["chosen"]], **choice}


def targets_on_test(test: Mapping, arm: str) -> dict:
    """The targets a shipped model is held to, on the TEST figures of ``arm`` (reported, never used to choose): beat
    BM3D in PSNR and SSIM in both windows, edge sharpness at least 0.95, NPS mean frequency closer to the normal-dose
    reference than BM3D's."""
    mean, distance = test["all"]["mean"], test["all"]["nps_mean_freq_distance_to_reference"]
    beats = {m: mean[arm][m] > mean["bm3d"][m] for m in ("psnr_abdomen", "ssim_abdomen", "psnr_wide", "ssim_wide")}
    return {"beats_bm3d_psnr_ssim_both_windows": {"met": all(beats.values()), "per_metric": beats},
            "edge_sharpness_at_least_0.95": {"met": mean[arm]["edge_sharpness"] >= 0.95,
                                              "value": mean[arm]["edge_sharpness"],
                                              "bm3d": mean["bm3d"]["edge_sharpness"]},
            "nps_mean_frequency_closer_to_normal_dose_than_bm3d": {"met": distance[arm] < distance["bm3d"],
                                                                  "model": distance[arm], "bm3d": distance["bm3d"]}}


def choose_seed(mean_psnr: Mapping[str, float]) -> str:
    """The seed (run name) to ship among runs of ONE recipe that differ only in their seed: the highest validation
    abdomen PSNR averaged over the validation conditions.  Why a rule at all: the spread between seeds is reported
    beside it, and the shipped one must be picked the same way on every run, never by looking at test figures."""
    finite = {name: float(v) for name, v in mean_psnr.items() if v == v and abs(float(v)) != float("inf")}
    if not finite:
        raise ValueError(f"no seed with a finite validation PSNR among {sorted(mean_psnr)}")
    return max(sorted(finite), key=lambda name: finite[name])
