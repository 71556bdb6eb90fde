"""Argument handling shared by the update-rule functions of fusedmf.functional (the package's
__init__ and smega2.py): one device per call, scalar vectors, loss-scale tensors. Below both, so
that neither imports the other for them."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Tensor = torch.Tensor


def _device_of(tensors: Sequence[Tensor]) -> torch.device:
    for t in tensors:
        return t.device
    return torch.device("cpu")


def _scalar_vector(values: list, device: torch.device) -> Tensor:
    """The per-step scalar vector on `device`, without a host synchronisation.

    On CUDA the values go through a freshly allocated pinned buffer and a non-blocking copy: the
    caching host allocator does not hand that buffer out again until the copy has run, so the next
    step cannot overwrite values a queued kernel has yet to read.
    """
    host = torch.tensor(values, dtype=torch.float32)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _as_list(x) -> list:
    return [] if x is None else list(x)


def _scale_tensor(x: Union[None, float, Tensor], device: torch.device, name: str) -> Optional[Tensor]:
    if x is None:
        return None
    if not isinstance(x, Tensor):
        return torch.full((1,), float(x), dtype=torch.float32, device=device)
    if x.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got shape {list(x.shape)}")
    return x.reshape(1).to(device=device, dtype=torch.float32)


def _check_same_device(lists: dict, device: torch.device, op: str) -> None:
    for list_name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if t.device != device:
                raise ValueError(
                    f"fusedmf.{op}: {list_name}[{i}] is on {t.device} but the tensors of one call must "
                    f"all be on {device} (the optimizers group tensors by device for you)"
                )
