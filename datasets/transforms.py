"""Image decoding and the face augmentations of the original repository.

The training augmentation is the original's: Resize, RandomHorizontalFlip, RandomRotation(5), ToTensor,
Normalize(0.5, 0.5); evaluation drops the two random steps. Resize is square here (the original's
`Resize(int)` only matched the shorter side, so non-square inputs gave non-square tensors). A run that starts
from another checkpoint (``--init_from``) normalises with that checkpoint's mean and std (`mean_and_std`).

Why PIL and not `torchvision.io.decode_image`: `benchmarks/bench_datasets.py` measures both on the LFW crops.
torchvision's decoder is a little faster, but its tensors then need tensor rotation (`grid_sample` on floats),
which costs more than the decode saves; PIL rotates 8-bit images in a few tens of microseconds. With PIL the
full training pipeline runs about 1.6-2x more images per second per worker. A truncated JPEG also fails loudly
in PIL (`OSError: image file is truncated`), which the bad-image replacement in `face_table.py` relies on.

ToTensor + Normalize are fused into one `ToNormalizedTensor` step (one multiply-subtract on the uint8 image
instead of a divide, then a normalise), which is the same arithmetic and about 2x cheaper.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

FACE_MEAN = (0.5, 0.5, 0.5)
FACE_STD = (0.5, 0.5, 0.5)


def mean_and_std(normalization: dict | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a checkpoint's ``{"mean": [...], "std": [...]}`` entry; FACE_MEAN, FACE_STD for None."""
    if normalization is None:
        return FACE_MEAN, FACE_STD
    return tuple(map(float, normalization["mean"])), tuple(map(float, normalization["std"]))


def normalization_entry(mean, std) -> dict:
    """The ``{"mean": [...], "std": [...]}`` entry of checkpoints and ``args.normalization``; `mean_and_std`
    reads it back."""
    return {"mean": [float(value) for value in mean], "std": [float(value) for value in std]}


class ToNormalizedTensor(torch.nn.Module):
    """PIL image or uint8 CHW tensor -> float32 CHW tensor, equal to `ToTensor()` then `Normalize(mean, std)`."""

    def __init__(self, mean=FACE_MEAN, std=FACE_STD):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        # (x / 255 - mean) / std  ==  x * scale - shift
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", mean / std, persistent=False)

    def forward(self, image):
        if isinstance(image, Image.Image):
            image = F.pil_to_tensor(image)
        if image.dtype != torch.uint8:
            raise TypeError(f"expected a PIL image or a uint8 tensor, got a {image.dtype} tensor")
        return image.to(torch.float32).mul_(self.scale).sub_(self.shift)

    def extra_repr(self) -> str:
        mean = (self.shift / (self.scale * 255.0)).flatten().tolist()
        std = (1.0 / (self.scale * 255.0)).flatten().tolist()
        return f"mean={[round(m, 4) for m in mean]}, std={[round(s, 4) for s in std]}"


def _square_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0:
        return (image_size, image_size)
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")


def train_transform(image_size, mean=FACE_MEAN, std=FACE_STD, normalize: bool = True) -> v2.Compose:
    """The original's training augmentation, square-resized to `image_size`; accepts what `load_image` returns.

    ``normalize=False`` stops at a uint8 CHW tensor: the training scripts' workers return those (a quarter of
    float32's shared memory and host-to-device copy) and `ToNormalizedTensor` runs on the device instead.
    """
    last = ToNormalizedTensor(mean, std) if normalize else v2.PILToTensor()
    return v2.Compose(
        [
            v2.Resize(_square_size(image_size), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(5),
            last,
        ]
    )


def eval_transform(image_size, mean=FACE_MEAN, std=FACE_STD) -> v2.Compose:
    """Deterministic resize + normalise for validation and embedding."""
    return v2.Compose([v2.Resize(_square_size(image_size), antialias=True), ToNormalizedTensor(mean, std)])
