"""Fused MF-momentum optimizers and the SMEGA2 master: torch.optim.Optimizer subclasses over fusedmf.functional."""

from .adam import MFAdam, MFAdamW
from .sgd import MFSGD
from .smega2 import SMEGA2

__all__ = ["MFSGD", "MFAdam", "MFAdamW", "SMEGA2"]
