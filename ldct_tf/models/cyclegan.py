"""The CycleGAN training model: unpaired low-dose -> normal-dose translation.

Reads like the method (Zhu et al. 2017, as applied to LDCT by Kang et al. 2019 and others):

* two generators: ``low_to_normal`` (G, the denoiser) and ``normal_to_low`` (F, its inverse);
* two PatchGAN critics: ``normal_critic`` tells real normal-dose patches from G's output, ``low_critic`` real
  low-dose patches from F's output;
* one ``train_step`` on an unpaired batch ``(low, normal)``: LSGAN adversarial terms, cycle consistency
  ``F(G(low)) ~ low`` and ``G(F(normal)) ~ normal``, identity ``G(normal) ~ normal`` and ``F(low) ~ low`` (a denoiser
  must leave clean images alone), and a VGG19 perceptual distance on the cycle reconstructions; then both critics;
* the physics noise prior: with a batch ``(low, normal, simulated_low, simulated_reference)`` and a ``simulated``
  weight, a pixel loss (MSE, L1, or MSE plus gradient MSE) of G on simulated pairs (``ldct_tf.pipeline.simulate_pairs``) joins the unpaired terms;
  with every unpaired weight 0 only G and that loss are computed (supervised pretraining on simulated pairs);
* ``call`` runs G, so the trained model can be saved and used as a denoiser.

Every loss is a mean over the replica's batch divided by the number of replicas, because Keras 3 optimizers sum
gradients across replicas (``shared/STACK.md``); the reported metrics are the undivided values.
"""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from ldct_tf import ct, keras_compat
from ldct_tf.config import LossConfig
from ldct_tf.models.losses import (SIMULATED_LOSSES, PerceptualLoss, gradient_mse_loss, l1_loss, lsgan_discriminator_loss,
                            lsgan_generator_loss, mse_loss)

UNPAIRED_TERMS = ("adversarial", "cycle", "identity", "perceptual")
LOSS_TERMS = UNPAIRED_TERMS + ("simulated",)
#: The defaults live in the config (one place); the model reads them from there.
DEFAULT_LOSS_WEIGHTS = {term: getattr(LossConfig(), term) for term in LOSS_TERMS}


