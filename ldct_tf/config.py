"""Experiment configuration: typed dataclass sections, YAML files, ``key=value`` overrides from the command line.

Hyperparameters live here and in ``configs/*.yaml``, never as literals deep in code.  Every CLI takes ``--config``
and ``section.key=value`` overrides and prints the resolved config, so a run is reproducible from its log.
Unknown keys are errors (a typo silently ignored is a wasted training run).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ldct_tf.errors import LdctError


@dataclass
class DataConfig:
    """Training input built from the pipeline's shards (ldct_tf.data)."""

    patch_size: int = 64
    min_tissue_fraction: float = 0.5  # patches with less than this share of pixels above -900 HU are resampled
    augment: bool = True  # flips and 90-degree rotations
    shuffle_buffer: int = 256
    cache: bool = True  # keep decoded training slices in memory (about 1 MB per 512x512 slice)
    # Keep the simulated pairs in memory too (2 MB per 512x512 pair, float32: tens of GB at archive scale).  Off:
    # they stream from the shards each pass, memory bounded by data.shuffle_buffer.
    cache_simulated: bool = False
    val_max_slices: int = 16  # whole validation slices scored per validation run
    # The real unpaired streams keep only the kernels both doses hold (ldct_tf.data.matched_kernels): a critic that
    # sees low-dose B30f against normal-dose D45f teaches kernel translation, not denoising.
    kernel_matched: bool = False


@dataclass
class ModelConfig:
    """Generator (attention U-Net) and discriminator (PatchGAN) shapes."""

    depth: int = 3
    base_filters: int = 32
    residual_blocks: int = 4
    attention: bool = True
    norm: str = "instance"  # instance | batch | none
    disc_filters: int = 64
    disc_layers: int = 3  # 3 strided layers: 70x70 receptive field
    spectral_norm: bool = False
    # Critic normalisation: same (as ``norm``) | instance | batch | none.  A string, not Optional: YAML's ``none`` must
    # mean "no normalisation", not "unset" (v1's critics silently got instance norm that way).
    disc_norm: str = "same"
    disc_input: str = "image"  # image | highpass | both (models/discriminator.py, HighPass)
    # The generator also sees its input's own noise level (models/blocks.NoiseLevelMap): one network for many doses.
    noise_conditional: bool = False

    @property
    def size_multiple(self) -> int:
        """Slice height and width must be multiples of this (each encoder level halves them)."""
        return 2**self.depth

    @property
    def critic_norm(self) -> str:
        return self.norm if self.disc_norm == "same" else self.disc_norm


@dataclass
class LossConfig:
    """Loss weights; defaults follow common LDCT CycleGAN practice (docs/training.md, the losses)."""

    adversarial: float = 1.0
    cycle: float = 10.0
    identity: float = 5.0
    perceptual: float = 0.1
    perceptual_layers: list[str] = field(default_factory=lambda: ["block5_conv4"])
    perceptual_layer_weights: list[float] = field(default_factory=lambda: [1.0])
    perceptual_window: str = "abdomen"
    vgg_weights: str = "imagenet"  # imagenet | none
    vgg_weights_path: Optional[str] = None
    # Pixel loss of the denoiser on simulated pairs (ldct_tf.pipeline.simulate_pairs): the physics noise prior.  0 = the pure
    # CycleGAN; with every other weight 0 the run is supervised on simulated pairs alone.
    simulated: float = 0.0
    simulated_loss: str = "mse"  # mse | l1 | mse_gradient (MSE plus the MSE of image gradients: keeps edges)
    gradient_weight: float = 1.0  # weight of the gradient MSE inside mse_gradient (MSE + w * gradient MSE)
    # > 0: the simulated term's target is the Noisier2Noise estimate of the noise-free slice instead of the stream's
    # reference (ldct_tf.data.noisier2noise_target); the value is the i0 whose noise the normal-dose slices
    # themselves carry (a calibration's fit.i0_from_normal_only).  Needs --reference original --textures fitted.
    noisier2noise_i0: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 10000
    batch_size: int = 4  # global batch
    steps_per_epoch: int = 500  # an epoch ends with validation, a checkpoint and TensorBoard images
    log_every: int = 50  # TensorBoard scalars every N steps
    generator_lr: float = 2e-4
    discriminator_lr: float = 2e-4
    beta_1: float = 0.5
    mixed_precision: bool = False
    # XLA for each replica's step in the loop (ldct_tf.train.loop.make_step_functions).  Off: on the 2-core CPU the
    # smoke CycleGAN's XLA compilation alone took minutes; try it on GPUs.
    jit_compile: bool = False
    steps_per_execution: int = 1  # training steps per tf.function call (one Python dispatch for N steps)
    # Learning rates for the global batch: none (as written) | linear (x batch / lr_reference_batch) | sqrt.  Default
    # none: Adam GAN training has no established scaling rule (the linear rule is SGD's, Goyal et al. 2017), and
    # train.batch_size is already the global batch, so adding replicas alone changes nothing.
    lr_scaling: str = "none"
    lr_reference_batch: int = 4  # the global batch generator_lr and discriminator_lr were chosen for
    seed: int = 0
    time_limit_minutes: float = 0.0  # > 0: stop (validate, checkpoint, save) at the first step past this budget
    cpu_limit_minutes: float = 0.0  # > 0: the same for this process's CPU time (equal budgets on a busy machine)
    simulated_batch_size: int = 0  # batch of the simulated-pair stream; 0: train.batch_size
    init_from: Optional[str] = None  # warm start: a run folder (or .keras file) whose generator the denoiser copies


