"""Data: the latent dataset format, the loaders (torch and DALI) with one batch contract, the built-in datasets, the VAE, latent extraction."""
