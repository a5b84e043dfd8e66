"""Reading face-embedding checkpoints: which layout a file is, its preprocessing, its model, safely.

`load_checkpoint` reads five layouts, told apart by their keys (no flag needed):

- "this repository": written by train_triplet.py / train_center.py / train_margin.py (``format_version``
  1). It stores the image size and normalisation it was trained with, so embedding uses exactly the training
  preprocessing, and may store the face alignment its training crops had (``alignment``).
- "original-2020": tamerthamoqa/facenet-pytorch-vggface2 checkpoints from 2020 on, same model layout
  (head ``Linear, BatchNorm1d, ReLU, Linear``) but no preprocessing info. Its 2020 models were trained at
  224 px with mean = std = 0.5 (preset "original-2020", the default); a file of this layout trained at
  140 px with the VGGFace2 mean and std loads with ``preprocess="original-2021"``.
- "original-2021": the same repository after its move to Glint360K (facenet-pytorch-glint360k, its
  98.45% ResNet-34 at 512 dimensions): a single ``Linear`` head without bias and plain unit embeddings,
  trained at 140 px with the mean and std of its tightly cropped faces (preset "original-2021").
- "original-2019": that repository's first published model (``model_resnet34_triplet.pt``, 91% on LFW),
  a ResNet with a single ``Linear`` head whose embeddings are scaled to norm 10. Its stored distance
  threshold lives on that scale, so `LegacyResnetTriplet` keeps the scale and distances stay comparable.
- "facenet-pytorch": a plain ``InceptionResnetV1`` state dict as facenet-pytorch publishes and saves it
  (e.g. ``20180402-114759-vggface2.pt``), loaded as our ``inception_resnet_v1`` (its ``logits`` layer over
  its training identities is dropped) with its preprocessing, 160 px and ``(x - 127.5) / 128``. It stores no
  distance threshold.

Preprocessing (`PREPROCESS_PRESETS`, ``preprocess=``): what a checkpoint of this repository stores always
wins, since it is what the model was trained with; a preset given for such a checkpoint that differs is
ignored with a one-line warning. For the other layouts, which store none, the preset given is used, else the
layout's own ("original-2020" for both original layouts, "facenet-pytorch" for that one). ``image_size``
overrides the size last.

Every file is read with ``torch.load(..., weights_only=True)``: a checkpoint is data, and unpickling
arbitrary objects from a downloaded file can run arbitrary code. The original stored its threshold as a
``numpy.float64``, which the safe loader refuses by default, so exactly the globals needed to rebuild that
one scalar type are allowed (`SAFE_NUMPY_GLOBALS`); anything else numpy (arrays, other scalar types) is
still refused.

The file I/O lives here and not in ``models/``, which stays importable without touching disk.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from datasets.face_alignment import Alignment, default_alignment
from datasets.transforms import eval_transform
from errors import InputError, no_file_reason
from models import MODEL_NAMES, Preprocessing, build_model, min_image_size
from models.preprocessing import PREPROCESS_PRESETS, preset_help

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "LAYOUT_THIS_REPOSITORY",
    "LAYOUT_ORIGINAL_2020",
    "LAYOUT_ORIGINAL_2019",
    "LAYOUT_ORIGINAL_2021",
    "LAYOUT_FACENET_PYTORCH",
    "PREPROCESS_PRESETS",
    "SAFE_NUMPY_GLOBALS",
    "Alignment",
    "LegacyResnetTriplet",
    "LoadedModel",
    "default_alignment",
    "load_checkpoint",
    "load_for_training",
    "preset_help",
    "read_checkpoint",
    "detect_layout",
]

CHECKPOINT_FORMAT_VERSION = 1  # the newest `format_version` this loader understands

LAYOUT_THIS_REPOSITORY = "this repository"
LAYOUT_ORIGINAL_2020 = "original-2020"
LAYOUT_ORIGINAL_2019 = "original-2019"
LAYOUT_ORIGINAL_2021 = "original-2021"
# the original's layouts whose embedding head is one Linear at model.fc: LegacyResnetTriplet's options
_LINEAR_HEAD_LAYOUTS = {
    LAYOUT_ORIGINAL_2019: {"bias": True, "distance_scale": 10.0},
    LAYOUT_ORIGINAL_2021: {"bias": False, "distance_scale": 1.0},
}
LAYOUT_FACENET_PYTORCH = "facenet-pytorch"

_LAYOUT_PRESET = {
    LAYOUT_ORIGINAL_2020: "original-2020",
    LAYOUT_ORIGINAL_2019: "original-2020",
    LAYOUT_ORIGINAL_2021: "original-2021",
    LAYOUT_FACENET_PYTORCH: "facenet-pytorch",
}

# what a checkpoint of facenet-pytorch's InceptionResnetV1 holds at the top level, and its class's logits
_FACENET_KEYS = (
    "conv2d_1a.conv.weight",
    "conv2d_4b.conv.weight",
    "last_linear.weight",
    "last_bn.running_mean",
)
# a key only Inception-ResNet-v1 has (the v2 models, timm's and the original's, have no conv2d_4b)
_INCEPTION_RESNET_V1_KEY = "model.conv2d_4b.conv.weight"

logger = logging.getLogger(__name__)

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
    """The original repository's 2019 and 2021 ResNet triplet models, rebuilt to load their published weights.

    The head is one ``Linear(in_features, embedding_dim)`` at ``model.fc``. 2019: with a bias, and the
    forward pass returns ``10 * normalize(x)`` (the original multiplied its unit embeddings by
    ``alpha = 10``, and its stored ``best_distance_threshold`` is on that scale). 2021: no bias, unit
    embeddings (``bias=False, distance_scale=1.0``).
    """

    def __init__(
        self, depth: int = 34, embedding_dim: int = 128, bias: bool = True, distance_scale: float = 10.0
    ):
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.distance_scale = float(distance_scale)
        self.model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        self.model.fc = nn.Linear(self.model.fc.in_features, embedding_dim, bias=bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.distance_scale * F.normalize(self.model(images).float(), p=2, dim=1)


@dataclass
class LoadedModel:
    """A model ready to embed (eval mode, on its device) and everything needed to feed and judge it.

    `load_for_training` returns one in training mode on the CPU instead, to fine-tune.
    """

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
    alignment: Alignment | None = None  # None: default_alignment(image_size)
    preprocess: str | None = None  # the preset used, None when the checkpoint stores its preprocessing
    alignment_stored: bool = False  # whether ``alignment`` is the checkpoint's own entry, not the default
    alignment_given: bool = False  # set from --template / --crop_margin (inference.resolve_alignment)
    new_head: bool = False  # load_for_training only: the embedding head is new, not the checkpoint's
    # set when the stored threshold was measured on other weights than these: what it was measured on
    threshold_note: str | None = None
    # the --amp choice the training run validated in (bf16, fp16, off), when its checkpoint says
    validation_precision: str | None = None

    def __post_init__(self):
        if self.alignment is None:
            self.alignment = default_alignment(self.image_size)

    @property
    def alignment_source(self) -> str:
        """Where ``alignment`` comes from: the checkpoint, the command line, or a guess for its input size."""
        if self.alignment_given:
            return "command line"
        return "checkpoint" if self.alignment_stored else "guessed: not stored in the checkpoint"

    def transform(self):
        """The preprocessing this model was trained with: PIL image in, normalised tensor out."""
        return eval_transform(self.image_size, mean=tuple(self.mean), std=tuple(self.std))

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
            "preprocess": self.preprocess,
            "alignment": self.alignment.as_dict(),
            "alignment_source": self.alignment_source,
            "distance_scale": self.distance_scale,
        }


def read_checkpoint(path) -> dict:
    """The checkpoint dict at `path`, read safely (weights only, numpy float64 scalars allowed)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}: {no_file_reason(path)}")
    try:
        with torch.serialization.safe_globals(SAFE_NUMPY_GLOBALS), warnings.catch_warnings():
            # files pickled with another protocol load fine but warn; the user can do nothing about it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load on a foreign file raises almost anything
        raise InputError(f"could not read checkpoint {path}: {_load_error_reason(error)}") from None
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    checkpoint = _without_module_prefix(checkpoint)
    if isinstance(checkpoint.get("model_state_dict"), dict):
        checkpoint["model_state_dict"] = _without_module_prefix(checkpoint["model_state_dict"])
    return checkpoint


