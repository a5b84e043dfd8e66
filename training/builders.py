"""The model, optimizer and learning-rate schedule that the flags describe."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable

import torch
from torch import nn

from errors import InputError, first_line
from models import build_model

OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "poly")


def build_optimizer(
    name: str, parameters: Iterable[nn.Parameter], lr: float, weight_decay: float = 1e-5
) -> torch.optim.Optimizer:
    """The original repository's four optimizers with its settings (its weight decay was 1e-5), and AdamW.

    SGD, Adam and AdamW use torch's fused kernel (one pass over all parameters) where this torch has it for
    the parameters' device (CPU since torch 2.4, CUDA); it saves about 1% of a ResNet-34 step on the CPU
    and updates the weights as the default kernel does, up to rounding. Adagrad keeps the original's kernel.
    """
    if name == "sgd":
        return _fused_if_supported(
            torch.optim.SGD, parameters, lr=lr, momentum=0.9, weight_decay=weight_decay
        )
    if name == "adagrad":
        return torch.optim.Adagrad(
            parameters, lr=lr, initial_accumulator_value=0.1, weight_decay=weight_decay
        )
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, alpha=0.99, eps=1e-8, weight_decay=weight_decay)
    if name == "adam":
        return _fused_if_supported(torch.optim.Adam, parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return _fused_if_supported(torch.optim.AdamW, parameters, lr=lr, weight_decay=weight_decay)
    raise InputError(f"--optimizer {name}: choose one of {', '.join(OPTIMIZERS)}")


def _fused_if_supported(optimizer_class, parameters, **options) -> torch.optim.Optimizer:
    parameters = list(parameters)
    try:
        return optimizer_class(parameters, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without the fused kernel
        return optimizer_class(parameters, **options)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` for its moments and step counts, keeping every option of its param
    groups (lr, weight decay, betas, the kernel: fused or not) as this process built them.

    torch restores the options from the file too. The optimizer was built from the resumed run's flags, which
    are the checkpoint's unless changed on the command line (`training.checkpoint.adopt_resumed_settings`), so
    a new --lr takes effect; and a checkpoint written where the fused kernel exists does not ask for it where
    it does not (nor one written without it switch it off).
    """
    built = [
        {key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups
    ]
    optimizer.load_state_dict(state)
    for group, options in zip(optimizer.param_groups, built, strict=True):
        group.update(options)


def build_embedding_model(
    args: argparse.Namespace, device: torch.device, num_classes: int | None = None
) -> nn.Module:
    """The model on its device, channels_last (faster convolutions on GPUs and on recent CPUs)."""
    try:
        model = build_model(
            args.model, args.embedding_dim, num_classes=num_classes, pretrained=args.pretrained
        )
        return model.to(device, memory_format=torch.channels_last)
    except ValueError as error:  # weights the model has none of, e.g. --pretrained vggface2 on a ResNet
        raise InputError(f"--pretrained {args.pretrained}: {error}") from None
    except RuntimeError as error:
        if is_out_of_memory(error):
            classes = f" and {num_classes} identities" if num_classes else ""
            raise InputError(
                f"--model {args.model} with --embedding_dim {args.embedding_dim}{classes} does not fit in "
                f"the memory of {device} ({first_line(error)})"
            ) from None
        if args.pretrained:  # published weights that could not be downloaded
            raise InputError(f"--pretrained: {error}") from None
        raise


def is_out_of_memory(error: RuntimeError) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's (a plain RuntimeError saying it cannot allocate)."""
    return isinstance(error, torch.OutOfMemoryError) or "allocate" in str(error)


class LearningRateSchedule:
    """The lr of every param group of ``optimizers`` as a pure function of the global step.

    lr = base lr (the group's ``initial_lr``) x warmup x decay, where warmup rises linearly over the first
    ``warmup_steps`` steps (margin losses at scale 64 diverge from scratch without it) and decay is
    ``constant``; ``cosine`` (to zero over the run, stepped per epoch, as the seed did); or ``poly``
    ((1 - progress)^2 over the steps after warmup, as arcface_torch's PolyScheduler). Being a function of the
    position alone, it needs no state to resume: `apply(step)` at any step sets the right lr.
    """

    def __init__(self, name, optimizers, epochs: int, steps_per_epoch: int, warmup_steps: int = 0):
        if name not in LR_SCHEDULES:
            raise InputError(f"--lr_schedule {name}: choose one of {', '.join(LR_SCHEDULES)}")
        self.name, self.optimizers = name, list(optimizers)
        self.epochs, self.steps_per_epoch = epochs, max(1, steps_per_epoch)
        self.total_steps = epochs * self.steps_per_epoch
        self.warmup_steps = min(warmup_steps, self.total_steps)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])

    @classmethod
    def for_run(cls, args, optimizers, epochs: int, steps_per_epoch: int) -> LearningRateSchedule:
        """The schedule a run's flags ask for: ``--lr_schedule`` over ``epochs``, ``--warmup_epochs`` of them
        (any fraction) in whole steps, half a step rounding up and any warmup lasting at least one step."""
        warmup_epochs = getattr(args, "warmup_epochs", 0.0)
        warmup_steps = math.floor(warmup_epochs * max(1, steps_per_epoch) + 0.5)
        if warmup_epochs > 0:
            warmup_steps = max(1, warmup_steps)
        return cls(args.lr_schedule, optimizers, epochs, steps_per_epoch, warmup_steps)

    def factor(self, step: int) -> float:
        """The multiplier of the base lr at global step ``step`` (0-based)."""
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.name == "cosine":
            epoch = min(step // self.steps_per_epoch, self.epochs)
            return warmup * (1 + math.cos(math.pi * epoch / self.epochs)) / 2
        if self.name == "poly":
            after = max(0, step - self.warmup_steps)
            progress = min(1.0, after / max(1, self.total_steps - self.warmup_steps))
            return warmup * (1 - progress) ** 2
        return warmup

    def apply(self, step: int) -> None:
        factor = self.factor(step)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor

    def state_dict(self) -> dict:
        """What the schedule is (for the record: resuming recomputes the lr from the position)."""
        return {"name": self.name, "epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch,
                "warmup_steps": self.warmup_steps}  # fmt: skip
