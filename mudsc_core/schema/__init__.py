"""Torch-free schema: the job spec, method parameters and architecture configs, with their registries."""

from mudsc_core.schema.architectures import ARCHITECTURE_CONFIGS, MLPConfig, ResNetConfig, VGGConfig, ViTConfig
from mudsc_core.schema.job import (
    ArchitectureSpec,
    CalibrationSpec,
    JobSpec,
    MethodSpec,
    ModelRef,
    OutputSpec,
    WebhookSpec,
    parse_s3_uri,
)
from mudsc_core.schema.methods import METHODS, MethodInfo, MudscParams, register

__all__ = [
    "ARCHITECTURE_CONFIGS",
    "MLPConfig",
    "ResNetConfig",
    "VGGConfig",
    "ViTConfig",
    "ArchitectureSpec",
    "CalibrationSpec",
    "JobSpec",
    "MethodSpec",
    "ModelRef",
    "OutputSpec",
    "WebhookSpec",
    "parse_s3_uri",
    "METHODS",
    "MethodInfo",
    "MudscParams",
    "register",
]
