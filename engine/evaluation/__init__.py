"""Evaluation: ADM's sample metrics (FID, sFID, IS, precision/recall), the Frechet distance, Inception, the linear probe."""
