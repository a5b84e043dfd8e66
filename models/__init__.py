"""Face-embedding models and a registry of them by name.

``build_model("resnet34", embedding_dim=128)`` is what the scripts call; the original repository's class
names (``Resnet34Triplet``, ``Resnet34Center``, ``InceptionResnetV2Triplet``, ...) stay importable.
"""

from __future__ import annotations

from .resnet import (
    RESNET_DEPTHS,
    EmbeddingModel,
    Resnet18Center,
    Resnet18Triplet,
    Resnet34Center,
    Resnet34Triplet,
    Resnet50Center,
    Resnet50Triplet,
    Resnet101Center,
    Resnet101Triplet,
    Resnet152Center,
    Resnet152Triplet,
    ResNetEmbedding,
)

MODEL_NAMES = tuple(f"resnet{depth}" for depth in RESNET_DEPTHS) + ("inceptionresnetv2",)


def build_model(
    name: str, embedding_dim: int = 128, num_classes: int | None = None, pretrained: bool = False
) -> EmbeddingModel:
    """The embedding model called ``name`` (one of ``MODEL_NAMES``); with ``num_classes``, a classifier too."""
    if name == "inceptionresnetv2":
        from .inceptionresnetv2 import InceptionResnetV2Embedding  # imports timm, so only when asked for

        return InceptionResnetV2Embedding(embedding_dim, num_classes, pretrained)
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return ResNetEmbedding(int(name.removeprefix("resnet")), embedding_dim, num_classes, pretrained)


def __getattr__(name: str):
    # the Inception-ResNet-v2 aliases without importing timm for users who never ask for them
    if name in ("InceptionResnetV2Triplet", "InceptionResnetV2Center", "InceptionResnetV2Embedding"):
        from . import inceptionresnetv2

        return getattr(inceptionresnetv2, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MODEL_NAMES",
    "build_model",
    "EmbeddingModel",
    "ResNetEmbedding",
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
