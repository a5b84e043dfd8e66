"""Image files: which suffixes count as images, how a file is decoded, and what a broken file raises.

Kept free of torch so that the CSV tools can use it without importing torch.
"""

from __future__ import annotations

import os
import struct
import zlib

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
        return image.convert("RGB")


RECORDIO_SUFFIX = ".rec"


def is_recordio(dataroot) -> bool:
    """A --dataroot that names a RecordIO file (``train.rec``, with its ``.idx``) rather than a folder."""
    return os.fspath(dataroot).endswith(RECORDIO_SUFFIX)
