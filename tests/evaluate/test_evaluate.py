"""Evaluate CLI and core: pairs from CSV / folders / simulation, the output contract, reader-study kit round trip,
a real SavedModel as a denoiser, and the Mayo pairs CSV as input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ldct_tf import baselines, evaluate, metrics
from ldct_tf.evaluate import __main__ as evaluate_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUIRED = ["slice", "denoiser", "psnr_abdomen", "ssim_abdomen", "psnr_wide", "ssim_wide", "rmse_hu", "noise_sd_hu"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """This module's own sample archive: the pairs CSVs written into it must not reach the session-wide archive that
    the pipeline tests count files in."""
    from ldct_tf.demo import sample_data

    return sample_data.write_sample_dataset(tmp_path_factory.mktemp("evaluate_sample"), n_patients=4,
                                            slices_per_series=3)


def _write_pairs_csv(sample, n: int) -> Path:
    """pairs.csv in the sample root with paths relative to it (the CLI must resolve them against the CSV's folder)."""
    path = sample.root / f"pairs_{n}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["low", "normal"])
        for low, normal in list(zip(sample.files["low"], sample.files["normal"]))[:n]:
            w.writerow([low.relative_to(sample.root), normal.relative_to(sample.root)])
    return path


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _text_outputs(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.suffix in {".csv", ".json", ".md",
                                                                                            ".txt"})


@pytest.fixture(scope="module")
def cli_run(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    pairs_csv = _write_pairs_csv(sample, 3)
    rc = evaluate_cli.main(["--pairs", str(pairs_csv), "--denoiser", "none", "--denoiser", "gaussian",
                            "--denoiser", "tv", "--out", str(out), "--panels", "1", "--reader-study", "2"])
    assert rc == 0
    return out


def test_cli_writes_the_output_contract(cli_run, sample):
    rows = _read_csv(cli_run / "metrics.csv")
    assert list(rows[0])[:2] == ["slice", "denoiser"] and set(REQUIRED) <= set(rows[0])
    assert len(rows) == 9 and {r["denoiser"] for r in rows} == {"none", "gaussian", "tv"}
    summary = json.loads((cli_run / "summary.json").read_text())  # strict JSON: no NaN / Infinity
    assert summary["slices"] == 3 and summary["denoisers"] == ["none", "gaussian", "tv"]
    for name in summary["denoisers"]:
        stat = summary["metrics"][name]["psnr_abdomen"]
        assert stat["n"] == 3 and stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1]
    # Sample low dose = normal + 40 HU white noise: every smoother must beat the input on PSNR in both windows.
    for window in ("abdomen", "wide"):
        none = summary["metrics"]["none"][f"psnr_{window}"]["mean"]
        assert summary["metrics"]["gaussian"][f"psnr_{window}"]["mean"] > none
        assert summary["metrics"]["tv"][f"psnr_{window}"]["mean"] > none
    assert sum(summary["wins"]["none"].values()) == 0
    report = (cli_run / "report.md").read_text()
    assert "abdomen window [-160, 240]" in report and "[-1024, 1900]" in report and "Wins per slice" in report
    for png in ("panel_01.png", "metric_bars.png", "nps.png"):
        assert (cli_run / "figures" / png).read_bytes()[:8] == PNG_MAGIC


def test_none_row_equals_the_metrics_functions(cli_run, sample):
    pair = evaluate.load_pair(sample.files["low"][0], sample.files["normal"][0])
    name = sample.files["low"][0].relative_to(sample.root).with_suffix("").as_posix()  # as written in the CSV
    row = next(r for r in _read_csv(cli_run / "metrics.csv") if r["denoiser"] == "none" and r["slice"] == name)
    assert float(row["psnr_abdomen"]) == pytest.approx(metrics.psnr(pair.low, pair.normal), rel=1e-5)
    assert float(row["ssim_wide"]) == pytest.approx(metrics.ssim(pair.low, pair.normal, "wide"), rel=1e-5)
    assert float(row["rmse_hu"]) == pytest.approx(metrics.rmse_hu(pair.low, pair.normal), rel=1e-5)


def test_no_identifiers_in_outputs(cli_run, sample):
    text = _text_outputs(cli_run) + "\n".join(str(p) for p in cli_run.rglob("*"))
    for identity in sample.identities:
        for value in identity.values():
            assert value not in text


def test_reader_study_kit_is_blinded(cli_run):
    kit = cli_run / "reader_study"
    key = _read_csv(kit / "key.csv")
    sheet = _read_csv(kit / "score_sheet.csv")
    assert len(key) == len(sheet) == 2 * 4  # 2 slices x (3 denoisers + the normal-dose reference)
    assert {r["denoiser"] for r in key} == {"none", "gaussian", "tv", "reference"}
    assert [r["case"] for r in key] == [r["case"] for r in sheet]
    blob = (kit / "score_sheet.csv").read_text() + " ".join(p.name for p in (kit / "cases").iterdir())
    for r in key:
        assert (kit / "cases" / f"{r['case']}.png").read_bytes()[:8] == PNG_MAGIC
        assert r["slice"] not in blob
    for name in ("gaussian", "none", "tv", "reference"):
        assert name not in blob
    # randomised: the same slice's cases are not all adjacent in the sheet
    slices_in_order = [r["slice"] for r in key]
    assert slices_in_order != sorted(slices_in_order)


def test_score_sheets_unblind_and_agreement(cli_run, tmp_path):
    kit = cli_run / "reader_study"
    key = {r["case"]: r["denoiser"] for r in _read_csv(kit / "key.csv")}
    truth = {"reference": 5, "tv": 4, "gaussian": 3, "none": 2}
    sheet = _read_csv(kit / "score_sheet.csv")
    for reader, shift in (("A", 0), ("B", 0), ("C", -1)):
        for r in sheet:
            r["reader"] = reader
            for c in evaluate.READER_CRITERIA:
                r[c] = str(max(1, truth[key[r["case"]]] + shift))
        with open(tmp_path / f"sheet_{reader}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(sheet[0]))
            w.writeheader()
            w.writerows(sheet)
    out = tmp_path / "scores"
    rc = evaluate_cli.main(["--score-sheet", str(tmp_path / "sheet_A.csv"),
                            "--score-sheet", str(tmp_path / "sheet_B.csv"), "--key", str(kit / "key.csv"),
                            "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "reader_scores.json").read_text())
    assert result["readers"] == 2
    assert result["scores"]["reference"]["noise"]["mean"] == 5.0 and result["scores"]["none"]["noise"]["mean"] == 2.0
    assert result["agreement"]["noise"]["weighted_kappa"] == pytest.approx(1.0)
    assert "kappa 1.00" in (out / "reader_scores.md").read_text()
    worse = evaluate.summarise_scores([tmp_path / "sheet_A.csv", tmp_path / "sheet_C.csv"], kit / "key.csv")
    assert worse["agreement"]["noise"]["weighted_kappa"] < 1.0 and worse["agreement"]["noise"]["exact_agreement"] == 0
    # A score outside 1-5 names the file and line.
    sheet[0]["noise"] = "7"
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(sheet[0]))
        w.writeheader()
        w.writerows(sheet)
    with pytest.raises(ValueError, match=r"bad.csv:2: noise must be an integer 1-5"):
        evaluate.summarise_scores([tmp_path / "bad.csv"], kit / "key.csv")


def test_weighted_kappa_known_values():
    assert evaluate.weighted_kappa([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == pytest.approx(1.0)
    # Every cell of the 2x2 table equally full: agreement exactly at chance.
    assert evaluate.weighted_kappa([1, 1, 2, 2], [1, 2, 1, 2], categories=(1, 2)) == pytest.approx(0.0)
    # Fully reversed ordinal scores: the worst possible agreement.
    assert evaluate.weighted_kappa([1, 5, 1, 5], [5, 1, 5, 1]) == pytest.approx(-1.0)


def test_low_normal_folders_match_by_position(sample, tmp_path):
    low_dir = sample.files["low"][0].parent
    normal_dir = sample.files["normal"][0].parent
    pairs = evaluate.load_pair_dirs(low_dir, normal_dir)
    assert [p.name for p in pairs] == ["IM0001", "IM0002", "IM0003"]
    np.testing.assert_array_equal(pairs[1].normal, evaluate.load_pair(sample.files["low"][1],
                                                                      sample.files["normal"][1]).normal)
    with pytest.raises(ValueError, match="equal counts"):
        evaluate.load_pair_dirs(low_dir, sample.files["normal"][0])


def test_simulated_input(sample, tmp_path):
    out = tmp_path / "sim"
    rc = evaluate_cli.main(["--normal", str(sample.files["normal"][0]), "--simulate", "0.25", "--denoiser", "none",
                            "--denoiser", "gaussian", "--out", str(out), "--no-figures"])
    assert rc == 0
    rows = _read_csv(out / "metrics.csv")
    assert len(rows) == 2 and not (out / "figures").exists()
    none = next(r for r in rows if r["denoiser"] == "none")
    assert 10.0 < float(none["rmse_hu"]) < 500.0  # simulated noise, not an identical copy


def test_core_function_without_output_folder():
    rng = np.random.default_rng(0)
    clean = np.full((48, 48), 40.0)
    clean[10:20, 10:30] = -100.0
    pairs = [evaluate.Pair(f"s{i}", (clean + rng.normal(0, 30, clean.shape)).astype(np.float32), clean)
             for i in range(2)]
    summary = evaluate.evaluate(pairs, {"none": baselines.get("none"), "smooth": lambda hu: baselines.gaussian(hu, 1.0)},
                                None, progress=False)
    assert summary["files"] == {} and len(summary["rows"]) == 4
    assert summary["metrics"]["smooth"]["noise_sd_hu"]["mean"] < summary["metrics"]["none"]["noise_sd_hu"]["mean"]
    assert summary["wins"]["smooth"]["psnr_abdomen"] == 2
    twins = evaluate.evaluate([pairs[0], pairs[0]], {"none": baselines.get("none")}, None, progress=False)
    assert [r["slice"] for r in twins["rows"]] == ["s0", "s0#2"]  # repeated names never merge rows
    with pytest.raises(ValueError, match="returned shape"):
        evaluate.evaluate(pairs, {"bad": lambda hu: hu[:10]}, None, progress=False)


def test_bad_inputs_exit_with_a_message(tmp_path, capsys):
    bad = tmp_path / "pairs.csv"
    bad.write_text("a,b\nx,y\n")
    assert evaluate_cli.main(["--pairs", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert f"{bad}: expected a header with columns low,normal" in capsys.readouterr().err
    assert evaluate_cli.main(["--pairs", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")]) == 1
    assert "no such pairs CSV" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown baseline 'median'"):
        evaluate.make_denoisers(["median"])
    with pytest.raises(ValueError, match="model: needs a path"):
        evaluate.make_denoisers(["model:"])


def test_mayo_pairs_csv_with_patient_filter(shared_data, tmp_path):
    out = tmp_path / "mayo"
    rc = evaluate_cli.main(["--pairs", str(shared_data / "mayo_pairs" / "pairs.csv"), "--patients", "L286",
                            "--denoiser", "none", "--out", str(out), "--no-figures"])
    assert rc == 0
    rows = _read_csv(out / "metrics.csv")
    assert [r["slice"] for r in rows] == [f"quarter_dose/L286_D45f_{i}" for i in range(14, 18)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["info"]["input"]["patients"] == "L286" and summary["info"]["denoiser_params"] == {"none": {}}
    assert summary["reference"]["noise_sd_hu"]["mean"] < summary["metrics"]["none"]["noise_sd_hu"]["mean"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A smoke-config generator exported as a SavedModel; its output head is randomised so that it really changes
    the image (an untrained generator is close to the identity, and a test passing on the identity proves nothing)."""
    keras = pytest.importorskip("keras")
    from ldct_tf import config as config_lib
    from ldct_tf.export import export_generator
    from ldct_tf.models.generator import build_generator

    m = config_lib.load(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml").model
    keras.utils.set_random_seed(1)
    generator = build_generator(m.depth, m.base_filters, m.residual_blocks, m.attention, m.norm, name="low_to_normal")
    head = generator.get_layer("noise")
    kernel, bias = head.get_weights()
    head.set_weights([np.random.default_rng(1).normal(0.0, 0.05, kernel.shape).astype(np.float32), bias])
    folder = tmp_path_factory.mktemp("saved_models") / "ldct_denoiser"
    export_generator(generator, folder, warmup_size=0, serving_base=None)
    return folder


def test_model_denoiser_from_a_saved_model(saved_model, sample, tmp_path):
    from ldct_tf.export import SavedModelDenoiser

    out = tmp_path / "model_eval"
    spec = f"model:{saved_model}"  # a model folder: its newest version is used
    rc = evaluate_cli.main(["--pairs", str(_write_pairs_csv(sample, 2)), "--denoiser", "none", "--denoiser", spec,
                            "--out", str(out), "--no-figures"])
    assert rc == 0
    rows = _read_csv(out / "metrics.csv")
    assert {r["denoiser"] for r in rows} == {"none", spec}
    pair = evaluate.load_pair(sample.files["low"][0], sample.files["normal"][0])
    direct = SavedModelDenoiser(saved_model)(pair.low)
    assert np.abs(direct - pair.low).mean() > 1.0  # the network really changes the slice
    row = next(r for r in rows if r["denoiser"] == spec and r["slice"].endswith(pair.name))
    assert float(row["rmse_hu"]) == pytest.approx(metrics.rmse_hu(direct, pair.normal), rel=1e-4)


def test_tune_mode_writes_the_grid(sample, tmp_path):
    out = tmp_path / "tuning"
    assert evaluate_cli.main(["--pairs", str(_write_pairs_csv(sample, 2)), "--tune", "gaussian",
                              "--out", str(out)]) == 0
    result = json.loads((out / "tuning.json").read_text())["gaussian"]
    assert result["slices"] == 2 and result["parameter"] == "sigma"
    assert len(result["grid"]) == len(baselines.GRIDS["gaussian"][1])
    best = max(result["grid"], key=lambda g: g["psnr_mean"])
    assert result["best"] == best["value"] > baselines.GRIDS["gaussian"][1][0]  # 40 HU noise: some smoothing wins


def test_the_tuning_command_tunes_like_its_python_call(sample, tmp_path):
    """``python -m ldct_tf.evaluate --tune`` (formerly ``python -m ldct_tf.baselines``) writes the same tuning.json
    as its in-process call; a missing pairs CSV is one line and exit status 1."""
    import os
    import subprocess
    import sys

    pairs_csv = str(_write_pairs_csv(sample, 2))
    alias, own = tmp_path / "alias", tmp_path / "own"
    assert evaluate_cli.main(["--pairs", pairs_csv, "--tune", "gaussian", "--out", str(alias)]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "ldct_tf.evaluate", "--pairs", pairs_csv, "--tune", "gaussian",
                           "--out", str(own)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gaussian: best sigma=" in done.stdout
    assert json.loads((own / "tuning.json").read_text()) == json.loads((alias / "tuning.json").read_text())
    missing = subprocess.run([sys.executable, "-m", "ldct_tf.evaluate", "--pairs", str(tmp_path / "no.csv"),
                              "--tune", "gaussian", "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0 and "no such pairs CSV" in missing.stderr
    assert not (tmp_path / "x").exists()


def test_out_that_is_a_file_and_key_messages_are_one_line(cli_run, tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    assert evaluate_cli.main(["--pairs", str(tmp_path / "p.csv"), "--out", str(a_file)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists and is not a folder" in err[0] and a_file.read_text() == "mine"
    # --key given but wrong: the message must not tell the user to "pass --key"; the kit's real key path works.
    sheet = cli_run / "reader_study" / "score_sheet.csv"
    assert evaluate_cli.main(["--score-sheet", str(sheet), "--key", str(tmp_path / "study" / "key.csv"),
                              "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "given with --key was not found" in err and "pass --key" not in err
    copied = tmp_path / "sheets" / "sheet.csv"
    copied.parent.mkdir()
    copied.write_text(sheet.read_text())
    assert evaluate_cli.main(["--score-sheet", str(copied), "--out", str(tmp_path / "s")]) == 1
    assert "pass --key OUT/reader_study/key.csv" in capsys.readouterr().err


def _figure_inputs(sample, n):
    pairs = evaluate.load_pairs_csv(_write_pairs_csv(sample, n))
    long_name = "model:saved_models/ldct_denoiser_with_a_long_name"
    return pairs, {"none": baselines.get("none"), long_name: baselines.get("gaussian")}, long_name


def test_figures_name_slices_and_denoisers_with_colour_bar_and_honest_bars(sample):
    from ldct_tf.evaluate import figures as figs

    pairs, denoisers, long_name = _figure_inputs(sample, 1)
    summary = evaluate.evaluate(pairs, denoisers, None, progress=False)
    rois = evaluate.choose_rois(pairs[0].normal)
    outputs = {n: fn(pairs[0].low) for n, fn in denoisers.items()}
    label = summary["rows"][0]["slice"]
    fig = figs.panel_figure(label, pairs[0], outputs, rois)
    fig.canvas.draw()
    assert label in fig._suptitle.get_text() and "slice 1" not in fig._suptitle.get_text()
    titles = [ax.get_title().replace("\n", "") for ax in fig.axes]
    assert long_name in titles  # wrapped over lines, never cut
    colour_bars = [ax for ax in fig.axes if "output - reference (HU)" in (ax.get_ylabel() + ax.get_xlabel())]
    assert len(colour_bars) == 1 and len(fig.axes) == 3 * 3 + 1
    bars = figs.metric_bars_figure(summary, evaluate.METRICS)
    bars.canvas.draw()
    box = bars.bbox
    for ax in bars.axes:
        assert ax.get_xlim()[0] == 0
        assert ("higher is better" in ax.get_title()) or ("lower" in ax.get_title())
        labels = [t.get_text().replace("\n", "") for t in ax.get_yticklabels()]
        assert labels == list(denoisers)
        for text in [*ax.get_yticklabels(), ax.title]:  # every label and title inside the canvas: nothing cut
            extent = text.get_window_extent()
            assert extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1
    assert "higher is better" in bars.axes[0].get_title() and "lower is better" in bars.axes[4].get_title()


def test_rerun_into_the_same_out_leaves_no_stale_panels(sample, tmp_path):
    pairs, denoisers, _ = _figure_inputs(sample, 3)
    out = tmp_path / "eval"
    evaluate.evaluate(pairs, denoisers, out, progress=False, panel_slices=3)
    assert sorted(p.name for p in (out / "figures").glob("panel_*.png")) == [f"panel_0{i}.png" for i in (1, 2, 3)]
    mine = out / "figures" / "panel_99.png"  # a file this tool did not write stays
    mine.write_bytes(b"user file")
    summary = evaluate.evaluate(pairs, denoisers, out, progress=False, panel_slices=1)
    assert sorted(p.name for p in (out / "figures").glob("panel_*.png")) == ["panel_01.png", "panel_99.png"]
    assert mine.read_bytes() == b"user file"
    figures = [Path(f).name for f in summary["files"]["figures"]]
    assert "panel_02" not in (out / "report.md").read_text()
    # panel, metric bars, NPS; plus the change audit's own figure (ldct_tf.audit.report)
    assert len([f for f in figures if f != "audit_flags.png"]) == 3 and "audit_flags.png" in figures
