"""Embed photos with any face-embedding checkpoint: the small API other projects call.

    from inference import FaceEmbedder, distance
    embedder = FaceEmbedder("model_resnet34_triplet.pt")
    a, b = embedder.embed(["alice_1.jpg", "alice_2.jpg"])
    distance(a, b) < embedder.loaded.best_distance_threshold  # True: the same person

Checkpoints of every supported layout are read by `checkpoint_loading` (re-exported here: `load_checkpoint`,
`LoadedModel`, the presets, ...).

Face alignment (``FaceEmbedder(align=True)``): photos are detected and aligned with the MTCNN pipeline of
datasets/align_dataset.py, into the crop geometry the checkpoint's ``alignment`` entry names
(``{"template": "none" | "arcface112", "image_size": int, "margin": int}``, the settings of
align_dataset.py). Without one the default is the square crop at the model's input size with the seed's
margin scaled to it: template "none", margin ``round(32 * image_size / 160)`` (160 px -> 32).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

import checkpoint_loading
from checkpoint_loading import *  # noqa: F403 - the loading API stays importable from here, as before
from checkpoint_loading import (
    Alignment,
    LoadedModel,
    default_alignment,
    load_checkpoint,
)
from datasets.face_alignment import TEMPLATES
from datasets.image_files import DECODE_ERRORS, to_rgb
from errors import InputError

__all__ = [*checkpoint_loading.__all__, "FaceEmbedder", "embed_images", "decision_threshold", "distance"]


# face detection settings of FaceEmbedder(align=True): the defaults of datasets/align_dataset.py
MIN_FACE_PROB = 0.9
MIN_FACE_SIZE = 20  # pixels of the detection view; larger is faster when faces are known to be large
DETECTION_MAX_SIDE = 640

logger = logging.getLogger(__name__)


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


def check_threshold(threshold: float | None) -> None:
    """A ``--threshold`` given must be a positive, finite distance (-1 would make every pair "different")."""
    if threshold is not None and not (np.isfinite(threshold) and threshold > 0):
        raise InputError(f"--threshold must be a positive distance, got {threshold}")


def decision_threshold(
    threshold: float | None, stored: float | None, model_path, flip: bool = False, note: str | None = None
) -> float:
    """The distance below which two faces are the same person: ``threshold`` when given, else the one the
    checkpoint stored (its best LFW threshold); an InputError when there is neither.

    The stored threshold was chosen on embeddings of unflipped images; with ``flip`` the distances come out
    shorter (the average of two views), so more pairs would pass it: a warning says how to get the right one.
    ``note`` (``LoadedModel.threshold_note``) says when it was measured on earlier weights: a warning too.
    """
    if threshold is not None:
        return threshold
    if stored is None:
        raise InputError(f"{model_path} stores no best_distance_threshold; pass --threshold")
    if note:
        logger.warning(
            "%s: the stored threshold %.4f is the last validation's: %s; validate_on_LFW.py on this "
            "checkpoint prints its own, to pass as --threshold",
            model_path,
            stored,
            note,
        )
    if flip:
        logger.warning(
            "--flip with the checkpoint's threshold %.4f, which was chosen without flipping: flipped distances "
            "are shorter, so more pairs pass it; validate_on_LFW.py --flip prints the threshold to pass as "
            "--threshold",
            stored,
        )
    return stored


def add_alignment_flags(parser) -> None:
    """--template / --crop_margin: how raw photos are cropped, for checkpoints that do not say (or to override)."""
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        default=None,
        help="the crops the model was trained on: none (a square around the face box plus --crop_margin) or "
        "arcface112 (the 5-landmark ArcFace warp, as in insightface's .rec sets); default: the checkpoint's "
        "alignment entry, else none",
    )
    parser.add_argument(
        "--crop_margin",
        type=int,
        default=None,
        help="--template none: output pixels around the face box; default: the checkpoint's, else "
        "round(32 * input size / 160)",
    )


def resolve_alignment(loaded: LoadedModel, template: str | None, crop_margin: int | None, used: bool) -> None:
    """Set ``loaded.alignment`` from --template / --crop_margin; ``used``: whether photos will be aligned
    (--align). Warns when raw photos are cropped without the checkpoint saying how its crops were made."""
    if template is None and crop_margin is None:
        if used and not loaded.alignment_stored:
            logger.warning(
                "%s does not say how its training crops were made: raw photos are cropped as a square around "
                "the face with margin %d; pass --template arcface112 if it was trained on ArcFace-warped crops "
                "(insightface's .rec sets), or --crop_margin",
                loaded.path,
                loaded.alignment.margin,
            )
        return
    if not used:
        raise InputError("--template and --crop_margin set how --align crops raw photos; add --align")
    template = template or ("none" if crop_margin is not None else loaded.alignment.template)
    if template == "arcface112":
        if crop_margin is not None:
            raise InputError(
                "--crop_margin applies to --template none (the ArcFace template fixes the framing)"
            )
        # the checkpoint's own ArcFace crop size (224 for some sets), else the template's 112
        alignment = (
            loaded.alignment if loaded.alignment.template == "arcface112" else Alignment("arcface112", 112, 0)
        )
    else:
        # the same template keeps the checkpoint's crop size (align_dataset's 182/44 for VGGFace2, resized to
        # the model's input); from another template, the default square crop at the input size
        same = loaded.alignment.template == "none"
        size = loaded.alignment.image_size if same else loaded.image_size
        if crop_margin is not None:
            margin = crop_margin
        else:
            margin = loaded.alignment.margin if same else default_alignment(size).margin
        if not 0 <= margin < size:
            raise InputError(f"--crop_margin must be in [0, {size}) for {size} px input, got {margin}")
        alignment = Alignment("none", size, margin)
    if loaded.alignment_stored and alignment != loaded.alignment:
        logger.warning(
            "%s was trained on %s crops; using %s as asked",
            loaded.path,
            loaded.alignment.as_dict(),
            alignment.as_dict(),
        )
    loaded.alignment = alignment
    loaded.alignment_given = True


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

    Without ``align`` the photos must be face crops aligned the way the training data was
    (datasets/align_dataset.py makes them); the embedder only resizes and normalises them. With ``align``
    they may be any photos: each is searched for faces with MTCNN (datasets/mtcnn.py, the detector of
    align_dataset.py with its settings) and the face is cropped into the checkpoint's alignment geometry
    (``loaded.alignment``, or ``alignment`` given here) before embedding. A photo with no face is an
    InputError naming it; with several, the one with the largest box area is embedded and a one-line warning
    names the photo and the count. (align_dataset.py's `select_face` also weighs how central a face is, which
    suits a dataset of portraits; here the largest box is the rule, simple to predict on any photo.)
    """

    def __init__(
        self,
        model: LoadedModel | str | os.PathLike,
        device=None,
        flip: bool = False,
        batch_size: int = 64,
        amp_dtype: torch.dtype | None = None,
        image_size: int | None = None,
        preprocess: str | None = None,
        align: bool = False,
        alignment: Alignment | None = None,
        min_face_size: int | None = None,
    ):
        if isinstance(model, LoadedModel):
            if preprocess is not None:
                raise InputError("preprocess goes with a checkpoint path; this model is loaded already")
            self.loaded = model if image_size is None else replace(model, image_size=image_size)
            if device is not None:
                self.loaded.model.to(device)
        else:
            self.loaded = load_checkpoint(
                model, device or "cpu", image_size=image_size, preprocess=preprocess
            )
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        self.device = _module_device(self.loaded.model)
        self.flip = flip
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype
        self.transform = self.loaded.transform()
        self.align = align
        self.alignment = alignment or self.loaded.alignment
        self.min_face_size = MIN_FACE_SIZE if min_face_size is None else min_face_size
        self._detector = None

    @classmethod
    def from_checkpoint(cls, path, device="cpu", **kwargs) -> FaceEmbedder:
        return cls(path, device=device, **kwargs)

    def embed(self, images: ImageLike | Iterable[ImageLike]) -> torch.Tensor:
        """(N, embedding_dim) float32 embeddings on the CPU, one row per image (PIL image or file path).

        An image that cannot be read, or (with ``align``) shows no face, is an InputError naming it.
        """
        embeddings, errors = self.try_embed(images)
        for error in errors:
            if error is not None:
                raise InputError(error)
        return embeddings

    def try_embed(self, images: ImageLike | Iterable[ImageLike]) -> tuple[torch.Tensor, list[str | None]]:
        """Like `embed`, but a failed image gives a row of NaN and its one-line reason instead of an error.

        Returns the (N, embedding_dim) embeddings and, per image, None or why it has no embedding.
        """
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        images = list(images)
        embeddings = torch.full((len(images), self.loaded.embedding_dim), float("nan"))
        errors: list[str | None] = [None] * len(images)
        model = self.loaded.model
        was_training = model.training
        model.eval()
        try:
            self._embed_into(embeddings, errors, images)
        finally:
            model.train(was_training)  # a model being fine-tuned goes back to training mode
        return embeddings, errors

    def _embed_into(self, embeddings: torch.Tensor, errors: list[str | None], images: list) -> None:
        model = self.loaded.model
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            tensors, rows = [], []
            for offset, face in enumerate(self._faces(chunk, start)):
                if isinstance(face, str):
                    errors[start + offset] = face
                else:
                    tensors.append(self.transform(face))
                    rows.append(start + offset)
            if not tensors:
                continue
            batch = torch.stack(tensors).to(self.device).contiguous(memory_format=torch.channels_last)
            with (
                torch.inference_mode(),
                torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None),
            ):
                embeddings[rows] = embed_images(model, batch, self.flip).cpu()

    def distance(self, image1: ImageLike, image2: ImageLike) -> float:
        """Distance between the faces in two photos, on the scale of the checkpoint's threshold."""
        first, second = self.embed([image1, image2])
        return distance(first, second)

    def aligned_faces(self, images: Iterable[ImageLike]) -> list[Image.Image]:
        """The aligned face crop of each photo (detected as with ``align=True``); InputError if one has none."""
        images = list(images)
        faces = self._detect_and_align(images, 0)
        for face in faces:
            if isinstance(face, str):
                raise InputError(face)
        return faces

    def _faces(self, images: Sequence[ImageLike], first_index: int) -> list[Image.Image | str]:
        """What gets embedded for each image (the RGB image, or its aligned face), or why there is none."""
        if self.align:
            return self._detect_and_align(images, first_index)
        faces = []
        for image in images:
            try:
                faces.append(to_rgb(image) if isinstance(image, Image.Image) else _read_image(image))
            except InputError as error:
                faces.append(str(error))
        return faces

    def _detect_and_align(self, images: Sequence[ImageLike], first_index: int) -> list[Image.Image | str]:
        from datasets.face_alignment import align_face
        from datasets.mtcnn import FaceDetector, detection_view, to_photo_coordinates

        if self._detector is None:
            self._detector = FaceDetector(device=self.device, min_face_size=self.min_face_size)
        results: list[Image.Image | str] = []
        photos, views, shrinks, names, slots = [], [], [], [], []
        for index, image in enumerate(images):
            name = _image_name(image, first_index + index)
            try:
                photo = to_rgb(image) if isinstance(image, Image.Image) else _read_photo(image)
            except InputError as error:
                results.append(str(error))
                continue
            view, shrink = detection_view(photo, DETECTION_MAX_SIDE)
            photos.append(photo)
            views.append(view)
            shrinks.append(shrink)
            names.append(name)
            slots.append(len(results))
            results.append("")
        for photo, faces, shrink, name, slot in zip(
            photos, self._detector.detect(views), shrinks, names, slots, strict=True
        ):
            faces = [face for face in faces if face.prob >= MIN_FACE_PROB]
            if not faces:
                results[slot] = f"no face found in {name}"
                continue
            largest = max(faces, key=_box_area)
            if len(faces) > 1:
                logger.warning("%s: %d faces found; using the largest", name, len(faces))
            face = to_photo_coordinates(largest, shrink)
            alignment = self.alignment
            results[slot] = align_face(
                photo, face, alignment.template, alignment.image_size, alignment.margin
            )
        return results


def _module_device(module: nn.Module) -> torch.device:
    """Where a module's tensors are (its parameters, else its buffers; the CPU for a module with neither)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _box_area(face) -> float:
    x1, y1, x2, y2 = (float(value) for value in face.box)
    return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


def _image_name(image: ImageLike, index: int) -> str:
    return f"image {index}" if isinstance(image, Image.Image) else str(image)


def _read_image(path) -> Image.Image:
    """The RGB image at `path`, or an InputError naming the file (missing, not an image, truncated)."""
    return _read_photo(path, upright=False)


def _read_photo(path, upright: bool = True) -> Image.Image:
    """The RGB image at `path`, turned upright by its EXIF orientation when `upright` (raw camera photos)."""
    try:
        with Image.open(path) as image:
            return to_rgb(ImageOps.exif_transpose(image) if upright else image)
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except DECODE_ERRORS as error:
        raise InputError(f"could not read image {path}: {error}") from None