def _without_module_prefix(state: dict) -> dict:
    """A state dict saved from a model wrapped in nn.DataParallel / DDP has every key prefixed ``module.``:
    the same weights without it (anything else unchanged)."""
    prefix = "module."
    if state and all(isinstance(key, str) and key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items()}
    return state


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
    """Which of the five layouts `checkpoint` is, from its keys; InputError if none."""
    if "model_state_dict" not in checkpoint and all(key in checkpoint for key in _FACENET_KEYS):
        return LAYOUT_FACENET_PYTORCH
    state = checkpoint.get("model_state_dict")
    if not isinstance(state, Mapping) or not state:
        keys = ", ".join(sorted(map(str, checkpoint))[:8]) or "none"
        raise InputError(f"{path} is not a model checkpoint: no 'model_state_dict' (its keys: {keys})")
    if "model.fc.weight" in state and "model.fc.0.weight" not in state:
        return LAYOUT_ORIGINAL_2019 if "model.fc.bias" in state else LAYOUT_ORIGINAL_2021
    if any(f"model.{head}.0.weight" in state for head in ("fc", "classif")):
        return LAYOUT_THIS_REPOSITORY if "format_version" in checkpoint else LAYOUT_ORIGINAL_2020
    if _INCEPTION_RESNET_V1_KEY in state:
        if "format_version" not in checkpoint:
            raise InputError(
                f"{path}: an Inception-ResNet-v1 model_state_dict without format_version is no layout known "
                "here (facenet-pytorch's own files are a plain state dict, without model_state_dict)"
            )
        return LAYOUT_THIS_REPOSITORY
    if any(key.startswith("model.last_linear.") for key in state):
        # the original's Inception-ResNet-v2 heads (a Linear, or Linear + BatchNorm1d) differ from ours
        raise InputError(
            f"{path}: the original repository's Inception-ResNet-v2 checkpoints are not supported"
        )
    raise InputError(
        f"{path}: unknown checkpoint layout (no embedding head at model.fc, model.fc.0 or model.classif.0)"
    )


