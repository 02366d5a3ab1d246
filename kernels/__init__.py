"""Dispersive Loss: the reference, the Gram-matrix CPU path and the fused Triton kernels."""
from .dispersive import BACKENDS, SCOPES, DispersiveLoss, dispersive_loss, dispersive_loss_groups, register_backend
from .reference import (DEFAULT_MARGIN, VARIANTS, dispersive_floor, off_diagonal_share, reference_dispersive_loss,
                        release_dispersive_loss)

__all__ = [
    "BACKENDS", "DEFAULT_MARGIN", "SCOPES", "VARIANTS", "DispersiveLoss", "dispersive_loss",
    "dispersive_loss_groups", "dispersive_floor", "off_diagonal_share",
    "reference_dispersive_loss", "register_backend", "release_dispersive_loss",
]
