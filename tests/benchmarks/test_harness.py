"""The benchmarks' shared harness (benchmarks.harness) and the layout rules of benchmarks/ and experiments/."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import harness

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in ("__init__", "harness"))
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.py") if p.stem not in ("__init__", "arms",
                                                                                             "blend_choice", "v3_data",
                                                                                             "v3_steps"))


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_data_root_follows_ldct_data_dir_else_the_shared_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("LDCT_DATA_DIR", str(tmp_path))
    assert harness.data_root() == tmp_path.resolve() and harness.data_source() == "$LDCT_DATA_DIR"
    monkeypatch.delenv("LDCT_DATA_DIR")
    assert harness.data_root() == (REPO.parent / "shared" / "data").resolve()


def test_results_are_strict_json_with_numpy_values_and_no_half_written_file(tmp_path):
    out = harness.write_result({"benchmark": "x", "value": np.float32(1.5), "n": np.int64(3), "bad": float("nan"),
                                "ok": np.bool_(True)}, tmp_path / "x.json")
    assert json.loads(out.read_text()) == {"benchmark": "x", "value": 1.5, "n": 3, "bad": None, "ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    assert harness.result_path("node") == REPO / "benchmarks" / "results" / "node.json"


def test_machine_info_and_versions_name_the_machine_and_every_package_asked_for():
    info = harness.machine_info()
    assert info["cpu_count"] >= 1 and info["python"].count(".") == 2
    found = harness.versions("no-such-package-xyz")
    assert found["numpy"] == np.__version__ and found["no-such-package-xyz"] is None


def test_measure_reports_wall_and_cpu_and_the_quiet_wait_gives_up_in_time():
    value, timing = harness.measure(lambda: sum(range(200_000)))
    assert value == sum(range(200_000)) and timing["wall"] > 0 and timing["cpu"] >= 0
    waited = harness.wait_for_quiet(0.0, window=0.05, threshold=1e9)  # any machine is "quiet" at this threshold
    assert waited is not None and waited < 1.0


def test_the_development_split_holds_out_the_test_patient_and_the_validation_slices():
    row = {"patient": "L096", "full_dose": "full_dose/L096_D45f_08.IMA"}
    assert harness.split_of(row) == "val"
    assert harness.split_of({**row, "full_dose": "full_dose/L096_D45f_02.IMA"}) == "train"
    assert harness.split_of({**row, "patient": harness.TEST_PATIENT}) == "test"


def test_no_benchmark_imports_another_benchmark_module_but_the_harness():
    for name in BENCHMARKS + ["harness"]:
        imported = {m for m in _imported_modules(REPO / "benchmarks" / f"{name}.py") if m.startswith("benchmarks")}
        assert imported <= {"benchmarks", "benchmarks.harness"} | {f"benchmarks.harness.{n}" for n in dir(harness)}, \
            f"benchmarks/{name}.py imports {sorted(imported)}"


def test_nothing_under_tests_imports_benchmarks_but_the_benchmark_tests():
    for path in (REPO / "tests").rglob("*.py"):
        if (REPO / "tests" / "benchmarks") in path.parents:
            continue
        imported = {m for m in _imported_modules(path) if m == "benchmarks" or m.startswith("benchmarks.")}
        assert not imported, f"{path.relative_to(REPO)} imports {sorted(imported)}"


@pytest.mark.parametrize("module", [f"benchmarks.{n}" for n in BENCHMARKS] + [f"experiments.{n}" for n in EXPERIMENTS])
def test_every_benchmark_and_experiment_command_answers_help(module, capsys):
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0 and f"python -m {module}" in capsys.readouterr().out
