"""What the model-choice experiments share: their YAML arms, and training, scoring and shipping one arm.

``experiments.ablation`` trains and scores the recipes, ``experiments.blend_choice`` scores the chosen recipe's blend
shares and ``experiments.adaptation`` its continuations, all the same way (the pairs of the AAPM-Mayo development
split of ``benchmarks.harness``, through ``ldct_tf.evaluate``), so that their figures compare.  Finished arms leave an
``arm_done.json`` in their run folder and are not trained again, so an interrupted experiment continues.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

from benchmarks import harness

REPO = harness.REPO
RESULTS = harness.RESULTS
CONFIGS = REPO / "configs"
ARMS_DIR = CONFIGS / "experiments"
CALIBRATION_FILE = CONFIGS / "calibration_aapm_mayo.json"


class ExperimentError(Exception):
    """An experiment cannot run (its arms file, data or work folder is wrong): one line, exit status 1 or 2."""


def load_arms(name: str, required: Sequence[str]) -> dict:
    """``configs/experiments/<name>.yaml``, checked to be a mapping with the ``required`` keys."""
    import yaml

    path = ARMS_DIR / f"{name}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ExperimentError(f"{path}: cannot read the experiment's arms ({exc})") from exc
    missing = [key for key in required if not isinstance(data, dict) or key not in data]
    if missing:
        raise ExperimentError(f"{path}: missing {missing}")
    return data


def arm_record(model_dir: Path) -> Optional[dict]:
    """The finished arm's record (its training stages), None while it is not finished."""
    marker = model_dir / "arm_done.json"
    return json.loads(marker.read_text()) if marker.exists() else None


def train_recipe(config_path: Path, shards: Path, model_dir: Path, cpu_minutes: float,
                 overrides: Sequence[str] = ()) -> dict:
    """One training run of ``config_path`` at a CPU budget (process CPU time, so other work on the machine does not
    tilt the comparison); returns the training summary."""
    from ldct_tf import config as config_lib
    from ldct_tf import train

    cfg = config_lib.load(config_path, [f"train.cpu_limit_minutes={cpu_minutes}", *overrides])
    return train.run(cfg, str(shards), str(model_dir), verbose=2)


def score(arms: Sequence[str], baselines: Sequence[str], root: Path, work: Path) -> dict:
    """Export every arm (once) and score it with the ``baselines`` on the validation slices (all and per kernel) and
    on the test patient."""
    from ldct_tf import config as config_lib
    from ldct_tf import evaluate
    from ldct_tf.export import SavedModelDenoiser, export_generator, load_generator

    denoisers = {}
    for arm in arms:
        version = work / "export" / arm / "1"
        if not version.exists():
            version = export_generator(load_generator(work / arm, config_lib.load(work / arm / "config.yaml")),
                                       work / "export" / arm)
        denoisers[arm] = SavedModelDenoiser(version)
    denoisers.update(evaluate.make_denoisers(list(baselines)))
    scored = {}
    for split in ("val", "test"):
        rows = harness.pairs_of(root, split)
        groups = {"all": rows}
        if split == "val":
            groups.update({k: [r for r in rows if r["kernel"] == k] for k in sorted({r["kernel"] for r in rows})})
        scored[split] = {group: score_rows(root, members, denoisers, work / "reports" / f"{split}_{group}",
                                           {"split": split, "group": group})
                         for group, members in groups.items()}
    return scored


def score_rows(root: Path, rows: Sequence[dict], denoisers: dict, out_dir: Path, info: dict) -> dict:
    """The pairs of ``rows`` (pairs.csv rows) scored with ``denoisers`` (name -> HU slice function) into ``out_dir``,
    the experiment's own report folder: slice count, mean of every metric, NPS distance to the reference."""
    from ldct_tf import evaluate

    pairs = [evaluate.load_pair(root / "mayo_pairs" / r["quarter_dose"], root / "mayo_pairs" / r["full_dose"],
                                name=Path(r["full_dose"]).stem) for r in rows]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    summary = evaluate.evaluate(pairs, {n: (lambda d: lambda hu: d(hu))(d) for n, d in denoisers.items()}, out_dir,
                                info=info)
    return {"slices": len(pairs),
            "mean": {n: {m: v["mean"] for m, v in f.items()} for n, f in summary["metrics"].items()},
            "nps_mean_freq_distance_to_reference": {n: v["mean"] for n, v in
                                                    summary["nps_mean_freq_distance_to_reference"].items()}}


def ship(model_dir: Path, target: Path, metadata: dict, input_blend: float = 0.0) -> None:
    """Export the run in ``model_dir`` as ``target`` (``.../NAME/VERSION``), its resolved config in the metadata."""
    from ldct_tf import config as config_lib
    from ldct_tf.export import export_generator, load_generator

    cfg = config_lib.load(model_dir / "config.yaml")
    export_generator(load_generator(model_dir, cfg), target.parent, version=int(target.name),
                     metadata={**metadata, "config": cfg.to_dict()},
                     default_strength=round(1.0 - input_blend, 6))  # a share B of the input is strength 1 - B
