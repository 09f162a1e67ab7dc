"""VGG-style CNN with torchvision-like names: ``features.{k}`` (conv [+ BatchNorm] + ReLU, 'M' = max-pool),
global average pool, linear head ``classifier``.

Unit groups: one per conv, named after the conv module (``features.{k}``). A group's activation is
observed at the output of the conv's ReLU module (unit_dim 1): the tensor that flows through the
channels after the non-linearity, before any pooling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from mudsc_core.architectures.builders import SpecBuilder
from mudsc_core.permutation.spec import ActivationSite, PermSpec
from mudsc_core.schema.architectures import VGGConfig


@dataclass(frozen=True)
class _ConvLayer:
    conv: str  # module name of the conv inside the model, e.g. "features.0"
    norm: str | None  # BatchNorm module name, when batch_norm
    relu: str
    channels: int


def _layout(config: VGGConfig) -> list[_ConvLayer]:
    """Positions of conv/BN/ReLU modules in ``features`` (shared by the module and its spec)."""
    layers: list[_ConvLayer] = []
    k = 0
    for item in config.layers:
        if item == "M":
            k += 1
            continue
        conv, k = f"features.{k}", k + 1
        norm = None
        if config.batch_norm:
            norm, k = f"features.{k}", k + 1
        relu, k = f"features.{k}", k + 1
        layers.append(_ConvLayer(conv, norm, relu, int(item)))
    return layers


class VGG(nn.Module):
    def __init__(self, config: VGGConfig) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        channels = config.in_channels
        for item in config.layers:
            if item == "M":
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            modules.append(nn.Conv2d(channels, int(item), kernel_size=3, padding=1))
            if config.batch_norm:
                modules.append(nn.BatchNorm2d(int(item)))
            modules.append(nn.ReLU())
            channels = int(item)
        self.features = nn.Sequential(*modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)  # (B, C, H', W')
        return cast(Tensor, self.classifier(self.pool(h).flatten(1)))  # (B, num_classes)


def build(config: VGGConfig) -> nn.Module:
    return VGG(config)


def example_inputs(config: VGGConfig) -> tuple[Tensor, ...]:
    """A batch of 2 random images just large enough for every max-pool, for tracing and self-checks."""
    size = max(8, 2 ** sum(1 for item in config.layers if item == "M"))
    return (torch.randn(2, config.in_channels, size, size, generator=torch.Generator().manual_seed(0)),)


def spec(config: VGGConfig) -> PermSpec:
    b = SpecBuilder()
    layout = _layout(config)
    for layer in layout:
        b.group(layer.conv, layer.channels, ActivationSite(layer.relu, "output", unit_dim=1))
    previous: str | None = None
    for layer in layout:
        b.conv(layer.conv, layer.conv, previous)
        if layer.norm is not None:
            b.batchnorm(layer.norm, layer.conv)
        previous = layer.conv
    b.linear("classifier", None, previous)
    b.head("classifier.weight", "classifier.bias")
    return b.build()
