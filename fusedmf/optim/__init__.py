"""Fused MF-momentum optimizers: torch.optim.Optimizer subclasses over fusedmf.functional."""

from .adam import MFAdam
from .sgd import MFSGD

__all__ = ["MFSGD", "MFAdam"]
