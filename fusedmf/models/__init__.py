"""Models used by fusedmf's benchmarks and examples (no torchvision dependency)."""

from .cifar_resnet import CIFAR_DEPTHS, RESNET20_NUM_PARAMS, CifarResNet, cifar_resnet
from .resnet import (
    DEPTHS,
    RESNET50_NUM_PARAMS,
    RESNET50_NUM_TENSORS,
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet,
    resnet18,
    resnet34,
    resnet50,
    resnet50_param_shapes,
    resnet101,
    resnet152,
)

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet", "resnet18", "resnet34", "resnet50", "resnet101",
           "resnet152", "resnet50_param_shapes", "RESNET50_NUM_PARAMS", "RESNET50_NUM_TENSORS", "DEPTHS",
           "CifarResNet", "cifar_resnet", "CIFAR_DEPTHS", "RESNET20_NUM_PARAMS"]
