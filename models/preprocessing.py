"""The input a model expects, as plain data: its side in pixels and its per-channel normalisation; and the
presets for checkpoints that store none (`PREPROCESS_PRESETS`, the commands' --preprocess)."""

from __future__ import annotations

from typing import NamedTuple


class Preprocessing(NamedTuple):
    """``image_size`` px RGB squares, normalised ``(x / 255 - mean) / std`` per channel."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Preprocessing of checkpoints that do not store theirs. The original repository trained and evaluated at
# 224 px with mean = std = 0.5 until 2020, and at 140 px with the mean and std of VGGFace2 in 2021 (see its
# train scripts of each year); facenet-pytorch's models take 160 px and (x - 127.5) / 128.
PREPROCESS_PRESETS: dict[str, Preprocessing] = {
    "original-2020": Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "original-2021": Preprocessing(140, (0.6071, 0.4609, 0.3944), (0.2457, 0.2175, 0.2129)),
    "facenet-pytorch": Preprocessing(160, (127.5 / 255,) * 3, (128 / 255,) * 3),
}


def preset_help() -> str:
    """The presets in one line, for the --preprocess flag of the commands."""
    described = "; ".join(
        f"{name}: {size} px, mean {_slashed(mean)}, std {_slashed(std)}"
        for name, (size, mean, std) in PREPROCESS_PRESETS.items()
    )
    return (
        f"input size and normalisation of a checkpoint that stores none: {described} (default: its "
        "layout's own; a checkpoint of this repository always uses what it stores)"
    )


def _slashed(values) -> str:
    return "/".join(f"{value:.4g}" for value in values)
