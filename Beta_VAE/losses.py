"""The one beta-VAE loss, used by training and by VAE-TracIn.

Decoder likelihoods (Higgins et al. 2017; Burgess et al. 2018, as in the original Beta-VAE code):
  - 'bernoulli': reconstruction = BCE(sigmoid(logits), x) summed over pixels (MNIST family);
  - 'gaussian' : reconstruction = ||sigmoid(logits) - x||^2 summed over pixels (CIFAR, CelebA).
KL(q(z|x) || N(0, I)) is in closed form. Objective 'H' is recon + beta * KL; objective 'B' is
recon + gamma * |KL - C| with the capacity C annealed linearly to C_max over C_stop_iter iterations.
"""
import torch
import torch.nn.functional as F

LIKELIHOODS = ("bernoulli", "gaussian")
OBJECTIVES = ("H", "B")
# The original TracIn code divides its loss by the number of pixels of a 3x64x64 image, for every dataset.
ORIGINAL_TRACIN_SCALE = 3 * 64 * 64


def likelihood_for_dataset(dataset: str) -> str:
    """Bernoulli decoder for the MNIST family, Gaussian for CIFAR and CelebA (the original's choice)."""
    return "bernoulli" if dataset.lower().startswith("mnist") else "gaussian"


def reconstruction_loss(x, logits, likelihood):
    """Per-sample reconstruction loss summed over pixels.

    x: (B, C, H, W) in [0, 1]; logits: (B, C, H, W) or (B, R, C, H, W) for R decoder draws per image.
    Returns (B,) or (B, R).
    """
    if logits.dim() == x.dim() + 1:
        x = x.unsqueeze(1).expand_as(logits)
    if likelihood == "bernoulli":
        per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif likelihood == "gaussian":
        per_pixel = (torch.sigmoid(logits) - x).pow(2)
    else:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}; got {likelihood!r}")
    return per_pixel.flatten(start_dim=logits.dim() - 3).sum(-1)


def kl_divergence(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample. mu, logvar: (B, z_dim) -> (B,)."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(-1)


def capacity(iteration, C_max, C_stop_iter):
    """Objective B's KL target at an iteration: linear from 0 to C_max over C_stop_iter iterations."""
    return min(max(C_max / C_stop_iter * iteration, 0.0), C_max)


def beta_vae_loss(x, logits, mu, logvar, *, likelihood, objective="H", beta=4.0, gamma=1000.0, C=0.0,
                  reduction="mean"):
    """The beta-VAE objective.

    x: (B, C, H, W); logits: (B, C, H, W) or (B, R, C, H, W), R draws averaged; mu, logvar: (B, z_dim).
    reduction 'mean' gives the training loss (batch mean, as the original's sum / batch_size), 'none' the
    per-sample losses (B,). For objective 'B' the per-sample form is recon_i + gamma * |KL_i - C|; its batch
    mean uses |mean KL - C| as in training.
    Returns (loss, recon, kl) with the same reduction applied to all three.
    """
    recon = reconstruction_loss(x, logits, likelihood)
    if recon.dim() == 2:
        recon = recon.mean(1)
    kl = kl_divergence(mu, logvar)
    if reduction == "mean":
        recon, kl = recon.mean(), kl.mean()
    elif reduction != "none":
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    if objective == "H":
        loss = recon + beta * kl
    elif objective == "B":
        loss = recon + gamma * (kl - C).abs()
    else:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
    return loss, recon, kl


def original_tracin_loss(x, logits, mu, logvar, *, beta):
    """The loss of the original VAE-TracIn code, per sample, whatever the dataset:
    (sum over pixels of (sigmoid(logits) - x)^2 + beta * KL) / (3 * 64 * 64). Shapes as ``beta_vae_loss``; (B,)."""
    loss, _, _ = beta_vae_loss(x, logits, mu, logvar, likelihood="gaussian", objective="H", beta=beta,
                               reduction="none")
    return loss / ORIGINAL_TRACIN_SCALE
