"""The model, optimizer and learning-rate schedule that the flags describe."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch
from torch import nn

from errors import InputError
from models import build_model

OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adam")


def build_optimizer(name: str, parameters: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The original repository's four optimizers with its settings (weight decay 1e-5 on all)."""
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=1e-5)
    if name == "adagrad":
        return torch.optim.Adagrad(parameters, lr=lr, initial_accumulator_value=0.1, weight_decay=1e-5)
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, alpha=0.99, eps=1e-8, weight_decay=1e-5)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=1e-5)
    raise InputError(f"--optimizer {name}: choose one of {', '.join(OPTIMIZERS)}")


def build_embedding_model(
    args: argparse.Namespace, device: torch.device, num_classes: int | None = None
) -> nn.Module:
    """The model on its device, channels_last (faster convolutions on GPUs and on recent CPUs)."""
    try:
        model = build_model(
            args.model, args.embedding_dim, num_classes=num_classes, pretrained=args.pretrained
        )
    except RuntimeError as error:  # ImageNet weights that could not be downloaded
        raise InputError(f"--pretrained: {error}") from None
    return model.to(device, memory_format=torch.channels_last)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, epochs: int):
    """Stepped once per epoch: ``cosine`` decays to zero over ``epochs``; ``constant`` keeps the lr."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
