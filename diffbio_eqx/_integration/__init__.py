"""Batch correction beside Harmony: trVAE-style MMD and adversarial (WGAN-GP critic) correction of the VAE."""

from ._adversarial import (
    AdversarialFit as AdversarialFit,
    BatchCritic as BatchCritic,
    CriticSettings as CriticSettings,
    batch_wasserstein as batch_wasserstein,
    fit_adversarial_vae as fit_adversarial_vae,
    gradient_penalty as gradient_penalty,
)
from ._common import corrected_expression as corrected_expression
from ._mmd import (
    TRVAE_BANDWIDTHS as TRVAE_BANDWIDTHS,
    batch_mmd_penalty as batch_mmd_penalty,
    multiscale_rbf_kernel as multiscale_rbf_kernel,
    pairwise_batch_mmd as pairwise_batch_mmd,
)
from ._mmd_vae import MMDVAELoss as MMDVAELoss, fit_mmd_vae as fit_mmd_vae
