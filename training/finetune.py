"""Starting a run from another face checkpoint (``--init_from``), and training its head alone first
(``--freeze_backbone_epochs``).

The checkpoint decides the new run's architecture, embedding size and preprocessing (image size, mean, std,
and its face alignment when it names one), so the new training and validation images are prepared as the
checkpoint's were and every checkpoint the run writes says so. A flag given on the command line that
contradicts it is an error; ``--reinit_head`` alone lets ``--embedding_dim`` differ, by training a new
embedding head. The optimizer, the epoch count and the output folder are the new run's own.

The embedding head is the block that maps the backbone's pooled features to the embedding: the original's
``fc`` (Linear, BatchNorm1d, ReLU, Linear) on the ResNets, ``classif`` on Inception-ResNet-v2, ``last_linear``
and ``last_bn`` on Inception-ResNet-v1. Everything else of the embedding model is the backbone; a classifier
over the training identities (center loss) belongs to the loss, not to either.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from checkpoint_loading import LoadedModel, load_for_training, rounded
from datasets.transforms import normalization_entry
from errors import InputError
from models import default_preprocessing
from training.cli import was_given
from training.runtime import log

# the state-dict prefixes of each architecture's embedding head (ResNets: model.fc)
_HEAD_PREFIXES = {
    "inceptionresnetv2": ("model.classif",),
    "inception_resnet_v1": ("model.last_linear", "model.last_bn"),
}
_LOSS_PREFIXES = ("model.classifier",)
ALIGNMENT_REPORT = "alignment_report.json"  # written by datasets/align_dataset.py into its output folder


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def is_head(name: str, architecture: str) -> bool:
    """Whether the parameter, buffer or module ``name`` of an embedding model belongs to its embedding head."""
    return _under(name, _HEAD_PREFIXES.get(architecture, ("model.fc",)))


def is_backbone(name: str, architecture: str) -> bool:
    """Whether ``name`` belongs to the backbone: neither the embedding head nor a classifier of the loss."""
    return not is_head(name, architecture) and not _under(name, _LOSS_PREFIXES)


def settle_run_settings(args: argparse.Namespace, resumed: dict | None) -> LoadedModel | None:
    """Decide the run's model, embedding size and preprocessing; return the --init_from model, or None.

    A resumed run has taken its settings from its checkpoint already (`load_resume_checkpoint`) and ignores
    --init_from: its weights come from the resumed checkpoint. A run from scratch or from --pretrained weights
    normalises as its model requires (inception_resnet_v1: facenet-pytorch's (x - 127.5) / 128).
    """
    source = None
    if resumed is not None:
        if args.init_from is not None:
            log.warning(
                f"--resume_path {args.resume_path}: resuming, so --init_from {args.init_from} is not used"
            )
        return None
    if args.init_from is not None:
        try:
            source = load_for_training(args.init_from, preprocess=args.preprocess)
        except InputError as error:
            raise InputError(f"--init_from: {error}") from None
        adopt_source_settings(args, source)
    else:
        preprocessing = default_preprocessing(args.model)
        if preprocessing is not None:
            args.normalization = normalization_entry(preprocessing.mean, preprocessing.std)
    args.alignment = dataroot_alignment(args.dataroot) or args.alignment
    return source


def adopt_source_settings(args: argparse.Namespace, source: LoadedModel) -> None:
    """The run's --model, --embedding_dim, --image_size and normalisation from the --init_from checkpoint;
    an InputError for a flag given on the command line that contradicts it."""
    path, new_head = args.init_from, args.reinit_head or source.new_head
    if was_given(args, "model") and args.model != source.architecture:
        raise InputError(
            f"--model {args.model} conflicts with --init_from {path}, a {source.architecture} checkpoint: its "
            f"weights fit only a {source.architecture}"
            + (" (--reinit_head replaces the embedding head, not the backbone)" if args.reinit_head else "")
        )
    if not new_head and was_given(args, "embedding_dim") and args.embedding_dim != source.embedding_dim:
        raise InputError(
            f"--embedding_dim {args.embedding_dim} conflicts with --init_from {path}, whose embedding_dim is "
            f"{source.embedding_dim}; add --reinit_head to train a new embedding head of {args.embedding_dim}"
        )
    if was_given(args, "image_size") and args.image_size != source.image_size:
        raise InputError(
            f"--image_size {args.image_size} conflicts with --init_from {path}, which takes {source.image_size} "
            f"px images; leave --image_size out to train at {source.image_size} px"
        )
    args.model = source.architecture
    if not (new_head and was_given(args, "embedding_dim")):
        args.embedding_dim = source.embedding_dim
    args.image_size = source.image_size
    args.normalization = normalization_entry(source.mean, source.std)
    args.alignment = source.alignment.as_dict() if source.alignment_stored else None


def dataroot_alignment(dataroot: str | None) -> dict | None:
    """The face alignment of a --dataroot made by datasets/align_dataset.py (its report's settings), or None."""
    if dataroot is None or not (Path(dataroot) / ALIGNMENT_REPORT).is_file():
        return None
    try:
        settings = json.loads((Path(dataroot) / ALIGNMENT_REPORT).read_text())["settings"]
        return {key: settings[key] for key in ("template", "image_size", "margin")}
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return None  # not a report of align_dataset.py: the alignment stays unknown


def load_initial_weights(model: nn.Module, source: LoadedModel, args: argparse.Namespace) -> None:
    """Copy the --init_from weights into the run's freshly built ``model``.

    Everything but a classifier of the new run (center loss: new identities) comes from the checkpoint, except
    the embedding head when it is new (--reinit_head, or a 2019 source), which keeps its fresh initialisation.
    """
    new_head = args.reinit_head or source.new_head
    state = {
        key: value
        for key, value in source.model.state_dict().items()
        if not (new_head and is_head(key, args.model))
    }
    result = model.load_state_dict(state, strict=False)
    missing = [
        key
        for key in result.missing_keys
        if not _under(key, _LOSS_PREFIXES) and not (new_head and is_head(key, args.model))
    ]
    if missing or result.unexpected_keys:  # the registry built a different model: a bug, not bad input
        raise RuntimeError(
            f"--init_from weights do not fit: missing {missing}, unexpected {result.unexpected_keys}"
        )
    head = (
        f"a new embedding head of {args.embedding_dim}"
        if new_head
        else f"its embedding head ({args.embedding_dim})"
    )
    log.info(
        f"initialised from {source.path} ({source.layout}, {source.architecture}): its backbone and {head}; "
        f"{args.image_size} px, mean {rounded(args.normalization['mean'])}, "
        f"std {rounded(args.normalization['std'])}"
    )


def set_backbone_frozen(model: nn.Module, architecture: str, frozen: bool) -> None:
    """Freeze the backbone (no gradients, batch norm in eval mode: its statistics stay) or let it train again.

    Call after ``model.train()``, which puts every batch-norm layer back in training mode.
    """
    for name, parameter in model.named_parameters():
        if is_backbone(name, architecture):
            parameter.requires_grad_(not frozen)
    if frozen:
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and is_backbone(name, architecture):
                module.eval()


def apply_backbone_freeze(
    model: nn.Module, args: argparse.Namespace, frozen: bool, was_frozen: bool, optimizers
) -> None:
    """Freeze the backbone for an epoch of --freeze_backbone_epochs, or let it train (saying so when that
    changes); once it trains, every SGD parameter gets a momentum buffer (also after a resume past the frozen
    epochs, whose checkpoint holds the head's buffers only)."""
    if frozen or was_frozen:
        set_backbone_frozen(model, args.model, frozen)
    if not frozen:
        complete_momentum_buffers(optimizers)
    if frozen != was_frozen:
        log.info(
            f"the backbone is frozen for the first {args.freeze_backbone_epochs} epoch(s): only the embedding "
            "head and the loss's parameters train"
            if frozen
            else "the backbone trains from now on"
        )


def complete_momentum_buffers(optimizers) -> None:
    """Give every parameter of an SGD optimizer a momentum buffer once any has one.

    After frozen epochs only the head has buffers, and torch's fused SGD kernel takes all or none (a
    TypeError at the first step after the unfreeze, or after a resume past it). With no dampening, torch's
    first step sets a new buffer to the gradient, which a zero buffer gives too: the update is the same.
    """
    for optimizer in optimizers:
        if not isinstance(optimizer, torch.optim.SGD):
            continue
        for group in optimizer.param_groups:
            states = [optimizer.state.get(parameter, {}) for parameter in group["params"]]
            if group["momentum"] == 0 or group["dampening"] != 0:  # a zero buffer is torch's start only then
                continue
            if not any("momentum_buffer" in state for state in states):
                continue
            for parameter in group["params"]:
                state = optimizer.state[parameter]
                if parameter.requires_grad and state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(
                        parameter, memory_format=torch.preserve_format
                    )
