"""Packing a folder of identity folders into an insightface-style RecordIO `.rec` + `.idx`, resumably.

The format and the reader are in `datasets/recordio.py`; `datasets/pack_recordio.py` is the command.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import NamedTuple

import numpy as np
import pandas as pd
from tqdm import tqdm

from datasets.face_table import FaceTable, read_face_csv
from datasets.generate_csv_files import generate_csv
from datasets.recordio import (
    IMAGE_HEADER,
    LENGTH_BITS,
    MAGIC,
    MAX_EXACT_FLOAT32_INT,
    MAX_PAYLOAD,
    RECORD_HEAD,
    encode_record,
    gather_record_words,
    index_path_for,
    pack_record,
    padded_length,
    unpack_header,
)
from errors import InputError

# the header record insightface writes at key 0: a 24-byte header and a two-value label vector
HEADER_RECORD_SIZE = RECORD_HEAD.size + IMAGE_HEADER.size + 8


class PackSummary(NamedTuple):
    num_images: int
    num_identities: int
    num_resumed: int  # records (header and images included) already complete from an interrupted run
    rec_path: str
    idx_path: str
    bad_images: list[str]  # left out by --verify: they did not decode


def write_recordio(
    dataroot,
    rec_path,
    idx_path=None,
    verify: bool = False,
    num_workers: int | None = None,
    progress: bool = False,
) -> PackSummary:
    """Pack `dataroot/<identity>/<image>` into an insightface-style .rec + .idx; resumes an interrupted run.

    The listing is `generate_csv`'s: identity folders with images in sorted order (label = their index, as in
    the CSV), images sorted by name; `verify` decodes each image first and leaves unreadable ones out. The
    file bytes are stored as they are (no re-encoding). Layout, as insightface's:

    - key 0 at byte 0: the header, label vector [N+1, N+1+C]. It is written first as a placeholder of the same
      size (vector [0, 0]: a reader sees no images) and rewritten in place once everything else is written.
      Its `id` field holds 64 bits of the listing's sha256, so a resume can tell it is the same dataset.
    - keys 1 .. N: the images (flag 0, label = class index, id = key).
    - keys N+1 .. N+C: one record per identity, label vector [first key, end key) of its images, no image.

    Each record is flushed before its index line is written and flushed, so after an interruption the index
    lists only records that are whole (a torn last line or record is cut off). Running the same command again
    continues after the last whole record and gives the same bytes as an uninterrupted run. An existing
    output made from another listing is an InputError; a complete one is left as it is.
    """
    rec_path = os.fspath(rec_path)
    idx_path = os.fspath(idx_path) if idx_path is not None else index_path_for(rec_path)
    if os.path.abspath(rec_path) == os.path.abspath(idx_path):
        raise InputError(f"the .rec and its index must be two files, both are {rec_path}")
    table, bad_images = _list_dataset(dataroot, verify, num_workers)
    num_images, num_classes = len(table.paths), table.num_classes
    _check_key_range(num_images, num_classes)
    listing_id = int.from_bytes(bytes.fromhex(table.fingerprint)[:8], "little")
    final_header = pack_record(
        0.0, b"", id=listing_id, label_vector=[num_images + 1, num_images + 1 + num_classes]
    )
    placeholder = pack_record(0.0, b"", id=listing_id, label_vector=[0, 0])

    directory = os.path.dirname(os.path.abspath(rec_path))
    os.makedirs(directory, exist_ok=True)
    next_key, end_offset = _resume_point(rec_path, idx_path, listing_id, encode_record(placeholder))
    num_records = 1 + num_images + num_classes
    if next_key > num_records:
        raise InputError(
            f"{idx_path} lists more records than {dataroot} has; delete {rec_path} and {idx_path} "
            "to pack from scratch"
        )
    num_resumed = next_key
    with open(rec_path, "r+b" if os.path.exists(rec_path) else "w+b") as rec, open(idx_path, "ab") as idx:
        rec.truncate(end_offset)
        rec.seek(end_offset)
        if next_key == 0:
            _append(rec, idx, 0, placeholder)
            next_key = 1
        _append_records(rec, idx, table, next_key, num_records, progress)
        _finish(rec, idx, final_header)
    return PackSummary(num_images, num_classes, num_resumed, rec_path, idx_path, bad_images)


def _list_dataset(dataroot, verify: bool, num_workers: int | None) -> tuple[FaceTable, list[str]]:
    """`generate_csv`'s listing of `dataroot` read back as a FaceTable, and the images --verify left out; the
    CSV lives in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="pack-recordio-") as work_dir:
        csv_path = os.path.join(work_dir, "listing.csv")
        listing = generate_csv(dataroot, csv_path, verify=verify, num_workers=num_workers)
        return read_face_csv(dataroot, csv_path), listing.bad_images