def load_checkpoint(
    path, device="cpu", image_size: int | None = None, preprocess: str | None = None
) -> LoadedModel:
    """Rebuild the model stored at `path` in eval mode on `device`, with its preprocessing and threshold.

    `preprocess` names a `PREPROCESS_PRESETS` entry for checkpoints that store no preprocessing (see the
    module docstring for which wins); `image_size` overrides the size stored, preset or assumed.
    """
    loaded = _load(path, preprocess, image_size, num_classes=None, keep_classifier=True)
    loaded.model.to(device).eval()
    return loaded


def load_for_training(path, num_classes: int | None = None, preprocess: str | None = None) -> LoadedModel:
    """The checkpoint's model to fine-tune from (``--init_from``): a registry model in training mode on the CPU.

    The `LoadedModel` carries what training needs to continue in the same way: ``architecture``,
    ``embedding_dim``, ``image_size``, ``mean``, ``std`` and ``alignment`` (crop the new training photos
    like that). Its model is an ``EmbeddingModel`` of ``build_model(architecture, embedding_dim,
    num_classes)`` with every parameter trainable; with ``num_classes`` a new, randomly initialised
    classifier of that size replaces any stored one (the stored one classifies the old identities), and
    without it none is kept. The 2019 and 2021 layouts' heads (one Linear) have no counterpart among the
    models trained here: the backbone is loaded under a new, randomly initialised embedding head of the
    stored size, and ``new_head`` says so (the distance threshold, of the old head, is dropped).
    """
    return _load(path, preprocess, None, num_classes=num_classes, keep_classifier=False)


def _load(
    path, preprocess: str | None, image_size: int | None, num_classes: int | None, keep_classifier: bool
) -> LoadedModel:
    """The checkpoint at `path` as a LoadedModel on the CPU, in training mode."""
    _check_load_options(preprocess, image_size)
    checkpoint = read_checkpoint(path)
    layout = detect_layout(checkpoint, path)
    state = _model_state(checkpoint, layout, path)
    architecture = _architecture(checkpoint, state, layout, path)
    embedding_dim = _embedding_dim(state, layout, architecture)
    if keep_classifier:  # the 2019 center-loss models' classifier plays no part in embedding
        stored = layout not in _LINEAR_HEAD_LAYOUTS and "model.classifier.weight" in state
        num_classes = int(state["model.classifier.weight"].shape[0]) if stored else None
    model, state, new_head = _model_for(
        layout, architecture, embedding_dim, num_classes, state, keep_classifier
    )
    _load_weights(model, state, architecture, path, keep_classifier, new_head)
    preprocessing, preset_used = _preprocessing(checkpoint, layout, path, preprocess)
    measured_size = preprocessing.image_size  # the input size the stored threshold was measured at
    if image_size is not None:
        if int(image_size) < min_image_size(architecture):  # the size training refuses for this model
            raise InputError(
                f"--image_size {image_size}: {architecture} needs at least {min_image_size(architecture)} px"
            )
        preprocessing = preprocessing._replace(image_size=int(image_size))
    # a new head's distances are on another scale than the stored threshold's
    threshold = None if new_head else _stored_threshold(checkpoint, path)
    return LoadedModel(
        model=model,
        architecture=architecture,
        embedding_dim=embedding_dim,
        best_distance_threshold=threshold,
        image_size=preprocessing.image_size,
        mean=preprocessing.mean,
        std=preprocessing.std,
        layout=layout,
        distance_scale=float(getattr(model, "distance_scale", 1.0)),
        epoch=_optional_int(checkpoint, "epoch", path),
        num_classes=num_classes,
        path=str(path),
        alignment=_alignment(checkpoint, path, preprocessing.image_size),
        preprocess=preset_used,
        alignment_stored=checkpoint.get("alignment") is not None,
        new_head=new_head,
        threshold_note=None if threshold is None else _threshold_note(checkpoint, measured_size, image_size),
        validation_precision=_validation_precision(checkpoint),
    )


