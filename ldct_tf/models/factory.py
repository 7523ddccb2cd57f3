"""Build and compile the CycleGAN from a :class:`ldct_tf.config.Config` (used by training and tuning)."""

from __future__ import annotations

import keras

from ldct_tf.config import Config, scaled_learning_rate
from ldct_tf.models.losses import PerceptualLoss
from ldct_tf.models.cyclegan import LOSS_TERMS, CycleGAN
from ldct_tf.models.discriminator import build_discriminator
from ldct_tf.models.generator import build_generator


def build_cyclegan(config: Config) -> CycleGAN:
    """Two generators, two critics and the perceptual loss, shaped by ``config.model`` / ``config.loss``.

    Call inside ``strategy.scope()`` when training distributed.
    """
    m, loss = config.model, config.loss
    if config.data.patch_size % m.size_multiple:
        raise ValueError(f"data.patch_size {config.data.patch_size} must be a multiple of 2**model.depth = "
                         f"{m.size_multiple}")

    def generator(name: str) -> keras.Model:
        return build_generator(m.depth, m.base_filters, m.residual_blocks, m.attention, m.norm, noise_conditional=m.noise_conditional, name=name)

    def critic(name: str) -> keras.Model:
        return build_discriminator(m.disc_filters, m.disc_layers, m.critic_norm, m.spectral_norm, name=name,
                                   critic_input=m.disc_input)

    perceptual = None
    if loss.perceptual > 0:
        perceptual = PerceptualLoss(loss.perceptual_layers, loss.perceptual_layer_weights, loss.perceptual_window,
                                    loss.vgg_weights, loss.vgg_weights_path)
    return CycleGAN(generator("low_to_normal"), generator("normal_to_low"), critic("normal_critic"),
                    critic("low_critic"), perceptual, name="cyclegan")


def compile_cyclegan(model: CycleGAN, config: Config, loss_scaling: bool = False) -> CycleGAN:
    """Adam optimizers (beta_1 0.5, the GAN default) for each network, loss weights from the config; optimizers are
    built at once (required under multi-replica strategies).  Learning rates follow ``train.lr_scaling``;
    ``loss_scaling`` wraps the optimizers for mixed precision."""
    t = config.train

    def adam(lr: float) -> keras.optimizers.Optimizer:
        optimizer = keras.optimizers.Adam(lr, beta_1=t.beta_1)
        return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scaling else optimizer

    generator_lr, critic_lr = scaled_learning_rate(t.generator_lr, t), scaled_learning_rate(t.discriminator_lr, t)
    model.compile(adam(generator_lr), adam(generator_lr), adam(critic_lr), adam(critic_lr),
                  loss_weights={term: getattr(config.loss, term) for term in LOSS_TERMS},
                  simulated_loss=config.loss.simulated_loss, gradient_weight=config.loss.gradient_weight,
                  jit_compile=t.jit_compile)
    model.build_optimizers()
    return model
