"""How the processes of a run stay in step.

One all-reduce per step (the one host sync a step needs) carries the step's loss sum and count, whether its
loss was finite, whether a stop was requested (SIGINT / SIGTERM) and whether the step failed, on every
process. So all processes apply or skip the same steps, stop after the same step, and an exception on one
process ends every process at once with that process's message, instead of leaving the others waiting in a
collective until its timeout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from errors import InputError, one_line
from training.runtime import Runtime, all_reduce_sum


class RankFailed(RuntimeError):
    """A process of the run failed; every process raises this with its message."""

    def __init__(self, message: str, input_error: bool):
        super().__init__(message)
        self.input_error = input_error


@dataclass
class StepVerdict:
    """What all processes agreed on after a step's forward pass."""

    loss_sum: float  # summed over the processes
    count: float
    nonfinite: bool  # some process's loss was not finite: skip the step everywhere
    stop: bool  # some process was asked to stop: stop after this step everywhere
    failed_rank: int | None  # the first process whose step raised


def agree_on_step(out, failed: bool, stop_requested: bool, runtime: Runtime) -> StepVerdict:
    """All-reduce a step's bookkeeping and flags; ``out`` is the task's StepOutput (None when it failed)."""
    device = runtime.device
    flags = torch.zeros(2 + runtime.world_size, dtype=torch.float64)
    flags[0] = float(stop_requested)
    flags[2 + runtime.rank] = float(failed)
    if out is None:
        measured = torch.zeros(3, dtype=torch.float64, device=device)
    else:
        nonfinite = (~torch.isfinite(out.loss_sum)).double()
        measured = torch.stack([out.loss_sum.double().nan_to_num(), out.count.double(), nonfinite])
    stats = all_reduce_sum(torch.cat([measured, flags.to(device, non_blocking=True)]), runtime).tolist()
    failed_ranks = [rank for rank, flag in enumerate(stats[5:]) if flag]
    return StepVerdict(
        loss_sum=stats[0],
        count=stats[1],
        nonfinite=bool(stats[2]),
        stop=bool(stats[3]),
        failed_rank=failed_ranks[0] if failed_ranks else None,
    )


def raise_shared_failure(error: BaseException | None, failed_rank: int, runtime: Runtime):
    """Every process raises `RankFailed` with the failed process's one-line message (it broadcasts it)."""
    payload = [None]
    if runtime.rank == failed_rank:
        payload = [(isinstance(error, InputError), one_line(error) or type(error).__name__)]
    dist.broadcast_object_list(payload, src=failed_rank)
    input_error, message = payload[0]
    raise RankFailed(f"rank {failed_rank}: {message}", input_error)


def check_for_failure(error: BaseException | None, runtime: Runtime) -> None:
    """Outside the step loop (validation, logging): re-raise alone, or agree with the others first."""
    if not runtime.distributed:
        if error is not None:
            raise error
        return
    flags = torch.zeros(runtime.world_size, dtype=torch.float64)
    flags[runtime.rank] = float(error is not None)
    failed = [
        rank for rank, flag in enumerate(all_reduce_sum(flags.to(runtime.device), runtime).tolist()) if flag
    ]
    if failed:
        raise_shared_failure(error, failed[0], runtime)
