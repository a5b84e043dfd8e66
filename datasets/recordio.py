"""MXNet RecordIO training sets (`train.rec` + `train.idx`, as insightface ships MS1M, Glint360K, ...), without mxnet.

mxnet no longer installs on current Python, so this is a reader and writer of our own, written from the format:

- `.rec` (dmlc-core's RecordIO, https://github.com/dmlc/dmlc-core/blob/main/include/dmlc/recordio.h): records
  one after another. A record is a little-endian uint32 magic number 0xced7230a, a uint32 `lrecord` (upper 3
  bits: continuation flag, lower 29 bits: payload length), then the payload padded with zeros to a multiple of
  4 bytes. A writer that meets the magic number at a 4-aligned position inside a payload splits the payload
  there into parts (flag 1 = first, 2 = middle, 3 = last; 0 = whole record) and drops those 4 bytes; a
  reader joins the parts with the magic number between them. We read and write such records the same way
  (a reader that finds records by scanning for the magic number, as dmlc's InputSplit does, needs them).
- `.idx`: text lines `key<TAB>byte offset of the record in the .rec`.
- image payload (mxnet.recordio.pack, https://mxnet.apache.org/versions/1.9.1/api/python/docs/api/mxnet/recordio/):
  a `<IfQQ` header (flag, label, id, id2); when flag > 0, `flag` float32 values follow (a label vector whose
  first value is the class); then the encoded image bytes, stored as the original file (JPEG/PNG).
- insightface's layout (https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch,
  `dataset.py`): record 0 is a header without image whose label vector [a, b] says that keys 1 .. a-1 are the
  images (and keys a .. b-1 hold one record per identity, label vector [first, end) of its image keys). A file
  without such a record 0 is read as "every key in the .idx is an image".

`RecordIOFaceDataset` reads the labels of all images once, at construction. Under an insightface header it
takes them from the identity records (one small record per identity, stored together after the images), so an
MS1M-sized .rec (5.8M images) is not read from end to end at every start: face records are about the size of
a disk page, and reading a few bytes of each would read nearly the whole file. Past 2^24 keys (Glint360K,
WebFace42M) the identity records' float32 ranges are inexact, and each image's label is read instead; so it
is without identity records: the first 36 bytes of each image record, by a vectorised gather from a memory
map of the .rec.
`datasets/recordio_writer.py` packs a folder of identity folders, resumably.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import struct
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image
from torch.utils.data import Dataset

from datasets.face_table import DECODE_ERRORS
from errors import InputError, first_line

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_BITS = 29
MAX_PAYLOAD = (1 << LENGTH_BITS) - 1
RECORD_HEAD = struct.Struct("<II")  # magic, lrecord
IMAGE_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
# magic + lrecord + image header + the first value of a label vector: all a label needs
_LABEL_WINDOW = RECORD_HEAD.size + IMAGE_HEADER.size + 4
# float32 holds every integer up to 2**24 exactly; beyond it, labels and the header's key range would round
MAX_EXACT_FLOAT32_INT = 1 << 24
_LABEL_CHUNK = 1 << 16


class RecordHeader(NamedTuple):
    """mxnet's IRHeader: `label` is a float, or (flag > 0) a float32 vector whose first value is the class."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def padded_length(length: int) -> int:
    return (length + 3) & ~3


def index_path_for(rec_path) -> str:
    """`train.rec` -> `train.idx`, the index insightface ships next to each .rec."""
    return os.path.splitext(os.fspath(rec_path))[0] + ".idx"


def pack_record(label, image_bytes, id=0, id2=0, label_vector=None) -> bytes:
    """The payload of one image record: header, optional label vector, image bytes (mxnet.recordio.pack's layout).

    `id` and `id2` keep the names of mxnet's IRHeader fields, which readers of the format know.

    With `label_vector`, the header's flag is its length and its values follow the header; `label` is then
    only the header's scalar field (insightface readers use the vector's first value).
    """
    vector = b""
    flag = 0
    if label_vector is not None:
        values = np.asarray(label_vector, dtype="<f4").ravel()
        flag, vector = len(values), values.tobytes()
    return IMAGE_HEADER.pack(flag, float(label), int(id), int(id2)) + vector + bytes(image_bytes)


