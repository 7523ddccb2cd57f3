"""Networks: attention U-Net generator, PatchGAN discriminator, and the CycleGAN training model."""
