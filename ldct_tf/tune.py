"""``python -m ldct_tf.tune``: Keras Tuner search over the CycleGAN's hyperparameters.

    python -m ldct_tf.tune --config configs/cpu_small.yaml --data SHARDS --dir runs/tune \\
        [--tuner random|hyperband|bayesian] [--max-trials N] [section.key=value ...]

Writes ``DIR/best.yaml`` (the config of the best trial, which ``python -m ldct_tf.train --config DIR/best.yaml``
takes as it is), ``DIR/results.csv`` and ``DIR/results.md`` (trial number as Keras Tuner shows it while searching,
from 1, and its ``search/trial_*`` folder, status, values, objective, metrics, seconds; also printed),
``DIR/search.json`` (what was searched, to check a resumed search) and Keras Tuner's own state in ``DIR/search/``
(``oracle.json``, ``trial_*/trial.json``, each trial's best weights and TensorBoard scalars).

Search space: the config's ``tuning.space`` mapping, keyed by the same ``section.key`` names as command-line
overrides, merged over :data:`DEFAULT_SPACE` (``tuning.default_space: false`` starts from nothing; an entry set to
``null`` removes that key from the search).  An entry is ``{min, max[, step][, sampling: log]}`` (an ``int`` or
``float`` range, typed by the config field), a list of choices, or ``{values: [...]}``; ``[true, false]`` on a boolean
field is a Boolean.  ``configs/tuning_example.yaml`` lists every ``tuning`` key with its default.

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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass
from typing import Any, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_tuner  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy import ndimage  # noqa: E402

from ldct_tf import config as config_lib  # noqa: E402
from ldct_tf import ct, data  # noqa: E402
from ldct_tf import train as train_lib  # noqa: E402

PROJECT = "search"
TUNERS = ("random", "hyperband", "bayesian")
SCORE_WINDOW = "abdomen"

#: What matters most for an LDCT CycleGAN: the two learning rates, the cycle / identity / perceptual weights and the
#: generator's capacity and normalisation.  Ranges are for real training; narrow them for a CPU.
DEFAULT_SPACE: dict[str, Any] = {
    "train.generator_lr": {"min": 2e-5, "max": 1e-3, "sampling": "log"},
    "train.discriminator_lr": {"min": 2e-5, "max": 1e-3, "sampling": "log"},
    "loss.cycle": {"min": 2.0, "max": 20.0, "sampling": "log"},
    "loss.identity": {"min": 0.5, "max": 10.0, "sampling": "log"},
    "loss.perceptual": [0.0, 0.05, 0.1, 0.2],
    "model.base_filters": [16, 32],
    "model.depth": {"min": 2, "max": 4},
    "model.residual_blocks": [2, 4, 6, 9],
    "model.attention": [True, False],
    "model.norm": ["instance", "batch"],
}

#: Every ``tuning`` key and its default (``configs/tuning_example.yaml`` lists them with comments).
TUNING_DEFAULTS: dict[str, Any] = {
    "objective": "auto",  # auto | psnr | ssim | unpaired
    "max_trials": 10,  # random and bayesian; --max-trials overrides
    "epochs": 2,  # epochs per trial (random, bayesian), each train.steps_per_epoch steps
    "executions_per_trial": 1,
    "default_space": True,
    "space": {},
    "hyperband": {"max_epochs": 4, "factor": 3, "iterations": 1},
    "bayesian": {"num_initial_points": None},
}

_SPEC_KEYS = {"min", "max", "step", "sampling", "values"}


class TuningError(ValueError):
    """A tuning section or search state that cannot be used; the message names the key or file."""


# --- the search space ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dimension:
    """One searched config key: ``kind`` is ``float`` | ``int`` (ranges), ``choice`` or ``boolean``."""

    key: str
    kind: str
    min: Any = None
    max: Any = None
    step: Any = None
    sampling: str = "linear"
    values: tuple = ()

    def declare(self, hp: keras_tuner.HyperParameters, default: Any = None) -> Any:
        """Register this dimension with Keras Tuner and return the trial's value (``default`` when it fits)."""
        if self.kind == "boolean":
            return hp.Boolean(self.key, default=bool(default) if isinstance(default, bool) else False)
        if self.kind == "choice":
            return hp.Choice(self.key, list(self.values), default=default if default in self.values else None)
        in_range = default is not None and self.min <= default <= self.max
        if self.kind == "int":
            return hp.Int(self.key, self.min, self.max, step=self.step, sampling=self.sampling,
                          default=int(default) if in_range and self.step is None else None)
        return hp.Float(self.key, self.min, self.max, step=self.step, sampling=self.sampling,
                        default=float(default) if in_range and self.step is None else None)

    def describe(self) -> str:
        if self.kind in ("choice", "boolean"):
            return f"{self.key} in {list(self.values) if self.values else [True, False]}"
        return f"{self.key} in [{self.min}, {self.max}]" + (f" step {self.step}" if self.step else "") + \
            (" (log)" if self.sampling == "log" else "")


