"""The noise-gain diagnostic's pieces (experiments.v3_noise_gain) on a tiny network: not the full run."""

import numpy as np
import pytest

from experiments import v3_noise_gain
from ldct_tf import ct
from ldct_tf.models.generator import build_generator


def _tiny(conditional: bool = True):
    return build_generator(depth=1, base_filters=4, residual_blocks=0, norm="none", noise_conditional=conditional)


def test_gain_scales_the_level_the_network_sees_and_changes_its_output():
    model = _tiny()
    x = ct.to_model(np.random.default_rng(0).normal(40, 30, (1, 32, 32, 1)).astype(np.float32))
    layer = model.get_layer("noise_level")
    levels = {}
    outputs = {}
    for gain in (1.0, 2.0):
        v3_noise_gain.set_noise_gain(model, gain, 50.0)
        levels[gain] = float(layer(x).numpy()[0, 0, 0, 1])
        outputs[gain] = np.asarray(model(x))
    assert levels[2.0] == pytest.approx(2 * levels[1.0], rel=1e-5)
    assert not np.allclose(outputs[1.0], outputs[2.0])


def test_a_network_without_a_noise_level_is_refused():
    with pytest.raises(ValueError, match="NoiseLevelMap"):
        v3_noise_gain.set_noise_gain(_tiny(conditional=False), 2.0, 50.0)


def test_markdown_has_a_row_per_condition_and_kernel_with_bm3d_beside_it():
    record = {"patient": "P", "slices": 2, "gains": [1.0, 2.0], "seeds": ["s0"],
              "seed_mean": {g: {"sim_10": {"B30f": [25.0, 0.7], "D45f": [24.0, 0.75]}} for g in ("1.0", "2.0")}}
    text = v3_noise_gain.markdown(record, {"sim_10": {"B30f": [27.0, 0.73]}})
    rows = [line for line in text.splitlines() if line.startswith("| 10 %")]
    assert len(rows) == 2
    assert rows[0].endswith("| 27.00 / 0.730 |") and rows[1].endswith("| - |")
