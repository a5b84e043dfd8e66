"""The face index every training dataset shares: one CSV row per image, read once into numpy arrays.

`read_face_csv` turns the CSV written by `datasets/generate_csv_files.py` (columns `id,name,class` as the
original tool wrote them, plus an optional `ext`) into a `FaceTable`: full image paths, dense int64 labels
0..C-1 and one name per class. It is built for VGGFace2's 3.3 million rows: pandas' C parser with fixed dtypes
and categorical name/ext columns, then vectorised numpy; the only per-row Python work is building each path
string once (and, for an old CSV without `ext` whose folders mix extensions, one dict look-up per file).

Paths are kept in a numpy `StringDType` array (numpy >= 2) rather than a list or object array of Python
strings: it takes about half the memory, and DataLoader workers forked from the main process do not write to
it when reading (reading an object array touches every string's reference count, which slowly copies the
whole list into every worker; see https://github.com/pytorch/pytorch/issues/13246).

`FaceImageLoader` is the one place where a corrupt image met during training is replaced by another image of
the same identity; TripletFaceDataset and LabelledFaceDataset both use it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from datasets.image_files import DECODE_ERRORS, IMAGE_EXTENSIONS, is_recordio, load_image
from errors import InputError, first_line

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("id", "name", "class")
OPTIONAL_COLUMNS = ("ext",)


_STRING_DTYPE = getattr(np.dtypes, "StringDType", None)


class FaceTable(NamedTuple):
    """One row per image: `paths[i]` is an image of identity `names[labels[i]]`."""

    root_dir: str
    paths: np.ndarray  # (N,) str, full paths (a .rec's: face_source.RecordPaths, made per row when asked for)
    labels: np.ndarray  # (N,) int64 in 0..num_classes-1
    names: list[str]  # identity (folder) name of each class
    num_classes: int
    fingerprint: str  # sha256 of the CSV bytes; ties a saved triplets file to its CSV


class RowGroups(NamedTuple):
    """Row indices grouped by class: the rows of class c are `order[starts[c]:starts[c + 1]]`."""

    order: np.ndarray  # (N,) int64
    starts: np.ndarray  # (C + 1,) int64

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.starts)

    def rows(self, label: int) -> np.ndarray:
        return self.order[self.starts[label] : self.starts[label + 1]]


def group_rows_by_class(labels: np.ndarray, num_classes: int | None = None) -> RowGroups:
    """Counting-sort style grouping: O(N) when the labels are already sorted, which CSVs usually are."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes or 0)
    starts = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    if len(labels) < 2 or bool(np.all(labels[1:] >= labels[:-1])):
        order = np.arange(len(labels), dtype=np.int64)
    else:
        # numpy's stable sort is a radix sort for 16-bit keys, so narrow the labels when they fit
        keys = labels.astype(np.uint16) if len(counts) <= np.iinfo(np.uint16).max + 1 else labels
        order = np.argsort(keys, kind="stable").astype(np.int64, copy=False)
    return RowGroups(order, starts)


def read_face_csv(root_dir, csv_path) -> FaceTable:
    """Read an `id,name,class[,ext]` CSV of images under `root_dir/<name>/<id><ext>` into a FaceTable.

    Classes are renumbered to 0..C-1 in the order of their `class` values. Without an `ext` column (CSVs
    written by the original tool) each identity folder is listed once to find its images' extensions.
    Every problem a user can fix raises InputError naming the file.

    The file is parsed in chunks of half a million rows, each turned into paths at once, so the Python
    strings pandas creates for the ids never exist for all rows together (this halves the peak memory).
    """
    root_dir, csv_path = os.fspath(root_dir), os.fspath(csv_path)
    if not os.path.isdir(root_dir):
        raise InputError(f"dataset folder not found: {root_dir}")
    fingerprint, max_rows = _fingerprint_and_line_count(csv_path)
    columns = _read_header(csv_path)

    paths = empty_path_array(max_rows)
    name_index: dict[str, int] = {}
    finder = _ExtensionFinder(root_dir)
    class_parts, name_parts, num_rows = [], [], 0
    for chunk in _read_chunks(csv_path, columns):
        ids, name_codes, chunk_names = _ids_and_names(chunk, csv_path, num_rows)
        exts = _chunk_extensions(chunk, ids, name_codes, chunk_names, finder)
        prefixes = np.array([os.path.join(root_dir, name, "") for name in chunk_names], dtype=object)[
            name_codes
        ]
        if num_rows + len(ids) > len(paths):  # only if lines end in a bare "\r": the count was of "\n"
            paths = np.concatenate(
                [paths[:num_rows], empty_path_array(num_rows + len(ids) - len(paths) + _CHUNK_ROWS)]
            )
        # one string per row in a single pass (object-array `+` would build an intermediate per row)
        paths[num_rows : num_rows + len(ids)] = [
            f"{prefix}{stem}{ext}" for prefix, stem, ext in zip(prefixes, ids, exts, strict=True)
        ]
        global_ids = np.array(
            [name_index.setdefault(name, len(name_index)) for name in chunk_names], dtype=np.int64
        )
        name_parts.append(global_ids[name_codes])
        class_parts.append(chunk["class"].to_numpy(dtype=np.int64))
        num_rows += len(ids)
    if num_rows == 0:
        raise InputError(f"{csv_path}: the csv has a header but no rows")
    finder.check(csv_path)

    labels, class_values = _dense_labels(np.concatenate(class_parts))
    class_names = _names_per_class(
        np.concatenate(name_parts), list(name_index), labels, class_values, csv_path
    )
    return FaceTable(
        root_dir=root_dir,
        paths=paths[:num_rows],  # a view: blank lines made the line count an upper bound
        labels=labels,
        names=class_names,
        num_classes=len(class_names),
        fingerprint=fingerprint,
    )


