"""Beta-VAE training package and the core shared with VAE-TracIn: models, the loss, datasets, checkpoints."""
