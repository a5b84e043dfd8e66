"""Load any face-embedding checkpoint and embed photos with it: the small API other projects call.

    from inference import FaceEmbedder, distance
    embedder = FaceEmbedder("model_resnet34_triplet.pt")
    a, b = embedder.embed(["alice_1.jpg", "alice_2.jpg"])
    distance(a, b) < embedder.loaded.best_distance_threshold  # True: the same person

`load_checkpoint` reads three layouts, told apart by their state-dict keys (no flag needed):

- "this repository": written by train_triplet.py / train_center.py (``format_version`` 1). It stores the
  image size and normalisation it was trained with, so embedding uses exactly the training preprocessing.
- "original-2020": tamerthamoqa/facenet-pytorch-vggface2 checkpoints from 2020 on, same model layout
  (head ``Linear, BatchNorm1d, ReLU, Linear``) but no preprocessing info: 224 px and mean = std = 0.5.
- "original-2019": that repository's first published model (``model_resnet34_triplet.pt``, 91% on LFW),
  a ResNet with a single ``Linear`` head whose embeddings are scaled to norm 10. Its stored distance
  threshold lives on that scale, so `LegacyResnetTriplet` keeps the scale and distances stay comparable.

Every file is read with ``torch.load(..., weights_only=True)``: a checkpoint is data, and unpickling
arbitrary objects from a downloaded file can run arbitrary code. The original stored its threshold as a
``numpy.float64``, which the safe loader refuses by default, so exactly the globals needed to rebuild that
one scalar type are allowed (`SAFE_NUMPY_GLOBALS`); anything else numpy (arrays, other scalar types) is
still refused.

The file I/O lives here and not in ``models/``, which stays importable without touching disk.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from datasets.image_files import load_image
from datasets.transforms import FACE_MEAN, FACE_STD, eval_transform
from errors import InputError
from models import MODEL_NAMES, build_model

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "LAYOUT_THIS_REPOSITORY",
    "LAYOUT_ORIGINAL_2020",
    "LAYOUT_ORIGINAL_2019",
    "SAFE_NUMPY_GLOBALS",
    "LegacyResnetTriplet",
    "LoadedModel",
    "FaceEmbedder",
    "load_checkpoint",
    "read_checkpoint",
    "detect_layout",
    "embed_images",
    "distance",
]

CHECKPOINT_FORMAT_VERSION = 1  # the newest `format_version` this loader understands

LAYOUT_THIS_REPOSITORY = "this repository"
LAYOUT_ORIGINAL_2020 = "original-2020"
LAYOUT_ORIGINAL_2019 = "original-2019"

# the original repository trained and evaluated at 224 px with mean = std = 0.5 (see its train scripts)
ORIGINAL_IMAGE_SIZE = 224

# What pickling one numpy.float64 refers to: the scalar reconstructor, numpy.dtype (called with "f8"), and
# the dtype's own class, which the unpickler must be allowed to restore state into. numpy 2 moved the
# reconstructor from numpy.core to numpy._core and a pickle names the module it was written under: the
# original repository's files (numpy 1.x) say numpy.core, newer ones numpy._core. Both names are allowed
# explicitly, whichever numpy is installed here.
try:
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # numpy < 1.26 has no numpy._core
    from numpy.core.multiarray import scalar as _numpy_scalar

SAFE_NUMPY_GLOBALS = [
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    type(np.dtype(np.float64)),  # numpy.dtypes.Float64DType
]

# the numbers of residual blocks per stage of each torchvision ResNet, and whether they are bottlenecks
_RESNET_DEPTH_BY_BLOCKS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}


class LegacyResnetTriplet(nn.Module):
    """The original repository's 2019 ResNet triplet model, rebuilt to load its published weights.

    The head is one ``Linear(in_features, embedding_dim)`` at ``model.fc`` and the forward pass returns
    ``10 * normalize(x)``: the original multiplied its unit embeddings by ``alpha = 10``, and its stored
    ``best_distance_threshold`` is on that scale.
    """

    distance_scale = 10.0

    def __init__(self, depth: int = 34, embedding_dim: int = 128):
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        self.model.fc = nn.Linear(self.model.fc.in_features, embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.distance_scale * F.normalize(self.model(images).float(), p=2, dim=1)


@dataclass
class LoadedModel:
    """A model ready to embed (eval mode, on its device) and everything needed to feed and judge it."""

    model: nn.Module
    architecture: str
    embedding_dim: int
    best_distance_threshold: float | None  # on the model's own distance scale
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str
    distance_scale: float  # the norm of every embedding: 1, or 10 for the 2019 model
    epoch: int | None = None
    num_classes: int | None = None
    path: str | None = None

    def transform(self):
        """The preprocessing this model was trained with: PIL image in, normalised tensor out."""
        return face_transform(self.image_size, self.mean, self.std)

    def info(self) -> dict:
        """Plain-data description for logs and JSON reports (everything but the model itself)."""
        return {
            "path": self.path,
            "layout": self.layout,
            "architecture": self.architecture,
            "embedding_dim": self.embedding_dim,
            "num_classes": self.num_classes,
            "epoch": self.epoch,
            "best_distance_threshold": self.best_distance_threshold,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "distance_scale": self.distance_scale,
        }


def face_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """Evaluation preprocessing at `image_size` with the given per-channel normalisation."""
    return eval_transform(image_size, mean=tuple(mean), std=tuple(std))


def read_checkpoint(path) -> dict:
    """The checkpoint dict at `path`, read safely (weights only, numpy float64 scalars allowed)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_NUMPY_GLOBALS), warnings.catch_warnings():
            # files pickled with another protocol load fine but warn; the user can do nothing about it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load on a foreign file raises almost anything
        raise InputError(f"could not read checkpoint {path}: {_load_error_reason(error)}") from None
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def _load_error_reason(error: Exception) -> str:
    """One line saying why torch.load failed, without its multi-paragraph advice to disable safety."""
    message = str(error)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", message) or re.search(
        r"Can only build .* but got <class '([^']+)'>", message
    )
    if refused:
        return (
            f"it needs {refused.group(1)}, which safe (weights-only) loading does not allow; "
            "only tensors, plain Python data and numpy float64 scalars are accepted"
        )
    if isinstance(error, EOFError):
        return "the file is empty or truncated"
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = lines[-1] if lines else ""
    return f"not a PyTorch checkpoint ({type(error).__name__}{': ' + detail if detail else ''})"


