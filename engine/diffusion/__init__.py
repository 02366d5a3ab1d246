"""Diffusion processes: SiT's stochastic-interpolant transport and DiT's Gaussian diffusion (DDPM)."""