def _field_type(key: str) -> Any:
    """The declared type of config field ``section.key`` (tunable: int, float, bool, str, Optional of those)."""
    section, _, name = key.partition(".")
    sections = typing.get_type_hints(config_lib.Config)
    if section not in sections or section == "tuning" or not name:
        raise TuningError(f"tuning.space: {key!r} is not a section.key of the config; sections: "
                          f"{[s for s in sections if s != 'tuning']}")
    fields = typing.get_type_hints(sections[section])
    if name not in fields:
        raise TuningError(f"tuning.space: unknown key {key!r}; {section} has: {', '.join(fields)}")
    annotation = fields[name]
    if typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation not in (int, float, bool, str):
        raise TuningError(f"tuning.space: {key!r} is a {annotation} field; only int, float, bool and str fields can "
                          "be searched")
    return annotation


def _flatten(space: dict, prefix: str = "") -> dict[str, Any]:
    """``{model: {depth: spec}}`` and ``{"model.depth": spec}`` (as YAML or ``tuning.space.model.depth=...``
    overrides write them) both become ``{"model.depth": spec}``."""
    flat: dict[str, Any] = {}
    for name, value in (space or {}).items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value and not set(value) <= _SPEC_KEYS:
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def parse_dimension(key: str, spec: Any) -> Dimension:
    """One ``tuning.space`` entry -> :class:`Dimension`; raises :class:`TuningError` naming the key."""
    kind = _field_type(key)
    if isinstance(spec, dict) and "values" in spec:
        spec = spec["values"]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise TuningError(f"tuning.space.{key}: empty list of choices")
        try:
            values = tuple(config_lib._coerce(v, kind, f"tuning.space.{key}") for v in spec)
        except config_lib.ConfigError as exc:
            raise TuningError(str(exc)) from None
        if kind is bool and set(values) == {True, False}:
            return Dimension(key, "boolean")
        return Dimension(key, "choice", values=tuple(dict.fromkeys(values)))
    if isinstance(spec, dict):
        if not {"min", "max"} <= set(spec):
            raise TuningError(f"tuning.space.{key}: a range needs min and max, got {spec!r}")
        if kind not in (int, float):
            raise TuningError(f"tuning.space.{key}: a {kind.__name__} field takes a list of choices, not a range")
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise TuningError(f"tuning.space.{key}: unknown entries {sorted(unknown)}; known: {sorted(_SPEC_KEYS)}")
        try:
            low, high = (config_lib._coerce(spec[k], kind, f"tuning.space.{key}.{k}") for k in ("min", "max"))
            step = None if spec.get("step") is None else config_lib._coerce(spec["step"], kind,
                                                                            f"tuning.space.{key}.step")
        except config_lib.ConfigError as exc:
            raise TuningError(str(exc)) from None
        sampling = str(spec.get("sampling", "linear"))
        if sampling not in ("linear", "log", "reverse_log"):
            raise TuningError(f"tuning.space.{key}.sampling: expected linear, log or reverse_log, got {sampling!r}")
        if not low < high:
            raise TuningError(f"tuning.space.{key}: min {low!r} must be below max {high!r}")
        if sampling != "linear" and low <= 0:
            raise TuningError(f"tuning.space.{key}: {sampling} sampling needs min > 0, got {low!r}")
        return Dimension(key, kind.__name__, low, high, step, sampling)
    raise TuningError(f"tuning.space.{key}: expected {{min, max}}, a list of choices or null, got {spec!r}")