def _validation_precision(checkpoint: Mapping) -> str | None:
    value = checkpoint.get("validation_precision")
    return value if value in ("bf16", "fp16", "off") else None


def _model_for(
    layout: str, architecture: str, embedding_dim: int, num_classes, state: Mapping, keep_classifier: bool
) -> tuple[nn.Module, dict, bool]:
    """The model to load ``state`` into, ``state`` without what that model does not take, and whether the
    model's embedding head is new (fine-tuning a 2019 or 2021 model: its single Linear has no counterpart here)."""
    if not keep_classifier or layout in _LINEAR_HEAD_LAYOUTS:
        state = {key: value for key, value in state.items() if not key.startswith("model.classifier.")}
    if layout not in _LINEAR_HEAD_LAYOUTS:
        return build_model(architecture, embedding_dim, num_classes), state, False
    if keep_classifier:
        depth = int(architecture.removeprefix("resnet"))
        return LegacyResnetTriplet(depth, embedding_dim, **_LINEAR_HEAD_LAYOUTS[layout]), state, False
    state = {key: value for key, value in state.items() if not key.startswith("model.fc.")}
    return build_model(architecture, embedding_dim, num_classes), state, True


def _check_load_options(preprocess: str | None, image_size: int | None) -> None:
    if preprocess is not None and preprocess not in PREPROCESS_PRESETS:
        raise InputError(
            f"unknown preprocessing preset {preprocess!r}; choose one of {', '.join(PREPROCESS_PRESETS)}"
        )
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 1):
        raise InputError(f"image_size must be a positive integer, got {image_size!r}")


def _model_state(checkpoint: Mapping, layout: str, path) -> dict:
    """The model's weights under our ``model.`` keys, checked to be of a layout this use can take."""
    if layout == LAYOUT_FACENET_PYTORCH:
        # its logits classify facenet-pytorch's own training identities: not part of the embedding
        return {f"model.{key}": value for key, value in checkpoint.items() if not key.startswith("logits.")}
    if layout == LAYOUT_THIS_REPOSITORY:
        _check_format_version(checkpoint, path)
    return dict(checkpoint["model_state_dict"])


