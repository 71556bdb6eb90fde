"""Scaling tools that ship with the package: the timeline recorder, the scaling predictor, and the
``python -m fusedmf.bench`` CLI.

:mod:`fusedmf.bench.timeline` records one training step's gradient-ready timeline;
:mod:`fusedmf.bench.predictor` turns such a timeline (forward, backward with the time each gradient
bucket becomes ready, optimizer) into a predicted step time and scaling efficiency for N GPUs under a
ring-allreduce network model. The benchmark drivers and their harness live in ``benchmarks/``
(fusedmf never imports it); ``python -m fusedmf.bench throughput|scaling`` runs them from the checkout.
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
from .timeline import record_timeline

__all__ = ["Network", "NETWORKS", "Timeline", "ParamGrad", "Bucket", "Prediction", "ring_allreduce_time",
           "allreduce_time", "make_buckets", "ddp_buckets", "fusedmf_buckets", "simulate", "predict",
           "efficiency_curve", "recommend_bucket_cap", "record_timeline"]