def _check_key_range(num_images: int, num_classes: int) -> None:
    """Raise InputError when float32 labels could not hold every class index exactly.

    Past 2^24 keys (Glint360K's 17.1M images, WebFace42M) the header's float32 key ranges round, as in
    insightface's own files of those sets; `datasets.recordio.image_keys` finds where the images really end.
    """
    if num_classes > MAX_EXACT_FLOAT32_INT:
        raise InputError(
            f"{num_classes} identities are too many for one .rec: labels are stored as float32, exact only up "
            f"to {MAX_EXACT_FLOAT32_INT}"
        )


def _append_records(rec, idx, table: FaceTable, next_key: int, num_records: int, progress: bool) -> None:
    """Append records `next_key` .. `num_records - 1`: the images, then one record per identity."""
    num_classes = table.num_classes
    # image keys of class c are class_starts[c] + 1 .. class_starts[c + 1] (key 0 is the header)
    class_starts = np.zeros(num_classes + 1, dtype=np.int64)
    np.cumsum(np.bincount(table.labels, minlength=num_classes), out=class_starts[1:])
    with tqdm(
        total=num_records, initial=next_key, unit=" records", disable=not progress, desc="packing"
    ) as bar:
        for key in range(next_key, num_records):
            _append(rec, idx, key, _record_payload(key, table, class_starts))
            bar.update()


def _record_payload(key: int, table: FaceTable, class_starts: np.ndarray) -> bytes:
    """The payload of record `key`: image row key - 1, or (past the images) an identity's key range."""
    num_images = len(table.paths)
    if key <= num_images:
        row = key - 1
        return pack_record(int(table.labels[row]), _file_bytes(str(table.paths[row])), id=key)
    label = key - num_images - 1
    first, end = class_starts[label] + 1, class_starts[label + 1] + 1
    return pack_record(0.0, b"", id=key, label_vector=[first, end])


def _finish(rec, idx, final_header: bytes) -> None:
    """Rewrite the placeholder at key 0 as the real header, then force both files to disk."""
    rec.seek(0)
    rec.write(encode_record(final_header))
    rec.flush()
    os.fsync(rec.fileno())
    os.fsync(idx.fileno())


def _file_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None


def _append(rec, idx, key: int, payload: bytes) -> None:
    offset = rec.tell()
    rec.write(encode_record(payload))
    rec.flush()  # the record reaches the file before the index line that lists it
    idx.write(f"{key}\t{offset}\n".encode())
    idx.flush()


def _start_afresh(rec_path: str, idx_path: str, rec_size: int, first_record: bytes) -> tuple[int, int]:
    if rec_size:
        with open(rec_path, "rb") as rec:
            start = rec.read(len(first_record) + 1)
        if not first_record.startswith(start):
            raise InputError(
                f"{rec_path} exists and is not a pack this command began ({idx_path} lists none of its "
                "records); delete both, or choose another output"
            )
    with open(idx_path, "wb"):
        pass
    return 0, 0


def _record_end(rec, offset: int, rec_size: int) -> int | None:
    """Where the record starting at ``offset`` ends (all of its parts), or None if it is not whole there."""
    first = True
    while True:
        rec.seek(offset)
        head = rec.read(RECORD_HEAD.size)
        if len(head) < RECORD_HEAD.size:
            return None
        magic, lrecord = RECORD_HEAD.unpack(head)
        cflag, length = lrecord >> LENGTH_BITS, lrecord & MAX_PAYLOAD
        offset += RECORD_HEAD.size + padded_length(length)  # parts before the last are 4-byte multiples
        if magic != MAGIC or cflag not in ((0, 1) if first else (2, 3)) or offset > rec_size:
            return None
        if cflag in (0, 3):
            return offset
        first = False


