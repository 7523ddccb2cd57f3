"""Range checks of a loaded :class:`ldct_tf.config.Config`: a bad value is one clear line before any work.

Separate from ``ldct_tf.config`` (parsing and overrides) so each module keeps one job; ``config.load`` calls
:func:`validate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ldct_tf.config import ConfigError, TuningError

if TYPE_CHECKING:
    from ldct_tf.config import Config, TuningConfig

NORMS = ("instance", "batch", "none")


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
