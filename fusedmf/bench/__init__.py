"""Benchmark tooling that ships with the package: the scaling predictor and the ``python -m fusedmf.bench`` CLI.

:mod:`fusedmf.bench.predictor` turns a measured single-GPU timeline (forward, backward with the time
each gradient bucket becomes ready, optimizer) into a predicted step time and scaling efficiency for
N GPUs under a ring-allreduce network model. :mod:`fusedmf.bench.throughput` and
:mod:`fusedmf.bench.scaling` hold the measurement logic that ``benchmarks/throughput.py`` and
``benchmarks/scaling.py`` wrap (fusedmf never imports ``benchmarks/``).
"""

from .predictor import (
    NETWORKS,
    Bucket,
    Network,
    ParamGrad,
    Prediction,
    Timeline,
    allreduce_time,
    ddp_buckets,
    efficiency_curve,
    fusedmf_buckets,
    make_buckets,
    predict,
    recommend_bucket_cap,
    ring_allreduce_time,
    simulate,
)

__all__ = ["Network", "NETWORKS", "Timeline", "ParamGrad", "Bucket", "Prediction", "ring_allreduce_time",
           "allreduce_time", "make_buckets", "ddp_buckets", "fusedmf_buckets", "simulate", "predict",
           "efficiency_curve", "recommend_bucket_cap"]
