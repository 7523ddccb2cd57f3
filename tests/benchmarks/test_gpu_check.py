"""benchmarks.gpu_check (the first-GPU-run check) in its CPU form, and benchmarks.float16_error's results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import float16_error, gpu_check

REPO = Path(__file__).resolve().parents[2]


def _strict_json(path: Path) -> dict:
    def refuse(value):
        raise ValueError(f"{path}: non-finite number {value}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_gpu_check_result(result: dict, batch_sizes: list[int]) -> None:
    """What every gpu_check JSON must hold: the devices it ran on, both training settings against each other,
    both exports at every batch size, every figure finite and positive."""
    devices = result["devices"]
    assert devices["kind"] in ("gpu", "cpu_logical_devices") and len(devices["devices"]) >= 1
    if devices["kind"] == "cpu_logical_devices":
        assert "say nothing about GPU speed" in devices["warning"] and devices["physical_gpus"] == []
        assert "loss.perceptual=0" in result["config"]["overrides"]
    assert result["config"]["path"] == "configs/paper.yaml"
    train = result["training"]
    one, many = train["one_replica"], train["all_replicas"]
    assert one["replicas"] == 1 and many["replicas"] == len(devices["devices"])
    assert many["global_batch"] == one["global_batch"] * many["replicas"]  # --global-batch scaled (default)
    for setting in (one, many):
        assert _positive(setting["patches_per_second"]) and _positive(setting["seconds_per_step_median"])
        assert all(_positive(s) for s in setting["seconds_per_step_all_rounds"])
        assert setting["memory_after_first_step"]
    assert _positive(train["scaling_efficiency"])
    expected = many["patches_per_second"] / (many["replicas"] * one["patches_per_second"])
    assert train["scaling_efficiency"] == pytest.approx(expected, rel=1e-3)
    infer = result["inference"]
    for batch in batch_sizes:
        for dtype in ("float32", "float16"):
            assert _positive(infer[dtype][f"batch_{batch}"]["slices_per_second"])
        assert _positive(infer["float16_speedup_over_float32"][f"batch_{batch}"])


@pytest.mark.slow
def test_cpu_form_runs_both_settings_and_both_exports_and_writes_finite_figures(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu-replicas", "2", "--steps", "1",
                           "--warmup-steps", "0", "--rounds", "1", "--batch-sizes", "1", "2", "--slice-size", "32",
                           "--inference-slices", "2", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = _strict_json(out)
    check_gpu_check_result(result, [1, 2])
    assert result["devices"]["devices"] == ["/cpu:0", "/cpu:1"]
    assert result["training"]["one_replica"]["global_batch"] == 2  # CPU_OVERRIDES: 2 patches per replica
    assert result["inference"]["slice_size"] == 32


def test_committed_cpu_result_has_every_figure():
    result = _strict_json(REPO / "benchmarks" / "results" / "gpu_check.json")
    check_gpu_check_result(result, result["inference"]["batch_sizes"])
    assert result["inference"]["batch_sizes"] == [1, 8, 32]


def test_without_a_gpu_the_gpu_form_refuses_in_one_line(tmp_path, capsys):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no GPU found") and "--cpu-replicas 2" in err and "\n" not in err
    assert not (tmp_path / "x.json").exists()


def test_one_cpu_replica_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--cpu-replicas", "1"])
    assert exc.value.code == 2 and "--cpu-replicas must be >= 2" in capsys.readouterr().err


def test_float16_error_result_compares_against_the_float32_export_of_the_shipped_model():
    result = _strict_json(REPO / "benchmarks" / "results" / "float16_error.json")
    assert result["patient"] == "L143" and not any("L286" in name for name in result["slice_files"])
    stats = result["abs_hu_difference_float16_vs_float32"]["all_pixels"]
    assert stats["max"] >= stats["p99_9"] >= stats["p99"] >= stats["median"] >= 0
    assert 0 < stats["max"] < 5  # float16 rounding, not a broken export (which would be tens of HU off)
    assert result["reference"]["max_abs_hu_float32_export_vs_reference"] == 0.0


def test_float16_error_names_a_missing_generator_in_one_line(tmp_path, capsys):
    missing = tmp_path / "none.keras"
    assert float16_error.main(["--generator", str(missing), "--out", str(tmp_path / "x.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {missing}: generator file not found"
