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
