"""Where training images come from: a folder of identity folders (listed in a CSV) or a RecordIO ``.rec``.

Both become the same `FaceTable` (one row per image: path, label, identity names, a fingerprint that ties
saved triplets to the data) plus the function that decodes a row's path. The datasets built on it
(`LabelledFaceDataset`, `TripletFaceDataset`) and the unreadable-image handling of `FaceImageLoader` (log,
replace by another image of the same identity, stop when too many fail) then work the same on either.

A ``.rec`` row's path is ``<file>.rec#<record key>``, so messages name the record. Identities are the labels
(a ``.rec`` keeps no folder names): identity ``00042`` is label 42.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from datasets.face_table import FaceTable, read_face_csv
from datasets.image_files import is_recordio, load_image
from datasets.recordio import RecordIOFaceDataset, RecordIOReader, unpack_header
from errors import InputError


class RecordPaths:
    """The ``<file>.rec#<key>`` path of each row, made when a row is asked for (``paths[row]``, ``len``).

    A numpy string per row would cost every process 3.6 GB for Glint360K's 17M records (fixed-width unicode)
    and about 9 GB for WebFace42M; the record keys this needs are already held.
    """

    def __init__(self, rec_path: str, keys: np.ndarray):
        self.rec_path, self.keys = rec_path, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, row) -> str:
        return f"{self.rec_path}#{int(self.keys[row])}"


class RecordImageDecoder:
    """Decodes ``<file>.rec#<key>`` paths; picklable (each DataLoader worker opens its own file handle)."""

    def __init__(self, reader: RecordIOReader):
        self.reader = reader

    def __call__(self, path: str) -> Image.Image:
        key = int(path.rsplit("#", 1)[1])
        _, image_bytes = unpack_header(self.reader.read(key))  # a truncated record is an InputError
        return load_image(io.BytesIO(image_bytes))  # a broken image raises a decode error: replaced


def open_face_table(dataroot, csv_path=None) -> tuple[FaceTable, Callable[[str], Image.Image]]:
    """The table of training images and the decoder of its paths, for a folder + CSV or a ``.rec``."""
    if not is_recordio(dataroot):
        if csv_path is None:
            raise InputError(f"{dataroot}: a folder of identity folders needs its CSV")
        return read_face_csv(dataroot, csv_path), load_image
    records = RecordIOFaceDataset(dataroot)
    if len(records) == 0:
        raise InputError(f"{dataroot}: holds no image records")
    table = FaceTable(
        root_dir=records.rec_path,
        paths=RecordPaths(records.rec_path, records.keys),
        labels=records.labels,
        names=records.identity_names,
        num_classes=records.num_classes,
        fingerprint=records.fingerprint,
    )
    return table, RecordImageDecoder(records.reader)