@dataclass
class ExportConfig:
    name: str = "ldct_denoiser"
    float16_weights: bool = False


@dataclass
class HyperbandConfig:
    """``--tuner hyperband``: trials get 1..max_epochs epochs, the best continue."""

    max_epochs: int = 4
    factor: int = 3
    iterations: int = 1


@dataclass
class BayesianConfig:
    """``--tuner bayesian``: random trials before the Gaussian process proposes."""

    num_initial_points: Optional[int] = None  # None: Keras Tuner's default, 3 per searched key


@dataclass
class TuningConfig(Mapping):
    """The Keras Tuner search (ldct_tf.tune); ``configs/tuning_example.yaml`` lists every key with a comment.

    Also reads as the mapping this section was before it was typed (``cfg.tuning["space"]``, ``set(cfg.tuning)``).
    """

    objective: str = "auto"  # auto | psnr | ssim | unpaired
    max_trials: int = 10  # random and bayesian; --max-trials overrides
    epochs: int = 2  # epochs per trial (random, bayesian), each train.steps_per_epoch steps
    executions_per_trial: int = 1
    default_space: bool = True  # false: search only the keys under ``space``
    # ``section.key`` (or nested ``section: {key: ...}``) -> {min, max[, step][, sampling]} | [choices] | null
    space: dict = field(default_factory=dict)
    hyperband: HyperbandConfig = field(default_factory=HyperbandConfig)
    bayesian: BayesianConfig = field(default_factory=BayesianConfig)

    def __getitem__(self, key: str) -> Any:
        if key not in _section_types(type(self)):
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(_section_types(type(self)))

    def __len__(self) -> int:
        return len(_section_types(type(self)))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class ConfigError(LdctError, ValueError):
    """A config file or override that cannot be used; the message names the key and the problem."""


class TuningError(ConfigError):
    """A tuning section or search state that cannot be used; the message names the key or file."""


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML / command-line value to the declared type ``annotation``; ``key`` names it in errors."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, args[0], key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation in (int, float):
        try:
            number = yaml.safe_load(value) if isinstance(value, str) else value
            if annotation is int and isinstance(number, float) and not number.is_integer():
                raise ValueError
            return annotation(number)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}") from None
    if annotation is str:
        return str(value)
    if annotation is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return value


def _section_types(section_cls) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _unknown(prefix: str, name: str, fields: dict) -> ConfigError:
    if prefix.split(".")[0] == "tuning":  # the message the tuning section had before it was typed
        return TuningError(f"{prefix}: unknown keys {[name]}; known: {sorted(fields)}")
    return ConfigError(f"unknown key {prefix + '.' + name!r}; {prefix} has: {', '.join(fields)}")


