"""Batch correction beside Harmony: trVAE-style MMD and adversarial (WGAN-GP critic) correction of the VAE."""
