"""The search space: the config's ``tuning.space`` entries (keyed like command-line overrides) parsed into typed
Keras Tuner dimensions, merged over :data:`DEFAULT_SPACE`, and a trial's values written back into a config.

A dimension takes its type from the config field it sets, so a trial's values always make a config that
``python -m ldct_tf.train`` reads.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

import keras_tuner

from ldct_tf import config as config_lib
from ldct_tf import config as config_lib_checks
from ldct_tf.config import TuningError

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

#: The default space of a supervised run (every unpaired loss weight 0, ``loss.simulated`` > 0: the shipped recipe,
#: ``configs/v2_simulated.yaml``): the discriminator's rate and the cycle / identity / perceptual weights do nothing
#: there, so they are not searched; the simulated loss, its gradient weight and the generator's shape are.
SUPERVISED_SPACE: dict[str, Any] = {
    "train.generator_lr": {"min": 1e-4, "max": 3e-3, "sampling": "log"},
    "loss.simulated_loss": ["mse", "mse_gradient", "l1"],
    "loss.gradient_weight": {"min": 0.25, "max": 4.0, "sampling": "log"},
    "model.base_filters": [12, 16, 24, 32],
    "model.depth": {"min": 2, "max": 4},
    "model.residual_blocks": [1, 2, 4],
    "model.attention": [True, False],
    "model.norm": ["none", "instance"],
}

#: The loss weights that make a run a CycleGAN; all 0 (with ``loss.simulated`` > 0) make it supervised.
_UNPAIRED_WEIGHTS = ("adversarial", "cycle", "identity", "perceptual")

#: Every ``tuning`` key and its default, as :class:`ldct_tf.config.TuningConfig` declares them.
TUNING_DEFAULTS: dict[str, Any] = dataclasses.asdict(config_lib.TuningConfig())

_SPEC_KEYS = {"min", "max", "step", "sampling", "values"}


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


def _searchable_type(key: str) -> type:
    """The declared type of config field ``section.key`` if it can be searched (int, float, bool, str, Optional of
    those); the tuning section itself cannot."""
    if key.partition(".")[0] == "tuning" or "." not in key:
        sections = [s for s in typing.get_type_hints(config_lib.Config) if s != "tuning"]
        raise TuningError(f"tuning.space: {key!r} is not a section.key of the config; sections: {sections}")
    try:
        annotation = config_lib.field_type(key)
    except config_lib.ConfigError as exc:
        raise TuningError(f"tuning.space: {exc}") from None
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


def _coerce(value: Any, kind: type, key: str) -> Any:
    try:
        return config_lib.coerce(value, kind, key)
    except config_lib.ConfigError as exc:
        raise TuningError(str(exc)) from None


def parse_dimension(key: str, spec: Any) -> Dimension:
    """One ``tuning.space`` entry -> :class:`Dimension`; raises :class:`TuningError` naming the key."""
    kind = _searchable_type(key)
    name = f"tuning.space.{key}"
    if isinstance(spec, dict) and "values" in spec:
        spec = spec["values"]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise TuningError(f"{name}: empty list of choices")
        values = tuple(_coerce(v, kind, name) for v in spec)
        if kind is bool and set(values) == {True, False}:
            return Dimension(key, "boolean")
        return Dimension(key, "choice", values=tuple(dict.fromkeys(values)))
    if isinstance(spec, dict):
        if not {"min", "max"} <= set(spec):
            raise TuningError(f"{name}: a range needs min and max, got {spec!r}")
        if kind not in (int, float):
            raise TuningError(f"{name}: a {kind.__name__} field takes a list of choices, not a range")
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise TuningError(f"{name}: unknown entries {sorted(unknown)}; known: {sorted(_SPEC_KEYS)}")
        low, high = (_coerce(spec[k], kind, f"{name}.{k}") for k in ("min", "max"))
        step = None if spec.get("step") is None else _coerce(spec["step"], kind, f"{name}.step")
        sampling = str(spec.get("sampling", "linear"))
        if sampling not in ("linear", "log", "reverse_log"):
            raise TuningError(f"{name}.sampling: expected linear, log or reverse_log, got {sampling!r}")
        if not low < high:
            raise TuningError(f"{name}: min {low!r} must be below max {high!r}")
        if sampling != "linear" and low <= 0:
            raise TuningError(f"{name}: {sampling} sampling needs min > 0, got {low!r}")
        return Dimension(key, kind.__name__, low, high, step, sampling)
    raise TuningError(f"{name}: expected {{min, max}}, a list of choices or null, got {spec!r}")


def tuning_settings(cfg: config_lib.Config) -> config_lib.TuningConfig:
    """The config's ``tuning`` section, range-checked again (it may have been changed since the config was loaded)."""
    return config_lib_checks.validate_tuning(cfg.tuning)


def supervised_only(cfg: config_lib.Config) -> bool:
    """True for the shipped recipe's kind of run: the denoiser alone, trained on simulated pairs (every unpaired loss
    weight 0), as :attr:`ldct_tf.models.cyclegan.CycleGAN.supervised_only` trains it."""
    return cfg.loss.simulated > 0 and all(getattr(cfg.loss, term) == 0 for term in _UNPAIRED_WEIGHTS)


def default_space(cfg: config_lib.Config) -> dict[str, Any]:
    """The built-in space for ``cfg``'s kind of run: :data:`SUPERVISED_SPACE`, or the CycleGAN's
    :data:`DEFAULT_SPACE`."""
    return dict(SUPERVISED_SPACE if supervised_only(cfg) else DEFAULT_SPACE)


def search_space(cfg: config_lib.Config) -> list[Dimension]:
    """The searched dimensions: ``tuning.space`` merged over the built-in space of the run's kind
    (:func:`default_space`; ``null`` entries removed)."""
    settings = tuning_settings(cfg)
    merged = default_space(cfg) if settings.default_space else {}
    merged.update(_flatten(settings.space))
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
