"""Inception-ResNet-v2 face-embedding models built on timm's ``inception_resnet_v2``.

timm is imported here only, so the ResNet models never pay for it. The embedding head is the same as the
ResNets' (``Linear(1536, 512), BatchNorm1d, ReLU, Linear(512, embedding_dim)``), in timm's head slot
``model.classif``.
"""

from __future__ import annotations

from .resnet import EmbeddingModel, embedding_head


def _timm_inception_resnet_v2(pretrained: bool):
    import timm

    try:
        return timm.create_model("inception_resnet_v2", pretrained=pretrained)
    except (OSError, RuntimeError) as error:  # no network, no hub cache, or a broken download
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RuntimeError(
            f"could not load timm's ImageNet weights for inception_resnet_v2 ({reason}); "
            "check the network or the Hugging Face cache, or start from random weights (--no-pretrained, pretrained=False)"
        ) from None


class InceptionResnetV2Embedding(EmbeddingModel):
    def __init__(self, embedding_dim: int = 128, num_classes: int | None = None, pretrained: bool = False):
        super().__init__(embedding_dim, num_classes)
        self.model = _timm_inception_resnet_v2(pretrained)
        self.model.classif = embedding_head(self.model.num_features, embedding_dim)
        self._add_classifier()


class InceptionResnetV2Triplet(InceptionResnetV2Embedding):
    """Inception-ResNet-v2 embedding model, the original repository's ``InceptionResnetV2Triplet``."""

    def __init__(self, embedding_dimension: int = 128, pretrained: bool = False):
        super().__init__(embedding_dimension, None, pretrained)


class InceptionResnetV2Center(InceptionResnetV2Embedding):
    """Inception-ResNet-v2 with a classifier, the original repository's ``InceptionResnetV2Center``."""

    def __init__(self, num_classes: int, embedding_dimension: int = 128, pretrained: bool = False):
        super().__init__(embedding_dimension, num_classes, pretrained)
