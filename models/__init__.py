"""Face-embedding models and a registry of them by name.

``build_model("resnet34", embedding_dim=128)`` is what the scripts call; the original repository's class
names (``Resnet34Triplet``, ``Resnet34Center``, ``InceptionResnetV2Triplet``, ...) stay importable.

Pretrained weights (``pretrained=``): ``False`` (none), ``True`` or ``"imagenet"`` (ImageNet, the ResNets and
``inceptionresnetv2``), ``"vggface2"`` or ``"casia-webface"`` (face weights, ``inception_resnet_v1`` only);
`pretrained_weights` lists what each model accepts. `default_preprocessing` is the input a model insists on
(``inception_resnet_v1``: 160 px, facenet-pytorch's normalisation), None when the training flags decide.
"""

from __future__ import annotations

from .preprocessing import Preprocessing
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

MODEL_NAMES = tuple(f"resnet{depth}" for depth in RESNET_DEPTHS) + (
    "inceptionresnetv2",
    "inception_resnet_v1",
)


def min_image_size(name: str) -> int:
    """The smallest input side worth training ``name`` on: Inception's stem needs 75 px; a ResNet takes any
    size, but below 32 px (one pixel of its last feature map) its last stages see little but padding."""
    return 75 if name.startswith("inception") else 32


# the named weights each model can start from; True means "imagenet"
_FACE_WEIGHTS = (
    "vggface2",
    "casia-webface",
)  # = inception_resnet_v1.PRETRAINED_WEIGHTS, without importing it


def pretrained_weights(name: str) -> tuple[str, ...]:
    """The values besides False that ``build_model(name, pretrained=...)`` accepts (True = "imagenet")."""
    _check_name(name)
    return _FACE_WEIGHTS if name == "inception_resnet_v1" else ("imagenet",)


def default_preprocessing(name: str):
    """The input a model must get, as ``Preprocessing(image_size, mean, std)``, or None if it has no own.

    Only ``inception_resnet_v1`` has one (160 px, ``(x - 127.5) / 128``: what its published weights were
    trained with); the others take the repository's default normalisation at ``--image_size``.
    """
    _check_name(name)
    if name != "inception_resnet_v1":
        return None
    from .inception_resnet_v1 import PREPROCESSING

    return PREPROCESSING


def build_model(
    name: str, embedding_dim: int = 128, num_classes: int | None = None, pretrained: bool | str = False
) -> EmbeddingModel:
    """The embedding model called ``name`` (one of ``MODEL_NAMES``); with ``num_classes``, a classifier too.

    ``pretrained``: False, True / "imagenet", or a name from ``pretrained_weights(name)``; another value, or
    a name the model has no weights for, is a ValueError.
    """
    _check_name(name)
    weights = _weights_name(name, pretrained)
    if name == "inception_resnet_v1":
        from .inception_resnet_v1 import InceptionResnetV1Embedding  # imports facenet_pytorch, when asked for

        return InceptionResnetV1Embedding(embedding_dim, num_classes, weights)
    if name == "inceptionresnetv2":
        from .inceptionresnetv2 import InceptionResnetV2Embedding  # imports timm, so only when asked for

        return InceptionResnetV2Embedding(embedding_dim, num_classes, weights is not None)
    return ResNetEmbedding(int(name.removeprefix("resnet")), embedding_dim, num_classes, weights is not None)


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def _weights_name(name: str, pretrained: bool | str | None) -> str | None:
    """``pretrained`` as the name of the weights to load, or None for none."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        pretrained = "imagenet"
    choices = pretrained_weights(name)
    if pretrained not in choices:
        allowed = ["False", "True"] if choices == ("imagenet",) else ["False"]
        allowed += [repr(choice) for choice in choices]
        raise ValueError(
            f"{name} has no {pretrained!r} weights; pretrained may be {', '.join(allowed[:-1])} or {allowed[-1]}"
        )
    return pretrained


def __getattr__(name: str):
    # the Inception-ResNet-v2 aliases without importing timm for users who never ask for them
    if name in ("InceptionResnetV2Triplet", "InceptionResnetV2Center", "InceptionResnetV2Embedding"):
        from . import inceptionresnetv2

        return getattr(inceptionresnetv2, name)
    if name == "InceptionResnetV1Embedding":  # and facenet_pytorch only for those who use it
        from . import inception_resnet_v1

        return inception_resnet_v1.InceptionResnetV1Embedding
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MODEL_NAMES",
    "build_model",
    "min_image_size",
    "pretrained_weights",
    "default_preprocessing",
    "Preprocessing",
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