def _assign(obj: Any, prefix: str, parts: Sequence[str], value: Any) -> None:
    """Set ``prefix.parts[0]...`` in the dataclass ``obj``: through nested sections, into free mappings (the
    ``tuning.space`` entries), coercing leaves to their declared type."""
    fields = _section_types(type(obj))
    name, rest = parts[0], list(parts[1:])
    dotted = f"{prefix}.{name}"
    if name not in fields:
        raise _unknown(prefix, name, fields)
    kind = fields[name]
    if dataclasses.is_dataclass(kind):
        if rest:
            _assign(getattr(obj, name), dotted, rest, value)
        else:
            _assign_all(getattr(obj, name), dotted, value)
    elif kind is dict and rest:
        node = getattr(obj, name)
        for part in rest[:-1]:
            node = node.setdefault(part, {})
        node[rest[-1]] = yaml.safe_load(value) if isinstance(value, str) else value
    elif rest:
        raise ConfigError(f"unknown key {'.'.join([dotted, *rest])!r}; {dotted} is a value, not a section")
    else:
        setattr(obj, name, coerce(value, kind, dotted))


def _assign_all(obj: Any, prefix: str, values: Any) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"section {prefix!r} must be a mapping, got {values!r}")
    for key, value in values.items():
        _assign(obj, prefix, [str(key)], value)


def from_dict(values: dict) -> Config:
    """Build a Config from nested dicts; unknown sections or keys raise ConfigError."""
    config = Config()
    for section, content in (values or {}).items():
        if section not in _section_types(Config):
            raise ConfigError(f"unknown config section {section!r}; known: {list(_section_types(Config))}")
        if section == "tuning" and content is None:  # ``tuning:`` with nothing under it
            continue
        _assign_all(getattr(config, section), section, content)
    return config


def _section(dotted: str) -> tuple[str, str]:
    section, _, key = dotted.partition(".")
    types = _section_types(Config)
    if section not in types:
        raise ConfigError(f"unknown config section {section!r} in {dotted!r}; known: {list(types)}")
    return section, key


def set_value(config: Config, dotted: str, value: Any) -> None:
    """Set ``section.key`` (``tuning.hyperband.factor``: nested sections; ``tuning.space.a.b``: into the search
    space mapping, the value read as YAML)."""
    if "." not in dotted:
        raise ConfigError(f"override {dotted!r} must look like section.key=value")
    section, key = _section(dotted)
    _assign(getattr(config, section), section, key.split("."), value)


def field_type(dotted: str) -> Any:
    """The declared type of the config field ``section.key``; raises ConfigError for unknown ones."""
    section, key = _section(dotted)
    fields = _section_types(_section_types(Config)[section])
    if key not in fields:
        raise _unknown(section, key, fields)
    return fields[key]


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Apply ``section.key=value`` strings (as given on a command line)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        set_value(config, key.strip(), value.strip())
    return config


def mixed_precision_policy(requested: bool) -> bool:
    """Set Keras' global dtype policy for a run; returns whether mixed precision is on.  Only on a GPU: float16 is
    slower than float32 on a CPU."""
    import keras
    import tensorflow as tf

    on = requested and bool(tf.config.list_physical_devices("GPU"))
    if requested and not on:
        print("train.mixed_precision ignored: no GPU (float16 is slower than float32 on a CPU)", flush=True)
    keras.mixed_precision.set_global_policy("mixed_float16" if on else "float32")
    return on


