"""Fully connected ReLU network: ``fc0 .. fc{L-1}`` hidden layers, each followed by ReLU, then ``head``.

Unit groups: one per hidden layer, named after its producer (``fc{i}``). A group's activation is
observed at the input of its consumer (``fc{i+1}`` or ``head``), i.e. after the ReLU.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from mudsc_core.architectures.builders import SpecBuilder
from mudsc_core.permutation.spec import ActivationSite, PermSpec
from mudsc_core.schema.architectures import MLPConfig


class MLP(nn.Module):
    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        widths = [config.input_dim, *config.hidden]
        self.num_hidden = len(config.hidden)
        for i in range(self.num_hidden):
            self.add_module(f"fc{i}", nn.Linear(widths[i], widths[i + 1]))
        self.head = nn.Linear(widths[-1], config.num_classes)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)  # (B, input_dim): image inputs (B, 1, 8, 8) are flattened
        for i in range(self.num_hidden):
            h = self.act(getattr(self, f"fc{i}")(h))  # (B, hidden[i])
        return cast(Tensor, self.head(h))  # (B, num_classes)


def build(config: MLPConfig) -> nn.Module:
    return MLP(config)


def example_inputs(config: MLPConfig) -> tuple[Tensor, ...]:
    """A batch of 2 random inputs, (2, input_dim), for tracing and self-checks."""
    return (torch.randn(2, config.input_dim, generator=torch.Generator().manual_seed(0)),)


def spec(config: MLPConfig) -> PermSpec:
    b = SpecBuilder()
    n = len(config.hidden)
    consumers = [f"fc{i + 1}" for i in range(n - 1)] + ["head"]
    for i, width in enumerate(config.hidden):
        b.group(f"fc{i}", width, ActivationSite(consumers[i], "input", unit_dim=-1))
    for i in range(n):
        b.linear(f"fc{i}", f"fc{i}", f"fc{i - 1}" if i else None)
    b.linear("head", None, f"fc{n - 1}")
    b.head("head.weight", "head.bias")
    return b.build()


__all__ = ["MLP", "build", "spec"]
