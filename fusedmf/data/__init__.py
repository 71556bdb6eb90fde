"""Data for fusedmf's benchmarks and examples: the CIFAR-10 binary format and synthetic batches."""

from .cifar10 import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    RECORD_BYTES,
    CIFAR10FormatError,
    load_cifar10,
    read_cifar10_batch,
    synthetic_cifar10,
    synthetic_imagenet,
    write_cifar10_batch,
)

__all__ = ["load_cifar10", "read_cifar10_batch", "write_cifar10_batch", "synthetic_cifar10", "synthetic_imagenet",
           "CIFAR10FormatError", "RECORD_BYTES", "CIFAR10_MEAN", "CIFAR10_STD"]