def detect_layout(checkpoint: Mapping, path="checkpoint") -> str:
    """Which of the three layouts `checkpoint` is, from its keys; InputError if none."""
    state = checkpoint.get("model_state_dict")
    if not isinstance(state, Mapping) or not state:
        keys = ", ".join(sorted(map(str, checkpoint))[:8]) or "none"
        raise InputError(f"{path} is not a model checkpoint: no 'model_state_dict' (its keys: {keys})")
    if "model.fc.weight" in state and "model.fc.0.weight" not in state:
        return LAYOUT_ORIGINAL_2019
    if any(f"model.{head}.0.weight" in state for head in ("fc", "classif")):
        return LAYOUT_THIS_REPOSITORY if "format_version" in checkpoint else LAYOUT_ORIGINAL_2020
    if any(key.startswith("model.last_linear.") for key in state):
        # the original's Inception-ResNet-v2 heads (a Linear, or Linear + BatchNorm1d) differ from ours
        raise InputError(
            f"{path}: the original repository's Inception-ResNet-v2 checkpoints are not supported"
        )
    raise InputError(
        f"{path}: unknown checkpoint layout (no embedding head at model.fc, model.fc.0 or model.classif.0)"
    )


def load_checkpoint(path, device="cpu", image_size: int | None = None) -> LoadedModel:
    """Rebuild the model stored at `path` in eval mode on `device`, with its preprocessing and threshold.

    `image_size` overrides the size stored in (or assumed for) the checkpoint.
    """
    checkpoint = read_checkpoint(path)
    layout = detect_layout(checkpoint, path)
    state = dict(checkpoint["model_state_dict"])
    if layout == LAYOUT_THIS_REPOSITORY:
        _check_format_version(checkpoint, path)
    architecture = _architecture(checkpoint, state, layout, path)
    embedding_dim = _embedding_dim(state, layout, architecture)
    num_classes = (
        int(state["model.classifier.weight"].shape[0]) if "model.classifier.weight" in state else None
    )

    if layout == LAYOUT_ORIGINAL_2019:
        model = LegacyResnetTriplet(int(architecture.removeprefix("resnet")), embedding_dim)
        # the 2019 center-loss models' classifier plays no part in embedding
        state = {key: value for key, value in state.items() if not key.startswith("model.classifier.")}
    else:
        model = build_model(architecture, embedding_dim, num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        reason = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise InputError(f"{path}: its weights do not fit a {architecture} model ({reason})") from None
    model.to(device).eval()

    image_size_used, mean, std = _preprocessing(checkpoint, layout, path)
    return LoadedModel(
        model=model,
        architecture=architecture,
        embedding_dim=embedding_dim,
        best_distance_threshold=_optional_float(checkpoint.get("best_distance_threshold")),
        image_size=int(image_size) if image_size is not None else image_size_used,
        mean=mean,
        std=std,
        layout=layout,
        distance_scale=float(getattr(model, "distance_scale", 1.0)),
        epoch=_optional_int(checkpoint.get("epoch")),
        num_classes=num_classes,
        path=str(path),
    )


def _check_format_version(checkpoint: Mapping, path) -> None:
    version = checkpoint["format_version"]
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_FORMAT_VERSION:
        raise InputError(
            f"{path} has checkpoint format_version {version!r}; this code reads versions 1 to "
            f"{CHECKPOINT_FORMAT_VERSION} (update the repository to load it)"
        )


def _architecture(checkpoint: Mapping, state: Mapping, layout: str, path) -> str:
    """The registry name of the stored model: its `model_architecture`, or inferred from a ResNet's keys."""
    name = checkpoint.get("model_architecture")
    if name is None:
        depth = resnet_depth_from_keys(state)
        if depth is None:
            raise InputError(
                f"{path} names no model_architecture and its weights are not a torchvision ResNet"
            )
        return f"resnet{depth}"
    name = str(name).lower()
    supported = (
        [n for n in MODEL_NAMES if n.startswith("resnet")] if layout == LAYOUT_ORIGINAL_2019 else MODEL_NAMES
    )
    if name not in supported:
        raise InputError(
            f"{path}: model_architecture {name!r} is not supported; known: {', '.join(supported)}"
        )
    return name


def resnet_depth_from_keys(state: Mapping) -> int | None:
    """18, 34, 50, 101 or 152 for a torchvision ResNet state dict under ``model.``, else None."""
    blocks = tuple(
        len({key.split(".")[2] for key in state if key.startswith(f"model.layer{stage}.")})
        for stage in range(1, 5)
    )
    return _RESNET_DEPTH_BY_BLOCKS.get((blocks, "model.layer1.0.conv3.weight" in state))


def _embedding_dim(state: Mapping, layout: str, architecture: str) -> int:
    """The output size of the embedding head's last Linear layer."""
    if layout == LAYOUT_ORIGINAL_2019:
        return int(state["model.fc.weight"].shape[0])
    head = "classif" if architecture == "inceptionresnetv2" else "fc"
    key = f"model.{head}.3.weight"
    if key not in state:
        raise InputError(f"a {architecture} checkpoint needs {key} in its model_state_dict")
    return int(state[key].shape[0])


def _preprocessing(checkpoint: Mapping, layout: str, path) -> tuple[int, tuple, tuple]:
    """(image_size, mean, std) the model was trained with."""
    if layout != LAYOUT_THIS_REPOSITORY:
        return ORIGINAL_IMAGE_SIZE, tuple(FACE_MEAN), tuple(FACE_STD)
    try:
        image_size = int(checkpoint["image_size"])
        mean = tuple(float(v) for v in checkpoint["normalization"]["mean"])
        std = tuple(float(v) for v in checkpoint["normalization"]["std"])
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{path}: image_size/normalization missing or malformed ({error!r})") from None
    if len(mean) != 3 or len(std) != 3 or image_size < 1 or min(std) <= 0:
        raise InputError(f"{path}: bad image_size {image_size} or normalization mean={mean} std={std}")
    return image_size, mean, std


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def embed_images(model: nn.Module, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """Embeddings (float32) of a preprocessed batch; with `flip`, of each image and its mirror together.

    The flipped embedding is ``normalize(f(x) + f(mirror x))`` rescaled to the model's embedding norm, so a
    2019 model's distances stay on its x10 scale. Both views go through one forward pass: eval-mode
    batch norm makes that identical to two passes, and it keeps the accelerator busier.
    """
    if not flip:
        return model(images).float()
    both = model(torch.cat([images, torch.flip(images, dims=[-1])])).float()
    original, mirrored = both.chunk(2)
    scale = float(getattr(model, "distance_scale", 1.0))
    return scale * F.normalize(original + mirrored, p=2, dim=1)


def distance(embedding1, embedding2):
    """Euclidean distance: a float for two vectors, a float64 numpy array for two (N, D) batches."""
    first = torch.as_tensor(np.asarray(_to_numpy(embedding1), dtype=np.float64))
    second = torch.as_tensor(np.asarray(_to_numpy(embedding2), dtype=np.float64))
    if first.shape != second.shape:
        raise InputError(
            f"cannot compare embeddings of shapes {tuple(first.shape)} and {tuple(second.shape)}"
        )
    distances = torch.linalg.vector_norm(first - second, dim=-1)
    return float(distances) if distances.ndim == 0 else distances.numpy()


def _to_numpy(values):
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values


ImageLike = Image.Image | str | os.PathLike


class FaceEmbedder:
    """Embeds face photos with a loaded checkpoint and the preprocessing it was trained with.

    The photos should be face crops aligned the way the training data was (datasets/align_dataset.py makes
    them); the embedder resizes and normalises them, it does not detect faces.
    """

    def __init__(
        self,
        model: LoadedModel | str | os.PathLike,
        device=None,
        flip: bool = False,
        batch_size: int = 64,
        amp_dtype: torch.dtype | None = None,
        image_size: int | None = None,
    ):
        if isinstance(model, LoadedModel):
            self.loaded = model if image_size is None else replace(model, image_size=image_size)
            if device is not None:
                self.loaded.model.to(device)
        else:
            self.loaded = load_checkpoint(model, device or "cpu", image_size=image_size)
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        self.device = next(self.loaded.model.parameters()).device
        self.flip = flip
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype
        self.transform = self.loaded.transform()

    @classmethod
    def from_checkpoint(cls, path, device="cpu", **kwargs) -> FaceEmbedder:
        return cls(path, device=device, **kwargs)

    def embed(self, images: ImageLike | Iterable[ImageLike]) -> torch.Tensor:
        """(N, embedding_dim) float32 embeddings on the CPU, one row per image (PIL image or file path)."""
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        images = list(images)
        if not images:
            return torch.empty(0, self.loaded.embedding_dim)
        rows = []
        model = self.loaded.model
        model.eval()
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None),
        ):
            for start in range(0, len(images), self.batch_size):
                batch = torch.stack(
                    [self._preprocess(image) for image in images[start : start + self.batch_size]]
                )
                batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
                rows.append(embed_images(model, batch, self.flip).cpu())
        return torch.cat(rows)

    def distance(self, image1: ImageLike, image2: ImageLike) -> float:
        """Distance between the faces in two photos, on the scale of the checkpoint's threshold."""
        first, second = self.embed([image1, image2])
        return distance(first, second)

    def _preprocess(self, image: ImageLike) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            image = _read_image(image)
        return self.transform(image.convert("RGB"))


def _read_image(path) -> Image.Image:
    """The RGB image at `path`, or an InputError naming the file (missing, not an image, truncated)."""
    try:
        return load_image(path)
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"could not read image {path}: {error}") from None
