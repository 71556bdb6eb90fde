"""Asynchronous training: SMEGA2's simulator, real asynchronous workers, and baselines.

- :class:`WorkerTimes`: who reports next (Gamma finish times as in the SMEGA2 paper; a slow
  worker; heavy-tailed durations), deterministic for a seed (NOTE [worker time model]);
- :class:`Simulator`: N worker weight copies around one master optimizer in one process
  (NOTE [simulated asynchrony]);
- :class:`Master` / :class:`Worker`: a master rank and N worker ranks over torch.distributed,
  point-to-point, no barrier, dead workers dropped after a timeout, checkpointable master
  (NOTE [async protocol]);
- :class:`ASGD` (with or without momentum) and :class:`DANAZero`: pure-PyTorch master-side
  baselines with SMEGA2's ``step`` / ``estimate`` interface.

The optimizer itself, :class:`fusedmf.optim.SMEGA2`, lives with the other optimizers.
"""

from .baselines import ASGD, DANAZero
from .simulator import Simulator, master_step
from .timing import DISTRIBUTIONS, Report, WorkerTimes
from .workers import FlatLayout, Master, MasterSummary, Worker

__all__ = ["WorkerTimes", "Report", "DISTRIBUTIONS", "Simulator", "master_step", "ASGD", "DANAZero", "Master",
           "Worker", "MasterSummary", "FlatLayout"]
