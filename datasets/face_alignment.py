"""Turning a detected face into an aligned crop: a square with a margin, or a warp onto the ArcFace template.

- `square_box_with_margin` + `crop_square`: the seed's crop, a square around the face box plus a margin in
  output pixels (as facenet-pytorch does), resized to the output size.
- `warp_to_template`: a similarity warp of the five landmarks onto the standard 112x112 ArcFace template
  (the alignment of `../shared/data/lfw_112`), estimated with `umeyama_similarity`.

`Alignment` names which of the two made a model's training crops, and at what size and margin (a checkpoint's
``alignment`` entry), so that raw photos can be cropped the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from errors import InputError

# The five-point template of InsightFace's arcface_torch (eyes, nose tip, mouth corners) for 112x112 crops,
# https://github.com/deepinsight/insightface/blob/master/python-package/insightface/utils/face_align.py
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)
TEMPLATES = ("none", "arcface112")


@dataclass(frozen=True)
class Alignment:
    """How raw photos are turned into the crops a model was trained on (datasets/align_dataset.py's flags)."""

    template: str  # "none": square crop around the face box plus margin; "arcface112": landmark warp
    image_size: int  # side of the crop in pixels (the model's transform resizes it to its input size)
    margin: int  # output pixels around the face box ("none" only; 0 for "arcface112")

    def as_dict(self) -> dict:
        """The checkpoint's ``alignment`` entry."""
        return {"template": self.template, "image_size": self.image_size, "margin": self.margin}

    @classmethod
    def from_entry(cls, entry, path) -> Alignment:
        """A checkpoint's ``alignment`` entry, checked; an InputError naming ``path`` when it is not one."""
        try:
            alignment = cls(str(entry["template"]), int(entry["image_size"]), int(entry["margin"]))
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(
                f"{path}: alignment entry malformed ({error!r}); expected template, image_size, margin"
            ) from None
        if alignment.template not in TEMPLATES or alignment.image_size < 1:
            raise InputError(f"{path}: bad alignment {entry!r} (templates: {', '.join(TEMPLATES)})")
        if not 0 <= alignment.margin < alignment.image_size or (
            alignment.template != "none" and alignment.margin
        ):
            raise InputError(f"{path}: bad alignment margin in {entry!r}")
        return alignment


def default_alignment(image_size: int) -> Alignment:
    """The crop assumed for a checkpoint that names none: square, the seed's 32 px margin at 160 px, scaled."""
    return Alignment("none", int(image_size), round(32 * image_size / 160))


def umeyama_similarity(src, dst):
    """Least-squares similarity transform (rotation, uniform scale, translation) taking `src` to `dst`.

    Umeyama 1991, "Least-squares estimation of transformation parameters between two point patterns"
    (https://doi.org/10.1109/34.88573), without reflections. Returns the 2x3 matrix M with dst ~ M @ [x, y, 1].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_centered, dst_centered = src - src_mean, dst - dst_mean
    covariance = dst_centered.T @ src_centered / len(src)
    u, singular_values, vt = np.linalg.svd(covariance)
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal map would mirror: forbid it
        signs[-1] = -1.0
    rotation = u @ np.diag(signs) @ vt
    src_variance = (src_centered**2).sum(axis=1).mean()
    scale = (singular_values * signs).sum() / src_variance
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def square_box_with_margin(box, image_size, margin):
    """The square crop around `box` whose resize to image_size leaves margin/2 output pixels on each side."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1) * image_size / (image_size - margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def crop_square(image, square, image_size):
    """Crop `square` (float x1, y1, x2, y2, may leave the photo: black there) and resize to image_size."""
    x1, y1, x2, y2 = square
    left, top = math.floor(x1), math.floor(y1)
    region = image.crop((left, top, math.ceil(x2), math.ceil(y2)))
    # PIL's resize filters with a support scaled to the shrink factor, so large faces do not alias
    sub_box = (x1 - left, y1 - top, x2 - left, y2 - top)
    return region.resize((image_size, image_size), Image.Resampling.BILINEAR, box=sub_box)


def warp_to_template(image, landmarks, image_size=112):
    """Similarity-warp `image` so that `landmarks` land on the ArcFace template scaled to image_size."""
    template = ARCFACE_TEMPLATE_112 * (image_size / 112.0)
    forward = np.vstack([umeyama_similarity(landmarks, template), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)  # output pixel -> photo pixel (pixel centres at integers)
    # when the face is much larger than the output, shrink the region it comes from first with an
    # antialiased resize; Image.transform samples one point per output pixel and would alias
    zoom = math.sqrt(abs(np.linalg.det(forward[:2, :2])))  # output pixels per photo pixel
    corners = np.array(
        [[0, 0, 1], [image_size, 0, 1], [0, image_size, 1], [image_size, image_size, 1]], float
    )
    source_corners = (inverse @ corners.T)[:2].T
    left, top = np.floor(source_corners.min(axis=0)).astype(int) - 2
    right, bottom = np.ceil(source_corners.max(axis=0)).astype(int) + 2
    region = image.crop((int(left), int(top), int(right), int(bottom)))
    to_region = np.array([[1.0, 0.0, -left], [0.0, 1.0, -top], [0.0, 0.0, 1.0]])
    if zoom < 0.5:
        shrunk_size = (max(1, round(region.width * zoom)), max(1, round(region.height * zoom)))
        to_region = np.diag([shrunk_size[0] / region.width, shrunk_size[1] / region.height, 1.0]) @ to_region
        region = region.resize(shrunk_size, Image.Resampling.BILINEAR)
        # the resize maps pixel centres (i + 0.5) / w_in = (j + 0.5) / w_out, not i / w_in = j / w_out
        to_region[:2, 2] += 0.5 * (np.diag(to_region)[:2] - 1.0)
    # PIL samples output pixel (x, y) at its centre (x + 0.5, y + 0.5) and puts input pixel centres at + 0.5
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    pil_map = shift @ to_region @ inverse @ np.linalg.inv(shift)
    return region.transform(
        (image_size, image_size),
        Image.Transform.AFFINE,
        data=tuple(pil_map[:2].ravel()),
        resample=Image.Resampling.BILINEAR,
    )


def align_face(photo, face, template: str, image_size: int, margin: int):
    """The aligned crop of ``face`` (a `datasets.mtcnn.Face`) in ``photo``, in the given output style."""
    if template == "arcface112":
        return warp_to_template(photo, face.landmarks, image_size)
    square = square_box_with_margin(face.box, image_size, margin)
    return crop_square(photo, square, image_size)