def scaled_learning_rate(lr: float, train: TrainConfig) -> float:
    """``lr`` for the global batch ``train.batch_size`` under ``train.lr_scaling`` (see its comment): linear
    multiplies by ``batch_size / lr_reference_batch``, sqrt by its square root, none keeps it."""
    ratio = train.batch_size / train.lr_reference_batch
    return lr * {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[train.lr_scaling]


def load(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then the overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    try:
        config = from_dict(values)
    except ConfigError as exc:
        raise type(exc)(f"{path}: {exc}" if path else str(exc)) from None
    config = apply_overrides(config, overrides)
    # Configs written before disc_norm was a string say ``null`` for "same as norm".
    if config.model.disc_norm in ("None", "null"):
        config.model.disc_norm = "same"
    try:
        return validate(config)
    except ConfigError as exc:
        raise type(exc)(f"{path}: {exc}" if path else str(exc)) from None


# Range checks of a loaded Config: a bad value is one clear line before any work.
NORMS = ("instance", "batch", "none")
LR_SCALINGS = ("none", "linear", "sqrt")


def _check(ok: bool, message: str, error: type = ConfigError) -> None:
    if not ok:
        raise error(message)


def validate(config: Config) -> Config:
    """Range checks at load, so that a bad value is one clear line before any work (a negative learning rate would
    train by gradient ascent, ``train.steps=-5`` would save an untrained model, ``batch_size=0`` fails deep in TF)."""
    d, m, loss, t = config.data, config.model, config.loss, config.train
    for key in ("steps", "batch_size", "steps_per_epoch", "log_every"):
        _check(getattr(t, key) >= 1, f"train.{key} must be >= 1, got {getattr(t, key)!r}")
    for key in ("generator_lr", "discriminator_lr"):
        _check(getattr(t, key) > 0, f"train.{key} must be > 0, got {getattr(t, key)!r}")
    _check(0 <= t.beta_1 < 1, f"train.beta_1 must be in [0, 1), got {t.beta_1!r}")
    for key in ("time_limit_minutes", "cpu_limit_minutes"):
        _check(getattr(t, key) >= 0, f"train.{key} must be >= 0 (0 = no limit), got {getattr(t, key)!r}")
    _check(t.simulated_batch_size >= 0, f"train.simulated_batch_size must be >= 0, got {t.simulated_batch_size!r}")
    _check(t.steps_per_execution >= 1, f"train.steps_per_execution must be >= 1, got {t.steps_per_execution!r}")
    _check(t.lr_scaling in LR_SCALINGS, f"train.lr_scaling must be one of {LR_SCALINGS}, got {t.lr_scaling!r}")
    _check(t.lr_reference_batch >= 1, f"train.lr_reference_batch must be >= 1, got {t.lr_reference_batch!r}")
    for key in ("adversarial", "cycle", "identity", "perceptual", "simulated", "gradient_weight",
                "noisier2noise_i0"):
        _check(getattr(loss, key) >= 0, f"loss.{key} must be >= 0, got {getattr(loss, key)!r}")
    _check(loss.simulated_loss in ("mse", "l1", "mse_gradient"),
           f"loss.simulated_loss must be mse, l1 or mse_gradient, got {loss.simulated_loss!r}")
    _check(m.depth >= 1 and m.base_filters >= 1 and m.residual_blocks >= 0 and m.disc_filters >= 1
           and m.disc_layers >= 1, f"model sizes must be positive: depth {m.depth}, base_filters {m.base_filters}, "
           f"residual_blocks {m.residual_blocks}, disc_filters {m.disc_filters}, disc_layers {m.disc_layers}")
    _check(m.norm in NORMS, f"model.norm must be one of {NORMS}, got {m.norm!r}")
    _check(m.disc_norm in NORMS + ("same",), f"model.disc_norm must be one of {NORMS + ('same',)}, got {m.disc_norm!r}")
    _check(d.patch_size >= m.size_multiple and d.patch_size % m.size_multiple == 0,
           f"data.patch_size {d.patch_size} must be a positive multiple of 2**model.depth = {m.size_multiple}")
    _check(0 <= d.min_tissue_fraction <= 1, f"data.min_tissue_fraction must be in [0, 1], got {d.min_tissue_fraction!r}")
    _check(d.shuffle_buffer >= 1 and d.val_max_slices >= 0,
           "data.shuffle_buffer must be >= 1 and data.val_max_slices >= 0")
    validate_tuning(config.tuning)
    return config


OBJECTIVES = ("auto", "psnr", "ssim", "unpaired")


def validate_tuning(tuning: TuningConfig) -> TuningConfig:
    """Range checks of the tuning section (the search space's entries are checked when it is parsed)."""
    _check(tuning.objective in OBJECTIVES, f"tuning.objective: expected auto, psnr, ssim or unpaired, got "
                                           f"{tuning.objective!r}", TuningError)
    for key in ("max_trials", "epochs", "executions_per_trial"):
        value = getattr(tuning, key)
        _check(type(value) is int and value >= 1, f"tuning.{key}: expected an integer >= 1, got {value!r}", TuningError)
    _check(isinstance(tuning.space, dict), f"tuning.space: expected a mapping of section.key entries, got "
                                           f"{tuning.space!r}", TuningError)
    hb, points = tuning.hyperband, tuning.bayesian.num_initial_points
    _check(hb.max_epochs >= 1 and hb.iterations >= 1 and hb.factor >= 2, "tuning.hyperband: max_epochs and iterations "
           f"must be >= 1 and factor >= 2, got {hb.max_epochs!r}, {hb.iterations!r} and {hb.factor!r}", TuningError)
    _check(points is None or points >= 1, f"tuning.bayesian.num_initial_points must be >= 1 or null, got {points!r}",
           TuningError)
    return tuning
