"""The CIFAR ResNets (He et al. 2016, option A shortcuts) used by the SMEGA2 experiment."""

import pytest
import torch

from fusedmf.models import RESNET20_NUM_PARAMS, cifar_resnet


def test_resnet20_size_and_output():
    m = cifar_resnet(20)
    assert sum(p.numel() for p in m.parameters()) == RESNET20_NUM_PARAMS
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 19          # 1 + 3 stages x 3 blocks x 2 (option A: no projection convs)
    out = m(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    # depth 6n + 2: ResNet-32 adds 2 blocks per stage
    assert len([mod for mod in cifar_resnet(32, width=4).modules() if isinstance(mod, torch.nn.Conv2d)]) == 31


@pytest.mark.parametrize("depth,width", [(21, 16), (2, 16), (20, 3)])
def test_bad_depth_or_width(depth, width):
    with pytest.raises(ValueError, match="depth|width"):
        cifar_resnet(depth, width=width)
