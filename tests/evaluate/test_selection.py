"""The rules that choose what ships (ldct_tf.evaluate.selection): validation figures in, one recipe or share out."""

from __future__ import annotations

import pytest

from ldct_tf.evaluate import selection

#: The shares the blend experiment tries (configs/experiments/blend_choice.yaml): 0 to 0.5 in steps of 0.05.
BLENDS = tuple(round(0.05 * i, 2) for i in range(11))


def _validation(rows: dict) -> dict:
    return {"all": {"mean": {arm: {"psnr_abdomen": p, "ssim_abdomen": s, "edge_sharpness": e}
                             for arm, (p, s, e) in rows.items()}}}


def test_sharpest_recipe_among_those_beating_bm3d_is_chosen():
    choice = selection.choose_recipe(_validation({
        "cyclegan_v1_recipe": (22.0, 0.68, 0.92), "simulated_only": (26.0, 0.76, 0.89),
        "simulated_edges": (25.9, 0.75, 0.91), "hybrid": (23.0, 0.75, 0.95),  # sharp, but below BM3D
        "bm3d": (25.7, 0.72, 0.81)}))
    assert choice["chosen"] == "simulated_edges"
    assert choice["beat_bm3d_on_validation"] == ["simulated_only", "simulated_edges"]


def test_without_a_recipe_beating_bm3d_the_highest_psnr_is_chosen():
    choice = selection.choose_recipe(_validation({
        "cyclegan_v1_recipe": (22.0, 0.68, 0.92), "simulated_only": (25.0, 0.70, 0.89),
        "hybrid": (23.0, 0.75, 0.95), "bm3d": (25.7, 0.72, 0.81)}))
    assert choice["chosen"] == "simulated_only" and choice["beat_bm3d_on_validation"] == []


def test_choice_among_given_arms_only():
    choice = selection.choose_recipe(_validation({
        "simulated_only": (26.0, 0.76, 0.89), "simulated_only+continued": (26.1, 0.77, 0.90),
        "simulated_only+adapted": (25.9, 0.76, 0.93), "bm3d": (25.7, 0.72, 0.81)}),
        ["simulated_only", "simulated_only+continued", "simulated_only+adapted"])
    assert choice["chosen"] == "simulated_only+adapted"
    assert set(choice["validation_psnr_abdomen"]) == {"simulated_only", "simulated_only+continued",
                                                      "simulated_only+adapted"}


def test_baselines_are_never_chosen_when_no_arms_are_named():
    # NLM beats BM3D here and is the sharpest: without a list of arms it must still not be chosen.
    choice = selection.choose_recipe(_validation({
        "simulated_only": (26.0, 0.76, 0.89), "nlm": (26.5, 0.80, 0.99), "none": (20.0, 0.5, 0.96),
        "bm3d": (25.7, 0.72, 0.81)}))
    assert choice["chosen"] == "simulated_only"
    assert set(choice["validation_edge_sharpness"]) == {"simulated_only"}


def test_figures_without_bm3d_or_arms_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="without BM3D"):
        selection.choose_recipe(_validation({"simulated_only": (26.0, 0.76, 0.89)}))
    with pytest.raises(ValueError, match="no arm to choose from"):
        selection.choose_recipe(_validation({"bm3d": (25.7, 0.72, 0.81)}), ["hybrid"])


def test_input_blend_share_is_the_sharpest_that_still_beats_bm3d():
    # Mixing the input back raises edge sharpness and, past some share, costs PSNR: the rule stops before BM3D wins.
    figures = {selection.blend_name(b): {"psnr_abdomen": 26.2 - 4 * b * b, "ssim_abdomen": 0.77 - 0.05 * b,
                                         "edge_sharpness": 0.90 + 0.12 * b} for b in BLENDS}
    bm3d = {"psnr_abdomen": 25.76, "ssim_abdomen": 0.728, "edge_sharpness": 0.81}
    choice = selection.choose_blend({"mean": figures}, bm3d, BLENDS)
    assert choice["input_blend"] == 0.3  # 26.2 - 4 * 0.35**2 = 25.71 is below BM3D
    # When even the plain output does not beat BM3D, the highest PSNR (no blend here) is kept.
    weak = {**bm3d, "psnr_abdomen": 26.5}
    assert selection.choose_blend({"mean": figures}, weak, BLENDS)["input_blend"] == 0.0


def test_targets_on_test_say_which_target_the_chosen_arm_meets():
    figures = {"psnr_abdomen": 27.0, "ssim_abdomen": 0.80, "psnr_wide": 35.0, "ssim_wide": 0.9,
               "edge_sharpness": 0.93}
    bm3d = {"psnr_abdomen": 26.0, "ssim_abdomen": 0.78, "psnr_wide": 35.5, "ssim_wide": 0.88,
            "edge_sharpness": 0.81}
    targets = selection.targets_on_test({"all": {"mean": {"arm": figures, "bm3d": bm3d},
                                                 "nps_mean_freq_distance_to_reference": {"arm": 0.01, "bm3d": 0.05}}},
                                        "arm")
    assert targets["beats_bm3d_psnr_ssim_both_windows"]["met"] is False  # psnr_wide is below BM3D's
    assert targets["beats_bm3d_psnr_ssim_both_windows"]["per_metric"]["psnr_abdomen"] is True
    assert targets["edge_sharpness_at_least_0.95"]["met"] is False
    assert targets["nps_mean_frequency_closer_to_normal_dose_than_bm3d"]["met"] is True


def test_the_shipped_seed_is_the_best_mean_validation_psnr_and_nan_never_wins():
    assert selection.choose_seed({"seed0": 25.1, "seed1": 25.4, "seed2": 25.3}) == "seed1"
    assert selection.choose_seed({"seed0": float("nan"), "seed1": 20.0}) == "seed1"
    assert selection.choose_seed({"seed0": 25.0, "seed1": 25.0}) == "seed0"  # ties: the first name, every run
    with pytest.raises(ValueError, match="no seed"):
        selection.choose_seed({"seed0": float("nan")})
