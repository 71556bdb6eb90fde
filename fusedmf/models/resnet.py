"""ResNet in torchvision's layout, without a torchvision dependency.

``resnet50()`` has the parameter names, shapes and order of ``torchvision.models.resnet50()``:
25,557,032 parameters in 161 tensors (docs/performance.md, the workload), so benchmarks and
checkpoints line up with the model everyone quotes. ``resnet()`` builds smaller variants (fewer
blocks, a narrower base width) for CPU runs; with torchvision's block counts and width 64 it
reproduces resnet18/34/50/101/152.

Initialisation follows torchvision: Kaiming-normal (fan_out, relu) for convolutions, ones and
zeros for batch norms, and optionally zero-initialised last BN of each residual branch
(Goyal et al., arXiv 1706.02677, which large-batch data-parallel training relies on).
"""

from __future__ import annotations

from typing import Optional, Sequence, Type, Union

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet", "resnet18", "resnet34", "resnet50", "resnet101",
           "resnet152", "resnet50_param_shapes", "RESNET50_NUM_PARAMS", "RESNET50_NUM_TENSORS", "DEPTHS"]

RESNET50_NUM_PARAMS = 25_557_032
RESNET50_NUM_TENSORS = 161


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (resnet18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "ResNet v1.5"), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Type[Union[BasicBlock, Bottleneck]]

#: torchvision's (block, blocks per stage) for each depth
DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """conv1 7x7/2, bn, relu, maxpool 3x3/2, four stages (stride 1, 2, 2, 2), avgpool, fc."""

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000, width: int = 64,
                 zero_init_residual: bool = False):
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {list(layers)}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet(depth: Optional[int] = 50, *, blocks: Optional[Sequence[int]] = None, width: int = 64,
           bottleneck: Optional[bool] = None, num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """A ResNet by depth (18, 34, 50, 101, 152) or by explicit ``blocks`` per stage.

    ``width`` is the base channel count (64 in the paper); ``bottleneck`` picks the block type
    (default: from ``depth``, or Bottleneck when only ``blocks`` is given). For a CPU-sized model:
    ``resnet(blocks=(1, 1, 1, 1), width=16, num_classes=10)``.
    """
    if blocks is None:
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)} (or pass blocks=...), got {depth!r}")
        block, blocks = DEPTHS[depth]
    else:
        block = DEPTHS[depth][0] if depth in DEPTHS else Bottleneck
    if bottleneck is not None:
        block = Bottleneck if bottleneck else BasicBlock
    return ResNet(block, blocks, num_classes=num_classes, width=width, zero_init_residual=zero_init_residual)


def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    return resnet(18, num_classes=num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs) -> ResNet:
    return resnet(34, num_classes=num_classes, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """torchvision's resnet50 layout: 25,557,032 parameters in 161 tensors at 1000 classes."""
    return resnet(50, num_classes=num_classes, **kwargs)


def resnet101(num_classes: int = 1000, **kwargs) -> ResNet:
    return resnet(101, num_classes=num_classes, **kwargs)


def resnet152(num_classes: int = 1000, **kwargs) -> ResNet:
    return resnet(152, num_classes=num_classes, **kwargs)


def resnet50_param_shapes(num_classes: int = 1000, *, named: bool = False) -> list:
    """The shapes of ResNet-50's 161 parameter tensors, in ``named_parameters()`` order.

    Built on the meta device: no memory is allocated and nothing is initialised. With
    ``named=True`` returns ``(name, shape)`` pairs with torchvision's parameter names.
    """
    with torch.device("meta"):
        model = resnet50(num_classes=num_classes)
    if named:
        return [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    return [tuple(p.shape) for p in model.parameters()]