def tuning_settings(cfg: config_lib.Config) -> dict:
    """The config's ``tuning`` section over :data:`TUNING_DEFAULTS`; unknown keys raise :class:`TuningError`."""
    section = dict(cfg.tuning or {})
    unknown = set(section) - set(TUNING_DEFAULTS)
    if unknown:
        raise TuningError(f"tuning: unknown keys {sorted(unknown)}; known: {sorted(TUNING_DEFAULTS)}")
    settings = copy.deepcopy(TUNING_DEFAULTS)
    for key, value in section.items():
        if isinstance(settings[key], dict) and key != "space":
            if not isinstance(value, dict):
                raise TuningError(f"tuning.{key}: expected a mapping, got {value!r}")
            extra = set(value) - set(settings[key])
            if extra:
                raise TuningError(f"tuning.{key}: unknown keys {sorted(extra)}; known: {sorted(settings[key])}")
            settings[key].update(value)
        else:
            settings[key] = value
    if settings["objective"] not in ("auto", "psnr", "ssim", "unpaired"):
        raise TuningError(f"tuning.objective: expected auto, psnr, ssim or unpaired, got {settings['objective']!r}")
    for key in ("max_trials", "epochs", "executions_per_trial"):
        if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] < 1:
            raise TuningError(f"tuning.{key}: expected an integer >= 1, got {settings[key]!r}")
    if not isinstance(settings["space"], dict):
        raise TuningError(f"tuning.space: expected a mapping of section.key entries, got {settings['space']!r}")
    return settings


def search_space(cfg: config_lib.Config) -> list[Dimension]:
    """The searched dimensions: ``tuning.space`` merged over :data:`DEFAULT_SPACE` (``null`` entries removed)."""
    settings = tuning_settings(cfg)
    merged = dict(DEFAULT_SPACE) if settings["default_space"] else {}
    merged.update(_flatten(settings["space"]))
    dims = [parse_dimension(key, spec) for key, spec in merged.items() if spec is not None]
    if not dims:
        raise TuningError("tuning.space: nothing to search (every entry is null and default_space is false)")
    return dims


def apply_values(cfg: config_lib.Config, values: dict) -> config_lib.Config:
    """A copy of ``cfg`` with a trial's values set (Keras Tuner's own ``tuner/...`` entries skipped)."""
    out = copy.deepcopy(cfg)
    for key, value in values.items():
        if not key.startswith("tuner/"):
            config_lib.set_value(out, key, value)
    return out


# --- scoring ------------------------------------------------------------------------------------------------------

def _metrics_functions():
    """``ldct_tf.metrics``' PSNR / SSIM (the evaluation's), else local ones with the same convention: both images
    clipped to the window, data range = the window width, scikit-image's SSIM."""
    try:
        from ldct_tf import metrics

        return metrics.psnr, metrics.ssim
    except ImportError:  # pragma: no cover - metrics.py is part of the package
        from skimage.metrics import structural_similarity

        def psnr(x, ref, window=SCORE_WINDOW):
            w = ct.window(window)
            mse = float(np.mean((w.clip(np.asarray(x, np.float64)) - w.clip(np.asarray(ref, np.float64))) ** 2))
            return float("inf") if mse == 0 else float(10 * np.log10(w.width**2 / mse))

        def ssim(x, ref, window=SCORE_WINDOW):
            w = ct.window(window)
            return float(structural_similarity(w.clip(np.asarray(x, np.float64)),
                                               w.clip(np.asarray(ref, np.float64)), data_range=w.width))

        return psnr, ssim


#: Immerkaer's (1996) operator: the difference of two Laplacians, blind to planes and (nearly) to smooth anatomy;
#: on white noise of SD s its output has SD 6 s.
_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)