def _listed_offsets(idx_data: bytes, idx_path: str, rec_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, line ends) of the whole lines of an index this tool wrote: 'n<TAB>offset' for n = 0, 1, ...

    Parsed by pandas' C reader: an index of millions of lines is not held as Python objects."""
    whole = idx_data[: idx_data.rfind(b"\n") + 1]  # whatever follows the last newline is a torn line
    line_ends = np.flatnonzero(np.frombuffer(whole, dtype=np.uint8) == ord("\n")) + 1
    if len(line_ends) == 0:
        return np.zeros(0, dtype=np.int64), line_ends
    try:
        table = pd.read_csv(
            io.BytesIO(whole), sep="\t", header=None, dtype=np.int64, engine="c", skip_blank_lines=False
        ).to_numpy()
    except (ValueError, OverflowError, pd.errors.ParserError):
        table = None
    if (
        table is not None
        and table.shape == (len(line_ends), 2)
        and np.array_equal(table[:, 0], np.arange(len(line_ends)))
        and (table[:, 1] >= 0).all()
    ):
        return table[:, 1], line_ends
    number = 0  # the first line that is not 'number<TAB>offset', to name it
    for number, line in enumerate(whole.split(b"\n")[:-1]):
        fields = line.split(b"\t")
        if (
            len(fields) != 2
            or not all(f.isdigit() and len(f) < 19 for f in fields)
            or int(fields[0]) != number
        ):
            break
    raise InputError(
        f"{idx_path}:{number + 1}: not written by an interrupted pack of this tool (expected "
        f"'{number}<TAB>offset'); delete {rec_path} and {idx_path} to pack again"
    )


def _whole_records(rec, offsets: np.ndarray, rec_size: int) -> int:
    """How many of the records listed at ``offsets`` are whole and follow each other from byte 0.

    The 8-byte record heads come from `gather_record_words`; a record in parts (its payload held the magic
    number) is walked by ``_record_end``."""
    if len(offsets) == 0 or offsets[0] != 0 or rec_size < RECORD_HEAD.size:
        return 0
    # where each record must end: the next one's offset; the last may end anywhere up to the file's end
    ends = np.append(offsets[1:], -1)
    for start, chunk, words, fits in gather_record_words(rec.name, offsets, RECORD_HEAD.size):
        chunk_ends = ends[start : start + len(chunk)]
        magic, lrecord = words[:, 0], words[:, 1]
        length = (lrecord & MAX_PAYLOAD).astype(np.int64)
        record_end = chunk + RECORD_HEAD.size + ((length + 3) & ~3)  # padded_length, vectorised
        whole = fits & (magic == MAGIC) & (lrecord >> LENGTH_BITS == 0) & (record_end <= rec_size)
        whole &= (record_end == chunk_ends) | (chunk_ends < 0)
        in_parts = fits & (magic == MAGIC) & (lrecord >> LENGTH_BITS == 1)
        for row in np.flatnonzero(in_parts):
            end = _record_end(rec, int(chunk[row]), rec_size)
            whole[row] = end is not None and (end == chunk_ends[row] or chunk_ends[row] < 0)
        if not whole.all():
            return start + int(np.argmin(whole))
    return len(offsets)


def _resume_point(rec_path: str, idx_path: str, listing_id: int, first_record: bytes) -> tuple[int, int]:
    """(next key to write, byte where it goes) after what an earlier run left; (0, 0) to start afresh.

    Also cuts the index back to its whole lines whose records are whole. Starting afresh over an existing
    .rec is allowed only when it holds at most the start of this pack's own first record (``first_record``,
    the framed placeholder header, which a run killed before its first index line leaves): anything else is
    someone's file, and is refused rather than overwritten.
    """
    rec_size = os.path.getsize(rec_path) if os.path.exists(rec_path) else 0
    idx_data = b""
    if os.path.exists(idx_path):
        with open(idx_path, "rb") as f:
            idx_data = f.read()
    if not idx_data.strip():
        if rec_size > HEADER_RECORD_SIZE:  # at most our own placeholder, written before its index line
            raise InputError(f"{rec_path} exists but {idx_path} lists no records; delete both to pack again")
        return _start_afresh(rec_path, idx_path, rec_size, first_record)

    if not os.path.exists(rec_path):
        raise InputError(f"{idx_path} lists records but {rec_path} does not exist; delete it to pack again")
    offsets, line_ends = _listed_offsets(idx_data, idx_path, rec_path)
    with open(rec_path, "rb") as rec:
        valid = _whole_records(rec, offsets, rec_size)
        if valid > 0:  # our header record: its payload right after the record head
            header_end = int(offsets[1]) if valid > 1 else _record_end(rec, 0, rec_size)
            rec.seek(RECORD_HEAD.size)
            header, _ = unpack_header(rec.read(header_end - RECORD_HEAD.size))
            if header.flag != 2 or header.id != listing_id:
                raise InputError(
                    f"{rec_path} already holds another dataset (written from another folder or by another "
                    f"tool); delete it and {idx_path}, or choose another output"
                )
            last_end = (
                offsets[valid] if valid < len(offsets) else _record_end(rec, int(offsets[-1]), rec_size)
            )
            end_offset = int(last_end)
    if valid == 0:
        return _start_afresh(rec_path, idx_path, rec_size, first_record)
    with open(idx_path, "r+b") as f:
        f.truncate(int(line_ends[valid - 1]))
    return valid, end_offset
