"""``python -m ldct_tf.tune``: Keras Tuner search over the denoiser's hyperparameters (the shipped recipe's supervised
training on simulated pairs, or the CycleGAN).

    python -m ldct_tf.tune --config configs/cpu_small.yaml --data SHARDS --dir runs/tune \\
        [--tuner random|hyperband|bayesian] [--max-trials N] [section.key=value ...]

Writes ``DIR/best.yaml`` (the config of the best trial, which ``python -m ldct_tf.train --config DIR/best.yaml``
takes as it is), ``DIR/results.csv`` and ``DIR/results.md`` (trial, status, values, objective, ``vs input`` and
``vs BM3D``, metrics, seconds; also printed; ``results.md`` opens with the input's and BM3D's scores),
``DIR/summary.json`` (the same, with the references' scores), ``DIR/search.json`` (what was searched, to check a
resumed search, and the stored BM3D scores) and Keras Tuner's own state in ``DIR/search/`` (``oracle.json``,
``trial_*/trial.json``, each trial's best weights and TensorBoard scalars).

References: every trial is shown beside the low-dose input's own score and a classical denoiser's on the same
validation slices: the noise-adaptive BM3D (:func:`ldct_tf.baselines.bm3d_adaptive`, scored once per search folder),
or non-local means when the optional ``bm3d`` package is missing (one line says so).

Search space: the config's ``tuning.space`` mapping, keyed by the same ``section.key`` names as command-line
overrides, merged over the built-in space of the run's kind: :data:`SUPERVISED_SPACE` for a supervised run on
simulated pairs (every unpaired loss weight 0, the shipped recipe), else the CycleGAN's :data:`DEFAULT_SPACE`
(``tuning.default_space: false`` starts from nothing; an entry set to
``null`` removes that key from the search).  An entry is ``{min, max[, step][, sampling: log]}`` (an ``int`` or
``float`` range, typed by the config field), a list of choices, or ``{values: [...]}``; ``[true, false]`` on a boolean
field is a Boolean.  ``configs/tuning_example.yaml`` (the shipped recipe) lists every ``tuning`` key with its
default; ``configs/tuning_cyclegan.yaml`` searches the CycleGAN.

Objective (``tuning.objective``, default ``auto``): with true pairs in the validation split (the same slice at both
doses, real or simulated with ``ldct_tf.simulate``), ``val_psnr``: the mean PSNR of the denoised low-dose slices
against their normal-dose slices in the abdomen window (both clipped to [-160, 240] HU, data range 400), to
maximise; ``val_ssim`` may be chosen instead.  Without pairs, ``val_unpaired`` (to minimise, HU) =
the noise SD left in the denoised slice + the anatomy it removed; see :func:`unpaired_scores`.

A trial trains ``tuning.epochs`` epochs of ``train.steps_per_epoch`` steps (Hyperband chooses its own epoch budgets,
up to ``tuning.hyperband.max_epochs``) with the training loop's step function under the same ``tf.distribute``
strategy as ``python -m ldct_tf.train``, and is scored after every epoch; its best epoch counts.

Resuming: run the same command again with the same ``--dir``: finished trials are kept, a trial that was running when
the search stopped is run again from its start (``--overwrite`` starts over).

Distributed: Keras Tuner's chief/worker mode.  Start one chief (``KERASTUNER_TUNER_ID=chief``) and any number of
workers (``KERASTUNER_TUNER_ID=tuner0``, ``tuner1``, ...), all with ``KERASTUNER_ORACLE_IP`` and
``KERASTUNER_ORACLE_PORT`` naming the chief, and the same arguments; ``--dir`` should be storage they share
(Hyperband continues one worker's trial on another).  The chief runs only the oracle; it writes the results and
``best.yaml`` when the workers have finished.  Each worker runs its trials under its own local strategy.

The command line is ``ldct_tf/tune/__main__.py``; the search is this package (``space``, ``scoring``,
``hypermodel``, ``search``), whose Python API is :func:`run` (``tune.run(config, data_dir, out_dir, ...)``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The tests patch ``train_lib.make_step_functions`` (the training loop's module) to skip the step's tracing.
from ldct_tf.train import loop as train_lib  # noqa: E402,F401
from ldct_tf.config import TuningError  # noqa: E402,F401
# The search's public names, importable from here as before the search had its own package.
from ldct_tf.tune.hypermodel import CycleGANHyperModel  # noqa: E402,F401
from ldct_tf.tune.scoring import (BASELINE_LABELS, SCORE_WINDOW, Validation, choose_baseline,  # noqa: E402,F401
                                    choose_objective, denoise_hu, unpaired_scores)
from ldct_tf.tune.search import (TUNERS, baseline_scores, best_config_yaml, improvement,  # noqa: E402,F401
                                   make_tuner, results_preamble, results_table, run, write_results)
from ldct_tf.tune.space import (DEFAULT_SPACE, SUPERVISED_SPACE, TUNING_DEFAULTS, Dimension,  # noqa: E402,F401
                                  apply_values, default_space, parse_dimension, search_space, supervised_only,
                                  tuning_settings)
