"""fusedmf.models: ResNet-50 in torchvision's layout (docs/performance.md, the workload)."""

import math

import pytest
import torch

from fusedmf.models import RESNET50_NUM_PARAMS, RESNET50_NUM_TENSORS, resnet, resnet50, resnet50_param_shapes

# torchvision's published parameter counts (torchvision.models docs, "num_params")
TORCHVISION_COUNTS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return resnet50().eval()


def test_resnet50_parameter_count(model):
    params = list(model.parameters())
    assert RESNET50_NUM_PARAMS == 25_557_032 and RESNET50_NUM_TENSORS == 161
    assert len(params) == 161, f"{len(params)} parameter tensors"
    assert sum(p.numel() for p in params) == 25_557_032


def test_resnet50_torchvision_names(model):
    named = dict(model.named_parameters())
    expected = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.weight": (64,),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.bias": (256,),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.conv3.weight": (1024, 256, 1, 1),
        "layer4.2.bn3.bias": (2048,),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }
    for name, shape in expected.items():
        assert name in named, f"missing parameter {name}"
        assert tuple(named[name].shape) == shape, f"{name}: {tuple(named[name].shape)} != {shape}"
    assert not any("layer3.6" in n or "layer4.3" in n for n in named)  # blocks [3, 4, 6, 3]


def test_resnet50_param_shapes_match_model(model):
    shapes = resnet50_param_shapes()
    assert len(shapes) == 161
    assert sum(math.prod(s) for s in shapes) == 25_557_032
    assert shapes == [tuple(p.shape) for p in model.parameters()]
    named = resnet50_param_shapes(named=True)
    assert [n for n, _ in named] == [n for n, _ in model.named_parameters()]


def test_forward_shape(model):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 1000)
    assert torch.isfinite(y).all()


def test_channels_last(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        cl = resnet50().eval()
        cl.load_state_dict(model.state_dict())
        cl = cl.to(memory_format=torch.channels_last)
        assert cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        y = cl(x.to(memory_format=torch.channels_last))
    assert y.shape == (2, 1000)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    small = resnet(blocks=(1, 1, 1, 1), width=8, num_classes=10)
    small(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [n for n, p in small.named_parameters() if p.grad is None]
    assert not missing, f"no grad for {missing}"


@pytest.mark.parametrize("depth", sorted(TORCHVISION_COUNTS))
def test_depths_match_torchvision_counts(depth):
    with torch.device("meta"):
        m = resnet(depth)
    assert sum(p.numel() for p in m.parameters()) == TORCHVISION_COUNTS[depth]


def test_small_resnet():
    m = resnet(blocks=(1, 1, 1, 1), width=16, num_classes=10).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert m.fc.in_features == 16 * 8 * 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        resnet(42)
    with pytest.raises(ValueError, match="four positive"):
        resnet(blocks=(1, 1, 1))
