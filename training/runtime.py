"""Where and how this process computes: device, torchrun process group, precision, seeds, logging.

Settled once by `setup_runtime`, before anything is built; the loop then only calls ``.to(runtime.device)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from devices import auto_amp, resolve_amp, resolve_device
from errors import InputError

log = logging.getLogger("facenet")


@dataclass
class Runtime:
    """This process's device, its place among the torchrun processes, and its autocast dtype."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    amp_dtype: torch.dtype | None = None
    eval_amp_dtype: torch.dtype | None = None  # validation's autocast (fp32 on the CPU under --amp auto)
    local_world_size: int = 1  # the processes on this machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def use_grad_scaler(self) -> bool:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none
        return self.amp_dtype == torch.float16


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Device, process group (under torchrun, PyTorch's own c10d rendezvous) and precision."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world_size > 1 and ":" in args.device:
        raise InputError(
            f"--device {args.device} with {world_size} processes would put every process on one GPU; "
            "use --device cuda (each process takes its local GPU) or auto"
        )
    device = resolve_device(args.device, local_rank)
    if rank == 0 and (warning := restart_store_warning(os.environ)):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # 30 minutes for a collective (NCCL's default is 10): the other processes wait in one while rank 0
        # validates and writes the checkpoint, which on many --val_targets or a large sharded classifier on a
        # slow shared disk can take minutes. A process that fails does not make the others wait for this:
        # they learn of it within a second (training.coordination.FailureWatch).
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30)
        )
    runtime = Runtime(device, rank, world_size, local_rank, local_world_size=local_world_size)
    set_precision(runtime, args)
    return runtime


def set_precision(runtime: Runtime, args: argparse.Namespace) -> None:
    """The autocast dtypes of ``args.amp`` on this device (again, once a resumed run adopted its --amp)."""
    runtime.amp_dtype = resolve_amp(args.amp, runtime.device)
    runtime.eval_amp_dtype = resolve_amp(args.amp, runtime.device, training=False)


def restart_store_warning(environ) -> str | None:
    """What to do when torchrun restarts workers on a rendezvous store it shares with them, or None.

    With that sharing (torchrun's default since PyTorch 2.4), a restarted attempt can read the previous
    attempt's connection keys and fail to connect (pytorch/pytorch#135712, #167288); this repository's
    test of --max_restarts fails that way with gloo and passes with the sharing off.
    """
    shared = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not shared or int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) == 0:
        return None
    return (
        "torchrun --max_restarts with its rendezvous store shared with the workers: a restart can fail to "
        "connect (pytorch/pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun"
    )


def precision_note(args: argparse.Namespace, runtime: Runtime) -> str:
    """What precision the run uses and, under --amp auto, why."""
    if args.amp == "auto":
        return f"--amp auto chose {auto_amp(runtime.device)[1]}"
    return f"mixed precision {runtime.amp_dtype or 'off'} (--amp {args.amp})"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """One seed per epoch, so an epoch's data and augmentation do not depend on what ran before (exact resume)."""
    return seed * 100_003 + epoch


# the packages a run's data and checkpoints go through: their warnings (an unreadable image replaced, pairs
# skipped) are the run's too, so they reach train.log as well as the console
RUN_MODULE_LOGGERS = ("datasets", "checkpoint_loading")


def configure_logging(output_dir: Path | None, is_main: bool) -> None:
    """Messages to stdout (warnings only on the other ranks) and, on the main process, to train.log; the
    warnings of RUN_MODULE_LOGGERS go to both as well."""
    close_run_logs()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if output_dir is not None and is_main:
        to_file = logging.FileHandler(output_dir / "train.log")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(to_file)
    for name in RUN_MODULE_LOGGERS:
        for handler in log.handlers:
            logging.getLogger(name).addHandler(handler)


def close_run_logs() -> None:
    """Detach and close the run's log handlers (train.log can then be deleted or reopened)."""
    for handler in log.handlers:
        for name in RUN_MODULE_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
    log.handlers.clear()


def all_reduce_sum(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Sum over the processes, in place (nothing to do in a single process)."""
    if runtime.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()
