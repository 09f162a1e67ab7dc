"""ImageNet-style ResNet 18/34/50/101 with torchvision's parameter and buffer names.

State-dict names are torchvision's (and timm's): ``conv1``, ``bn1``, ``layer{i}.{b}.conv{1,2[,3]}``,
``layer{i}.{b}.bn{1,2[,3]}``, ``layer{i}.{b}.downsample.0`` (1x1 conv, no bias) and
``downsample.1`` (BatchNorm) on the first block of a stage that changes stride or width, ``fc``.
Bottlenecks put the stride on their 3x3 conv (torchvision's "v1.5"). The ReLUs are functional
(torchvision's ReLU modules hold no state), so checkpoints of torchvision and timm load unchanged.

This module has no hand-written permutation spec: its spec is derived by tracing
(:func:`mudsc_core.permutation.trace.trace_spec` on :func:`example_inputs`).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mudsc_core.schema.architectures import TorchvisionResNetConfig

# depth -> (bottleneck?, blocks per stage)
_LAYOUTS: dict[int, tuple[bool, tuple[int, int, int, int]]] = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
}


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Sequential | None:
    """Projection shortcut (1x1 conv + BN) when the block changes stride or width, else identity."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(_conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """3x3 conv (stride) -> BN -> ReLU -> 3x3 conv -> BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, planes, H/stride, W/stride)
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 conv -> BN -> ReLU -> 3x3 conv (stride) -> BN -> ReLU -> 1x1 conv (x4) -> BN, + shortcut, ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample = _downsample(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, planes, H, W)
        out = F.relu(self.bn2(self.conv2(out)))  # (B, planes, H/stride, W/stride)
        out = self.bn3(self.conv3(out))  # (B, 4 planes, H/stride, W/stride)
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def stage_plan(config: TorchvisionResNetConfig) -> list[tuple[int, int, int]]:
    """(planes, blocks, stride) of each of the four stages; a stage outputs planes * expansion channels."""
    _, blocks = _LAYOUTS[config.depth]
    w = config.width
    return [(w, blocks[0], 1), (2 * w, blocks[1], 2), (4 * w, blocks[2], 2), (8 * w, blocks[3], 2)]


class TorchvisionResNet(nn.Module):
    def __init__(self, config: TorchvisionResNetConfig) -> None:
        super().__init__()
        bottleneck, _ = _LAYOUTS[config.depth]
        block: type[BasicBlock] | type[Bottleneck] = Bottleneck if bottleneck else BasicBlock
        in_planes = config.width
        self.conv1 = nn.Conv2d(config.in_channels, in_planes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages: list[nn.Sequential] = []
        for planes, count, stride in stage_plan(config):
            blocks: list[nn.Module] = []
            for b in range(count):
                blocks.append(block(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He (fan_out) init for convs, unit-scale BN, as torchvision; Linear keeps PyTorch's default.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # (B, w, H/4, W/4)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))  # (B, 8w * expansion, H/32, W/32)
        return cast(Tensor, self.fc(torch.flatten(self.avgpool(out), 1)))  # (B, num_classes)


def build(config: TorchvisionResNetConfig) -> nn.Module:
    return TorchvisionResNet(config)


def example_inputs(config: TorchvisionResNetConfig) -> tuple[Tensor, ...]:
    """A batch of 2 random 32x32 images (enough for tracing: layer4 still sees 1x1 maps)."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(2, config.in_channels, 32, 32, generator=generator),)
