"""A whole search: :func:`run` (the Python API behind ``python -m ldct_tf.tune``) picks the objective, builds the
Keras Tuner tuner, runs or continues the search in its folder, and writes the results table and ``best.yaml``.

Results are read from Keras Tuner's oracle, which holds every trial of the folder (also those of an earlier,
interrupted call and those that other workers ran), so a resumed or distributed search reports all of them.

Each trial is reported beside two references scored on the same validation slices: the low-dose input itself and a
classical denoiser (the noise-adaptive BM3D; non-local means without the optional ``bm3d`` package).  The classical
denoiser is scored once per search folder and stored in ``search.json``, so a resumed search does not pay for it
again (BM3D costs seconds per 512 x 512 slice).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from typing import Any, Optional, Sequence

import keras_tuner
import tensorflow as tf

from ldct_tf import config as config_lib
from ldct_tf import data
from ldct_tf.train import loop
from ldct_tf.config import TuningError
from ldct_tf.tune.hypermodel import CycleGANHyperModel
from ldct_tf.tune.scoring import BASELINE_LABELS, Validation, choose_baseline, choose_objective
from ldct_tf.tune.space import Dimension, apply_values, search_space, tuning_settings

PROJECT = "search"
TUNERS = ("random", "hyperband", "bayesian")
_STATUS_DONE = ("COMPLETED", "FAILED", "INVALID")


def make_tuner(algorithm: str, hypermodel: CycleGANHyperModel, objective: keras_tuner.Objective,
               settings: config_lib.TuningConfig, directory: str, max_trials: int, seed: int,
               overwrite: bool) -> keras_tuner.Tuner:
    """The Keras Tuner tuner for ``algorithm`` (one of :data:`TUNERS`), its state in ``directory/search``."""
    common = dict(hypermodel=hypermodel, objective=objective, seed=seed, directory=directory, project_name=PROJECT,
                  overwrite=overwrite, distribution_strategy=hypermodel.strategy,
                  executions_per_trial=settings.executions_per_trial)
    if algorithm == "random":
        return keras_tuner.RandomSearch(max_trials=max_trials, **common)
    if algorithm == "bayesian":
        try:
            import sklearn  # noqa: F401  (Keras Tuner's Gaussian process)
        except ImportError:
            raise TuningError("--tuner bayesian needs scikit-learn (Keras Tuner's Gaussian process): "
                              "pip install scikit-learn==1.9.1") from None
        return keras_tuner.BayesianOptimization(max_trials=max_trials,
                                                num_initial_points=settings.bayesian.num_initial_points, **common)
    if algorithm == "hyperband":
        hb = settings.hyperband
        return keras_tuner.Hyperband(max_epochs=hb.max_epochs, factor=hb.factor, hyperband_iterations=hb.iterations,
                                     **common)
    raise TuningError(f"--tuner must be one of {TUNERS}, got {algorithm!r}")


def _score(trial) -> Optional[float]:
    score = trial.score
    return None if score is None or not math.isfinite(float(score)) else float(score)


def trial_number(trial_id: str) -> int:
    """The 1-based number Keras Tuner shows while searching ("Running Trial #3" is trial id "2", folder
    ``trial_2``); results, best.yaml and the summary use the same number, so the progress and the results agree."""
    return int(trial_id) + 1


def improvement(score: Optional[float], reference: float, objective: keras_tuner.Objective) -> Optional[float]:
    """How much better (+) or worse (-) ``score`` is than ``reference`` in the objective's units, whichever way the
    objective points (PSNR up, the unpaired criterion down)."""
    if score is None:
        return None
    return score - reference if objective.direction == "max" else reference - score


def results_table(oracle, space: Sequence[Dimension], objective: keras_tuner.Objective,
                  references: Optional[dict[str, float]] = None) -> list[dict]:
    """One row per trial: id, status, searched values, objective, ``vs LABEL`` (the objective's improvement over
    each of ``references``, label -> that reference's objective score), the other validation metrics, seconds, and
    the last line of the error of a failed trial."""
    rows = []
    for trial_id in sorted(oracle.trials):
        trial = oracle.trials[trial_id]
        values = trial.hyperparameters.values
        row: dict[str, Any] = {"trial": trial_number(trial_id), "folder": f"trial_{trial_id}", "status": trial.status}
        row.update({dim.key: values.get(dim.key) for dim in space})
        if "tuner/epochs" in values:
            row["epochs"] = values["tuner/epochs"]
        row[objective.name] = _score(trial)
        for label, reference in (references or {}).items():
            row[f"vs {label}"] = improvement(row[objective.name], reference, objective)
        for name in sorted(trial.metrics.metrics):
            if name.startswith("val_") and name != objective.name:
                row[name] = trial.metrics.get_last_value(name)
        row["seconds"] = trial.metrics.get_last_value("seconds") if trial.metrics.exists("seconds") else None
        if trial.status in ("FAILED", "INVALID") and trial.message:
            row["error"] = trial.message.strip().splitlines()[-1][:200]
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results(rows: list[dict], directory: str, preamble: str = "") -> str:
    """``results.csv`` and ``results.md`` (``preamble``, then the table) in ``directory``; returns the table."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    with tf.io.gfile.GFile(os.path.join(directory, "results.csv"), "w") as handle:
        handle.write(buffer.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    table = "\n".join(lines) + "\n"
    with tf.io.gfile.GFile(os.path.join(directory, "results.md"), "w") as handle:
        handle.write(preamble + table)
    return table


def results_preamble(objective: keras_tuner.Objective, validation: Validation, input_scores: dict,
                     baseline: Optional[dict]) -> str:
    """The head of ``results.md``: the objective, the references' scores on the same slices, and how to read the
    ``vs`` columns, so that a trial's score can be judged without another tool."""
    direction = "higher" if objective.direction == "max" else "lower"
    kind = "paired" if validation.paired else "unpaired low-dose"
    metrics = list(input_scores)
    lines = [f"# Hyperparameter search: {objective.name} ({direction} is better)", "",
             f"References on the same {len(validation.low)} {kind} validation slice(s):", "",
             "| reference | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics),
             "| low-dose input | " + " | ".join(_fmt(input_scores[m]) for m in metrics) + " |"]
    columns = "`vs input`"
    if baseline:
        scores = baseline["scores"]
        lines.append(f"| {baseline['label']} ({baseline['name']}) | " +
                     " | ".join(_fmt(scores.get(m)) for m in metrics) + " |")
        columns += f" and `vs {baseline['label']}`"
    lines += ["", f"{columns}: how much better (+) or worse (-) each trial's {objective.name} (at its best epoch) is "
              "than the reference's.", ""]
    return "\n".join(lines) + "\n"


def best_config_yaml(cfg: config_lib.Config, trial, objective: keras_tuner.Objective, algorithm: str,
                     trials: int) -> str:
    header = (f"# Best of {trials} trial(s) of a {algorithm} search (python -m ldct_tf.tune): trial "
              f"{trial_number(trial.trial_id)} (search/trial_{trial.trial_id}), {objective.name} = "
              f"{trial.score:.4g} ({objective.direction}imise).\n"
              "# Train it with: python -m ldct_tf.train --config best.yaml --data SHARDS --model-dir RUN\n")
    return header + cfg.to_yaml()


def _check_resume(directory: str, record: dict, overwrite: bool) -> None:
    """A search continued in the same folder must search the same thing; ``search.json`` records what that was."""
    path = os.path.join(directory, "search.json")
    if overwrite or not tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, "w") as handle:
            json.dump(record, handle, indent=2)
        return
    with tf.io.gfile.GFile(path) as handle:
        previous = json.load(handle)
    for key in ("tuner", "objective", "space"):
        if previous.get(key) != record[key]:
            raise TuningError(f"{path}: this folder holds a search with {key} {previous.get(key)!r}, not "
                              f"{record[key]!r}; use another --dir, or --overwrite to start over")


def _check_request(out_dir: str, max_trials: Optional[int]) -> None:
    """Refuse, before any work, a search folder that is a file (Keras Tuner's traceback came only after the data
    was loaded) and a trial budget below one (0 used to mean the config's default, silently)."""
    if max_trials is not None and max_trials < 1:
        raise TuningError(f"--max-trials must be at least 1, got {max_trials}")
    if tf.io.gfile.exists(out_dir) and not tf.io.gfile.isdir(out_dir):
        raise TuningError(f"--dir {out_dir} is a file, not a folder; choose a folder for the search")


def _is_tuner_worker() -> bool:
    """Keras Tuner's rule: a chief oracle is named by ``KERASTUNER_ORACLE_IP``; the process whose
    ``KERASTUNER_TUNER_ID`` contains "chief" runs it, every other one is a worker running trials."""
    return "KERASTUNER_ORACLE_IP" in os.environ and "chief" not in os.environ.get("KERASTUNER_TUNER_ID", "")


def _check_data(cfg: config_lib.Config, data_dir: str) -> None:
    """The shards exist, and hold the simulated pairs a config with ``loss.simulated`` > 0 trains on (the shipped
    recipe's kind of search), before any trial is built."""
    try:
        manifest = data.read_manifest(data_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise TuningError(str(exc)) from None
    if cfg.loss.simulated > 0 and not data.simulated_pair_count(manifest):
        raise TuningError(f"{data_dir}: loss.simulated > 0 needs simulated pairs; run python -m ldct_tf.simulate "
                          "pairs on it first")


def _read_record(directory: str) -> dict:
    path = os.path.join(directory, "search.json")
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as handle:
        return json.load(handle)


def baseline_scores(directory: str, validation: Validation, input_scores: dict) -> dict:
    """The classical comparator's scores on the validation slices, computed once per search folder: a stored entry
    of ``search.json`` for the same slices (the same input scores) is used as it is, also a stored BM3D when the
    ``bm3d`` package has gone since.  Returns ``{name, label, scores, slices, input_scores, seconds}``."""
    name, note = choose_baseline()
    record = _read_record(directory)
    stored = record.get("baseline")
    if stored and stored.get("input_scores") == input_scores and stored.get("name") in (name, "bm3d_adaptive"):
        print(f"{stored['label']} ({stored['name']}) on the same slices, stored in search.json: " +
              _scores_line(stored["scores"]), flush=True)
        return stored
    if note:
        print(note, flush=True)
    label = BASELINE_LABELS.get(name, name)
    print(f"Scoring {label} ({name}) on the {len(validation.low)} validation slice(s), once per search...",
          flush=True)
    started = time.perf_counter()
    scores = validation.baseline_scores(name)
    entry = {"name": name, "label": label, "scores": scores, "slices": len(validation.low),
             "input_scores": input_scores, "seconds": round(time.perf_counter() - started, 2)}
    record["baseline"] = entry
    with tf.io.gfile.GFile(os.path.join(directory, "search.json"), "w") as handle:
        json.dump(record, handle, indent=2)
    print(f"{label} ({name}) on the same slices: " + _scores_line(scores), flush=True)
    return entry


def _scores_line(scores: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in scores.items())


def _references(objective: keras_tuner.Objective, input_scores: dict, baseline: Optional[dict]) -> dict[str, float]:
    """Label -> the objective's score of each reference, for the ``vs`` columns."""
    references = {"input": input_scores[objective.name]}
    if baseline:
        references[baseline["label"]] = baseline["scores"][objective.name]
    return references


def _announce(objective: keras_tuner.Objective, validation: Validation, input_scores: dict, space, algorithm: str,
              strategy) -> None:
    direction = "higher" if objective.direction == "max" else "lower"
    print(f"Objective: {objective.name} ({direction} is better) on {len(validation.low)} "
          f"{'paired' if validation.paired else 'unpaired low-dose'} validation slice(s)" +
          ("" if validation.paired else " (no paired slices: noise SD left + anatomy removed, HU)"), flush=True)
    print("Low-dose input itself: " + _scores_line(input_scores), flush=True)
    print("Search space (" + algorithm + "):\n  " + "\n  ".join(d.describe() for d in space), flush=True)
    print(f"Strategy {type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s)", flush=True)


def run(cfg: config_lib.Config, data_dir: str, out_dir: str, *, algorithm: str = "random",
        max_trials: Optional[int] = None, overwrite: bool = False, cpu_replicas: int = 0, verbose: int = 1) -> dict:
    """Run (or continue) a search of ``cfg``'s tuning section on the shards in ``data_dir``, its state and results
    in ``out_dir``; returns a summary (also written as ``out_dir/summary.json``) with the input's and the classical
    baseline's scores, the results rows and ``run_now``, the trials this call ran (a Keras Tuner worker returns
    ``{"worker": True}``).  ``max_trials`` None: ``tuning.max_trials``.

    Raises :class:`TuningError` for an unusable tuning section, data or folder, and when no trial produced a score.
    """
    _check_request(out_dir, max_trials)
    settings = tuning_settings(cfg)
    space = search_space(cfg)
    _check_data(cfg, data_dir)
    max_trials = settings.max_trials if max_trials is None else max_trials

    strategy = loop.make_strategy(cpu_replicas)
    config_lib.mixed_precision_policy(cfg.train.mixed_precision)
    validation = Validation.load(data_dir, cfg.data.val_max_slices)
    objective = choose_objective(settings.objective, validation.paired)
    input_scores = validation.input_scores()
    _announce(objective, validation, input_scores, space, algorithm, strategy)

    tf.io.gfile.makedirs(out_dir)
    is_worker = _is_tuner_worker()
    overwrite = overwrite and not is_worker  # the chief alone may clear a folder the workers share
    record = {"tuner": algorithm, "objective": objective.name, "space": [d.describe() for d in space],
              "paired_validation": validation.paired, "input_scores": input_scores}
    baseline = None
    if not is_worker:  # the chief (or a lone search) writes the results; workers only run trials
        _check_resume(out_dir, record, overwrite)
        baseline = baseline_scores(out_dir, validation, input_scores)
    hypermodel = CycleGANHyperModel(cfg, space, data_dir, validation, strategy, objective, settings.epochs, verbose)
    try:
        tuner = make_tuner(algorithm, hypermodel, objective, settings, out_dir, max_trials, cfg.train.seed + 1,
                           overwrite)
    except keras_tuner.errors.FailedTrialError as exc:  # Keras Tuner builds the default values' model first
        raise TuningError(f"the search space's default values do not build a model: {exc}") from None
    oracle = tuner.oracle
    before = {tid: t.status for tid, t in getattr(oracle, "trials", {}).items()} if not is_worker else {}
    if before:
        done = sum(s in _STATUS_DONE for s in before.values())
        print(f"Continuing the search in {out_dir}: {done} trial(s) finished earlier are kept", flush=True)
    tuner.search(verbose=verbose)
    if is_worker:
        print("Worker finished: the chief writes the results and best.yaml", flush=True)
        return {"worker": True}
    summary = _finish(cfg, oracle, space, objective, validation, input_scores, baseline, algorithm, out_dir)
    summary["run_now"] = sorted(trial_number(tid) for tid, t in oracle.trials.items()
                                if t.status in _STATUS_DONE and before.get(tid) not in _STATUS_DONE)
    with tf.io.gfile.GFile(os.path.join(out_dir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def _finish(cfg: config_lib.Config, oracle, space, objective: keras_tuner.Objective, validation: Validation,
            input_scores: dict, baseline: dict, algorithm: str, out_dir: str) -> dict:
    """The results table (beside the references), ``best.yaml`` and the summary of a finished search."""
    references = _references(objective, input_scores, baseline)
    rows = results_table(oracle, space, objective, references)
    table = write_results(rows, out_dir, results_preamble(objective, validation, input_scores, baseline))
    direction = "higher" if objective.direction == "max" else "lower"
    print("\nResults (" + objective.name + f", {direction} is better; `vs` columns: + is better than that "
          "reference):\n" + table, flush=True)
    scored = [t for t in oracle.trials.values() if t.status == "COMPLETED" and _score(t) is not None]
    failed = [r for r in rows if r["status"] in ("FAILED", "INVALID")]
    for row in failed:
        print(f"trial {row['trial']} failed: {row.get('error', 'no message')}", flush=True)
    if not scored:
        raise TuningError(f"none of the {len(rows)} trial(s) in {out_dir} produced a score ({len(failed)} failed); "
                          "see the errors above")
    best = oracle.get_best_trials(1)[0]
    best_path = os.path.join(out_dir, "best.yaml")
    with tf.io.gfile.GFile(best_path, "w") as handle:
        handle.write(best_config_yaml(apply_values(cfg, best.hyperparameters.values), best, objective, algorithm,
                                      len(rows)))
    beside = ", ".join(f"{label} {value:.4g}" for label, value in references.items())
    print(f"Best: trial {trial_number(best.trial_id)}, {objective.name} {best.score:.4g} ({beside}); config written "
          f"to {best_path}", flush=True)
    return {"objective": objective.name, "direction": objective.direction, "paired": validation.paired,
            "input_scores": input_scores, "baseline": baseline, "best_trial": trial_number(best.trial_id),
            "best_score": float(best.score),
            "best_vs": {label: improvement(float(best.score), value, objective) for label, value in references.items()},
            "best_config": best_path, "trials": rows}
