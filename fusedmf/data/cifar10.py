"""CIFAR-10 in its binary format, read from a local directory (no download), and synthetic batches.

The binary version (``cifar-10-batches-bin``) holds ``data_batch_1.bin`` .. ``data_batch_5.bin``
(10,000 records each) and ``test_batch.bin``. A record is 1 label byte (0-9) followed by 3072 pixel
bytes: the 1024 red values, then green, then blue, each 32x32 row-major (CHW, uint8).

    images, labels = load_cifar10("/data/cifar-10-batches-bin", train=True)   # uint8 [N,3,32,32], int64 [N]
    x = normalize(images)                                                       # float, see CIFAR10_MEAN/STD

Synthetic data for throughput runs: :func:`synthetic_imagenet` (3x224x224, 1000 classes) and
:func:`synthetic_cifar10` (3x32x32, 10 classes), random normal images on the requested device,
optionally channels_last.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["load_cifar10", "read_cifar10_batch", "write_cifar10_batch", "synthetic_cifar10", "synthetic_imagenet",
           "normalize", "CIFAR10FormatError", "RECORD_BYTES", "IMAGE_SHAPE", "TRAIN_FILES", "TEST_FILES",
           "CIFAR10_MEAN", "CIFAR10_STD"]

IMAGE_SHAPE = (3, 32, 32)
IMAGE_BYTES = 3 * 32 * 32
RECORD_BYTES = 1 + IMAGE_BYTES
NUM_CLASSES = 10
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

PathLike = Union[str, os.PathLike]


class CIFAR10FormatError(ValueError):
    """A CIFAR-10 binary file is missing, has a size that is not a whole number of records, or bad labels."""


def read_cifar10_batch(path: PathLike, *, expected_records: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One ``*.bin`` file -> (uint8 images [N, 3, 32, 32], int64 labels [N])."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CIFAR10FormatError(f"CIFAR-10 file not found: {path}")
    size = os.path.getsize(path)
    if size == 0 or size % RECORD_BYTES:
        raise CIFAR10FormatError(
            f"{path}: {size} bytes is not a whole number of CIFAR-10 records ({RECORD_BYTES} bytes each: "
            f"1 label byte + {IMAGE_BYTES} pixel bytes); is this the binary version (cifar-10-batches-bin)?")
    n = size // RECORD_BYTES
    if expected_records is not None and n != expected_records:
        raise CIFAR10FormatError(f"{path}: {n} records, expected {expected_records}")
    with open(path, "rb") as f:
        raw = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).view(n, RECORD_BYTES)
    labels = raw[:, 0].to(torch.int64)
    if n and int(labels.max()) >= NUM_CLASSES:
        bad = int(torch.nonzero(labels >= NUM_CLASSES)[0, 0])
        raise CIFAR10FormatError(f"{path}: record {bad} has label {int(labels[bad])}, expected 0..9")
    images = raw[:, 1:].contiguous().view(n, *IMAGE_SHAPE)
    return images, labels


def load_cifar10(root: PathLike, train: bool = True, *, files: Optional[Sequence[str]] = None,
                 expected_records: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """All batches of the train (``data_batch_1..5.bin``) or test (``test_batch.bin``) split of ``root``.

    ``root`` may be the ``cifar-10-batches-bin`` directory or its parent. Every missing file is named
    in the error. ``expected_records`` (per file; 10,000 for the real data set) is checked when given.
    """
    root = os.fspath(root)
    if os.path.isdir(os.path.join(root, "cifar-10-batches-bin")):
        root = os.path.join(root, "cifar-10-batches-bin")
    names = list(files) if files is not None else list(TRAIN_FILES if train else TEST_FILES)
    missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise CIFAR10FormatError(
            f"CIFAR-10 binary files missing in {root}: {', '.join(missing)} (expected the binary version, "
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz, extracted; nothing is downloaded)")
    parts: List[Tuple[torch.Tensor, torch.Tensor]] = [
        read_cifar10_batch(os.path.join(root, n), expected_records=expected_records) for n in names]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def write_cifar10_batch(path: PathLike, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write uint8 images [N, 3, 32, 32] and labels [N] in the binary format (for tests and subsets)."""
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"images must be uint8 [N, 3, 32, 32], got {images.dtype} {tuple(images.shape)}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be [N] with N = {images.shape[0]}, got {tuple(labels.shape)}")
    rec = torch.empty(images.shape[0], RECORD_BYTES, dtype=torch.uint8)
    rec[:, 0] = labels.to(torch.uint8)
    rec[:, 1:] = images.reshape(images.shape[0], -1)
    with open(os.fspath(path), "wb") as f:
        f.write(rec.numpy().tobytes())


def normalize(images: torch.Tensor, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float (x / 255 - mean) / std per channel."""
    m = torch.tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    return (images.to(dtype) / 255.0 - m) / s


def _synthetic(batch: int, shape, num_classes: int, device, channels_last: bool, dtype, seed: Optional[int]):
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = torch.device(device)
    g = torch.Generator(device="cpu")
    if seed is not None:
        g.manual_seed(seed)
    else:
        g.seed()
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def synthetic_imagenet(batch: int, device="cpu", channels_last: bool = False, *, image_size: int = 224,
                       num_classes: int = 1000, dtype: torch.dtype = torch.float32, seed: Optional[int] = 0):
    """A random ImageNet-shaped batch: (images [batch, 3, S, S], labels [batch] in 0..num_classes-1)."""
    return _synthetic(batch, (3, image_size, image_size), num_classes, device, channels_last, dtype, seed)


def synthetic_cifar10(batch: int, device="cpu", channels_last: bool = False, *, dtype: torch.dtype = torch.float32,
                      seed: Optional[int] = 0):
    """A random CIFAR-10-shaped batch: (images [batch, 3, 32, 32], labels [batch] in 0..9)."""
    return _synthetic(batch, IMAGE_SHAPE, NUM_CLASSES, device, channels_last, dtype, seed)
