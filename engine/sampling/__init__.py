"""Sampling: classifier-free guidance, the releases' samplers, images and sample files."""