def _load_weights(
    model: nn.Module, state: Mapping, architecture: str, path, keep_classifier: bool, new_head: bool = False
) -> None:
    """Load ``state``; only a new classifier (fine-tuning on other identities) or a new head may be missing."""
    missing_allowed = set() if keep_classifier else {"model.classifier.weight", "model.classifier.bias"}
    if new_head:
        missing_allowed |= {key for key in model.state_dict() if key.startswith("model.fc.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ
        raise InputError(
            f"{path}: its weights do not fit a {architecture} model ({_first_reason(error)})"
        ) from None
    missing = [key for key in result.missing_keys if key not in missing_allowed]
    if missing or result.unexpected_keys:
        what = f"missing {missing[0]}" if missing else f"unexpected {result.unexpected_keys[0]}"
        count = len(missing) + len(result.unexpected_keys)
        raise InputError(
            f"{path}: its weights do not fit a {architecture} model ({what}"
            + (f" and {count - 1} more keys)" if count > 1 else ")")
        )


def _first_reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)


def _check_format_version(checkpoint: Mapping, path) -> None:
    version = checkpoint["format_version"]
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_FORMAT_VERSION:
        raise InputError(
            f"{path} has checkpoint format_version {version!r}; this code reads versions 1 to "
            f"{CHECKPOINT_FORMAT_VERSION} (update the repository to load it)"
        )


def _architecture(checkpoint: Mapping, state: Mapping, layout: str, path) -> str:
    """The registry name of the stored model: its `model_architecture`, or inferred from a ResNet's keys."""
    if layout == LAYOUT_FACENET_PYTORCH:
        return "inception_resnet_v1"
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
        [n for n in MODEL_NAMES if n.startswith("resnet")] if layout in _LINEAR_HEAD_LAYOUTS else MODEL_NAMES
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
    if layout in _LINEAR_HEAD_LAYOUTS:
        return int(state["model.fc.weight"].shape[0])
    if architecture == "inception_resnet_v1":
        key = "model.last_linear.weight"
    else:
        key = f"model.{'classif' if architecture == 'inceptionresnetv2' else 'fc'}.3.weight"
    if key not in state:
        raise InputError(f"a {architecture} checkpoint needs {key} in its model_state_dict")
    return int(state[key].shape[0])


def _preprocessing(
    checkpoint: Mapping, layout: str, path, preset: str | None
) -> tuple[Preprocessing, str | None]:
    """The preprocessing the model was trained with, and the name of the preset it came from (or None)."""
    if layout != LAYOUT_THIS_REPOSITORY:
        name = preset or _LAYOUT_PRESET[layout]
        return PREPROCESS_PRESETS[name], name
    try:
        image_size = int(checkpoint["image_size"])
        mean = tuple(float(v) for v in checkpoint["normalization"]["mean"])
        std = tuple(float(v) for v in checkpoint["normalization"]["std"])
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{path}: image_size/normalization missing or malformed ({error!r})") from None
    if (
        len(mean) != 3
        or len(std) != 3
        or image_size < 1
        or not all(map(math.isfinite, mean + std))
        or min(std) <= 0
    ):
        raise InputError(f"{path}: bad image_size {image_size} or normalization mean={mean} std={std}")
    stored = Preprocessing(image_size, mean, std)
    if preset is not None and not _same_preprocessing(PREPROCESS_PRESETS[preset], stored):
        logger.warning(
            "%s stores the preprocessing it was trained with (%d px, mean %s, std %s); ignoring preset %s",
            path,
            image_size,
            rounded(mean),
            rounded(std),
            preset,
        )
    return stored, None


def _same_preprocessing(first: Preprocessing, second: Preprocessing) -> bool:
    return first.image_size == second.image_size and all(
        math.isclose(a, b, abs_tol=1e-6)
        for a, b in zip(first.mean + first.std, second.mean + second.std, strict=True)
    )


def rounded(values) -> str:
    """Mean or std values for a message: (0.5, 0.5, 0.5)."""
    return "(" + ", ".join(f"{value:.4g}" for value in values) + ")"


def _alignment(checkpoint: Mapping, path, image_size: int) -> Alignment:
    """The checkpoint's ``alignment`` entry, checked, or the default crop for its input size."""
    entry = checkpoint.get("alignment")
    return default_alignment(image_size) if entry is None else Alignment.from_entry(entry, path)


def _stored_threshold(checkpoint: Mapping, path) -> float | None:
    """The checkpoint's best_distance_threshold: None, or a positive finite distance (else an InputError)."""
    value = checkpoint.get("best_distance_threshold")
    if value is None:
        return None
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = math.nan
    if not (math.isfinite(threshold) and threshold > 0):
        raise InputError(f"{path}: best_distance_threshold {value!r} is not a positive distance")
    return threshold


def _optional_int(checkpoint: Mapping, key: str, path) -> int | None:
    value = checkpoint.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{path}: {key} {value!r} is not a whole number")
    return int(value)


def _threshold_note(checkpoint: Mapping, measured_size: int, image_size: int | None) -> str | None:
    """Why the stored threshold may not separate these embeddings' pairs, or None.

    It is that of the last validation: with --lfw_validation_epoch_interval > 1, and in interrupted or
    --checkpoint_every_steps checkpoints of this repository, the weights saved have trained on since. And
    distances shrink or grow with the input size, so it holds only at the size it was measured at."""
    notes = []
    history, epoch = checkpoint.get("history"), checkpoint.get("epoch")
    # the original's layouts have no history: their threshold is the saved epoch's
    if isinstance(history, Mapping) and isinstance(epoch, int):
        validated = history.get("validated_epochs") or []
        step = checkpoint.get("step_in_epoch") or 0
        if validated and (validated[-1] != epoch or step):
            where = f"epoch {epoch}" + (f" plus {step} steps" if step else "")
            notes.append(f"it was measured after epoch {validated[-1]}, and these weights are from {where}")
    if image_size is not None and int(image_size) != measured_size:
        notes.append(
            f"it was measured at {measured_size} px input, and these embeddings are made at {int(image_size)} px"
        )
    return "; ".join(notes) or None
