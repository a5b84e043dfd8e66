"""One optimisation step, after the task's forward: the loss DDP should see, backward, and the optimizers.

`StepOutput` is what a task's step returns. `loss_for_ddp` weights this process's loss by its share of the
step's samples, so that DDP's average of the gradients is the gradient of the mean over every process's
samples. `backward_and_step` runs backward, the gradient scaler (fp16 only), clipping and the optimizer steps;
`agree_on_overflow` makes every optimizer of every process skip an fp16 overflow together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from training.runtime import Runtime, all_reduce_sum

if TYPE_CHECKING:
    from training.engine import TrainingTask


@dataclass
class StepOutput:
    """What a task's step returns: the loss to back-propagate and the bookkeeping of the epoch average."""

    loss: torch.Tensor  # mean over the samples trained on (a zero with a graph when there were none)
    loss_sum: torch.Tensor  # loss x number of samples, detached
    count: torch.Tensor  # number of samples (triplets, images) the loss is a mean over
    # whether ``loss`` is already the mean over every process's samples with gradients to match (the sharded
    # margin classifier); otherwise it is this process's own mean, and the trainer weights it by its share
    global_mean: bool = False


def loss_for_ddp(out: StepOutput, global_count: float, world_size: int) -> torch.Tensor:
    """The loss whose gradient, once DDP has averaged it over the W processes, is that of the mean over every
    process's samples: this process's mean weighted by W x its share of them (``global_count`` is the
    all-reduced count). The shares differ when the processes keep different numbers of triplets; unweighted,
    each of a process's triplets would count 1 / (W x that process's count) instead of 1 / global_count."""
    if world_size == 1 or out.global_mean:
        return out.loss
    return out.loss * (world_size * out.count.to(out.loss.dtype) / max(global_count, 1.0))


def backward_and_step(
    task: TrainingTask,
    loss: torch.Tensor,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
    runtime: Runtime | None = None,
) -> bool:
    """Backward and the task's optimizer steps; the scaler is a no-op unless training in fp16. Returns whether
    the optimizers stepped (False: an fp16 gradient overflow, see `agree_on_overflow`).

    ``clip_grad_norm`` (--clip_grad_norm) bounds the total gradient norm of the model (the backbone and its
    head, as arcface_torch clips its backbone), measured on the true gradients: after unscaling. Under DDP the
    gradients are already averaged, so every process clips by the same factor.
    """
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    scaler.scale(loss).backward()
    for optimizer in task.optimizers:
        scaler.unscale_(optimizer)
    overflow = scaler.is_enabled() and agree_on_overflow(scaler, task.optimizers, runtime)
    if clip_grad_norm is not None and not overflow:
        nn.utils.clip_grad_norm_(task.model.parameters(), clip_grad_norm)
    task.before_optimizer_step()
    for optimizer in task.optimizers:
        scaler.step(optimizer)  # skipped when its inf flag is set
    scaler.update()
    for optimizer in task.optimizers:
        optimizer.zero_grad(set_to_none=True)
    return not overflow


def agree_on_overflow(scaler: torch.amp.GradScaler, optimizers, runtime: Runtime | None = None) -> bool:
    """After ``unscale_``: whether any optimizer of any process met an inf or NaN gradient. If one did, every
    optimizer of every process is marked as having met one, so GradScaler skips them all and every process
    lowers its scale alike. Left to itself GradScaler decides per optimizer and per process: the model could
    skip a step its centers take, and a process whose own classifier shard overflowed would lower its scale
    alone, after which DDP would average gradients scaled differently. One all-reduce; fp16 runs only.

    The flags are GradScaler's per-optimizer ``found_inf_per_device`` tensors (its state since PyTorch 1.6).
    """
    flags = [
        flag
        for optimizer in optimizers
        for flag in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values()
    ]
    device = flags[0].device if flags else torch.device("cpu")
    found = (
        torch.stack([flag.to(device) for flag in flags]).sum() if flags else torch.zeros((), device=device)
    )
    if runtime is not None:
        found = all_reduce_sum(found.reshape(1).double(), runtime)[0]
    overflow = bool(found.item() > 0)
    for flag in flags:
        flag.fill_(float(overflow))
    return overflow
