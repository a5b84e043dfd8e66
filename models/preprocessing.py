"""The input a model expects, as plain data: its side in pixels and its per-channel normalisation."""

from __future__ import annotations

from typing import NamedTuple


class Preprocessing(NamedTuple):
    """``image_size`` px RGB squares, normalised ``(x / 255 - mean) / std`` per channel."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
