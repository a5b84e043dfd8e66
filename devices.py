"""Which device, which precision, how many worker processes: settled here once for every command."""

from __future__ import annotations

import os

import torch

from errors import InputError

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; a bare ``cuda`` is this process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device name (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def resolve_amp(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp``; None means full precision."""
    if choice == "off" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if choice == "fp16" and device.type != "cuda":
        raise InputError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp off on the CPU")
    return torch.bfloat16 if choice == "bf16" else torch.float16


def available_cpus() -> int:
    """CPU cores this process may run on (the affinity mask, which containers narrow), else cpu_count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def usable_workers(requested: int, processes: int = 1) -> int:
    """The requested data workers, capped so ``processes`` such processes do not outnumber the CPUs."""
    return max(0, min(requested, available_cpus() // max(1, processes)))
