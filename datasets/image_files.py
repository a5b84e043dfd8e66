"""Image files: which suffixes count as images, how a file is decoded, and what a broken file raises.

Kept free of torch so that the CSV tools can use it without importing torch.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from PIL import Image

# lower-case suffixes counted as images, in order of preference when one stem has several
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# what a broken file can raise while PIL decodes it (PNG chunk errors are SyntaxError, zlib/struct errors
# escape from some plugins); anything else is a bug and stays a traceback
DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    RuntimeError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


def load_image(path) -> Image.Image:
    """Decode an image file (a path or a binary file object) completely into an RGB PIL image.

    `convert` forces the decode here, so a corrupt or truncated file raises now (OSError / SyntaxError /
    ValueError) rather than later inside a transform, and the file handle is closed before returning.
    """
    with Image.open(path) as image:
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image.convert("RGB")``, except that 16-bit and 32-bit grey images are first scaled to 8 bits.

    Pillow's convert clips them at 255, so a 16-bit grey PNG (mode I;16 or I) would become all white."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") or 255 < top <= 65535:
        values = values / 257.0  # 16-bit range onto 8 bits
    elif top > 65535 or float(values.min(initial=0.0)) < 0:  # no known range: stretch what is there
        values = (values - values.min()) * (255.0 / max(np.ptp(values), 1e-12))
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


RECORDIO_SUFFIX = ".rec"


def is_recordio(dataroot) -> bool:
    """A --dataroot that names a RecordIO file (``train.rec``, with its ``.idx``) rather than a folder."""
    return os.fspath(dataroot).endswith(RECORDIO_SUFFIX)