_CHUNK_ROWS = 1 << 19


def _ids_and_names(
    chunk: pd.DataFrame, csv_path: str, first_row: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A chunk's ids (object array), its rows' name codes and its names; an empty id or name is an InputError.

    `first_row` is the number of rows before the chunk, so that a message can give the file's line.
    """
    ids = chunk["id"].to_numpy(dtype=object)
    empty_id = ids == ""
    if bool(empty_id.any()):
        raise InputError(f"{csv_path}: row {first_row + int(np.argmax(empty_id)) + 2} has an empty id")
    name_codes = chunk["name"].cat.codes.to_numpy()
    chunk_names = [str(name) for name in chunk["name"].cat.categories]
    if "" in chunk_names:
        raise InputError(f"{csv_path}: a row has an empty identity name")
    return ids, name_codes, chunk_names


def empty_path_array(size: int) -> np.ndarray:
    return np.empty(size, dtype=_STRING_DTYPE() if _STRING_DTYPE is not None else object)


def _fingerprint_and_line_count(csv_path: str) -> tuple[str, int]:
    """sha256 of the file, and its number of newlines (an upper bound on the number of rows)."""
    if not os.path.isfile(csv_path):
        raise InputError(f"csv file not found: {csv_path}")
    digest, newlines, has_text = hashlib.sha256(), 0, False
    with open(csv_path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
            newlines += block.count(b"\n")
            has_text = has_text or bool(block.strip())
    if not has_text:
        raise InputError(f"{csv_path}: the csv file is empty")
    return digest.hexdigest(), newlines + 1


def _read_header(csv_path: str) -> list[str]:
    try:
        header = [str(c) for c in pd.read_csv(csv_path, nrows=0).columns]
    except (ValueError, pd.errors.ParserError) as error:
        raise InputError(f"{csv_path}: not a readable csv ({first_line(error)})") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        raise InputError(
            f"{csv_path}: missing column(s) {', '.join(missing)}; expected id,name,class[,ext] "
            f"(found {','.join(header)})"
        )
    return [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in header]


def _read_chunks(csv_path: str, columns: list[str]):
    # categorical name/ext columns are hashed inside the C parser: no Python string per row for them;
    # na_filter=False keeps ids such as "NA" or "0001_01" as the exact strings written
    dtypes = {"id": object, "name": "category", "class": np.int64, "ext": "category"}
    try:
        with pd.read_csv(
            csv_path,
            usecols=columns,
            dtype={c: dtypes[c] for c in columns},
            na_filter=False,
            engine="c",
            chunksize=_CHUNK_ROWS,
        ) as reader:
            yield from reader
    except (ValueError, pd.errors.ParserError) as error:
        raise InputError(f"{csv_path}: could not parse ({first_line(error)})") from None


def _dotted(ext: str) -> str:
    """'jpg' -> '.jpg' (a hand-written csv may omit the dot); '' stays '' (look the file up)."""
    ext = ext.strip()
    return ext if ext == "" or ext.startswith(".") else "." + ext


def _chunk_extensions(
    chunk: pd.DataFrame, ids, name_codes, chunk_names, finder: _ExtensionFinder
) -> np.ndarray:
    if "ext" in chunk:
        ext_codes = chunk["ext"].cat.codes.to_numpy()
        ext_values = [_dotted(str(ext)) for ext in chunk["ext"].cat.categories]
        exts = np.asarray(ext_values, dtype=object)[ext_codes]
        if "" not in ext_values:
            return exts
        # compare small integer codes, not strings, to find the rows without an extension
        missing = ext_codes == ext_values.index("")
    else:
        exts = np.empty(len(ids), dtype=object)
        missing = np.ones(len(ids), dtype=bool)
    finder.fill(exts, missing, ids, name_codes, chunk_names)
    return exts


class _ExtensionFinder:
    """Extensions for rows without one: each identity folder is listed once (cached across chunks)."""

    def __init__(self, root_dir: str):
        self.root_dir = root_dir
        self.listings: dict[str, dict[str, str]] = {}

    def fill(self, exts, missing, ids, name_codes, chunk_names) -> None:
        rows = np.flatnonzero(missing)
        groups = group_rows_by_class(name_codes[rows], len(chunk_names))
        for code in np.flatnonzero(groups.counts):
            group = rows[groups.rows(code)]
            stem_to_ext = self._listing(chunk_names[code])
            folder_exts = set(stem_to_ext.values())
            if len(folder_exts) <= 1:
                # the usual case, one extension per folder: no per-file lookup. A folder without images
                # gets a placeholder; check() reports it and the loader reports the files
                exts[group] = folder_exts.pop() if folder_exts else IMAGE_EXTENSIONS[0]
            else:
                exts[group] = [stem_to_ext.get(stem, IMAGE_EXTENSIONS[0]) for stem in ids[group]]

    def _listing(self, name: str) -> dict[str, str]:
        if name not in self.listings:
            self.listings[name] = _list_image_stems(os.path.join(self.root_dir, name))
        return self.listings[name]

    def check(self, csv_path: str) -> None:
        without_images = [name for name, listing in self.listings.items() if not listing]
        if not without_images:
            return
        if len(without_images) == len(self.listings):
            raise InputError(
                f"{csv_path}: none of its identity folders has images under {self.root_dir} "
                f"(e.g. {os.path.join(self.root_dir, without_images[0])}); is the dataset root right?"
            )
        logger.warning(
            "%d of %d identity folders of %s have no images under %s (e.g. %s)",
            len(without_images),
            len(self.listings),
            csv_path,
            self.root_dir,
            without_images[0],
        )


def _list_image_stems(folder: str) -> dict[str, str]:
    """stem -> extension of the images in `folder`, preferring IMAGE_EXTENSIONS' order when a stem repeats."""
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    stem_to_ext: dict[str, str] = {}
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() not in rank:
                    continue
                known = stem_to_ext.get(stem)
                if known is None or rank[ext.lower()] < rank[known.lower()]:
                    stem_to_ext[stem] = ext
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return stem_to_ext


def _dense_labels(class_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map arbitrary integer class values to 0..C-1 preserving their order; O(N) in the common cases."""
    class_values = np.asarray(class_values, dtype=np.int64)
    num_rows = len(class_values)
    if bool(np.all(class_values[1:] >= class_values[:-1])):
        is_new = np.empty(num_rows, dtype=bool)
        is_new[0] = True
        np.not_equal(class_values[1:], class_values[:-1], out=is_new[1:])
        return np.cumsum(is_new) - 1, class_values[is_new]
    low, high = int(class_values.min()), int(class_values.max())
    if low >= 0 and high < 4 * num_rows + 1024:
        present = np.bincount(class_values) > 0
        return (np.cumsum(present) - 1)[class_values], np.flatnonzero(present)
    values, labels = np.unique(class_values, return_inverse=True)
    return labels.astype(np.int64), values


def _names_per_class(
    name_ids: np.ndarray, all_names: list[str], labels: np.ndarray, class_values: np.ndarray, csv_path: str
) -> list[str]:
    """One name per class; a class shared by two names, or a name with two classes, is an InputError."""
    class_name_ids = np.empty(len(class_values), dtype=name_ids.dtype)
    class_name_ids[labels] = name_ids  # any row of each class will do: all rows are checked against it below
    mismatch = name_ids != class_name_ids[labels]
    if bool(mismatch.any()):
        row = int(np.argmax(mismatch))
        raise InputError(
            f"{csv_path}: class {class_values[labels[row]]} is given to two identities "
            f"({all_names[class_name_ids[labels[row]]]!r} and {all_names[name_ids[row]]!r}, row {row + 2})"
        )
    class_names = [all_names[i] for i in class_name_ids]
    if len(set(class_names)) != len(class_names):
        seen: set[str] = set()
        duplicate = next(name for name in class_names if name in seen or seen.add(name))
        raise InputError(f"{csv_path}: identity {duplicate!r} appears under more than one class")
    return class_names


class FaceImageLoader:
    """Decode table rows; replace an unreadable image by another image of the same identity.

    Each bad file is logged once with its path and never retried. If more than `max_bad_fraction` of the
    loads are bad (checked once `min_loads` images were loaded), or an identity has no readable image left,
    an InputError stops training: the data set, not the code, needs fixing. Counters are per process, so each
    DataLoader worker keeps its own.
    """

    def __init__(
        self,
        table: FaceTable,
        transform=None,
        max_bad_fraction: float = 0.01,
        min_loads: int = 100,
        decode=None,
    ):
        self.table = table
        self.transform = transform
        self.max_bad_fraction = max_bad_fraction
        self.min_loads = min_loads
        self.decode = decode or load_image
        self.num_loads = 0
        self.num_bad = 0
        self.bad_rows: set[int] = set()
        self._groups: RowGroups | None = None  # built at the first bad image only

    def __call__(self, row: int, avoid=()):
        """The transformed image of `row`; `avoid` lists rows a replacement should preferably not be."""
        row = int(row)
        image = self._try_decode(row)
        if image is None:
            image = self._replacement(row, avoid)
        self._check_bad_fraction()
        return self.transform(image) if self.transform is not None else image

    def _try_decode(self, row: int):
        if row in self.bad_rows:
            self.num_loads += 1
            self.num_bad += 1
            return None
        path = str(self.table.paths[row])
        self.num_loads += 1
        try:
            return self.decode(path)
        except InputError:
            raise  # the data set itself is broken (a truncated .rec): stop, replacing one image won't help
        except DECODE_ERRORS as error:
            self.num_bad += 1
            self.bad_rows.add(row)
            logger.warning("could not decode %s (%s: %s)", path, type(error).__name__, first_line(error))
            return None

    def _replacement(self, row: int, avoid):
        if self._groups is None:
            self._groups = group_rows_by_class(self.table.labels, self.table.num_classes)
        label = int(self.table.labels[row])
        candidates = self._groups.rows(label)
        candidates = candidates[candidates != row]
        # the order is drawn from torch's generator, which the trainer seeds per sample (training.data.
        # SeededSamples): a replacement depends on (seed, epoch, index) only, not on which worker loads it or
        # what it loaded before, so a resumed epoch sees the uninterrupted one's images
        order = torch.randperm(len(candidates)).numpy()
        candidates = candidates[order]
        # rows to avoid (e.g. the positive of the same triplet) go last, used only if nothing else decodes
        avoid = np.asarray(list(avoid), dtype=np.int64)
        candidates = np.concatenate(
            [candidates[~np.isin(candidates, avoid)], candidates[np.isin(candidates, avoid)]]
        )
        for other in candidates:
            other = int(other)
            if other in self.bad_rows:
                continue
            image = self._try_decode(other)
            if image is not None:
                logger.warning("replaced unreadable %s by %s", self.table.paths[row], self.table.paths[other])
                return image
        folder = os.path.join(self.table.root_dir, self.table.names[label])
        raise InputError(
            f"identity {self.table.names[label]!r} has no readable image left ({len(candidates) + 1} tried in "
            f"{folder}); {self._rebuild_hint()}"
        )

    def _check_bad_fraction(self):
        if self.num_loads >= self.min_loads and self.num_bad > self.max_bad_fraction * self.num_loads:
            example = self.table.paths[min(self.bad_rows)] if self.bad_rows else "?"
            raise InputError(
                f"{self.num_bad} of {self.num_loads} image loads failed (more than {self.max_bad_fraction:.0%}), "
                f"e.g. {example}; check {self.table.root_dir} or {self._rebuild_hint()}"
            )

    def _rebuild_hint(self) -> str:
        """How to make a dataset without the unreadable images: re-pack a .rec, re-list a folder."""
        if is_recordio(self.table.root_dir):
            return "re-pack it with datasets/pack_recordio.py --verify, which leaves unreadable images out"
        return "rebuild the csv with datasets/generate_csv_files.py --verify, which leaves them out"
