"""fusedmf: fused MF-momentum optimizers, mixed precision inside the update, bucketed allreduce.

    import fusedmf
    from fusedmf.optim import MFSGD, MFAdam
    fusedmf.available_backends()   # what runs here, and why each missing backend is missing
"""

from . import functional, mf
from ._backends import BackendStatus, available_backends
from .amp import DynamicLossScaler
from .optim import SMEGA2, MFAdam, MFAdamW, MFSGD

__version__ = "0.1.0"

__all__ = ["MFSGD", "MFAdam", "MFAdamW", "SMEGA2", "DynamicLossScaler", "available_backends", "BackendStatus",
           "functional", "mf", "__version__"]
