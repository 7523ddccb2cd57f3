"""The ablation's arms file (configs/experiments/ablation.yaml) as experiments.ablation reads it."""

from __future__ import annotations

import pytest

from experiments import ablation
from experiments.arms import ExperimentError


def test_the_arms_file_is_consistent_and_in_the_shipped_run_s_order():
    ablation.check_arms()  # every config exists, streams and schedules are known
    assert ablation.ARMS[:3] == ("cyclegan_v1_recipe", "simulated_only", "simulated_projected")
    assert ablation.ARMS[-2:] == ("hybrid", "hybrid_light") and len(ablation.ARMS) == 16
    assert ablation.BASELINES == ("bm3d", "nlm", "none")


def test_overrides_follow_the_calibration_of_the_run():
    from ldct_tf.simulate import calibration as calibration_lib

    calibration = calibration_lib.load(ablation.CALIBRATION_FILE)
    n2n = ablation.arm_overrides("simulated_fitted_n2n_edges3")
    assert n2n[0] == f"loss.noisier2noise_i0={calibration_lib.normal_dose_i0(calibration)}"
    assert n2n[1:] == ["loss.simulated_loss=mse_gradient", "loss.gradient_weight=3"]
    assert ablation.arm_overrides("cyclegan_v1_recipe") == ["train.steps=100000", "train.time_limit_minutes=0"]


def test_an_arm_with_a_missing_config_is_refused_naming_the_file(monkeypatch):
    monkeypatch.setitem(ablation.ARM_SPECS, "broken", {"config": "no_such.yaml"})
    with pytest.raises(ExperimentError, match=r"ablation.yaml: arm 'broken': config 'no_such.yaml' not found"):
        ablation.check_arms()
