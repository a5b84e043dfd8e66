"""torch.hub entry points: this repository's models by name, and models loaded from checkpoints.

    model = torch.hub.load(REPO_DIR, "resnet34", source="local", embedding_dim=128)
    model = torch.hub.load(REPO_DIR, "inception_resnet_v1", source="local", pretrained="vggface2")
    model = torch.hub.load(REPO_DIR, "from_checkpoint", source="local", path="model.pt")
    embedder = torch.hub.load(REPO_DIR, "face_embedder", source="local", path="model.pt", align=True)

One entry per name of ``models.MODEL_NAMES`` (``build_model``'s arguments: ``embedding_dim``,
``num_classes``, ``pretrained``); nothing downloads unless ``pretrained`` asks for weights that are not
cached yet: torchvision's ImageNet ResNets in ``$TORCH_HOME/hub/checkpoints``, facenet-pytorch's in
``$TORCH_HOME/checkpoints``, timm's Inception-ResNet-v2 in the Hugging Face cache. ``from_checkpoint`` returns the embedding model of any checkpoint that inference.py
reads, in eval mode, with the `LoadedModel` description at ``model.loaded_info``; ``face_embedder`` returns
an ``inference.FaceEmbedder`` (photos in, embeddings out, with the checkpoint's preprocessing).
"""

from __future__ import annotations

# imported under private names: torch.hub.list() shows every public callable of this file as an entry
import inference as _inference
import models as _models

# what torch.hub checks is importable before it imports this file (facenet_pytorch is needed for
# inception_resnet_v1 and face alignment, timm for inceptionresnetv2; both only when used)
dependencies = ["torch", "torchvision", "numpy", "PIL"]


def _registry_entry(name: str):
    def entry(
        embedding_dim: int | None = None, num_classes: int | None = None, pretrained: bool | str = False
    ):
        if embedding_dim is None:
            embedding_dim = _native_embedding_dim(name)
        return _models.build_model(name, embedding_dim, num_classes, pretrained)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"The {name} embedding model of this repository: build_model({name!r}, embedding_dim, num_classes, "
        "pretrained); embedding_dim defaults to 512 for inception_resnet_v1 (its published weights' size), "
        "else 128. Its forward returns L2-normalised float32 embeddings."
    )
    return entry


def _native_embedding_dim(name: str) -> int:
    """inception_resnet_v1: 512, the size its published face weights end at (any other size replaces that
    head with a random one); the others: 128, the training scripts' default."""
    if name == "inception_resnet_v1":
        from models.inception_resnet_v1 import NATIVE_EMBEDDING_DIM

        return NATIVE_EMBEDDING_DIM
    return 128


for _name in _models.MODEL_NAMES:
    globals()[_name] = _registry_entry(_name)


def from_checkpoint(path, device="cpu", preprocess: str | None = None, image_size: int | None = None):
    """The embedding model stored at ``path`` (any layout inference.py reads), in eval mode on ``device``.

    ``model.loaded_info`` describes it: preprocessing (image_size, mean, std), threshold, layout, alignment.
    """
    loaded = _inference.load_checkpoint(path, device, image_size=image_size, preprocess=preprocess)
    loaded.model.loaded_info = loaded.info()
    return loaded.model


def face_embedder(path, device="cpu", **kwargs):
    """An ``inference.FaceEmbedder`` for the checkpoint at ``path``; keyword arguments go to FaceEmbedder."""
    return _inference.FaceEmbedder(path, device=device, **kwargs)
