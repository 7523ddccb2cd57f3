"""Pieces of the v3 experiment's steps (experiments.v3_steps) on tiny arrays: the patch stream and the cost chain."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from experiments import v3_steps
from ldct_tf import ct


def _pairs(extra_hu: float = 100.0):
    ref = np.zeros((v3_steps.PATCH + 32, v3_steps.PATCH + 32), np.float32)  # soft tissue: never rejected as air
    return [ref + extra_hu], [ref]


def _added_noise(stream, n: int) -> np.ndarray:
    """The inserted noise (low - reference, HU) of the first ``n`` patches' centre pixel."""
    out = []
    for low, ref in itertools.islice(stream, n):
        out.append(float(ct.from_model(low)[10, 10, 0] - ct.from_model(ref)[10, 10, 0]))
    return np.array(out)


def test_patch_stream_without_rescale_keeps_the_inserted_noise():
    lows, refs = _pairs()
    assert np.allclose(_added_noise(v3_steps._patch_stream(lows, refs, seed=0), 20), 100.0, atol=1e-2)


def test_patch_stream_rescale_scales_the_inserted_noise_within_its_range():
    lows, refs = _pairs()
    noise = _added_noise(v3_steps._patch_stream(lows, refs, seed=0, noise_rescale=1.0), 50)
    low, high = v3_steps.RESCALE_RANGE
    assert noise.min() >= 100.0 * low - 1e-2 and noise.max() <= 100.0 * high + 1e-2
    assert noise.std() > 5.0  # the factor varies from patch to patch
    half = _added_noise(v3_steps._patch_stream(lows, refs, seed=0, noise_rescale=0.5), 200)
    share = float(np.mean(np.isclose(half, 100.0, atol=1e-2)))
    assert 0.35 < share < 0.65  # about half the patches keep their full noise


def test_patch_stream_is_deterministic_for_a_seed():
    lows, refs = _pairs()
    a = [p[0] for p in itertools.islice(v3_steps._patch_stream(lows, refs, 3, 0.5), 5)]
    b = [p[0] for p in itertools.islice(v3_steps._patch_stream(lows, refs, 3, 0.5), 5)]
    c = [p[0] for p in itertools.islice(v3_steps._patch_stream(lows, refs, 4, 0.5), 5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_cost_of_a_continuation_counts_every_run_it_continues():
    runs = {"seed0": {"cpu_seconds": 100.0, "init": None},
            "original_from_seed0": {"cpu_seconds": 20.0, "init": "seed0"},
            "cont_seed0": {"cpu_seconds": 40.0, "init": "original_from_seed0"}}
    assert v3_steps._chain_cpu(runs, "cont_seed0") == pytest.approx(160.0)
    assert v3_steps._chain_cpu(runs, "seed0") == pytest.approx(100.0)


def test_transplant_into_a_network_with_the_coarse_noise_channel_computes_the_same_until_trained():
    source = v3_steps.build_model()
    target = v3_steps.build_model(coarse_noise=True)
    assert v3_steps.transplant(source, target) == ["enc0_conv1"]
    rng = np.random.default_rng(0)
    x = ct.to_model(rng.normal(40, 40, (1, 64, 64, 1)).astype(np.float32))
    assert np.array_equal(np.asarray(source(x)), np.asarray(target(x)))
    with pytest.raises(ValueError, match="cannot transplant"):
        v3_steps.transplant(target, v3_steps.build_model())  # narrowing is refused
    from ldct_tf.models.generator import build_generator

    other = build_generator(depth=2, base_filters=16, residual_blocks=2, norm="none", noise_conditional=True)
    with pytest.raises(ValueError, match="layers with weights differ"):
        v3_steps.transplant(source, other)  # another architecture is refused, not half copied


def test_command_refuses_missing_inputs_and_an_existing_run_in_one_line_writing_nothing(tmp_path, capsys):
    from experiments import v3

    work = tmp_path / "work"
    (work / "seed0").mkdir(parents=True)
    (work / "seed0" / "generator.keras").write_bytes(b"a trained run")
    cases = [(["train", "--work", str(work), "--seed", "0", "--steps", "1"], "holds a trained run already"),
             (["train", "--work", str(work), "--init", "nosuch", "--name", "new", "--steps", "1"], "--init"),
             (["train", "--work", str(work), "--name", "new", "--steps", "1"], "no simulated pairs"),
             (["validate", "--work", str(tmp_path / "empty"), "--version", "5"], "no */generator.keras")]
    for argv, message in cases:
        assert v3.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert sorted(p.name for p in work.iterdir()) == ["seed0"]  # nothing written, the run untouched
    assert (work / "seed0" / "generator.keras").read_bytes() == b"a trained run"
    assert not (tmp_path / "empty").exists()
