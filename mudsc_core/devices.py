"""The device is chosen once, at the edge (the worker's setting, a caller's argument), never inside an algorithm."""

from __future__ import annotations

import torch


def resolve_device(setting: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda``/``cuda:N`` must be available.

    The worker calls this inside the task, in the pool process: CUDA is never initialised in a forked parent.
    """
    if str(setting) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {setting} requested but CUDA is not available")
    return device
