"""ResNet face-embedding models built on torchvision.

This file is self-contained on purpose: copy it alone into another project and

    from resnet import Resnet34Triplet
    model = Resnet34Triplet(embedding_dimension=ckpt["embedding_dimension"])
    model.load_state_dict(ckpt["model_state_dict"])

works with only torch and torchvision installed.

State-dict layout (identical to tamerthamoqa/facenet-pytorch-vggface2's 2020 models, so weights move both ways;
its 2019 and 2021 single-Linear heads load through checkpoint_loading.py):
the torchvision backbone lives at ``model.``; its ``fc`` is the embedding head
``Sequential(Linear(in_features, 512), BatchNorm1d(512), ReLU(), Linear(512, embedding_dim))``
(keys ``model.fc.0.*``, ``model.fc.1.*``, ``model.fc.3.*``); models trained with a classifier (center loss)
add ``model.classifier = Linear(embedding_dim, num_classes)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

__all__ = [
    "RESNET_DEPTHS",
    "EmbeddingModel",
    "ResNetEmbedding",
    "embedding_head",
    "Resnet18Triplet",
    "Resnet34Triplet",
    "Resnet50Triplet",
    "Resnet101Triplet",
    "Resnet152Triplet",
    "Resnet18Center",
    "Resnet34Center",
    "Resnet50Center",
    "Resnet101Center",
    "Resnet152Center",
]

RESNET_DEPTHS = (18, 34, 50, 101, 152)


def embedding_head(in_features: int, embedding_dim: int) -> nn.Sequential:
    """The original repository's embedding head; indices 0, 1 and 3 carry weights."""
    return nn.Sequential(
        nn.Linear(in_features, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(inplace=True),
        nn.Linear(512, embedding_dim),
    )


def _torchvision_resnet(depth: int, pretrained: bool) -> nn.Module:
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"unknown ResNet depth {depth}; choose one of {RESNET_DEPTHS}")
    builder = getattr(torchvision.models, f"resnet{depth}")
    if not pretrained:
        return builder(weights=None)
    weights = torchvision.models.get_weight(f"ResNet{depth}_Weights.IMAGENET1K_V1")
    try:
        return builder(weights=weights)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a truncated download a RuntimeError
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RuntimeError(
            f"could not load torchvision's ImageNet weights for resnet{depth} ({reason}); "
            "check the network or the torch hub cache, or start from random weights (--no-pretrained, pretrained=False)"
        ) from None


class EmbeddingModel(nn.Module):
    """What every embedding model here shares: a backbone at ``self.model`` whose output is the raw embedding.

    ``forward`` returns L2-normalised embeddings of shape (N, embedding_dim). With ``num_classes`` set, the
    model also owns ``self.model.classifier`` on top of the embedding (for cross-entropy + center-loss
    training) and ``forward_training`` returns ``(embeddings, logits)``.
    """

    model: nn.Module

    def __init__(self, embedding_dim: int, num_classes: int | None):
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes

    def _add_classifier(self) -> None:
        if self.num_classes is not None:
            self.model.classifier = nn.Linear(self.embedding_dim, self.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # normalise in fp32: under autocast the head runs in bf16/fp16, whose rounding leaves
        # half-precision "unit" vectors visibly off unit length
        return F.normalize(self.model(images).float(), p=2, dim=1)

    def forward_training(
        self, images: torch.Tensor, logit_scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and classifier logits; ``logit_scale`` multiplies the unit-norm embedding first.

        Softmax over logits of a unit vector saturates early (every logit is bounded by the weight norm), so
        cross-entropy learns slowly at scale 1; the training script passes a larger scale (see README.md).
        """
        if self.num_classes is None:
            raise RuntimeError("this model has no classifier; build it with num_classes to train with it")
        embeddings = self.forward(images)
        logits = self.model.classifier(embeddings * logit_scale)
        return embeddings, logits


class ResNetEmbedding(EmbeddingModel):
    """A torchvision ResNet of the given depth with the original repository's embedding head."""

    def __init__(
        self,
        depth: int = 34,
        embedding_dim: int = 128,
        num_classes: int | None = None,
        pretrained: bool = False,
    ):
        super().__init__(embedding_dim, num_classes)
        self.depth = depth
        self.model = _torchvision_resnet(depth, pretrained)
        self.model.fc = embedding_head(self.model.fc.in_features, embedding_dim)
        self._add_classifier()


def _triplet_alias(depth: int) -> type:
    def __init__(self, embedding_dimension: int = 128, pretrained: bool = False):
        ResNetEmbedding.__init__(self, depth, embedding_dimension, None, pretrained)

    name = f"Resnet{depth}Triplet"
    doc = f"ResNet-{depth} embedding model, the original repository's ``{name}``."
    return type(name, (ResNetEmbedding,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


def _center_alias(depth: int) -> type:
    def __init__(self, num_classes: int, embedding_dimension: int = 128, pretrained: bool = False):
        ResNetEmbedding.__init__(self, depth, embedding_dimension, num_classes, pretrained)

    name = f"Resnet{depth}Center"
    doc = f"ResNet-{depth} embedding model with a classifier, the original repository's ``{name}``."
    return type(name, (ResNetEmbedding,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


# the names users of the original import, as thin aliases with the original constructor signatures
Resnet18Triplet = _triplet_alias(18)
Resnet34Triplet = _triplet_alias(34)
Resnet50Triplet = _triplet_alias(50)
Resnet101Triplet = _triplet_alias(101)
Resnet152Triplet = _triplet_alias(152)
Resnet18Center = _center_alias(18)
Resnet34Center = _center_alias(34)
Resnet50Center = _center_alias(50)
Resnet101Center = _center_alias(101)
Resnet152Center = _center_alias(152)
