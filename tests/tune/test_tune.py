"""``python -m ldct_tf.tune``: search space parsing, the objectives, and searches over shards from the pipeline."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from ldct_tf import config, ct
from ldct_tf import tune
from ldct_tf.tune import __main__ as tune_cli
from tests.conftest import REPO, with_simulated_stream

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}

SMOKE = str(REPO / "configs" / "smoke.yaml")
EXAMPLE = str(REPO / "configs" / "tuning_example.yaml")
# The smallest CycleGAN the code builds (tracing its training step costs about 10 s of CPU instead of 30 s for the smoke
# model) and a small space that keeps every trial that size.
TINY = ["loss.perceptual=0", "loss.identity=0", "model.depth=1", "model.residual_blocks=0", "model.attention=false",
        "model.disc_layers=1", "data.patch_size=16", "train.steps_per_epoch=1", "tuning.epochs=1",
        "tuning.default_space=false", "tuning.space.train.generator_lr={min: 1e-4, max: 1e-3, sampling: log}",
        "tuning.space.loss.cycle=[5, 10]"]
# The shipped recipe (configs/tuning_example.yaml: supervised on simulated pairs, noise-conditional) at its smallest.
TINY_SUPERVISED = ["model.depth=1", "model.residual_blocks=0", "model.attention=false", "model.disc_layers=1",
                   "data.patch_size=16", "train.steps_per_epoch=1", "train.simulated_batch_size=4", "tuning.epochs=1",
                   "tuning.default_space=false",
                   "tuning.space.train.generator_lr={min: 1e-4, max: 1e-3, sampling: log}",
                   "tuning.space.loss.simulated_loss=[mse, mse_gradient]"]


@pytest.fixture(scope="module")
def paired_shards(sample, tmp_path_factory):
    """Pipeline shards whose val split holds paired slices (the shared ``sample_run`` puts no patient in val)."""
    from ldct_tf.pipeline.__main__ import run

    out = tmp_path_factory.mktemp("tune_shards") / "out"
    manifest = run(["--input", str(sample.root), "--dose-manifest", str(sample.dose_manifest), "--output", str(out),
                    "--salt", "test-salt", "--splits", "train=0.5,val=0.5", "--num-shards", "1"])
    assert manifest["counts"]["val"]["low"] > 0 and manifest["counts"]["val"]["normal"] > 0
    return str(out)


# --- search space -------------------------------------------------------------------------------------------------

def test_default_space_covers_the_issue_and_parses_against_the_config():
    dims = {d.key: d for d in tune.search_space(config.Config())}
    assert set(dims) == set(tune.DEFAULT_SPACE)
    assert dims["train.generator_lr"].kind == "float" and dims["train.generator_lr"].sampling == "log"
    assert dims["model.depth"].kind == "int"
    assert dims["model.attention"].kind == "boolean"
    assert dims["model.norm"].values == ("instance", "batch")
    assert all(isinstance(v, float) for v in dims["loss.perceptual"].values)


def test_user_space_merges_over_the_defaults_nested_or_dotted():
    cfg = config.load(SMOKE, ["tuning.space.model.depth=null", "tuning.space.loss.cycle=[5, 10]"])
    cfg.tuning["space"]["model.base_filters"] = {"min": 4, "max": 16, "step": 4}
    dims = {d.key: d for d in tune.search_space(cfg)}
    assert "model.depth" not in dims
    assert dims["loss.cycle"].values == (5.0, 10.0)  # coerced to the float field
    assert (dims["model.base_filters"].min, dims["model.base_filters"].max, dims["model.base_filters"].step) == \
        (4, 16, 4)
    only = config.load(SMOKE, ["tuning.default_space=false", "tuning.space.model.norm=[batch]"])
    assert [d.key for d in tune.search_space(only)] == ["model.norm"]


@pytest.mark.parametrize("override, message", [
    ("tuning.space.model.colour=[1, 2]", "unknown key 'model.colour'"),
    ("tuning.space.model.norm={min: 1, max: 2}", "takes a list of choices"),
    ("tuning.space.train.generator_lr={min: 0, max: 1, sampling: log}", "needs min > 0"),
    ("tuning.space.model.depth={min: 4, max: 2}", "must be below max"),
    ("tuning.space.model.depth=[2, 2.5]", "expected int"),
    ("tuning.space.loss.perceptual_layers=[[a]]", "only int, float, bool and str"),
    ("tuning.epochs=0", "tuning.epochs"),
    ("tuning.objective=best", "tuning.objective"),
    ("tuning.trials=3", "unknown keys ['trials']"),
])
def test_bad_tuning_sections_name_the_key(override, message):
    with pytest.raises(tune.TuningError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tune.search_space(config.load(SMOKE, [override]))


def test_example_config_searches_the_shipped_recipe_offline_and_lists_every_tuning_key():
    """The example is the shipped model's recipe (supervised on simulated pairs, noise-conditional, no VGG19: runs
    offline); the CycleGAN search stays available as its own example (issue 26)."""
    cfg = config.load(EXAMPLE)
    assert set(cfg.tuning) == set(tune.TUNING_DEFAULTS)
    assert tune.supervised_only(cfg) and cfg.model.noise_conditional and cfg.loss.perceptual == 0
    assert cfg.loss.vgg_weights == "none" and cfg.model.norm == "none"
    dims = {d.key: d for d in tune.search_space(cfg)}
    assert set(dims) == set(tune.SUPERVISED_SPACE) | {"data.patch_size"}
    assert dims["model.norm"].values == ("none", "instance")
    assert dims["loss.simulated_loss"].values == ("mse", "mse_gradient", "l1")
    assert not {"train.discriminator_lr", "loss.cycle", "loss.perceptual"} & set(dims)  # no effect when supervised
    cyclegan = config.load(REPO / "configs" / "tuning_cyclegan.yaml")
    assert set(cyclegan.tuning) == set(tune.TUNING_DEFAULTS) and not tune.supervised_only(cyclegan)
    assert {d.key for d in tune.search_space(cyclegan)} >= {"train.generator_lr", "loss.cycle", "model.attention"}


def test_the_built_in_space_follows_the_kind_of_run():
    supervised = config.load(SMOKE, ["loss.adversarial=0", "loss.cycle=0", "loss.identity=0", "loss.perceptual=0",
                                     "loss.simulated=1"])
    assert {d.key for d in tune.search_space(supervised)} == set(tune.SUPERVISED_SPACE)
    hybrid = config.load(SMOKE, ["loss.simulated=1"])  # a CycleGAN with the simulated term is still a CycleGAN
    assert {d.key for d in tune.search_space(hybrid)} == set(tune.DEFAULT_SPACE)


def test_trial_values_become_a_config_the_trainer_reads(tmp_path):
    cfg = tune.apply_values(config.load(SMOKE), {"model.attention": False, "train.generator_lr": 3e-4,
                                                 "tuner/epochs": 2})
    path = tmp_path / "best.yaml"
    path.write_text(cfg.to_yaml())
    again = config.load(path)
    assert again.model.attention is False and again.train.generator_lr == 3e-4


# --- objectives ---------------------------------------------------------------------------------------------------

def _phantom(size: int = 96) -> np.ndarray:
    """Water disc with a fat ring and two small contrast spots in air: piecewise constant HU."""
    yy, xx = np.mgrid[:size, :size] - size / 2
    r = np.hypot(yy, xx)
    hu = np.full((size, size), -1000.0)
    hu[r < 44] = -100.0
    hu[r < 38] = 40.0
    hu[np.hypot(yy - 10, xx + 12) < 5] = 120.0
    hu[np.hypot(yy + 14, xx - 8) < 3] = -20.0
    return hu


def test_unpaired_criterion_prefers_denoising_over_identity_blur_and_flattening():
    rng = np.random.default_rng(0)
    clean = _phantom()
    low = clean + rng.normal(0, 40, clean.shape)
    score = {name: tune.unpaired_scores(low, out)["unpaired"] for name, out in {
        "identity": low,
        "denoised": clean + rng.normal(0, 8, clean.shape),
        "blurred": ndimage.gaussian_filter(low, 6),
        "flat": np.full_like(low, 40.0),
    }.items()}
    assert score["denoised"] < min(score["identity"], score["blurred"], score["flat"]), score
    parts = tune.unpaired_scores(low, low)
    assert parts["residual_hu"] == 0 and 30 < parts["noise_hu"] < 50  # the added noise SD is 40 HU


def test_validation_psnr_is_abdomen_window_psnr_of_the_cropped_output():
    rng = np.random.default_rng(1)
    normal = [_phantom(90), _phantom(70)]
    low = [n + rng.normal(0, 30, n.shape) for n in normal]
    validation = tune.Validation(low, normal, paired=True)
    identity = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Identity()])
    scores = validation.score(identity, multiple=8)  # 90 and 70 are padded to 96 and 72, then cropped back
    expected = np.mean([10 * np.log10(400.0**2 / np.mean((np.clip(l, -160, 240) - np.clip(n, -160, 240)) ** 2))
                        for l, n in zip(low, normal)])
    assert scores["val_psnr"] == pytest.approx(expected, abs=1e-3)
    assert scores["val_psnr"] == pytest.approx(validation.input_scores()["val_psnr"], abs=1e-3)
    assert 0 < scores["val_ssim"] < 1


def test_unpaired_validation_scores_the_denoised_slices_without_references():
    rng = np.random.default_rng(2)
    low = [_phantom(64) + rng.normal(0, 40, (64, 64))]
    validation = tune.Validation(low, [], paired=False)
    identity = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Identity()])
    scores = validation.score(identity, multiple=4)
    assert set(scores) == {"val_noise_hu", "val_residual_hu", "val_unpaired"}
    assert scores["val_residual_hu"] == pytest.approx(0, abs=0.05)  # float32 round trip through the model scale
    assert scores["val_unpaired"] == pytest.approx(validation.input_scores()["val_unpaired"], abs=0.05)


def test_objective_follows_the_validation_split():
    assert tune.choose_objective("auto", paired=True).name == "val_psnr"
    auto_unpaired = tune.choose_objective("auto", paired=False)
    assert (auto_unpaired.name, auto_unpaired.direction) == ("val_unpaired", "min")
    assert tune.choose_objective("ssim", paired=True).direction == "max"
    with pytest.raises(tune.TuningError, match="needs paired validation"):
        tune.choose_objective("psnr", paired=False)


# --- searches -----------------------------------------------------------------------------------------------------

@pytest.fixture
def no_training_steps(monkeypatch):
    """Trials without training steps (the step's tracing costs about 30 s of CPU per trial): everything else, the
    building, scoring, checkpoints and Keras Tuner's bookkeeping, runs for real."""
    monkeypatch.setattr(tune.train_lib, "make_step_functions", lambda model, strategy: (lambda it: None, None))


def _trial_folder(callbacks) -> str:
    """The trial's folder name (``trial_2``), from the checkpoint callback Keras Tuner passes to ``fit``."""
    for callback in callbacks or []:
        path = getattr(callback, "filepath", None)
        if isinstance(path, str) and os.path.basename(os.path.dirname(path)).startswith("trial_"):
            return os.path.basename(os.path.dirname(path))
    raise AssertionError("no trial checkpoint callback")


@pytest.mark.slow
def test_hyperband_search_continues_trials_from_their_checkpoints(paired_shards, tmp_path, monkeypatch, capsys):
    """A real Hyperband search with real training steps: a trial that Hyperband continues starts from exactly the
    weights its parent trial ended with (its checkpoint), not from a fresh initialisation."""
    fit = tune.CycleGANHyperModel.fit
    weights_at_start, weights_at_end, parent_of = {}, {}, {}

    def generator_weights(model):
        return [np.array(w) for w in model.low_to_normal.weights]

    def recording_fit(self, hp, model, *args, callbacks=None, **kwargs):
        folder = _trial_folder(callbacks)
        parent_of[folder] = hp.values.get("tuner/trial_id")
        weights_at_start[folder] = generator_weights(model)
        result = fit(self, hp, model, *args, callbacks=callbacks, **kwargs)
        weights_at_end[folder] = generator_weights(model)
        return result

    monkeypatch.setattr(tune.CycleGANHyperModel, "fit", recording_fit)
    summary = tune_cli.tune(["--config", SMOKE, "--data", paired_shards, "--dir", str(tmp_path), "--tuner", "hyperband",
                             "--progress", "1", *TINY, "tuning.hyperband.max_epochs=2", "tuning.hyperband.factor=2"])
    output = capsys.readouterr().out
    assert summary["objective"] == "val_psnr" and summary["paired"]
    rows = summary["trials"]
    assert len(rows) >= 3
    assert all(row["status"] == "COMPLETED" and np.isfinite(row["val_psnr"]) for row in rows)
    # The progress ("Running Trial #N") and the results number the trials alike; the folder is named too.
    shown = sorted(int(n) for n in re.findall(r"Running Trial #(\d+)", output))
    assert shown == sorted(row["trial"] for row in rows) == list(range(1, len(rows) + 1))
    assert all(row["folder"] == f"trial_{int(row['trial']) - 1:0{len(row['folder']) - 6}d}" for row in rows)
    continued = {f: p for f, p in parent_of.items() if p is not None}
    assert continued  # a trial that went on from an earlier trial's weights, for more epochs
    for folder, parent in continued.items():
        parent_end, start = weights_at_end[f"trial_{parent}"], weights_at_start[folder]
        assert any(not np.array_equal(a, b) for a, b in zip(weights_at_start[f"trial_{parent}"], parent_end)), \
            "the parent's real training steps changed nothing"
        assert all(np.array_equal(a, b) for a, b in zip(parent_end, start)), f"{folder} did not load trial_{parent}"
    assert config.load(summary["best_config"]).model.depth == 1


def test_bayesian_tuner_gets_its_settings_and_the_space(tmp_path):
    pytest.importorskip("sklearn", reason="BayesianOptimization needs scikit-learn (keras-tuner[bayesian])")
    import keras_tuner

    cfg = config.load(SMOKE, [*TINY, "tuning.bayesian.num_initial_points=2"])
    objective = tune.choose_objective("auto", paired=True)
    hypermodel = tune.CycleGANHyperModel(cfg, tune.search_space(cfg), "unused", tune.Validation([], [], True),
                                         tf.distribute.get_strategy(), objective, epochs=1)
    tuner = tune.make_tuner("bayesian", hypermodel, objective, tune.tuning_settings(cfg), str(tmp_path), 3, seed=1,
                            overwrite=False)
    assert isinstance(tuner, keras_tuner.BayesianOptimization)
    assert (tuner.oracle.num_initial_points, tuner.oracle.max_trials) == (2, 3)
    assert {hp.name for hp in tuner.oracle.get_space().space} == {"train.generator_lr", "loss.cycle"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_chief_and_worker_run_one_search(paired_shards, tmp_path, no_training_steps, monkeypatch):
    """Keras Tuner's distributed mode: a chief process runs the oracle, a worker (this process) runs the trials."""
    argv = ["--config", SMOKE, "--data", paired_shards, "--dir", str(tmp_path / "search"), "--max-trials", "2",
            "--progress", "0", *TINY]
    cluster = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(_free_port())}
    chief = subprocess.Popen([sys.executable, "-m", "ldct_tf.tune", *argv], cwd=REPO, text=True,
                             env={**ENV, **cluster, "KERASTUNER_TUNER_ID": "chief"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for name, value in {**cluster, "KERASTUNER_TUNER_ID": "tuner0"}.items():
            monkeypatch.setenv(name, value)
        assert tune_cli.tune(argv) == {"worker": True}
        output, _ = chief.communicate(timeout=300)
    finally:
        if chief.poll() is None:
            chief.kill()
            chief.wait()
    assert chief.returncode == 0, output[-3000:]
    assert "Best: trial" in output
    with open(tmp_path / "search" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["COMPLETED", "COMPLETED"] and all(r["val_psnr"] for r in rows)
    assert config.load(tmp_path / "search" / "best.yaml").model.depth == 1


def test_a_search_where_every_trial_fails_says_so(paired_shards, tmp_path, no_training_steps, monkeypatch, capsys):
    monkeypatch.setattr(tune.Validation, "score", lambda self, generator, multiple: {"val_psnr": float("nan"),
                                                                                      "val_ssim": float("nan")})
    assert tune_cli.main(["--config", SMOKE, "--data", paired_shards, "--dir", str(tmp_path), "--max-trials", "1",
                          "--progress", "0", *TINY]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m ldct_tf.tune: error: ") and "none of the 1 trial" in err and err.count("\n") == 1
    assert not (tmp_path / "best.yaml").exists()


@pytest.mark.parametrize("case", ["dir_is_a_file", "zero_trials"])
def test_a_file_as_dir_or_zero_trials_is_one_line_before_any_work(paired_shards, tmp_path, monkeypatch, capsys, case):
    """``--dir`` naming a file was a traceback, ``--max-trials 0`` silently ran the config's 10 trials (issue 27)."""
    from ldct_tf.tune import search

    def no_tuner(*args, **kwargs):
        raise AssertionError("the search started")

    monkeypatch.setattr(search, "make_tuner", no_tuner)
    target = tmp_path / "search"
    if case == "dir_is_a_file":
        target.write_text("notes\n")
    trials = "0" if case == "zero_trials" else "1"
    assert tune_cli.main(["--config", SMOKE, "--data", paired_shards, "--dir", str(target), "--max-trials", trials,
                          "--progress", "0", *TINY]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m ldct_tf.tune: error: ") and err.count("\n") == 1 and "Traceback" not in err
    expected = f"--dir {target} is a file" if case == "dir_is_a_file" else "--max-trials must be at least 1, got 0"
    assert expected in err
    assert target.is_file() == (case == "dir_is_a_file") and target.exists() == (case == "dir_is_a_file")


@pytest.mark.slow
def test_interrupted_random_search_resumes_and_its_best_config_trains(paired_shards, tmp_path, monkeypatch):
    """Two real trials on the smoke config; the search is interrupted in the second and resumed; the best config
    is accepted by the training CLI."""
    search = tmp_path / "search"
    argv = ["--config", SMOKE, "--data", paired_shards, "--dir", str(search), "--max-trials", "2", "--progress", "0",
            *TINY]
    fit = tune.CycleGANHyperModel.fit
    calls = []

    def interrupted_in_second_trial(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(tune.CycleGANHyperModel, "fit", interrupted_in_second_trial)
    with pytest.raises(KeyboardInterrupt):
        tune_cli.tune(argv)
    first_trial = (search / "search" / "trial_0" / "trial.json").read_text()
    assert json.loads(first_trial)["status"] == "COMPLETED"
    monkeypatch.setattr(tune.CycleGANHyperModel, "fit", fit)

    summary = tune_cli.tune(argv)
    assert summary["run_now"] == [2]  # the finished trial (number 1, folder trial_0) is not run again
    assert (search / "search" / "trial_0" / "trial.json").read_text() == first_trial
    rows = summary["trials"]
    assert [(r["trial"], r["folder"]) for r in rows] == [(1, "trial_0"), (2, "trial_1")]
    assert all(r["status"] == "COMPLETED" and np.isfinite(r["val_psnr"]) and r["seconds"] > 0 for r in rows)
    assert (search / "results.csv").read_text().count("\n") == 3 and (search / "results.md").exists()

    best = next(r for r in rows if r["trial"] == summary["best_trial"])
    cfg = config.load(search / "best.yaml")
    assert cfg.loss.cycle == best["loss.cycle"]
    assert cfg.train.generator_lr == pytest.approx(best["train.generator_lr"])

    from ldct_tf.train.__main__ import train

    trained = train(["--config", str(search / "best.yaml"), "--data", paired_shards, "--model-dir",
                     str(tmp_path / "run"), "--progress", "0", "train.steps=1"])
    assert trained["steps"] == 1 and (tmp_path / "run" / "generator.keras").exists()
    assert config.load(tmp_path / "run" / "config.yaml").loss.cycle == best["loss.cycle"]


# --- the references: the low-dose input and BM3D beside every trial (issue 26) ----------------------------------------

@pytest.fixture(scope="module")
def simulated_shards(paired_shards, tmp_path_factory):
    """A copy of the paired shards with a simulated-pair stream: what the shipped recipe trains on."""
    shards, _, _ = with_simulated_stream(paired_shards, tmp_path_factory.mktemp("tune_sim"), realisations=1)
    return str(shards)


def _markdown_rows(text: str, first_column: str) -> list[dict]:
    """The rows of the Markdown table in ``text`` whose header starts with ``first_column``, as dicts of strings."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


@pytest.mark.slow
def test_shipped_recipe_search_reports_each_trial_beside_the_input_and_bm3d(simulated_shards, tmp_path, monkeypatch,
                                                                              capsys):
    """The example's supervised, noise-conditional search with real training steps on simulated pairs: results.md,
    summary.json and the console give the input's and BM3D's scores and each trial beside them; BM3D is scored once
    per search folder, not again when the search resumes."""
    from ldct_tf import baselines

    if not baselines.bm3d_available():
        pytest.skip("the optional bm3d package is not installed")
    score_baseline = tune.Validation.baseline_scores
    calls = []

    def counting(self, name):
        calls.append(name)
        return score_baseline(self, name)

    monkeypatch.setattr(tune.Validation, "baseline_scores", counting)
    search = tmp_path / "search"
    argv = ["--config", EXAMPLE, "--data", simulated_shards, "--dir", str(search), "--progress", "0",
            *TINY_SUPERVISED]
    summary = tune_cli.tune([*argv, "--max-trials", "2"])
    out = capsys.readouterr().out
    assert calls == ["bm3d_adaptive"]
    inputs, bm3d = summary["input_scores"], summary["baseline"]
    assert (bm3d["name"], bm3d["label"]) == ("bm3d_adaptive", "BM3D") and set(bm3d["scores"]) == set(inputs)
    assert bm3d["scores"]["val_psnr"] != inputs["val_psnr"]
    assert f"Low-dose input itself: val_psnr {inputs['val_psnr']:.4g}" in out
    assert f"BM3D (bm3d_adaptive) on the same slices: val_psnr {bm3d['scores']['val_psnr']:.4g}" in out
    assert re.search(r"Best: trial \d, val_psnr \S+ \(input \S+, BM3D \S+\)", out)
    rows = summary["trials"]
    assert len(rows) == 2 and all(r["status"] == "COMPLETED" for r in rows)
    for row in rows:
        assert row["vs input"] == pytest.approx(row["val_psnr"] - inputs["val_psnr"])
        assert row["vs BM3D"] == pytest.approx(row["val_psnr"] - bm3d["scores"]["val_psnr"])
    # A real supervised step ran: the trial recorded a simulated-pair loss.
    trial = json.loads((search / "search" / "trial_0" / "trial.json").read_text())
    assert trial["metrics"]["metrics"]["train_simulated_loss"]["observations"][0]["value"][0] > 0

    text = (search / "results.md").read_text()
    references = {r["reference"]: r for r in _markdown_rows(text, "reference")}
    assert references["low-dose input"]["val_psnr"] == f"{inputs['val_psnr']:.4g}"
    assert references["BM3D (bm3d_adaptive)"]["val_ssim"] == f"{bm3d['scores']['val_ssim']:.4g}"
    table = _markdown_rows(text, "trial")
    assert [r["vs input"] for r in table] == [f"{r['vs input']:.4g}" for r in rows]
    assert [r["vs BM3D"] for r in table] == [f"{r['vs BM3D']:.4g}" for r in rows]
    saved = json.loads((search / "summary.json").read_text())
    assert saved["baseline"]["scores"] == bm3d["scores"] and saved["input_scores"] == inputs
    assert [r["vs BM3D"] for r in saved["trials"]] == [r["vs BM3D"] for r in rows]

    again = tune_cli.tune([*argv, "--max-trials", "3"])
    out = capsys.readouterr().out
    assert calls == ["bm3d_adaptive"], "BM3D was scored again on resuming"
    assert "stored in search.json" in out and again["baseline"]["scores"] == bm3d["scores"]
    assert again["run_now"] == [3] and len(again["trials"]) == 3
    assert config.load(again["best_config"]).model.noise_conditional is True


def test_without_bm3d_the_search_says_so_once_and_compares_with_non_local_means(paired_shards, tmp_path,
                                                                                no_training_steps, monkeypatch,
                                                                                capsys):
    from ldct_tf import baselines

    def no_bm3d(*args, **kwargs):
        raise AssertionError("BM3D was called")

    monkeypatch.setattr(baselines, "bm3d_available", lambda: False)
    monkeypatch.setattr(baselines, "bm3d", no_bm3d)
    summary = tune_cli.tune(["--config", SMOKE, "--data", paired_shards, "--dir", str(tmp_path), "--max-trials", "1",
                             "--progress", "0", *TINY])
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "BM3D is not installed" in line]
    assert len(notes) == 1 and "non-local means" in notes[0] and "pip install" in notes[0]
    nlm = summary["baseline"]
    assert (nlm["name"], nlm["label"]) == ("nlm", "NLM") and np.isfinite(nlm["scores"]["val_psnr"])
    row = summary["trials"][0]
    assert row["vs NLM"] == pytest.approx(row["val_psnr"] - nlm["scores"]["val_psnr"])
    text = (tmp_path / "results.md").read_text()
    assert "| NLM (nlm) |" in text and "vs BM3D" not in text
    assert _markdown_rows(text, "trial")[0]["vs NLM"] == f"{row['vs NLM']:.4g}"


def test_vs_columns_are_improvements_whichever_way_the_objective_points():
    psnr, unpaired = tune.choose_objective("psnr", paired=True), tune.choose_objective("unpaired", paired=False)
    assert tune.improvement(27.0, 25.0, psnr) == pytest.approx(2.0)
    assert tune.improvement(10.0, 12.0, unpaired) == pytest.approx(2.0)  # 2 HU less noise + removed anatomy
    assert tune.improvement(None, 12.0, unpaired) is None


def test_a_supervised_search_on_shards_without_simulated_pairs_is_one_line(paired_shards, tmp_path, capsys):
    target = tmp_path / "search"
    assert tune_cli.main(["--config", EXAMPLE, "--data", paired_shards, "--dir", str(target), "--progress", "0",
                          *TINY_SUPERVISED]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m ldct_tf.tune: error: ") and err.count("\n") == 1
    assert "loss.simulated > 0 needs simulated pairs" in err and not target.exists()
