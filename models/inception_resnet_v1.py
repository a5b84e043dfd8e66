"""Inception-ResNet-v1, the FaceNet network of facenet-pytorch, as one of our embedding models.

The network is facenet-pytorch's ``InceptionResnetV1`` (https://github.com/timesler/facenet-pytorch, a port of
David Sandberg's TensorFlow FaceNet), so its published weights load unchanged:
``pretrained="vggface2"`` or ``"casia-webface"`` goes through facenet-pytorch's own ``load_weights``, which
downloads the file once into ``$TORCH_HOME/checkpoints`` (``~/.cache/torch/checkpoints``) and reads it from
there afterwards.

Our conventions on top of it:

- The network lives at ``self.model`` (state-dict keys ``model.conv2d_1a.conv.weight``, ...,
  ``model.last_linear.weight``, ``model.last_bn.*``); its own ``forward`` would L2-normalise, ours stops
  before that so that `EmbeddingModel.forward` normalises in fp32 like every other model here.
- The embedding is the output of ``last_linear`` (1792 -> 512, no bias) + ``last_bn``. With
  ``embedding_dim=512`` (its native size) both keep facenet-pytorch's shapes and take its pretrained
  weights; any other size replaces the two with freshly initialised layers of that size (same structure),
  so the pretrained backbone is kept and only the projection is new.
- facenet-pytorch's ``logits`` layer classifies its training identities (8631 for VGGFace2) and is dropped;
  with ``num_classes`` our own ``model.classifier`` is added, as for the ResNets.
- Its input is 160 px, normalised as ``(x - 127.5) / 128`` (facenet-pytorch's
  ``fixed_image_standardization``), i.e. mean 127.5/255 and std 128/255 in torchvision terms:
  `PREPROCESSING`, which checkpoints record and inference uses.
"""

from __future__ import annotations

import pickle

import torch
from facenet_pytorch import InceptionResnetV1
from torch import nn

from .preprocessing import Preprocessing
from .resnet import EmbeddingModel

__all__ = [
    "NATIVE_EMBEDDING_DIM",
    "PRETRAINED_WEIGHTS",
    "PREPROCESSING",
    "InceptionResnetV1Embedding",
]

NATIVE_EMBEDDING_DIM = 512
PRETRAINED_WEIGHTS = ("vggface2", "casia-webface")


PREPROCESSING = Preprocessing(160, (127.5 / 255,) * 3, (128 / 255,) * 3)


class _FacenetBackbone(InceptionResnetV1):
    """facenet-pytorch's network, its embedding un-normalised, resized to ``embedding_dim``, no logits."""

    def __init__(self, embedding_dim: int, pretrained: str | None, dropout_prob: float):
        try:
            super().__init__(pretrained=pretrained, dropout_prob=dropout_prob)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            # OSError: no network (URLError); the others: a truncated or foreign file in the cache
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise RuntimeError(
                f"could not load facenet-pytorch's {pretrained} weights for inception_resnet_v1 ({reason}); "
                "they download once into $TORCH_HOME/checkpoints: check the network or that cache, "
                "or train without them"
            ) from None
        if hasattr(self, "logits"):
            del self.logits  # the classifier over facenet-pytorch's own training identities
        if embedding_dim != NATIVE_EMBEDDING_DIM:
            self.last_linear = nn.Linear(self.last_linear.in_features, embedding_dim, bias=False)
            self.last_bn = nn.BatchNorm1d(embedding_dim, eps=0.001, momentum=0.1, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # facenet-pytorch's forward up to last_bn, without its F.normalize (EmbeddingModel does that in fp32)
        for layer in (
            self.conv2d_1a,
            self.conv2d_2a,
            self.conv2d_2b,
            self.maxpool_3a,
            self.conv2d_3b,
            self.conv2d_4a,
            self.conv2d_4b,
            self.repeat_1,
            self.mixed_6a,
            self.repeat_2,
            self.mixed_7a,
            self.repeat_3,
            self.block8,
            self.avgpool_1a,
            self.dropout,
        ):
            x = layer(x)
        return self.last_bn(self.last_linear(x.flatten(1)))


class InceptionResnetV1Embedding(EmbeddingModel):
    """facenet-pytorch's Inception-ResNet-v1 as an `EmbeddingModel` (see the module docstring).

    ``pretrained``: None/False, or one of `PRETRAINED_WEIGHTS`. ``dropout_prob`` is facenet-pytorch's
    dropout before ``last_linear`` (its default, 0.6; active in training mode only).
    """

    preprocessing = PREPROCESSING

    def __init__(
        self,
        embedding_dim: int = NATIVE_EMBEDDING_DIM,
        num_classes: int | None = None,
        pretrained: str | None = None,
        dropout_prob: float = 0.6,
    ):
        super().__init__(embedding_dim, num_classes)
        if pretrained is False:
            pretrained = None
        if pretrained is not None and pretrained not in PRETRAINED_WEIGHTS:
            raise ValueError(
                f"inception_resnet_v1 has pretrained weights {' and '.join(map(repr, PRETRAINED_WEIGHTS))}, "
                f"not {pretrained!r}"
            )
        self.pretrained = pretrained
        self.model = _FacenetBackbone(embedding_dim, pretrained, dropout_prob)
        self._add_classifier()
