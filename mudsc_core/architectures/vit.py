"""Vision transformer with timm parameter names: ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``, ``norm``, ``head``.
Pre-norm blocks, GELU MLP, fused qkv (rows q|k|v, each head's dims contiguous), cls-token pooling.

Unit groups, in forward order:

- ``residual``: the residual stream (D units). Activation: input of the final ``norm`` (the stream
  after the last block), unit_dim -1 (every token of every image is a sample).
- ``blocks.{i}.attn.qk``: queries and keys of block i (size D, one block per head; q and k share
  the permutation so that every head's q.k is preserved). Activation: the qkv output, segments q
  and k stacked as extra samples.
- ``blocks.{i}.attn.v``: values of block i and the input of attn.proj (block_tie = the qk group:
  heads are paired once; the dims inside a head are permuted independently of q/k).
  Activation: input of ``attn.proj``.
- ``blocks.{i}.mlp``: the MLP hidden units. Activation: input of ``mlp.fc2`` (after GELU).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mudsc_core.architectures.builders import SpecBuilder
from mudsc_core.permutation.spec import ActivationSite, PermSpec
from mudsc_core.schema.architectures import ViTConfig


def mlp_hidden(config: ViTConfig) -> int:
    return int(config.embed_dim * config.mlp_ratio)


class PatchEmbed(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.embed_dim, kernel_size=p, stride=p)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.proj(x).flatten(2).transpose(1, 2))  # (B, T, D)


class Attention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        return cast(Tensor, self.proj(out.transpose(1, 2).reshape(batch, tokens, dim)))


class Mlp(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, mlp_hidden(config))
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_hidden(config), config.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.mlp = Mlp(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return cast(Tensor, x + self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        tokens = (config.image_size // config.patch_size) ** 2
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(config) for _ in range(config.depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch_embed(x)  # (B, T, D)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed  # (B, T+1, D)
        h = self.norm(self.blocks(h))
        return cast(Tensor, self.head(h[:, 0]))  # (B, num_classes)


def build(config: ViTConfig) -> nn.Module:
    return VisionTransformer(config)


def example_inputs(config: ViTConfig) -> tuple[Tensor, ...]:
    """A batch of 2 random images of the configured size, for tracing and self-checks."""
    size = config.image_size
    return (torch.randn(2, config.in_channels, size, size, generator=torch.Generator().manual_seed(0)),)


def spec(config: ViTConfig) -> PermSpec:
    b = SpecBuilder()
    dim, heads = config.embed_dim, config.num_heads
    # Pre-norm: the stream is also observed where each block's norms and the final norm hand it on.
    reads = [f"blocks.{i}.{norm}" for i in range(config.depth) for norm in ("norm1", "norm2")] + ["norm"]
    stream = b.group(
        "residual",
        dim,
        ActivationSite("norm", "input", unit_dim=-1),
        extra_sites=tuple(ActivationSite(name, "output", unit_dim=-1) for name in reads),
    )
    for i in range(config.depth):
        p = f"blocks.{i}"
        qk = b.group(
            f"{p}.attn.qk",
            dim,
            ActivationSite(f"{p}.attn.qkv", "output", unit_dim=-1, segments=((0, dim), (dim, 2 * dim))),
            num_blocks=heads,
        )
        b.group(
            f"{p}.attn.v", dim, ActivationSite(f"{p}.attn.proj", "input", unit_dim=-1), num_blocks=heads, block_tie=qk
        )
        b.group(f"{p}.mlp", mlp_hidden(config), ActivationSite(f"{p}.mlp.fc2", "input", unit_dim=-1))

    b.conv("patch_embed.proj", stream, None)
    b.param("cls_token", None, None, b.axis(stream, "out"))  # (1, 1, D)
    b.param("pos_embed", None, None, b.axis(stream, "out"))  # (1, T+1, D)
    for i in range(config.depth):
        p = f"blocks.{i}"
        qk, v = f"{p}.attn.qk", f"{p}.attn.v"
        b.norm(f"{p}.norm1", stream)
        rows = b.segments([qk, qk, v], "out")  # (3D,) = q | k | v
        b.param(f"{p}.attn.qkv.weight", rows, b.axis(stream, "in"))
        if config.qkv_bias:
            b.param(f"{p}.attn.qkv.bias", rows)
        b.linear(f"{p}.attn.proj", stream, v)
        b.norm(f"{p}.norm2", stream)
        b.linear(f"{p}.mlp.fc1", f"{p}.mlp", stream)
        b.linear(f"{p}.mlp.fc2", stream, f"{p}.mlp")
    b.norm("norm", stream)
    b.linear("head", None, stream)
    b.head("head.weight", "head.bias")
    return b.build()
