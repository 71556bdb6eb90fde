"""Fused MF-momentum optimizers and the SMEGA2 master: torch.optim.Optimizer subclasses over fusedmf.functional."""

from ._base import MFOptimizerBase
from .adam import MFAdam, MFAdamW
from .sgd import MFSGD
from .smega2 import SMEGA2

# MFOptimizerBase: the common base, for isinstance checks (fusedmf.comm asks whether an optimizer is fused)
__all__ = ["MFSGD", "MFAdam", "MFAdamW", "SMEGA2", "MFOptimizerBase"]
