"""The LFW verification pairs as a dataset of unique images plus index pairs.

The original built one (path, path, issame) entry per pair and loaded both images per pair: 12,000 decodes for
6,000 pairs, although the pairs use only 7,701 distinct images. Here every image is listed once (`image_paths`)
and `pairs` indexes into it, so the validation embeds each image once; `issame` and `fold_of_pair` keep the
official order, so the ten folds stay the official ones.

Pairs file format (LFW View 2, http://vis-www.cs.umass.edu/lfw/README.txt): an optional header line
`<num_folds> <pairs_per_kind>` (View 1's pairsDevTrain/Test.txt: `<pairs_per_kind>` alone, one fold), then per
fold `pairs_per_kind` matched lines `Name i j` followed by `pairs_per_kind` mismatched lines
`Name1 i Name2 j`; image i of Name is `Name/Name_%04d.jpg`. Pairs without folds (no header, or one fold) are
evaluated in ten folds of same and different pairs (`eval_metrics.stratified_fold_ids`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import NamedTuple

import numpy as np
from torch.utils.data import Dataset

from datasets.image_files import DECODE_ERRORS, load_image
from errors import InputError, first_line, no_file_reason

logger = logging.getLogger(__name__)

LFW_EXTENSIONS = (".jpg", ".png", ".jpeg")


class PairsFile(NamedTuple):
    """The parsed pairs file: image keys (name, number) per pair, in file order."""

    first: list[tuple[str, int]]
    second: list[tuple[str, int]]
    issame: np.ndarray  # (num_pairs,) bool
    fold_of_pair: np.ndarray  # (num_pairs,) int64
    num_folds: int


def read_pairs(pairs_path) -> PairsFile:
    """Parse a pairs file; a malformed line raises InputError with its line number."""
    pairs_path = os.fspath(pairs_path)
    if not os.path.isfile(pairs_path):
        raise InputError(f"pairs file not found: {pairs_path}")
    try:
        with open(pairs_path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the header
            lines = [(number, line.split()) for number, line in enumerate(f, start=1) if line.strip()]
    except UnicodeDecodeError:
        raise InputError(f"{pairs_path}: not a pairs file (not UTF-8 text)") from None
    if not lines:
        raise InputError(f"{pairs_path}: the pairs file is empty")

    num_folds, pairs_per_kind = 1, None
    if len(lines[0][1]) in (1, 2):  # header: "<num_folds> <pairs_per_kind>", or View 1's "<pairs_per_kind>"
        number, header = lines.pop(0)
        fields = ["1", *header] if len(header) == 1 else header
        num_folds, pairs_per_kind = (_int_field(v, pairs_path, number) for v in fields)
        if num_folds < 1 or pairs_per_kind < 1:
            raise InputError(
                f"{pairs_path}:{number}: the header must hold positive integers, got {' '.join(header)}"
            )

    first, second, issame = [], [], []
    for number, fields in lines:
        if len(fields) == 3:
            name, i, j = fields
            first.append((name, _int_field(i, pairs_path, number)))
            second.append((name, _int_field(j, pairs_path, number)))
            issame.append(True)
        elif len(fields) == 4:
            name1, i, name2, j = fields
            first.append((name1, _int_field(i, pairs_path, number)))
            second.append((name2, _int_field(j, pairs_path, number)))
            issame.append(name1 == name2)
        else:
            raise InputError(
                f"{pairs_path}:{number}: expected 'Name i j' or 'Name1 i Name2 j', got {' '.join(fields)!r}"
            )

    num_pairs = len(issame)
    if pairs_per_kind is None:
        fold_of_pair = np.zeros(num_pairs, dtype=np.int64)  # no header: the folds are unknown, one block
    else:
        expected = num_folds * 2 * pairs_per_kind
        if num_pairs != expected:
            raise InputError(
                f"{pairs_path}: the header promises {num_folds} folds x 2 x {pairs_per_kind} = {expected} pairs, "
                f"the file has {num_pairs}"
            )
        fold_of_pair = np.arange(num_pairs, dtype=np.int64) // (2 * pairs_per_kind)
    return PairsFile(first, second, np.asarray(issame, dtype=bool), fold_of_pair, num_folds)


def _int_field(value: str, pairs_path: str, line_number: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{pairs_path}:{line_number}: {value!r} is not an image number") from None


def find_lfw_image(directory: str, name: str, number: int) -> str | None:
    """`directory/Name/Name_%04d` with the first extension that exists, or None."""
    stem = os.path.join(directory, name, f"{name}_{number:04d}")
    for ext in LFW_EXTENSIONS:
        if os.path.isfile(stem + ext):
            return stem + ext
    return None


class LFWDataset(Dataset):
    """Each image used by the pairs once: `dataset[i] -> (image, i)`; `pairs` index into `image_paths`.

    A missing image is an InputError naming it, unless `skip_missing=True`: then its pairs are dropped and a
    warning says how many went from which fold (`fold_of_pair` keeps the official fold of every kept pair).
    """

    def __init__(self, dir, pairs_path, transform=None, skip_missing=False):
        directory = os.fspath(dir)  # `dir` (a builtin's name) is the keyword the callers use
        if not os.path.isdir(directory):
            raise InputError(f"LFW image folder not found: {directory}")
        parsed = read_pairs(pairs_path)
        self.transform = transform
        self.num_folds = parsed.num_folds

        keys = list(dict.fromkeys(parsed.first + parsed.second))  # unique images, first-seen order
        found = {key: find_lfw_image(directory, *key) for key in keys}
        missing = {key for key, path in found.items() if path is None}
        keep = np.ones(len(parsed.issame), dtype=bool)
        if missing:
            if not skip_missing:
                name, number = min(missing)
                raise InputError(
                    f"LFW image missing: {os.path.join(directory, name, f'{name}_{number:04d}.jpg')} "
                    f"(also tried .png, .jpeg; {len(missing)} missing in all; validate_on_LFW.py --skip_missing "
                    "evaluates without their pairs)"
                )
            keep = np.array(
                [
                    a not in missing and b not in missing
                    for a, b in zip(parsed.first, parsed.second, strict=True)
                ]
            )
            self._report_dropped(parsed.fold_of_pair[~keep], len(keep), len(missing))
            if not keep.any():
                raise InputError(f"no LFW pair of {os.fspath(pairs_path)} has both images under {directory}")
            kept_folds = np.unique(parsed.fold_of_pair[keep])
            if parsed.num_folds >= 2 and kept_folds.size < 2:
                raise InputError(
                    f"{os.fspath(pairs_path)}: only fold {int(kept_folds[0]) + 1} keeps pairs with both images "
                    f"under {directory} ({int(keep.sum())} pairs); cross-validation needs two folds or more"
                )

        first = [key for key, kept in zip(parsed.first, keep, strict=True) if kept]
        second = [key for key, kept in zip(parsed.second, keep, strict=True) if kept]
        used = list(dict.fromkeys(first + second))
        index_of = {key: i for i, key in enumerate(used)}
        self.image_paths: list[str] = [found[key] for key in used]
        self.pairs = np.array(
            [[index_of[a], index_of[b]] for a, b in zip(first, second, strict=True)], dtype=np.int64
        ).reshape(-1, 2)
        self.issame: np.ndarray = parsed.issame[keep]
        self.fold_of_pair: np.ndarray = parsed.fold_of_pair[keep]
        self.num_skipped_pairs: int = int((~keep).sum())  # --skip_missing: pairs left out for missing images

    @staticmethod
    def _report_dropped(dropped_folds: np.ndarray, num_pairs: int, num_missing: int) -> None:
        per_fold = Counter(int(fold) + 1 for fold in dropped_folds)
        detail = ", ".join(f"fold {fold}: {count}" for fold, count in sorted(per_fold.items()))
        logger.warning(
            "skipped %d of %d LFW pairs whose images are missing (%d images; %s); results are not comparable "
            "with the official protocol",
            len(dropped_folds),
            num_pairs,
            num_missing,
            detail,
        )

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index):
        path = self.image_paths[index]
        try:
            image = load_image(path)
        except DECODE_ERRORS as error:
            # no replacement here: a substituted image would change the verification result silently
            raise InputError(
                f"LFW image unreadable: {path} ({type(error).__name__}: {first_line(error)})"
            ) from None
        if self.transform is not None:
            image = self.transform(image)
        return image, index


def resolve_lfw_pairs(lfw_dir, lfw_pairs) -> str:
    """``--lfw_pairs`` when given, else the pairs file found in the LFW folder (the scripts' rule)."""
    if lfw_pairs is not None:
        if not os.path.isfile(lfw_pairs):
            raise InputError(f"--lfw_pairs {lfw_pairs}: {no_file_reason(lfw_pairs)}")
        return os.fspath(lfw_pairs)
    names = ("pairs.txt", "lfw_pairs.txt", "LFW_pairs.txt")
    for name in names:
        candidate = os.path.join(lfw_dir, name)
        if os.path.isfile(candidate):
            return candidate
    raise InputError(f"no LFW pairs file: pass --lfw_pairs (none of {', '.join(names)} in {lfw_dir})")
