"""The ablation's recipe choice (benchmarks.ablation.choose): validation figures in, one recipe out."""

from __future__ import annotations

from benchmarks import ablation


def _validation(rows: dict) -> dict:
    return {"all": {"mean": {arm: {"psnr_abdomen": p, "ssim_abdomen": s, "edge_sharpness": e}
                             for arm, (p, s, e) in rows.items()}}}


def test_sharpest_recipe_among_those_beating_bm3d_is_chosen():
    choice = ablation.choose(_validation({
        "cyclegan_v1_recipe": (22.0, 0.68, 0.92), "simulated_only": (26.0, 0.76, 0.89),
        "simulated_edges": (25.9, 0.75, 0.91), "hybrid": (23.0, 0.75, 0.95),  # sharp, but below BM3D
        "bm3d": (25.7, 0.72, 0.81)}))
    assert choice["chosen"] == "simulated_edges"
    assert choice["beat_bm3d_on_validation"] == ["simulated_only", "simulated_edges"]


def test_without_a_recipe_beating_bm3d_the_highest_psnr_is_chosen():
    choice = ablation.choose(_validation({
        "cyclegan_v1_recipe": (22.0, 0.68, 0.92), "simulated_only": (25.0, 0.70, 0.89),
        "hybrid": (23.0, 0.75, 0.95), "bm3d": (25.7, 0.72, 0.81)}))
    assert choice["chosen"] == "simulated_only" and choice["beat_bm3d_on_validation"] == []


def test_choice_among_given_arms_only():
    choice = ablation.choose(_validation({
        "simulated_only": (26.0, 0.76, 0.89), "simulated_only+continued": (26.1, 0.77, 0.90),
        "simulated_only+adapted": (25.9, 0.76, 0.93), "bm3d": (25.7, 0.72, 0.81)}),
        ["simulated_only", "simulated_only+continued", "simulated_only+adapted"])
    assert choice["chosen"] == "simulated_only+adapted"
    assert set(choice["validation_psnr_abdomen"]) == {"simulated_only", "simulated_only+continued",
                                                      "simulated_only+adapted"}


def test_adapted_continuation_is_the_base_run_plus_a_kernel_matched_critic(tmp_path):
    from benchmarks import adaptation
    from ldct_tf import config

    base = ablation.REPO / "configs" / "v2_simulated_edges.yaml"
    adapted = config.load(base, adaptation.continuation_overrides("adapted", tmp_path))
    assert adapted.loss.adversarial == adaptation.ADVERSARIAL["adapted"] > 0
    assert adapted.loss.cycle == adapted.loss.identity == 0 and adapted.data.kernel_matched is True
    assert adapted.loss.simulated == 1 and adapted.train.init_from == str(tmp_path)
    continued = config.load(base, adaptation.continuation_overrides("continued", tmp_path))
    assert continued.loss.adversarial == 0 and continued.data.kernel_matched is False
    assert continued.train.init_from == str(tmp_path)


def test_input_blend_share_is_the_sharpest_that_still_beats_bm3d():
    from benchmarks import blend_choice

    # Mixing the input back raises edge sharpness and, past some share, costs PSNR: the rule stops before BM3D wins.
    figures = {blend_choice.blend_name(b): {"psnr_abdomen": 26.2 - 4 * b * b, "ssim_abdomen": 0.77 - 0.05 * b,
                                            "edge_sharpness": 0.90 + 0.12 * b} for b in blend_choice.BLENDS}
    bm3d = {"psnr_abdomen": 25.76, "ssim_abdomen": 0.728, "edge_sharpness": 0.81}
    choice = blend_choice.choose_blend({"mean": figures}, bm3d)
    assert choice["input_blend"] == 0.3  # 26.2 - 4 * 0.35**2 = 25.71 is below BM3D
    # When even the plain output does not beat BM3D, the highest PSNR (no blend here) is kept.
    weak = {**bm3d, "psnr_abdomen": 26.5}
    assert blend_choice.choose_blend({"mean": figures}, weak)["input_blend"] == 0.0
