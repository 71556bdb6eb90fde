"""The CIFAR ResNets of He et al. 2016 (§4.2): ResNet-20/32/44/56/110, as SMEGA2's experiments use them.

3 stages of n BasicBlocks (depth = 6n + 2) with 16, 32, 64 channels on 32x32 inputs, global
average pooling and one linear layer; shortcuts of "option A" (identity, subsampled and
zero-padded where the shape changes: no extra parameters), as in the widely used
akamaster/pytorch_resnet_cifar10 that the SMEGA2 reference code trains. ResNet-20 has 269,722
parameters at 10 classes.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CifarResNet", "cifar_resnet", "resnet20", "CIFAR_DEPTHS", "RESNET20_NUM_PARAMS"]

CIFAR_DEPTHS = (20, 32, 44, 56, 110)
RESNET20_NUM_PARAMS = 269_722


class _Block(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.pad = stride, planes - inplanes

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1 or self.pad:       # option A: subsample, zero-pad the new channels
            short = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth!r}")
        if width < 2 or width % 2:
            raise ValueError(f"width must be an even number >= 2, got {width!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, inplanes = [], width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                layers.append(_Block(inplanes, planes, 2 if (stage and i == 0) else 1))
                inplanes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def cifar_resnet(depth: int = 20, num_classes: int = 10, width: int = 16) -> CifarResNet:
    """ResNet-``depth`` for 32x32 images (``width`` 16 is the paper's; smaller for CPU smoke runs)."""
    return CifarResNet(depth, num_classes, width)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)
