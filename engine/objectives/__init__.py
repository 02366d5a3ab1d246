"""Training objectives: the Dispersive Loss term and the SiT, DiT and MeanFlow objectives that carry it."""