def unpaired_scores(low_hu: np.ndarray, denoised_hu: np.ndarray) -> dict[str, float]:
    """The unpaired criterion on one slice, in HU, lower is better: ``noise_hu + residual_hu``.

    * ``noise_hu``: the noise SD left in the denoised slice, from Immerkaer's operator as a robust SD (1.4826 x the
      median absolute response / 6) over soft tissue, where the low-dose slice (smoothed) lies inside the abdomen
      window, away from air and bone edges.  Low for a good denoiser, also for one that blurs.
    * ``residual_hu``: the mean absolute value, over the same pixels, of what the denoiser removed (low - denoised)
      after a Gaussian blur of 2 px: noise averages out under the blur, removed anatomy, blurred edges and HU shifts
      do not.  Zero for the identity, which keeps all of its noise.

    A proxy for the paired PSNR, used only when the validation split has no paired slices; it cannot see
    hallucinated texture that looks like anatomy.
    """
    low = np.asarray(low_hu, np.float64)
    out = np.asarray(denoised_hu, np.float64)
    w = ct.window(SCORE_WINDOW)
    smooth = ndimage.gaussian_filter(low, 2.0)
    tissue = ndimage.binary_erosion((smooth > w.low) & (smooth < w.high), iterations=2)
    if tissue.sum() < 64:
        tissue = np.ones_like(low, bool)
    response = ndimage.convolve(out, _NOISE_KERNEL, mode="reflect")
    noise = 1.4826 * float(np.median(np.abs(response[tissue]))) / 6.0
    residual = float(np.mean(np.abs(ndimage.gaussian_filter(low - out, 2.0)[tissue])))
    return {"noise_hu": noise, "residual_hu": residual, "unpaired": noise + residual}


