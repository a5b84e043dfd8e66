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
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: not supported (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", local_rank)
            if local_rank >= count:
                raise InputError(
                    f"--device {name}: this process is local rank {local_rank}, and this machine has {count} "
                    f"GPU(s); start at most {count} processes per machine (torchrun --nproc_per_node)"
                )
        elif device.index >= count:
            raise InputError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device


# CPU flags (Linux /proc/cpuinfo) of native bf16 arithmetic: AVX-512 BF16 (AMD Zen 4+, Intel Cooper Lake+) and
# AMX (Intel Sapphire Rapids+). Without them bf16 is emulated on the CPU and slower than fp32.
NATIVE_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them; empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def auto_amp(device: torch.device) -> tuple[torch.dtype | None, str]:
    """What ``--amp auto`` picks on ``device``, and why (one line for the log)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        # is_bf16_supported() says yes on V100/T4 too, through slow emulation: ask for Ampere (8.0) or newer
        if major >= 8:
            return torch.bfloat16, f"bf16: the GPU (compute capability {major}.{minor}) has native bf16"
        return (
            torch.float16,
            f"fp16 with a gradient scaler: compute capability {major}.{minor} has no native bf16",
        )
    if device.type == "cpu":
        native = sorted(cpu_flags() & set(NATIVE_CPU_BF16_FLAGS))
        if native:
            return torch.bfloat16, f"bf16: the CPU has native bf16 ({', '.join(native)})"
        return None, "off: the CPU has no native bf16 (avx512_bf16 / amx_bf16), where fp32 is faster"
    return None, f"off: no automatic mixed precision on {device.type}"


def resolve_amp(choice: str, device: torch.device, training: bool = True) -> torch.dtype | None:
    """The autocast dtype for ``--amp``; None means full precision.

    Evaluation (``training=False``) keeps fp32 on the CPU under ``auto``: its numbers stay exact and
    comparable with any other evaluation of the same model, and embedding is a small share of the time.
    """
    if choice == "off":
        return None
    if choice == "auto":
        if not training and device.type == "cpu":
            return None
        return auto_amp(device)[0]
    if choice == "fp16" and device.type != "cuda":
        raise InputError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp off on the CPU")
    return torch.bfloat16 if choice == "bf16" else torch.float16


def amp_name(dtype: torch.dtype | None) -> str:
    """The --amp choice that gives autocast ``dtype``: bf16, fp16, or off (full precision)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[dtype]


def available_cpus() -> int:
    """CPU cores this process may run on (the affinity mask, which containers narrow), else cpu_count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def usable_workers(requested: int, processes: int = 1) -> int:
    """The requested data workers, capped so ``processes`` such processes on this machine (torchrun's local
    world size, not the global one) do not outnumber its CPUs."""
    return max(0, min(requested, available_cpus() // max(1, processes)))
