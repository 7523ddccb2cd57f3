"""The adaptation experiment's continuations (experiments.adaptation, arms in configs/experiments/adaptation.yaml)."""

from __future__ import annotations

from experiments import adaptation
from experiments.arms import CONFIGS


def test_adapted_continuation_is_the_base_run_plus_a_kernel_matched_critic(tmp_path):
    from ldct_tf import config

    base = CONFIGS / "v2_simulated_edges.yaml"
    adapted = config.load(base, adaptation.continuation_overrides("adapted", tmp_path))
    assert adapted.loss.adversarial == adaptation.ADVERSARIAL["adapted"] > 0
    assert adapted.loss.cycle == adapted.loss.identity == 0 and adapted.data.kernel_matched is True
    assert adapted.loss.simulated == 1 and adapted.train.init_from == str(tmp_path)
    continued = config.load(base, adaptation.continuation_overrides("continued", tmp_path))
    assert continued.loss.adversarial == 0 and continued.data.kernel_matched is False
    assert continued.train.init_from == str(tmp_path)