# SkipSymbolicBuild: Keras' symbolic build fails under MultiWorkerMirroredStrategy (keras-team/keras#20585).
@keras.saving.register_keras_serializable(package="ldct_tf")
class CycleGAN(keras_compat.SkipSymbolicBuild, keras.Model):
    def __init__(self, low_to_normal: keras.Model, normal_to_low: keras.Model, normal_critic: keras.Model,
                 low_critic: keras.Model, perceptual: Optional[PerceptualLoss] = None, **kwargs):
        super().__init__(**kwargs)
        self.low_to_normal = low_to_normal
        self.normal_to_low = normal_to_low
        self.normal_critic = normal_critic
        self.low_critic = low_critic
        # The frozen VGG19 must not be saved or checkpointed: PerceptualLoss is a plain class (not a Keras layer),
        # which Keras does not track (tests/test_cyclegan.py checks the weights and the checkpoint).
        self._perceptual_loss = perceptual
        names = ["generator_loss", "adversarial_loss", "cycle_loss", "identity_loss", "perceptual_loss",
                 "simulated_loss", "normal_critic_loss", "low_critic_loss"]
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}
        self.val_trackers = {name: keras.metrics.Mean(name=name) for name in ("psnr", "ssim", "psnr_input",
                                                                                "ssim_input")}
        self.loss_weights_: dict[str, float] = dict(DEFAULT_LOSS_WEIGHTS)
        # Steps taken, saved with the weights. Not the optimizers' iteration counts: a loss-scaled (mixed precision)
        # optimizer skips its update, and its count, on steps with overflowing gradients.
        self.train_steps = self.add_weight(shape=(), dtype="int64", initializer="zeros", trainable=False,
                                           aggregation="only_first_replica", name="train_steps")
        self.built = True  # its four networks are functional models, built at construction

    @property
    def perceptual(self) -> Optional[PerceptualLoss]:
        return self._perceptual_loss

    def compile(self, generator_optimizer, inverse_generator_optimizer, normal_critic_optimizer,
                low_critic_optimizer, loss_weights: Optional[dict] = None, score_window: str = "abdomen",
                simulated_loss: str = "mse", gradient_weight: float = 1.0, **kwargs):
        """Four optimizers (one per network), the loss weights (``adversarial``, ``cycle``, ``identity``,
        ``perceptual``, ``simulated``) and the simulated-pair pixel loss (``losses.SIMULATED_LOSSES``; ``mse_gradient``
        is MSE + ``gradient_weight`` x gradient MSE); paired validation slices are scored in ``score_window``."""
        super().compile(**kwargs)
        self.generator_optimizer = generator_optimizer
        self.inverse_generator_optimizer = inverse_generator_optimizer
        self.normal_critic_optimizer = normal_critic_optimizer
        self.low_critic_optimizer = low_critic_optimizer
        weights = dict(DEFAULT_LOSS_WEIGHTS)
        for key, value in (loss_weights or {}).items():
            if key not in LOSS_TERMS:
                raise ValueError(f"unknown loss weight {key!r}; known: {LOSS_TERMS}")
            weights[key] = float(value)
        self.loss_weights_ = weights
        if simulated_loss not in SIMULATED_LOSSES:
            raise ValueError(f"simulated_loss must be one of {SIMULATED_LOSSES}, got {simulated_loss!r}")
        if gradient_weight < 0:
            raise ValueError(f"gradient_weight must be >= 0, got {gradient_weight!r}")
        self.simulated_loss = simulated_loss
        self.gradient_weight = float(gradient_weight)
        self.score_window = ct.window(score_window)

    @property
    def supervised_only(self) -> bool:
        """True when every unpaired weight is 0: only the denoiser and the simulated-pair loss are computed."""
        return all(self.loss_weights_[t] == 0 for t in UNPAIRED_TERMS)

    def _optimizer_networks(self):
        """(optimizer, the network it trains) for the four networks, in the order of ``train_step``'s losses."""
        return [(self.generator_optimizer, self.low_to_normal), (self.inverse_generator_optimizer, self.normal_to_low),
                (self.normal_critic_optimizer, self.normal_critic), (self.low_critic_optimizer, self.low_critic)]

    def build_optimizers(self) -> None:
        """Create every optimizer's slots now. Call inside ``strategy.scope()`` before ``fit``: optimizers built
        lazily inside a multi-replica ``train_step`` fail (``shared/STACK.md``)."""
        for optimizer, network in self._optimizer_networks():
            optimizer.build(network.trainable_variables)

    def steps_done(self) -> int:
        """Training steps taken, as a Python int (restored with checkpoints; works for distributed variables)."""
        return int(keras.ops.convert_to_numpy(self.train_steps.value))

    @property
    def metrics(self):
        return list(self.trackers.values()) + list(self.val_trackers.values())

    def call(self, inputs, training=False):
        return self.low_to_normal(inputs, training=training)

    def _simulated_term(self, simulated_low, simulated_reference, training: bool):
        denoised = self.low_to_normal(simulated_low, training=training)
        if self.simulated_loss == "l1":
            return l1_loss(simulated_reference, denoised)
        if self.simulated_loss == "mse_gradient":
            return (mse_loss(simulated_reference, denoised)
                    + self.gradient_weight * gradient_mse_loss(simulated_reference, denoised))
        return mse_loss(simulated_reference, denoised)

    def _loss_terms(self, low, normal, training: bool, simulated: Optional[tuple] = None) -> dict:
        """Every loss term of one batch; ``simulated`` = ``(simulated_low, simulated_reference)`` or None."""
        zero = tf.constant(0.0)
        sim = (self._simulated_term(*simulated, training=training)
               if simulated is not None and self.loss_weights_["simulated"] > 0 else zero)
        if self.supervised_only and training:
            out = {term: zero for term in UNPAIRED_TERMS}
            out.update(simulated=sim, generator=self.loss_weights_["simulated"] * sim, normal_critic=zero,
                       low_critic=zero)
            return out
        G, F = self.low_to_normal, self.normal_to_low
        fake_normal = G(low, training=training)
        fake_low = F(normal, training=training)
        cycled_low = F(fake_normal, training=training)
        cycled_normal = G(fake_low, training=training)
        fake_normal_scores = self.normal_critic(fake_normal, training=training)
        fake_low_scores = self.low_critic(fake_low, training=training)

        out = {
            "adversarial": lsgan_generator_loss(fake_normal_scores) + lsgan_generator_loss(fake_low_scores),
            "cycle": l1_loss(low, cycled_low) + l1_loss(normal, cycled_normal),
            "identity": (l1_loss(normal, G(normal, training=training)) + l1_loss(low, F(low, training=training))
                         if self.loss_weights_["identity"] > 0 else tf.constant(0.0)),
            "perceptual": (self.perceptual(low, cycled_low) + self.perceptual(normal, cycled_normal)
                           if self.perceptual is not None and self.loss_weights_["perceptual"] > 0
                           else tf.constant(0.0)),
        }
        out["simulated"] = sim
        out["generator"] = tf.add_n([self.loss_weights_[k] * out[k] for k in LOSS_TERMS])
        # The critics' losses reuse the scores of the generated images: their gradients are taken only with
        # respect to the critics' own variables, so the generators are not updated through them.
        out["normal_critic"] = lsgan_discriminator_loss(self.normal_critic(normal, training=training),
                                                        fake_normal_scores)
        out["low_critic"] = lsgan_discriminator_loss(self.low_critic(low, training=training), fake_low_scores)
        return out

    def _update_trackers(self, losses: dict) -> None:
        for term in LOSS_TERMS:
            self.trackers[f"{term}_loss"].update_state(losses[term])
        self.trackers["generator_loss"].update_state(losses["generator"])
        self.trackers["normal_critic_loss"].update_state(losses["normal_critic"])
        self.trackers["low_critic_loss"].update_state(losses["low_critic"])

    def train_step(self, data):
        """One step on ``(low, normal)`` or ``(low, normal, simulated_low, simulated_reference)``."""
        low, normal = data[0], data[1]
        simulated = (data[2], data[3]) if len(data) > 3 else None
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if self.supervised_only:
            return self._supervised_step(simulated, replicas)
        with tf.GradientTape(persistent=True) as tape:
            losses = self._loss_terms(low, normal, training=True, simulated=simulated)
            # Keras 3 optimizers sum gradients over replicas: divide so the step equals a global-batch mean.
            scaled = {key: losses[key] / replicas for key in ("generator", "normal_critic", "low_critic")}
            scaled = {key: opt.scale_loss(scaled[key]) for key, opt in
                      (("generator", self.generator_optimizer), ("normal_critic", self.normal_critic_optimizer),
                       ("low_critic", self.low_critic_optimizer))}
            scaled["inverse"] = self.inverse_generator_optimizer.scale_loss(losses["generator"] / replicas)
        keys = ("generator", "inverse", "normal_critic", "low_critic")
        updates = [(optimizer, tape.gradient(scaled[key], network.trainable_variables), network.trainable_variables)
                   for key, (optimizer, network) in zip(keys, self._optimizer_networks())]
        del tape
        self._apply(updates)
        self.train_steps.assign_add(1)
        self._update_trackers(losses)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    @staticmethod
    def _apply(updates: list) -> None:
        """Apply every optimizer, or (an overflow on any replica, under mixed precision) none: the finite check is
        combined over all replicas first, because Keras' LossScaleOptimizer checks only the first replica
        (``keras_compat.WORKAROUNDS["loss_scale_all_replicas"]``)."""
        finite = keras_compat.all_replicas_finite([g for _, grads, _ in updates for g in grads])
        keras_compat.apply_if_all_finite(updates, finite)

    def _supervised_step(self, simulated, replicas):
        """Only the denoiser, only the simulated-pair loss: the other networks and optimizers stay untouched."""
        if simulated is None:
            raise ValueError("every unpaired loss weight is 0, so training needs simulated pairs (loss.simulated > 0 "
                             "and a simulated stream)")
        with tf.GradientTape() as tape:
            losses = self._loss_terms(None, None, training=True, simulated=simulated)
            scaled = self.generator_optimizer.scale_loss(losses["generator"] / replicas)
        variables = self.low_to_normal.trainable_variables
        self._apply([(self.generator_optimizer, tape.gradient(scaled, variables), variables)])
        self.train_steps.assign_add(1)
        self._update_trackers(losses)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def test_step(self, data):
        """Loss terms on a validation batch; with a third element ``paired`` (1 where ``normal`` is the same
        slice as ``low`` at normal dose), PSNR/SSIM of the denoised slice and of the input in the score window."""
        low, normal = data[0], data[1]
        losses = self._loss_terms(low, normal, training=False)
        self._update_trackers(losses)
        results = {name: tracker.result() for name, tracker in self.trackers.items()}
        if len(data) > 2:
            paired = tf.reshape(tf.cast(data[2], tf.float32), [-1])
            denoised = self.low_to_normal(low, training=False)
            unit = self.score_window.model_to_unit
            reference = unit(normal)
            for name, image in (("", unit(denoised)), ("_input", unit(low))):
                self.val_trackers[f"psnr{name}"].update_state(tf.image.psnr(image, reference, 1.0), paired)
                self.val_trackers[f"ssim{name}"].update_state(tf.image.ssim(image, reference, 1.0), paired)
            results.update({name: tracker.result() for name, tracker in self.val_trackers.items()})
        return results

    def get_compile_config(self):
        return None  # optimizers and loss weights come from the training config, not from the saved file

    def get_config(self):
        config = super().get_config()
        for name in ("low_to_normal", "normal_to_low", "normal_critic", "low_critic"):
            config[name] = keras.saving.serialize_keras_object(getattr(self, name))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in ("low_to_normal", "normal_to_low", "normal_critic", "low_critic"):
            config[name] = keras.saving.deserialize_keras_object(config[name])
        return cls(**config)