def unpack_header(payload) -> tuple[RecordHeader, bytes]:
    """(header, image bytes) of a record payload; a payload too short for its header raises InputError."""
    payload = bytes(payload)
    if len(payload) < IMAGE_HEADER.size:
        raise InputError(
            f"record payload of {len(payload)} bytes is shorter than the {IMAGE_HEADER.size}-byte header"
        )
    flag, label, record_id, record_id2 = IMAGE_HEADER.unpack_from(payload)
    start = IMAGE_HEADER.size
    if flag > 0:
        end = start + 4 * flag
        if len(payload) < end:
            raise InputError(
                f"record payload of {len(payload)} bytes is too short for its {flag} label values"
            )
        label = np.frombuffer(payload, dtype="<f4", count=flag, offset=start).astype(np.float32)
        start = end
    return RecordHeader(flag, label, record_id, record_id2), payload[start:]


def encode_record(payload: bytes) -> bytes:
    """A record as dmlc-core's writer makes it: magic, lrecord, payload, zero padding to a multiple of 4 bytes.

    Where the payload holds the magic number at a 4-aligned position, it is split there into parts (flag 1,
    then 2, last 3; a record of one part has flag 0) and those 4 bytes are left out: `RecordIOReader.read`
    puts them back. Every part but the last is a multiple of 4 bytes long, so only the last is padded.
    """
    if len(payload) > MAX_PAYLOAD:
        raise InputError(
            f"a record payload of {len(payload)} bytes exceeds RecordIO's limit of {MAX_PAYLOAD}"
        )
    words = np.frombuffer(payload, dtype="<u4", count=len(payload) // 4)
    cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
    starts, ends = [0, *(cut + 4 for cut in cuts)], [*cuts, len(payload)]
    flags = [0] if not cuts else [1] + [2] * (len(cuts) - 1) + [3]
    pieces = []
    for flag, start, end in zip(flags, starts, ends, strict=True):
        pieces += [RECORD_HEAD.pack(MAGIC, (flag << LENGTH_BITS) | (end - start)), payload[start:end]]
    pieces.append(b"\0" * (padded_length(len(payload)) - len(payload)))
    return b"".join(pieces)


class RecordIOReader:
    """Random access to the records of a `.rec` through its `.idx`: `reader.read(key) -> payload bytes`.

    `keys` (sorted) and `offsets` are int64 arrays; `fingerprint` is the sha256 of the .idx bytes. The file is
    opened at the first read and again in every new process (each DataLoader worker gets its own handle; a
    pickled reader carries no handle).
    """

    def __init__(self, rec_path, idx_path=None):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else index_path_for(self.rec_path)
        if not os.path.isfile(self.rec_path):
            raise InputError(f"RecordIO file not found: {self.rec_path}")
        if not os.path.isfile(self.idx_path):
            raise InputError(f"RecordIO index not found: {self.idx_path} (expected next to {self.rec_path})")
        self.file_size = os.path.getsize(self.rec_path)
        self.keys, self.offsets, self.fingerprint = _read_index(self.idx_path)
        past_end = self.offsets + RECORD_HEAD.size > self.file_size
        if past_end.any():
            row = int(np.argmax(past_end))
            raise InputError(
                f"{self.idx_path}: key {self.keys[row]} points to byte {self.offsets[row]}, past the end of "
                f"{self.rec_path} ({self.file_size} bytes; truncated .rec or an index of another file?)"
            )
        self._handle = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key) -> bool:
        row = np.searchsorted(self.keys, key)
        return bool(row < len(self.keys) and self.keys[row] == key)

    def _rows(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The index rows of `keys`, and which of the keys the index lacks."""
        rows = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return rows, self.keys[rows] != keys

    def has_all(self, keys) -> bool:
        """Whether the index lists every one of `keys` (an array)."""
        return not self._rows(np.asarray(keys, dtype=np.int64))[1].any()

    def offsets_of(self, keys) -> np.ndarray:
        """Byte offsets of `keys` (an array); a key not in the index raises InputError."""
        keys = np.asarray(keys, dtype=np.int64)
        rows, missing = self._rows(keys)
        if missing.any():
            raise InputError(f"{self.idx_path}: no record with key {keys[int(np.argmax(missing))]}")
        return self.offsets[rows]

    def read(self, key) -> bytes:
        """The payload of record `key` (parts of a multi-part record joined as dmlc-core does)."""
        offset = int(self.offsets_of([key])[0])
        parts = []
        while True:
            cflag, length = self._record_head(key, offset, first=not parts)
            data = self._pread(length, offset + RECORD_HEAD.size)
            if len(data) < length:
                raise self._truncated(key, offset, length)
            parts.append(data)
            if cflag in (0, 3):
                return MAGIC_BYTES.join(parts)
            offset += RECORD_HEAD.size + padded_length(length)

    def read_header(self, key) -> tuple[RecordHeader, int]:
        """(header, size of the image bytes) of record `key`, reading only the header of a whole record."""
        offset = int(self.offsets_of([key])[0])
        cflag, length = self._record_head(key, offset, first=True)
        if cflag != 0:  # rare: the magic number occurs inside the payload, so the payload is in parts
            payload = self.read(key)
        else:
            size = min(length, IMAGE_HEADER.size)
            payload = self._pread(size, offset + RECORD_HEAD.size)
            if len(payload) < size or offset + RECORD_HEAD.size + length > self.file_size:
                raise self._truncated(key, offset, length)
            flag = IMAGE_HEADER.unpack_from(payload)[0] if size == IMAGE_HEADER.size else 0
            if flag > 0:
                payload = self._pread(min(length, IMAGE_HEADER.size + 4 * flag), offset + RECORD_HEAD.size)
        try:
            header, image = unpack_header(payload)
        except InputError as error:
            raise InputError(f"{self.rec_path}: record {key}: {error}") from None
        image_size = len(image) if cflag != 0 else length - (len(payload) - len(image))
        return header, image_size

    def _record_head(self, key, offset: int, first: bool) -> tuple[int, int]:
        head = self._pread(RECORD_HEAD.size, offset)
        if len(head) < RECORD_HEAD.size:
            raise self._truncated(key, offset, RECORD_HEAD.size)
        magic, lrecord = RECORD_HEAD.unpack(head)
        if magic != MAGIC:
            raise InputError(
                f"{self.rec_path}: record {key} at byte {offset} does not start with the RecordIO magic number "
                f"(not a .rec file, or {self.idx_path} belongs to another file)"
            )
        cflag, length = lrecord >> LENGTH_BITS, lrecord & MAX_PAYLOAD
        if first and cflag not in (0, 1):
            raise InputError(f"{self.rec_path}: key {key} points into the middle of a multi-part record")
        if not first and cflag not in (2, 3):
            raise InputError(f"{self.rec_path}: multi-part record {key} is cut off by another record")
        return cflag, length

    def _truncated(self, key, offset: int, length: int) -> InputError:
        return InputError(
            f"{self.rec_path}: record {key} at byte {offset} ({length} bytes) runs past the end of the file "
            f"({self.file_size} bytes); the .rec is truncated"
        )

    def _file(self):
        pid = os.getpid()
        if self._handle is None or self._pid != pid:
            try:
                # unbuffered: every read is one positioned read of exactly the bytes needed
                self._handle = open(self.rec_path, "rb", buffering=0)
            except OSError as error:
                raise InputError(f"cannot open {self.rec_path}: {error.strerror or error}") from None
            self._pid = pid
        return self._handle

    def _pread(self, size: int, offset: int) -> bytes:
        handle = self._file()
        if hasattr(os, "pread"):
            return os.pread(handle.fileno(), size, offset)
        handle.seek(offset)
        return handle.read(size)

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        return state


def _read_index(idx_path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(sorted keys, their offsets, sha256 of the file) of a `key<TAB>offset` index."""
    with open(idx_path, "rb") as f:
        data = f.read()
    fingerprint = hashlib.sha256(data).hexdigest()
    if not data.strip():
        raise InputError(f"{idx_path}: the RecordIO index is empty")
    try:
        table = pd.read_csv(io.BytesIO(data), sep="\t", header=None, dtype=np.int64, engine="c").to_numpy()
    except (ValueError, OverflowError, pd.errors.ParserError) as error:  # Overflow: a number past int64
        raise InputError(
            f"{idx_path}: not a RecordIO index of 'key<TAB>offset' lines ({first_line(error)})"
        ) from None
    if table.ndim != 2 or table.shape[1] != 2:
        raise InputError(f"{idx_path}: expected 2 columns (key<TAB>offset), found {table.shape[-1]}")
    keys, offsets = table[:, 0].copy(), table[:, 1].copy()
    if (keys < 0).any() or (offsets < 0).any():
        raise InputError(f"{idx_path}: negative key or offset")
    if not bool(np.all(keys[1:] > keys[:-1])):
        order = np.argsort(keys, kind="stable")
        keys, offsets = keys[order], offsets[order]
        repeated = keys[1:] == keys[:-1]
        if repeated.any():
            raise InputError(f"{idx_path}: key {keys[int(np.argmax(repeated))]} appears twice")
    return keys, offsets, fingerprint


def image_keys(reader: RecordIOReader) -> np.ndarray:
    """The image keys of a .rec: 1 .. a-1 under an insightface header record 0, else every key of the index.

    Record 0 counts as the header when it has a label vector and no image bytes (insightface writes it with
    `mx.recordio.pack(header, b"")`); a record 0 with an image is an image.
    """
    if 0 not in reader:
        return reader.keys.copy()
    header, image_size = reader.read_header(0)
    if header.flag == 0 or image_size > 0:
        return reader.keys.copy()
    end = float(header.label[0])
    if not end.is_integer() or end < 0:
        raise InputError(f"{reader.rec_path}: the header record 0 gives {end} as the end of the image keys")
    if end <= 1:  # [0, 0] is the placeholder write_recordio replaces when it finishes
        raise InputError(
            f"{reader.rec_path}: the header record 0 says the file has no images (an unfinished pack? "
            f"run the same pack_recordio.py command again to complete it)"
        )
    end = int(end)
    last_key = int(reader.keys[-1])
    if end > 2 * last_key + 2:  # float32 rounding moves it by a few keys at most: a corrupt or foreign header
        raise InputError(
            f"{reader.rec_path}: the header record 0 ends the image keys at {end}, far past the index's last "
            f"key {last_key}"
        )
    # insightface's float32 header can be a few keys off (exact_image_end); 2^24 itself may be 2^24 + 1
    # rounded down (a pack of exactly 2^24 images)
    if end >= MAX_EXACT_FLOAT32_INT:
        end = exact_image_end(reader, end)
    keys = np.arange(1, end, dtype=np.int64)
    reader.offsets_of(keys)  # every promised image key must be in the index
    return keys


def exact_image_end(reader: RecordIOReader, rounded_end: int) -> int:
    """The first key after the images, near ``rounded_end`` (the header's float32 value): the lowest key
    within float32's rounding of it whose record holds no image bytes (the first identity record).

    insightface stores the header's key range as float32: WebFace42M's end key 42,474,558 reads back as
    42,474,560, two identity records (which hold no image) past the last image."""
    spacing = 2 ** max(0, int(np.floor(np.log2(rounded_end))) - 23)  # float32's step at that magnitude
    for key in range(max(1, rounded_end - spacing), rounded_end + spacing + 1):
        if key not in reader or reader.read_header(key)[1] == 0:
            return key
    raise InputError(
        f"{reader.rec_path}: the header record 0 ends the images at about {rounded_end}, but every record "
        f"from {rounded_end - spacing} to {rounded_end + spacing} holds an image"
    )


def gather_record_words(rec_path, offsets: np.ndarray, num_bytes: int, chunk_size: int = _LABEL_CHUNK):
    """For chunks of ``offsets``: (start, the chunk's offsets, words, fits), ``words`` the first ``num_bytes``
    (a multiple of 4) at each offset as little-endian uint32, gathered by one numpy fancy index from a memory
    map of the file (at least a page read per record); rows whose bytes would run past the end of the file are
    zeros, with ``fits`` False."""
    window = np.arange(num_bytes, dtype=np.int64)
    with open(rec_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        buffer = np.frombuffer(mapped, dtype=np.uint8)
        try:
            for start in range(0, len(offsets), chunk_size):
                chunk = offsets[start : start + chunk_size]
                fits = chunk + num_bytes <= len(mapped)
                words = np.zeros((len(chunk), num_bytes // 4), dtype="<u4")
                words[fits] = buffer[chunk[fits, None] + window].view("<u4")
                yield start, chunk, words, fits
        finally:
            del buffer  # the memory map cannot close while a numpy view of it exists


def read_labels(reader: RecordIOReader, keys: np.ndarray, columns: int = 1) -> np.ndarray:
    """float64 label (a label vector's first value) of each record in `keys`, reading ~36 bytes per record;
    with ``columns=2``, an (N, 2) array of the first two values of each label vector (NaN where a record has
    fewer), as insightface's identity records hold [first key, end key).

    Whole records with the header inside the file are read in chunks by one numpy gather from a memory map;
    anything else (a multi-part record, a malformed or truncated one) goes through `reader.read_header`, which
    reads it the slow way or raises the InputError naming the file and key.
    """
    keys = np.asarray(keys, dtype=np.int64)
    offsets = reader.offsets_of(keys)
    values = np.full((len(keys), columns), np.nan)
    file_size = os.path.getsize(reader.rec_path)
    window = _LABEL_WINDOW + 4 * (columns - 1)
    vector_word = (RECORD_HEAD.size + IMAGE_HEADER.size) // 4
    for start, chunk, words, fits in gather_record_words(reader.rec_path, offsets, window):
        lrecord = words[:, 1]
        length = (lrecord & MAX_PAYLOAD).astype(np.int64)
        flag = words[:, 2].astype(np.int64)
        good = (
            fits
            & (words[:, 0] == MAGIC)
            & (lrecord >> LENGTH_BITS == 0)
            & (length >= IMAGE_HEADER.size + 4 * flag)
            & (chunk + RECORD_HEAD.size + length <= file_size)
        )
        rows = values[start : start + len(chunk)]
        rows[:, 0] = np.where(flag > 0, words[:, vector_word].view("<f4"), words[:, 3].view("<f4"))
        for column in range(1, columns):
            rows[flag > column, column] = words[flag > column, vector_word + column].view("<f4")
        for row in np.flatnonzero(~good):
            header, _ = reader.read_header(int(keys[start + row]))
            vector = np.atleast_1d(header.label)[:columns] if header.flag > 0 else [float(header.label)]
            rows[row] = np.nan
            rows[row, : len(vector)] = vector
    return values[:, 0] if columns == 1 else values


# identities whose first and last image labels are read to check that the identity records can be trusted
_CHECKED_IDENTITIES = 512


def labels_from_identity_records(reader: RecordIOReader, keys: np.ndarray) -> np.ndarray | None:
    """The labels of image keys 1 .. a-1 from insightface's identity records, or None where the file has none
    to trust (then every image record's own label is read).

    The header [a, b] puts one record per identity at keys a .. b-1, label vector [first key, end key) of its
    images, in the order of the class labels (insightface's packers and `recordio_writer` both write them so).
    They are used only when they tile the image keys exactly and the first and last image of up to 512
    identities, spread over the file, carry their identity's index as label; past 2^24 keys float32 cannot
    hold the ranges exactly, so such files are read image by image.
    """
    if len(keys) == 0 or keys[0] != 1 or keys[-1] != len(keys) or 0 not in reader:
        return None
    header, image_size = reader.read_header(0)
    if header.flag < 2 or image_size > 0:
        return None
    image_end, identity_end = len(keys) + 1, float(header.label[1])
    if not identity_end.is_integer() or not image_end < identity_end <= MAX_EXACT_FLOAT32_INT:
        return None
    identity_keys = np.arange(image_end, int(identity_end), dtype=np.int64)
    if not reader.has_all(identity_keys):
        return None
    ranges = read_labels(reader, identity_keys, columns=2)
    first, end = ranges[:, 0], ranges[:, 1]
    if not (
        np.isfinite(ranges).all()
        and first[0] == 1
        and end[-1] == image_end
        and (end > first).all()
        and np.array_equal(end[:-1], first[1:])
    ):
        return None
    counts = (end - first).astype(np.int64)
    labels = np.repeat(np.arange(len(counts), dtype=np.float64), counts)
    checked = np.unique(np.linspace(0, len(counts) - 1, min(len(counts), _CHECKED_IDENTITIES)).round())
    checked = checked.astype(np.int64)
    sample = np.concatenate([first[checked], end[checked] - 1]).astype(np.int64)
    # one positioned read each: a memory map would read ahead ~128 kB around each of these scattered records
    for key in sample.tolist():
        header = reader.read_header(key)[0]
        if float(np.atleast_1d(header.label)[0]) != labels[key - 1]:
            return None
    return labels


class RecordIOFaceDataset(Dataset):
    """The image records of a .rec as (transformed RGB image, class index): the RecordIO twin of
    `LabelledFaceDataset`.

    `labels` (int64), `num_classes` (largest label + 1), `identity_names` (the labels as zero-padded strings: a
    .rec keeps no folder names) and `keys` (the record key of each image, for triplet files and messages) are
    read once at construction. A label that is not an integer >= 0 is an InputError naming the file and key.
    An image that does not decode is an InputError naming the file and key too: unlike the folder datasets,
    nothing is replaced, so pack with `--verify` to leave unreadable images out of the .rec.
    """

    def __init__(self, rec_path, transform=None, idx_path=None):
        self.reader = RecordIOReader(rec_path, idx_path)
        self.rec_path = self.reader.rec_path
        self.transform = transform
        self.keys: np.ndarray = image_keys(self.reader)
        raw_labels = labels_from_identity_records(self.reader, self.keys)
        if raw_labels is None:
            raw_labels = read_labels(self.reader, self.keys)
        bad = ~np.isfinite(raw_labels) | (raw_labels < 0) | (raw_labels != np.floor(raw_labels))
        if bad.any():
            row = int(np.argmax(bad))
            raise InputError(
                f"{self.rec_path}: record {self.keys[row]} has label {raw_labels[row]}; "
                f"labels must be class indices (integers >= 0)"
            )
        self.labels: np.ndarray = raw_labels.astype(np.int64)
        self.num_classes: int = int(self.labels.max()) + 1
        width = max(5, len(str(self.num_classes - 1)))
        self.identity_names: list[str] = [f"{label:0{width}d}" for label in range(self.num_classes)]
        self.fingerprint: str = self.reader.fingerprint  # sha256 of the .idx: ties triplet files to this .rec

    def __len__(self) -> int:
        return len(self.keys)

    def image(self, index) -> Image.Image:
        """The decoded RGB image of dataset row `index` (no transform)."""
        key = int(self.keys[index])
        _, image_bytes = unpack_header(self.reader.read(key))
        try:
            with Image.open(io.BytesIO(image_bytes)) as image:
                return image.convert("RGB")
        except DECODE_ERRORS as error:
            raise InputError(
                f"{self.rec_path}: record {key} does not decode as an image "
                f"({type(error).__name__}: {first_line(error)})"
            ) from None

    def __getitem__(self, index):
        image = self.image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
