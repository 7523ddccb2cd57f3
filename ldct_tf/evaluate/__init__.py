"""``python -m ldct_tf.evaluate``: score denoisers on paired low/normal-dose CT, side by side, and run reader studies.

    python -m ldct_tf.evaluate --pairs pairs.csv --denoiser none --denoiser bm3d --denoiser model:saved_models/ldct_denoiser --out eval
    python -m ldct_tf.evaluate --low LOW_DIR --normal NORMAL_DIR --out eval
    python -m ldct_tf.evaluate --normal NORMAL_DIR --simulate 0.25 --out eval         # simulated quarter dose
    python -m ldct_tf.evaluate --pairs pairs.csv --reader-study 10 --out study         # + blinded reader-study kit
    python -m ldct_tf.evaluate --score-sheet reader1.csv --score-sheet reader2.csv --out study   # unblind, summarise
    python -m ldct_tf.evaluate --pairs pairs.csv --patients L096,L143 --tune gaussian,tv --out tuning  # tune baselines

Pairs CSV: header ``low,normal`` (``quarter_dose,full_dose`` is accepted too, so the Mayo ``pairs.csv`` works as is),
paths absolute or relative to the CSV's folder, an optional ``patient`` column for ``--patients``.  Denoisers:
``none`` (the low-dose input), ``gaussian``, ``nlm``, ``tv``, ``bm3d`` (tuned defaults, ``ldct_tf.baselines``) and
``model:PATH`` (a SavedModel version folder, or a model folder meaning its newest version).

Output folder: ``metrics.csv`` (one row per slice and denoiser), ``summary.json`` and ``report.md`` (mean and 95 %
interval per denoiser and metric, wins per slice, the normal-dose reference's own noise figures), ``figures/``
(liver-window panels with zoomed crops and difference maps, metric bars, NPS curves).  Slices are named after the
files you gave (never after DICOM header fields, which may identify the patient).

The core is :func:`evaluate` (pairs x denoisers -> summary dict), which the quality benchmark and the demo call
directly; :func:`load_pairs_csv`, :func:`load_pair_dirs`, :func:`simulated_pairs` and :func:`make_denoisers` build its
inputs.  The work is done in the ``ldct_tf.evaluate`` package (pairs, denoisers, scoring, report, reader_study);
this module is its face (the names other code imports from here) and ``__main__.py`` the command line.  ``--tune``
tunes the classical baselines' strength instead of evaluating (``ldct_tf.evaluate.baseline_tuning``; it was
``python -m ldct_tf.baselines``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

from ldct_tf.evaluate import report, scoring
from ldct_tf.evaluate.denoisers import SliceDenoiser, make_denoisers, model_denoiser
from ldct_tf.evaluate.pairs import (DEFAULT_CALIBRATION, EvaluateInputError, Pair, dicom_files, load_pair,
                                    load_pair_dirs, load_pairs_csv, read_pairs_csv, simulated_pairs)
from ldct_tf.evaluate.reader_study import (READER_CRITERIA, score_report_markdown, summarise_scores,
                                             weighted_kappa, write_reader_study, write_score_summary)
from ldct_tf.evaluate.report import report_markdown, write_metrics_csv
# The benchmarks take the strict-JSON helper from here; it lives in ldct_tf.jsonio, shared with the audit.
from ldct_tf.jsonio import jsonable
from ldct_tf.evaluate.scoring import (METRICS, REFERENCE, WIN_METRICS, SliceRois, choose_rois, count_wins,
                                        interval95, noise_figures, score_slice)

__all__ = [
    "DEFAULT_CALIBRATION", "METRICS", "READER_CRITERIA", "REFERENCE", "WIN_METRICS", "EvaluateInputError", "Pair",
    "SliceDenoiser", "SliceRois", "choose_rois", "count_wins", "evaluate", "interval95", "jsonable", "load_pair",
    "load_pair_dirs", "load_pairs_csv", "make_denoisers", "model_denoiser", "noise_figures",
    "read_pairs_csv", "report_markdown", "score_report_markdown", "score_slice", "simulated_pairs",
    "summarise_scores", "weighted_kappa", "write_metrics_csv", "write_reader_study", "write_score_summary",
]


def evaluate(pairs: Sequence[Pair], denoisers: Mapping[str, SliceDenoiser], out_dir: Optional[str | Path] = None,
             *, figures: bool = True, progress: bool = True, panel_slices: int = 3,
             info: Optional[dict] = None, lesions: int = 0) -> dict:
    """Run every denoiser on every pair and score it; returns the summary dict (also written to ``out_dir``).

    Summary keys: ``slices``, ``denoisers`` (names in order), ``metrics`` (``{denoiser: {metric: interval95}}``),
    ``wins`` (:func:`count_wins`), ``reference`` (the normal-dose slices' own noise SD, CNR and NPS mean frequency),
    ``nps_mean_freq_distance_to_reference`` (per denoiser: mean |f_denoiser - f_reference| over slices), ``rows``
    (per slice and denoiser), ``info`` (``info`` as given: e.g. the input and the denoisers' parameters) and
    ``files`` (what was written).  ``out_dir=None`` computes without writing.
    """
    scores = scoring.score(pairs, denoisers, progress=progress, panel_slices=panel_slices, info=info,
                           lesions=lesions)
    if out_dir is not None:
        report.write(scores, out_dir, figures=figures)
    return scores.summary
