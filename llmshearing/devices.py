"""Device and dtype names in one place: torch's ('cuda', 'cpu'), Composer's ('gpu', 'cpu'), dtype names."""
from __future__ import annotations

import torch

from llmshearing.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_of(name: str, key: str = "--dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"{key} '{name}': choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str | None, key: str = "--device") -> str:
    """A torch device: `device` ('gpu' means cuda), or cuda when available and cpu otherwise (None / 'auto')."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = "cuda" if device == "gpu" else device
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key} '{device}' is not a torch device (like cpu, cuda, cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} {device}: CUDA is not available on this machine; use cpu")
    return device


def composer_device(device: str | None, key: str = "device") -> str:
    """Composer's name ('gpu' or 'cpu') of `device` (None: gpu when available)."""
    return "gpu" if resolve_device(device, key).startswith("cuda") else "cpu"
