"""CIFAR ResNet (depth 6k+2, stage widths 16w/32w/64w) with the parameter names of the public
ZipIt!/Git Re-Basin/MuDSC ports: ``conv1``, ``bn1``, ``layer{s}.{b}.conv1/bn1/conv2/bn2``,
``layer{s}.{b}.shortcut.0/1`` (projection on blocks that change stride or width), ``linear``.

The projection shortcut is a 1x1 conv (ours) or, with ``shortcut_kernel=3``, a 3x3 conv with
padding 1 (the public ZipIt!/MuDSC reference checkpoints); :func:`infer_config` reads which one a
checkpoint has. The kernel size does not change the spec (kernel axes carry no units).

Unit groups, in forward order:

- ``layer{s}``: the residual stream of stage s. Written by the stem (s=1) or by block 0's projection
  shortcut, and by every block's conv2/bn2; read by every block's conv1 and identity shortcut, by
  the next stage's block 0 (conv1 and shortcut.0 input axes) and by the ``linear`` head (s=3).
  Activation: output of the stage's last block (after its final ReLU), unit_dim 1.
- ``layer{s}.{b}.inner``: a block's inner channels (conv1 rows, bn1, conv2 input axis).
  Activation: input of ``layer{s}.{b}.conv2``. The block's ReLU is functional, but conv2 is a module
  and its input is exactly relu(bn1(conv1(x))), the tensor after the non-linearity.

With ``norm='group'`` every group is normalised by a GroupNorm and gets ``num_blocks = groups``
(GroupNorm groups are contiguous channel chunks and must be matched as wholes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mudsc_core.architectures.builders import SpecBuilder
from mudsc_core.permutation.spec import ActivationSite, PermSpec
from mudsc_core.schema.architectures import ResNetConfig


def _norm(config: ResNetConfig, channels: int) -> nn.Module:
    if config.norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(config.groups, channels)


class BasicBlock(nn.Module):
    def __init__(self, config: ResNetConfig, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(config, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = _norm(config, planes)
        self.shortcut: nn.Sequential = nn.Sequential()
        if stride != 1 or in_planes != planes:
            k = shortcut_kernel(config)
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=k, stride=stride, padding=k // 2, bias=False),
                _norm(config, planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, planes, H/stride, W/stride)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def shortcut_kernel(config: ResNetConfig) -> int:
    """Kernel size of the projection shortcuts; ``None`` (not inferred from a checkpoint) builds 1x1."""
    return 1 if config.shortcut_kernel is None else config.shortcut_kernel


def _stage_plan(config: ResNetConfig) -> list[tuple[int, int]]:
    """(width, stride) of each of the three stages."""
    w = config.width
    return [(16 * w, 1), (32 * w, 2), (64 * w, 2)]


def blocks_per_stage(config: ResNetConfig) -> int:
    return (config.depth - 2) // 6


class ResNet(nn.Module):
    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        stem = 16 * config.width
        self.conv1 = nn.Conv2d(config.in_channels, stem, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = _norm(config, stem)
        in_planes = stem
        k = blocks_per_stage(config)
        stages: list[nn.Sequential] = []
        for planes, stride in _stage_plan(config):
            blocks = []
            for b in range(k):
                blocks.append(BasicBlock(config, in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)  # input size is not assumed (digits are 8x8)
        self.linear = nn.Linear(in_planes, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, 16w, H, W)
        out = self.layer3(self.layer2(self.layer1(out)))  # (B, 64w, H/4, W/4)
        return cast(Tensor, self.linear(self.pool(out).flatten(1)))  # (B, num_classes)


def build(config: ResNetConfig) -> nn.Module:
    return ResNet(config)


_SHORTCUT_PROBE = "layer2.0.shortcut.0.weight"  # block 0 of stage 2 always projects (stride 2)


def infer_config(config: dict[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with ``shortcut_kernel`` read from the checkpoint ``state`` when it is None or absent.

    ``state`` maps entry names to tensors (or anything with a ``shape``, e.g. safetensors header
    entries). The kernel is the last dim of ``layer2.0.shortcut.0.weight``; 1 if that entry is
    absent. Other fields are left alone; a kernel other than 1 or 3 is rejected when the config is
    validated. ``config`` itself is not modified.
    """
    if config.get("shortcut_kernel") is not None:
        return dict(config)
    shape = tuple(getattr(state.get(_SHORTCUT_PROBE), "shape", ()))
    kernel = int(shape[-1]) if len(shape) == 4 else 1
    return {**config, "shortcut_kernel": kernel}


def example_inputs(config: ResNetConfig) -> tuple[Tensor, ...]:
    """A batch of 2 random CIFAR-sized images, (2, in_channels, 32, 32), for tracing and self-checks."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(2, config.in_channels, 32, 32, generator=generator),)


def spec(config: ResNetConfig) -> PermSpec:
    # Same axes for both shortcut kernels: the conv helpers leave the (kh, kw) axes unit-free.
    b = SpecBuilder()
    k = blocks_per_stage(config)
    blocks_of = config.groups if config.norm == "group" else 1
    plan = _stage_plan(config)

    # Groups in forward order: a stage's stream is first written by the stem (stage 1) or by
    # block 0 of the stage, after that block's inner channels.
    for s, (planes, _) in enumerate(plan, start=1):
        stream_site = ActivationSite(f"layer{s}.{k - 1}", "output", unit_dim=1)
        if s == 1:
            b.group("layer1", planes, stream_site, num_blocks=blocks_of)
        for blk in range(k):
            name = f"layer{s}.{blk}"
            b.group(f"{name}.inner", planes, ActivationSite(f"{name}.conv2", "input", unit_dim=1), num_blocks=blocks_of)
            if s > 1 and blk == 0:
                b.group(f"layer{s}", planes, stream_site, num_blocks=blocks_of)

    b.conv("conv1", "layer1", None, bias=False)
    b.any_norm("bn1", "layer1", config.norm)
    in_planes = plan[0][0]
    for s, (planes, stride) in enumerate(plan, start=1):
        for blk in range(k):
            stream_in = f"layer{s - 1}" if (s > 1 and blk == 0) else f"layer{s}"
            projection = blk == 0 and (stride != 1 or in_planes != planes)
            b.residual_block(
                f"layer{s}.{blk}",
                stream_in=stream_in,
                stream_out=f"layer{s}",
                inner=f"layer{s}.{blk}.inner",
                norm=config.norm,
                shortcut=projection,
            )
            in_planes = planes
    b.linear("linear", None, "layer3")
    b.head("linear.weight", "linear.bias")
    return b.build()