def denoise_hu(generator: keras.Model, hu: np.ndarray, multiple: int) -> np.ndarray:
    """Run the generator on one HU slice ``[H, W]``: padded with air to ``multiple``, cropped back, HU out."""
    h, w = hu.shape
    padded = np.full((-(-h // multiple) * multiple, -(-w // multiple) * multiple), ct.AIR_HU, np.float32)
    padded[:h, :w] = hu
    out = generator(ct.to_model(padded)[None, ..., None], training=False)
    return ct.from_model(keras.ops.convert_to_numpy(out))[0, :h, :w, 0]


@dataclass
class Validation:
    """Validation slices (HU): low-dose inputs, their normal-dose slices when ``paired``."""

    low: list
    normal: list
    paired: bool

    @classmethod
    def load(cls, data_dir: str, max_slices: int) -> "Validation":
        pairs, paired = data.validation_examples(data_dir, max_slices)
        if paired:
            return cls([p[0][..., 0] for p in pairs], [p[1][..., 0] for p in pairs], True)
        lows = [p[0][..., 0] for p in pairs]
        if not lows:
            try:
                lows = [hu.numpy()[..., 0] for hu, _ in data.slice_dataset(data_dir, "val", "low").take(max_slices)]
            except ValueError:
                lows = []
        if not lows:
            raise TuningError(f"{data_dir}: the val split has no low-dose slices to score trials on; run the pipeline "
                              "with a val split (--splits train=...,val=...)")
        return cls(lows, [], False)

    def input_scores(self) -> dict[str, float]:
        """The low-dose input's own scores: what a trial has to beat."""
        return self._scores(self.low)

    def score(self, generator: keras.Model, multiple: int) -> dict[str, float]:
        return self._scores([denoise_hu(generator, hu, multiple) for hu in self.low])

    def _scores(self, outputs: list) -> dict[str, float]:
        if self.paired:
            psnr, ssim = _metrics_functions()
            return {"val_psnr": float(np.mean([psnr(o, n, SCORE_WINDOW) for o, n in zip(outputs, self.normal)])),
                    "val_ssim": float(np.mean([ssim(o, n, SCORE_WINDOW) for o, n in zip(outputs, self.normal)]))}
        per_slice = [unpaired_scores(l, o) for l, o in zip(self.low, outputs)]
        return {f"val_{k}": float(np.mean([s[k] for s in per_slice])) for k in per_slice[0]}


def choose_objective(setting: str, paired: bool) -> keras_tuner.Objective:
    """``auto``: PSNR when the validation slices are true pairs, else the unpaired criterion."""
    if setting in ("psnr", "ssim") and not paired:
        raise TuningError(f"tuning.objective={setting} needs paired validation slices (the same slice at both doses); "
                          "the val split has none: use tuning.objective=unpaired or auto")
    if setting == "auto":
        setting = "psnr" if paired else "unpaired"
    return keras_tuner.Objective(f"val_{setting}", "min" if setting == "unpaired" else "max")


# --- the hypermodel -----------------------------------------------------------------------------------------------

class CycleGANHyperModel(keras_tuner.HyperModel):
    """Builds and compiles the CycleGAN of one trial (the base config with the trial's values) and trains it with the
    training loop's step function, scoring the validation slices after every epoch."""

    def __init__(self, base: config_lib.Config, space: Sequence[Dimension], data_dir: str, validation: Validation,
                 strategy: tf.distribute.Strategy, objective: keras_tuner.Objective, epochs: int, verbose: int = 1):
        super().__init__(name="ldct_cyclegan")
        self.objective = objective
        self.base = base
        self.space = list(space)
        self.data_dir = data_dir
        self.validation = validation
        self.strategy = strategy
        self.epochs = epochs
        self.verbose = verbose
        self._datasets: dict[tuple, tf.data.Dataset] = {}

    def trial_config(self, hp: keras_tuner.HyperParameters) -> config_lib.Config:
        values = {}
        for dim in self.space:
            section, _, name = dim.key.partition(".")
            values[dim.key] = dim.declare(hp, getattr(getattr(self.base, section), name))
        return apply_values(self.base, values)

    def training_dataset(self, cfg: config_lib.Config) -> tf.data.Dataset:
        """The unpaired training stream for a trial, shared by the trials that read the data alike: every such trial
        sees the same seeded patches, and decoding and tracing the input pipeline are paid once."""
        d, t = cfg.data, cfg.train
        key = (d.patch_size, t.batch_size, t.seed, d.min_tissue_fraction, d.augment, d.shuffle_buffer, d.cache)
        if key not in self._datasets:
            self._datasets[key] = data.unpaired_training_dataset(
                self.data_dir, d.patch_size, t.batch_size, seed=t.seed, min_tissue_fraction=d.min_tissue_fraction,
                augment=d.augment, shuffle_buffer=d.shuffle_buffer, cache=d.cache)
        return self._datasets[key]

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        """A compiled CycleGAN with its four networks and optimizers built (inside the strategy's scope), as the
        tuner requires of a subclassed model."""
        from ldct_tf.models.factory import build_cyclegan, compile_cyclegan

        cfg = self.trial_config(hp)
        if cfg.train.batch_size % self.strategy.num_replicas_in_sync:
            raise keras_tuner.errors.FailedTrialError(
                f"train.batch_size {cfg.train.batch_size} is not divisible by the "
                f"{self.strategy.num_replicas_in_sync} replicas")
        keras.utils.set_random_seed(cfg.train.seed)  # every trial starts from the same initial weights' seed
        scope = self.strategy.scope() if not tf.distribute.has_strategy() else contextlib.nullcontext()
        with scope:
            try:
                model = build_cyclegan(cfg)
            except ValueError as exc:  # an impossible combination, e.g. patch size vs depth: fail this trial only
                raise keras_tuner.errors.FailedTrialError(str(exc)) from None
            return compile_cyclegan(model, cfg, loss_scaling=keras.mixed_precision.global_policy().name ==
                                    "mixed_float16")

    def fit(self, hp, model, *args, callbacks=None, epochs: Optional[int] = None, initial_epoch: int = 0,
            verbose=None, **kwargs) -> dict:
        """Train ``epochs`` epochs (from ``initial_epoch`` when Hyperband continues a trial) and return the metrics
        of the best-scoring epoch, with ``seconds`` for the whole trial."""
        cfg = self.trial_config(hp)
        t = cfg.train
        epochs = int(epochs or self.epochs)
        verbose = self.verbose if verbose is None else verbose
        steps_per_epoch = max(1, t.steps_per_epoch)
        started = time.perf_counter()
        train_ds = self.training_dataset(cfg)
        train_step, _ = train_lib.make_step_functions(model, self.strategy)
        iterator = iter(self.strategy.experimental_distribute_dataset(train_ds))
        callback_list = keras.callbacks.CallbackList(list(callbacks or []), model=model)
        writer = _trial_writer(callbacks)
        objective = self.objective
        best: Optional[dict] = None
        callback_list.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            callback_list.on_epoch_begin(epoch)
            model.reset_metrics()
            bar = keras.utils.Progbar(steps_per_epoch, verbose=verbose, stateful_metrics=list(model.trackers))
            for step in range(steps_per_epoch):
                train_step(iterator)
                if verbose and ((step + 1) % max(1, t.log_every) == 0 or step + 1 == steps_per_epoch):
                    bar.update(step + 1, values=list(train_lib.read_metrics(model.trackers).items()))
            logs = {f"train_{k}": v for k, v in train_lib.read_metrics(model.trackers).items()}
            logs.update(self.validation.score(model.low_to_normal, 2**cfg.model.depth))
            logs["epoch"] = float(epoch + 1)
            if writer is not None:
                train_lib.write_scalars(writer, {k: v for k, v in logs.items() if k != "epoch"},
                                        model.steps_done())
            if verbose:
                print(f"epoch {epoch + 1}/{epochs}: " + " - ".join(
                    f"{k}: {v:.4g}" for k, v in logs.items() if k.startswith("val_")), flush=True)
            callback_list.on_epoch_end(epoch, logs)
            if best is None or objective.better_than(objective.get_value(logs), objective.get_value(best)):
                best = dict(logs)
        callback_list.on_train_end()
        if best is None:
            raise keras_tuner.errors.FailedTrialError(f"no epochs to train (initial_epoch {initial_epoch} >= "
                                                      f"epochs {epochs})")
        best["seconds"] = round(time.perf_counter() - started, 2)
        return best


def _trial_writer(callbacks) -> Optional[Any]:
    """A TensorBoard writer in the trial's folder (found from the tuner's checkpoint callback), or None (also on
    the non-chief workers of a multi-worker strategy)."""
    if not train_lib.is_chief():
        return None
    for callback in callbacks or []:
        path = getattr(callback, "filepath", None)
        if isinstance(path, str) and os.path.basename(os.path.dirname(path)).startswith("trial_"):
            return tf.summary.create_file_writer(os.path.join(os.path.dirname(path), "logs"))
    return None


# --- tuners and results -------------------------------------------------------------------------------------------

def make_tuner(kind: str, hypermodel: CycleGANHyperModel, objective: keras_tuner.Objective, settings: dict,
               directory: str, max_trials: int, seed: int, overwrite: bool) -> keras_tuner.Tuner:
    common = dict(hypermodel=hypermodel, objective=objective, seed=seed, directory=directory, project_name=PROJECT,
                  overwrite=overwrite, distribution_strategy=hypermodel.strategy,
                  executions_per_trial=settings["executions_per_trial"])
    if kind == "random":
        return keras_tuner.RandomSearch(max_trials=max_trials, **common)
    if kind == "bayesian":
        try:
            import sklearn  # noqa: F401  (Keras Tuner's Gaussian process)
        except ImportError:
            raise TuningError("--tuner bayesian needs scikit-learn (Keras Tuner's Gaussian process): "
                              "pip install scikit-learn==1.9.1") from None
        return keras_tuner.BayesianOptimization(max_trials=max_trials,
                                                num_initial_points=settings["bayesian"]["num_initial_points"],
                                                **common)
    if kind == "hyperband":
        hb = settings["hyperband"]
        return keras_tuner.Hyperband(max_epochs=int(hb["max_epochs"]), factor=int(hb["factor"]),
                                     hyperband_iterations=int(hb["iterations"]), **common)
    raise TuningError(f"--tuner must be one of {TUNERS}, got {kind!r}")


_STATUS_DONE = ("COMPLETED", "FAILED", "INVALID")


def trial_number(trial_id: str) -> int:
    """The 1-based number Keras Tuner shows while searching ("Running Trial #3" is trial id "2", folder
    ``trial_2``); results, best.yaml and the summary use the same number, so the progress and the results agree."""
    return int(trial_id) + 1


def _score(trial) -> Optional[float]:
    score = trial.score
    return None if score is None or not math.isfinite(float(score)) else float(score)


def results_table(oracle, space: Sequence[Dimension], objective: keras_tuner.Objective) -> list[dict]:
    """One row per trial: id, status, searched values, objective, the other validation metrics, seconds, and the
    last line of the error of a failed trial."""
    rows = []
    for trial_id in sorted(oracle.trials):
        trial = oracle.trials[trial_id]
        values = trial.hyperparameters.values
        row: dict[str, Any] = {"trial": trial_number(trial_id), "folder": f"trial_{trial_id}", "status": trial.status}
        row.update({dim.key: values.get(dim.key) for dim in space})
        if "tuner/epochs" in values:
            row["epochs"] = values["tuner/epochs"]
        row[objective.name] = _score(trial)
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


def write_results(rows: list[dict], directory: str) -> str:
    """``results.csv`` and ``results.md`` in ``directory``; returns the Markdown table."""
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
        handle.write(table)
    return table


def best_config_yaml(cfg: config_lib.Config, trial, objective: keras_tuner.Objective, kind: str, trials: int) -> str:
    header = (f"# Best of {trials} trial(s) of a {kind} search (python -m ldct_tf.tune): trial "
              f"{trial_number(trial.trial_id)} (search/trial_{trial.trial_id}), "
              f"{objective.name} = {trial.score:.4g} ({objective.direction}imise).\n"
              "# Train it with: python -m ldct_tf.train --config best.yaml --data SHARDS --model-dir RUN\n")
    return header + cfg.to_yaml()


# --- the run ------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldct_tf.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config with an optional tuning: section (configs/tuning_example.yaml)")
    parser.add_argument("--data", required=True, help="output folder of pipelines.dicom_to_tfrecord")
    parser.add_argument("--dir", required=True, help="search folder: Keras Tuner state, results, best.yaml")
    parser.add_argument("--tuner", choices=TUNERS, default="random", help="search algorithm (default random)")
    parser.add_argument("--max-trials", type=int, help="trials in all, finished ones included (random, bayesian; "
                                                       "default tuning.max_trials)")
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier search in --dir")
    parser.add_argument("--cpu-replicas", type=int, default=0,
                        help="without GPUs: split the CPU into N logical devices under MirroredStrategy (testing)")
    parser.add_argument("--verbose", type=int, default=1, help="0 silent, 1 progress")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. tuning.epochs=1")
    return parser


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


def _is_tuner_worker() -> bool:
    """Keras Tuner's rule: a chief oracle is named by ``KERASTUNER_ORACLE_IP``; the process whose
    ``KERASTUNER_TUNER_ID`` contains "chief" runs it, every other one is a worker running trials."""
    return "KERASTUNER_ORACLE_IP" in os.environ and "chief" not in os.environ.get("KERASTUNER_TUNER_ID", "")


def tune(argv: Optional[Sequence[str]] = None) -> dict:
    """Run (or continue) a search; returns a summary with the results rows and ``run_now``, the trials this call
    ran.  Raises ``SystemExit`` when no trial produced a score."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.overrides)
        settings = tuning_settings(cfg)
        space = search_space(cfg)
    except (config_lib.ConfigError, TuningError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print("Resolved config:\n" + cfg.to_yaml(), flush=True)
    data.read_manifest(args.data)
    max_trials = args.max_trials or settings["max_trials"]

    strategy = train_lib.make_strategy(args.cpu_replicas)
    gpus = tf.config.list_physical_devices("GPU")
    mixed = cfg.train.mixed_precision and bool(gpus)
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        validation = Validation.load(args.data, cfg.data.val_max_slices)
        objective = choose_objective(settings["objective"], validation.paired)
    except TuningError as exc:
        raise SystemExit(f"error: {exc}") from None
    direction = "higher" if objective.direction == "max" else "lower"
    print(f"Objective: {objective.name} ({direction} is better) on {len(validation.low)} "
          f"{'paired' if validation.paired else 'unpaired low-dose'} validation slice(s)" +
          ("" if validation.paired else " (no paired slices: noise SD left + anatomy removed, HU)"), flush=True)
    baseline = validation.input_scores()
    print("Low-dose input itself: " + ", ".join(f"{k} {v:.4g}" for k, v in baseline.items()), flush=True)
    print("Search space (" + args.tuner + "):\n  " + "\n  ".join(d.describe() for d in space), flush=True)
    print(f"Strategy {type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s)", flush=True)

    tf.io.gfile.makedirs(args.dir)
    is_worker = _is_tuner_worker()
    overwrite = args.overwrite and not is_worker  # the chief alone may clear a folder the workers share
    record = {"tuner": args.tuner, "objective": objective.name, "space": [d.describe() for d in space],
              "paired_validation": validation.paired, "input_scores": baseline}
    if not is_worker:
        try:
            _check_resume(args.dir, record, overwrite)
        except TuningError as exc:
            raise SystemExit(f"error: {exc}") from None
    hypermodel = CycleGANHyperModel(cfg, space, args.data, validation, strategy, objective, settings["epochs"],
                                    args.verbose)
    try:
        tuner = make_tuner(args.tuner, hypermodel, objective, settings, args.dir, max_trials, cfg.train.seed + 1,
                           overwrite)
    except TuningError as exc:
        raise SystemExit(f"error: {exc}") from None
    except keras_tuner.errors.FailedTrialError as exc:  # Keras Tuner builds the default values' model first
        raise SystemExit(f"error: the search space's default values do not build a model: {exc}") from None
    oracle = tuner.oracle
    before = {tid: t.status for tid, t in getattr(oracle, "trials", {}).items()} if not is_worker else {}
    if before:
        done = sum(s in _STATUS_DONE for s in before.values())
        print(f"Continuing the search in {args.dir}: {done} trial(s) finished earlier are kept", flush=True)
    tuner.search(verbose=args.verbose)
    if is_worker:
        print("Worker finished: the chief writes the results and best.yaml", flush=True)
        return {"worker": True}

    rows = results_table(oracle, space, objective)
    run_now = [trial_number(tid) for tid, t in oracle.trials.items()
               if t.status in _STATUS_DONE and before.get(tid) not in _STATUS_DONE]
    table = write_results(rows, args.dir)
    print("\nResults (" + objective.name + f", {direction} is better):\n" + table, flush=True)
    scored = [t for t in oracle.trials.values() if t.status == "COMPLETED" and _score(t) is not None]
    failed = [r for r in rows if r["status"] in ("FAILED", "INVALID")]
    for row in failed:
        print(f"trial {row['trial']} failed: {row.get('error', 'no message')}", flush=True)
    if not scored:
        raise SystemExit(f"error: none of the {len(rows)} trial(s) in {args.dir} produced a score "
                         f"({len(failed)} failed); see the errors above")
    best = oracle.get_best_trials(1)[0]
    best_cfg = apply_values(cfg, best.hyperparameters.values)
    best_path = os.path.join(args.dir, "best.yaml")
    with tf.io.gfile.GFile(best_path, "w") as handle:
        handle.write(best_config_yaml(best_cfg, best, objective, args.tuner, len(rows)))
    print(f"Best: trial {trial_number(best.trial_id)}, {objective.name} {best.score:.4g}; config written to "
          f"{best_path}",
          flush=True)
    return {"objective": objective.name, "direction": objective.direction, "paired": validation.paired,
            "input_scores": baseline, "best_trial": trial_number(best.trial_id), "best_score": float(best.score),
            "best_config": best_path, "trials": rows, "run_now": sorted(run_now)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    tune(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
