"""Configs of the built-in architectures (torch-free; the modules live in mudsc_core.architectures)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from mudsc_core.schema._base import Frozen


class MLPConfig(Frozen):
    """Fully connected ReLU network: input -> hidden[0] -> ... -> hidden[-1] -> num_classes."""

    input_dim: int = Field(64, ge=1, le=1_000_000)
    hidden: list[int] = Field(default_factory=lambda: [128, 128], min_length=1, max_length=64)
    num_classes: int = Field(10, ge=1, le=100_000)

    @field_validator("hidden")
    @classmethod
    def _positive(cls, hidden: list[int]) -> list[int]:
        if any(h < 1 or h > 1_000_000 for h in hidden):
            raise ValueError("every hidden width must be in 1..1000000")
        return hidden


def _default_vgg_layers() -> list[int | Literal["M"]]:
    return [64, "M", 128, "M", 256, 256, "M"]


class VGGConfig(Frozen):
    """VGG-style CNN: 3x3 convs (+BatchNorm) + ReLU, 'M' = 2x2 max-pool, global average pool, linear head."""

    in_channels: int = Field(3, ge=1, le=64)
    layers: list[int | Literal["M"]] = Field(default_factory=_default_vgg_layers, min_length=1, max_length=64)
    num_classes: int = Field(10, ge=1, le=100_000)
    batch_norm: bool = True

    @field_validator("layers")
    @classmethod
    def _has_conv(cls, layers: list[int | str]) -> list[int | str]:
        channels = [c for c in layers if c != "M"]
        if not channels:
            raise ValueError("layers must contain at least one conv width")
        if any(c < 1 or c > 65_536 for c in channels):  # type: ignore[operator]
            raise ValueError("conv widths must be in 1..65536")
        return layers


class ResNetConfig(Frozen):
    """CIFAR-style ResNet (He et al. option B shortcuts), as in the ZipIt!/Git Re-Basin/MuDSC ports.

    depth = 6k + 2 (8, 14, 20, 26, 32, ...); stage widths 16w, 32w, 64w.
    """

    depth: int = Field(20, ge=8, le=1202)
    width: int = Field(1, ge=1, le=64)
    num_classes: int = Field(10, ge=1, le=100_000)
    norm: Literal["batch", "group"] = "batch"
    groups: int = Field(4, ge=1, le=64, description="GroupNorm groups when norm='group'")
    in_channels: int = Field(3, ge=1, le=64)
    shortcut_kernel: Literal[1, 3] | None = Field(
        None,
        description=(
            "kernel size of the projection shortcuts (shortcut.0): 1 (ours) or 3 (the public ZipIt!/MuDSC "
            "checkpoints, padding 1); None = infer from the checkpoint (resnet.infer_config), builds 1x1"
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> ResNetConfig:
        if (self.depth - 2) % 6 != 0:
            raise ValueError("depth must be 6k+2 (8, 14, 20, 26, 32, ...)")
        if self.norm == "group" and (16 * self.width) % self.groups != 0:
            raise ValueError("16*width must be divisible by groups")
        return self


class TorchvisionResNetConfig(Frozen):
    """ImageNet-style ResNet with torchvision's parameter and buffer names (v1.5: stride on the 3x3 conv).

    torchvision and timm ResNet checkpoints (``resnet18/34/50/101``) load unchanged. depth 18/34 use
    BasicBlocks, 50/101 Bottlenecks (expansion 4); stem 7x7/2 conv + BN + ReLU + 3x3/2 max-pool; stage
    widths width, 2w, 4w, 8w (times 4 at the output of a Bottleneck stage); adaptive average pool, ``fc``.
    """

    depth: Literal[18, 34, 50, 101] = 18
    width: int = Field(64, ge=4, le=512, description="base width of layer1 (torchvision: 64)")
    num_classes: int = Field(1000, ge=1, le=100_000)
    in_channels: int = Field(3, ge=1, le=64)


class ViTConfig(Frozen):
    """Vision transformer with timm parameter names (pre-norm blocks, fused qkv, cls token)."""

    image_size: int = Field(32, ge=1, le=4096)
    patch_size: int = Field(4, ge=1, le=4096)
    in_channels: int = Field(3, ge=1, le=64)
    embed_dim: int = Field(64, ge=1, le=16_384)
    depth: int = Field(4, ge=1, le=128)
    num_heads: int = Field(4, ge=1, le=256)
    mlp_ratio: float = Field(4.0, gt=0, le=64)
    num_classes: int = Field(10, ge=1, le=100_000)
    qkv_bias: bool = True

    @model_validator(mode="after")
    def _check(self) -> ViTConfig:
        if self.image_size % self.patch_size != 0:
            raise ValueError("image_size must be divisible by patch_size")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError("embed_dim must be divisible by num_heads")
        return self


_CLASS_NAME = re.compile(r"^[A-Z][A-Za-z0-9]{0,127}$")
_MODEL_TYPE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class TransformersConfig(Frozen):
    """A Hugging Face transformers model, built from its config (``config.json``) with random weights, never
    downloaded: the class is ``architectures[0]`` (``BertModel``, ``GPT2LMHeadModel``, ``LlamaForCausalLM``,
    ``ViTForImageClassification``, ``CLIPVisionModel``, ...). Empty (the default): the config is read from
    the first model folder's ``config.json``, and every model folder's config must agree with it. Its
    permutation spec is derived by tracing the model's computation (torch.export) and checked before every
    merge. Logits outputs are pinned (an LM head or classifier contracts the residual stream, which stays
    free). A features encoder (a class without ``For`` in its name: ``BertModel``, ``CLIPVisionModel``) merged
    by align (``mode: "align"``) keeps its output groups free: the merged model returns its features in
    model 0's unit order, a drop-in replacement for model 0; merged by zip, whose merged order is no input
    model's, its outputs (so its residual stream) are pinned. Calibration tensors are the forward's keywords (``input_ids``,
    ``attention_mask``, ``pixel_values``, ...); padding (``attention_mask`` 0) is not counted."""

    model_config = ConfigDict(frozen=True, extra="allow", allow_inf_nan=False)

    model_type: str | None = Field(None, description="the config's model_type (bert, gpt2, llama, vit, ...)")
    architectures: list[str] | None = Field(None, min_length=1, max_length=8)

    @model_validator(mode="after")
    def _check(self) -> TransformersConfig:
        extra = self.model_extra or {}
        if self.model_type is None and self.architectures is None and not extra:
            return self  # read from the first model folder
        if self.model_type is None or not _MODEL_TYPE.match(self.model_type):
            raise ValueError("a transformers config needs its model_type (lower-case letters, digits, _ or -)")
        if not self.architectures or not all(isinstance(a, str) and _CLASS_NAME.match(a) for a in self.architectures):
            raise ValueError("a transformers config needs architectures: [<model class name>, ...]")
        return self

    @property
    def given(self) -> bool:
        return self.model_type is not None

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


ARCHITECTURE_CONFIGS: dict[str, type[Frozen]] = {
    "mlp": MLPConfig,
    "vgg": VGGConfig,
    "resnet": ResNetConfig,
    "vit": ViTConfig,
    "torchvision_resnet": TorchvisionResNetConfig,
    "transformers": TransformersConfig,
}
