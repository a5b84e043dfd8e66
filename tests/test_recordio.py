import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import datasets.recordio as recordio
import datasets.recordio_writer as recordio_writer
from datasets.generate_csv_files import generate_csv
from datasets.labelled_faces import LabelledFaceDataset
from datasets.pack_recordio import main
from datasets.recordio import (
    MAGIC,
    MAGIC_BYTES,
    RecordIOFaceDataset,
    RecordIOReader,
    encode_record,
    pack_record,
    unpack_header,
)
from datasets.recordio_writer import write_recordio
from datasets.transforms import eval_transform
from errors import InputError
from tests.conftest import write_random_image

REPO = Path(__file__).resolve().parents[1]


def write_rec(rec_path: Path, records: dict[int, bytes], index_order=None) -> Path:
    """A .rec of whole records (payloads by key, written in key order) and its .idx, by hand."""
    offsets, data = {}, b""
    for key in sorted(records):
        offsets[key] = len(data)
        data += encode_record(records[key])
    rec_path.write_bytes(data)
    keys = index_order if index_order is not None else sorted(records)
    rec_path.with_suffix(".idx").write_text("".join(f"{key}\t{offsets[key]}\n" for key in keys))
    return rec_path


def image_file_bytes(seed: int, ext: str = ".png", tmp_dir: Path | None = None) -> bytes:
    path = write_random_image(tmp_dir / f"image_{seed}{ext}", size=16, seed=seed)
    return path.read_bytes()


def test_pack_and_unpack_roundtrip():
    payload = pack_record(3, b"jpeg bytes", id=7, id2=9)
    header, image = unpack_header(payload)
    assert (header.flag, header.label, header.id, header.id2, image) == (0, 3.0, 7, 9, b"jpeg bytes")
    header, image = unpack_header(pack_record(0, b"png", label_vector=[5, 2.5]))
    assert header.flag == 2 and np.array_equal(header.label, [5, 2.5]) and image == b"png"
    record = encode_record(b"12345")
    assert (
        struct.unpack_from("<II", record) == (MAGIC, 5)
        and len(record) == 8 + 8
        and record.endswith(b"\0\0\0")
    )
    with pytest.raises(InputError, match="shorter"):
        unpack_header(b"\0" * 10)


@pytest.fixture
def packed_tree(make_face_tree, tmp_path):
    """4 identities (3, 1, 2, 3 images, .jpg/.png), an empty identity folder and a stray file; packed."""
    root = make_face_tree(counts=(3, 1, 2, 3))
    (root / "id_001b").mkdir()  # no images: generate_csv gives it no class, so neither does the .rec
    (root / "id_002" / "notes.txt").write_text("not an image")
    rec_path = tmp_path / "out" / "train.rec"
    summary = write_recordio(root, rec_path)
    assert summary.num_images == 9 and summary.num_identities == 4 and summary.num_resumed == 0
    return root, rec_path


def test_rec_gives_the_folder_datasets_images_and_labels(packed_tree, tmp_path):
    root, rec_path = packed_tree
    csv_path = tmp_path / "faces.csv"
    generate_csv(root, csv_path, num_workers=1)
    folder = LabelledFaceDataset(root, csv_path)
    rec = RecordIOFaceDataset(rec_path)

    assert len(rec) == len(folder) == 9
    assert rec.labels.dtype == np.int64 and rec.num_classes == folder.num_classes == 4
    # identities in sorted folder order: the class of a folder-dataset row is its name's rank
    ranks = {name: rank for rank, name in enumerate(sorted(folder.table.names))}
    assert rec.labels.tolist() == [ranks[folder.table.names[label]] for label in folder.labels]
    assert rec.identity_names == ["00000", "00001", "00002", "00003"]
    assert rec.keys.tolist() == list(range(1, 10))
    for index in range(len(rec)):
        rec_image, rec_label = rec[index]
        folder_image, folder_label = folder[index]
        assert rec_label == ranks[folder.table.names[folder_label]]
        assert np.array_equal(np.asarray(rec_image), np.asarray(folder_image))
        # the stored bytes are the file's own, not a re-encoding
        _, stored = unpack_header(rec.reader.read(int(rec.keys[index])))
        assert stored == Path(folder.table.paths[index]).read_bytes()


def test_header_and_identity_records_follow_insightface(packed_tree):
    _, rec_path = packed_tree
    reader = RecordIOReader(rec_path)
    assert reader.keys.tolist() == list(range(14)) and reader.offsets[0] == 0
    header, image_size = reader.read_header(0)
    assert header.flag == 2 and header.label.tolist() == [10, 14] and image_size == 0
    ranges = [reader.read_header(key)[0].label.tolist() for key in range(10, 14)]
    assert ranges == [[1, 4], [4, 5], [5, 7], [7, 10]]


def test_transform_and_dataloader_workers(packed_tree):
    _, rec_path = packed_tree
    dataset = RecordIOFaceDataset(rec_path, transform=eval_transform(16))
    dataset[0]  # opens the file in this process
    in_process = next(iter(DataLoader(dataset, batch_size=9)))
    in_worker = next(iter(DataLoader(dataset, batch_size=9, num_workers=1)))
    assert in_process[0].shape == (9, 3, 16, 16)
    assert torch.equal(in_process[0], in_worker[0]) and torch.equal(in_process[1], in_worker[1])


def test_reader_pickles_without_its_handle_and_reopens_per_process(packed_tree):
    _, rec_path = packed_tree
    dataset = RecordIOFaceDataset(rec_path)
    first = dataset.reader.read(1)
    handle = dataset.reader._handle
    assert handle is not None
    assert pickle.loads(pickle.dumps(dataset.reader)).__dict__["_handle"] is None
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.reader.read(1) == first and copy.labels.tolist() == dataset.labels.tolist()
    dataset.reader._pid = -1  # as in a forked worker: the inherited handle is not reused
    assert dataset.reader.read(1) == first and dataset.reader._handle is not handle


def test_rec_without_header_record_lists_every_key(tmp_path):
    images = {key: image_file_bytes(key, tmp_dir=tmp_path) for key in range(4)}
    records = {
        0: pack_record(2, images[0]),
        1: pack_record(0, images[1], label_vector=[1, 7]),  # the label vector's first value is the class
        2: pack_record(0, images[2]),
        3: pack_record(2, images[3]),
    }
    rec_path = write_rec(tmp_path / "plain.rec", records, index_order=[2, 0, 3, 1])
    dataset = RecordIOFaceDataset(rec_path)
    assert dataset.keys.tolist() == [0, 1, 2, 3]
    assert dataset.labels.tolist() == [2, 1, 0, 2] and dataset.num_classes == 3
    image, label = dataset[1]
    assert label == 1 and np.array_equal(np.asarray(image), np.asarray(dataset.image(1)))
    assert image.size == (16, 16)


def test_multi_part_record_is_joined_with_the_magic_number(tmp_path):
    image = image_file_bytes(0, tmp_dir=tmp_path)
    payload = pack_record(1, image)
    cut = 32  # a 4-aligned position where a dmlc writer met the magic number and split the payload
    first, second = payload[:cut], payload[cut:]
    data = encode_record(pack_record(0, image))
    data += struct.pack("<II", MAGIC, (1 << 29) | len(first)) + first + b"\0" * (-len(first) % 4)
    data += struct.pack("<II", MAGIC, (3 << 29) | len(second)) + second + b"\0" * (-len(second) % 4)
    rec_path = tmp_path / "parts.rec"
    rec_path.write_bytes(data)
    rec_path.with_suffix(".idx").write_text(f"0\t0\n1\t{len(encode_record(pack_record(0, image)))}\n")
    reader = RecordIOReader(rec_path)
    assert reader.read(1) == first + MAGIC_BYTES + second
    dataset = RecordIOFaceDataset(rec_path)
    assert dataset.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    "num_written", [1, 5, 10, 12]
)  # header only, some images, all images, some identities
@pytest.mark.parametrize("tear", [False, True])
def test_resumed_pack_is_byte_identical(make_face_tree, tmp_path, monkeypatch, num_written, tear):
    root = make_face_tree(counts=(3, 1, 2, 3))
    whole = write_recordio(root, tmp_path / "whole" / "train.rec")

    append = recordio_writer._append
    calls = []

    def interrupted(*args):
        if len(calls) == num_written:
            raise KeyboardInterrupt
        calls.append(args)
        append(*args)

    rec_path = tmp_path / "resumed" / "train.rec"
    idx_path = rec_path.with_suffix(".idx")
    monkeypatch.setattr(recordio_writer, "_append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_recordio(root, rec_path)
    monkeypatch.setattr(recordio_writer, "_append", append)
    lines = idx_path.read_text().splitlines()
    assert len(lines) == num_written
    with pytest.raises(InputError, match="no images"):  # the placeholder header: an unfinished file
        RecordIOFaceDataset(rec_path)
    if tear:  # killed mid-write: half a record after the last listed one, and half an index line
        with open(rec_path, "ab") as f:
            f.write(encode_record(b"x" * 100)[:50])
        with open(idx_path, "a") as f:
            f.write(f"{len(lines)}\t12")

    summary = write_recordio(root, rec_path)
    assert summary.num_resumed == num_written
    assert rec_path.read_bytes() == Path(whole.rec_path).read_bytes()
    assert idx_path.read_bytes() == Path(whole.idx_path).read_bytes()


def test_a_pack_killed_inside_its_first_record_starts_again(make_face_tree, tmp_path, monkeypatch):
    """Killed while writing the placeholder header, before its index line: the .rec holds the start of
    this pack's own first record and nothing lists it; the next run starts afresh."""
    root = make_face_tree(counts=(3, 1, 2))
    whole = write_recordio(root, tmp_path / "whole" / "train.rec")

    def killed(rec, idx, key, payload):
        rec.write(encode_record(payload)[:10])
        raise KeyboardInterrupt

    rec_path = tmp_path / "resumed" / "train.rec"
    monkeypatch.setattr(recordio_writer, "_append", killed)
    with pytest.raises(KeyboardInterrupt):
        write_recordio(root, rec_path)
    monkeypatch.undo()
    assert rec_path.stat().st_size == 10 and rec_path.with_suffix(".idx").read_bytes() == b""
    assert write_recordio(root, rec_path).num_resumed == 0
    assert rec_path.read_bytes() == Path(whole.rec_path).read_bytes()


@pytest.mark.parametrize("case", ["shifted-index", "small-file-no-index"])
def test_a_rec_this_pack_did_not_begin_is_never_overwritten(packed_tree, make_face_tree, tmp_path, case):
    """Another dataset's .rec whose index lists none of its records whole (offsets shifted by hand), or a
    small file of the user's at the output path: both used to be overwritten from byte 0, exit 0."""
    _, other_rec = packed_tree
    rec_path = tmp_path / "victim.rec"
    idx_path = rec_path.with_suffix(".idx")
    if case == "shifted-index":
        rec_path.write_bytes(other_rec.read_bytes())
        lines = other_rec.with_suffix(".idx").read_text().splitlines()
        idx_path.write_text(
            "".join(f"{k}\t{int(o) + 10_000_000}\n" for k, o in (line.split("\t") for line in lines))
        )
    else:
        rec_path.write_bytes(b"hello")
    before = rec_path.read_bytes()
    root = make_face_tree(counts=(2, 2), root=tmp_path / "faces")
    with pytest.raises(InputError, match="victim.rec exists and is not a pack this command began"):
        write_recordio(root, rec_path)
    assert rec_path.read_bytes() == before


def test_resume_drops_a_listed_record_cut_short(packed_tree, make_face_tree, tmp_path, monkeypatch):
    root, rec_path = packed_tree
    whole_rec, whole_idx = rec_path.read_bytes(), rec_path.with_suffix(".idx").read_bytes()
    reader = RecordIOReader(rec_path)
    os.truncate(rec_path, int(reader.offsets[5]) + 20)  # record 5 listed, but only 20 of its bytes written
    record_end, walked = recordio_writer._record_end, []
    monkeypatch.setattr(recordio_writer, "_record_end", lambda *a: walked.append(a[1]) or record_end(*a))
    summary = write_recordio(root, rec_path)
    assert summary.num_resumed == 5
    assert walked == []  # single-part records are checked by one gather of their heads, not walked one by one
    assert rec_path.read_bytes() == whole_rec and rec_path.with_suffix(".idx").read_bytes() == whole_idx
    # a complete output is left as it is
    assert write_recordio(root, rec_path).num_resumed == 14 and rec_path.read_bytes() == whole_rec


@pytest.mark.parametrize(
    "line, bad_line", [(b"5\tx\n", 6), (b"7\t100\n", 6), (b"\n", 6), (b"5\t99999999999999999999\n", 6)]
)
def test_an_index_this_tool_did_not_write_is_refused_naming_its_first_bad_line(packed_tree, line, bad_line):
    root, rec_path = packed_tree
    idx_path = rec_path.with_suffix(".idx")
    idx_path.write_bytes(b"".join(idx_path.read_bytes().splitlines(keepends=True)[:5]) + line)
    before = idx_path.read_bytes()
    with pytest.raises(InputError, match=rf"train\.idx:{bad_line}: not written by an interrupted pack"):
        write_recordio(root, rec_path)
    assert idx_path.read_bytes() == before


def test_output_of_another_folder_is_refused(packed_tree, make_face_tree, tmp_path):
    _, rec_path = packed_tree
    before = rec_path.read_bytes()
    other = make_face_tree(counts=(2, 2), root=tmp_path / "other")
    with pytest.raises(InputError, match="another dataset"):
        write_recordio(other, rec_path)
    assert rec_path.read_bytes() == before


def test_truncated_record_is_an_input_error(packed_tree):
    _, rec_path = packed_tree
    reader = RecordIOReader(rec_path)
    os.truncate(rec_path, int(reader.offsets[9]) + 30)  # the last image record loses its end
    idx_path = rec_path.with_suffix(".idx")
    idx_path.write_text("".join(idx_path.read_text().splitlines(keepends=True)[:10]))  # keys 0..9 remain
    with pytest.raises(InputError, match=r"train\.rec: record 9 .*truncated") as error:
        RecordIOFaceDataset(rec_path)
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="record 9 .*truncated"):
        RecordIOReader(rec_path).read(9)


def test_index_offset_past_the_end_is_an_input_error(packed_tree):
    _, rec_path = packed_tree
    with open(rec_path.with_suffix(".idx"), "a") as f:
        f.write("99\t10000000\n")
    with pytest.raises(InputError, match=r"train\.idx: key 99 points to byte 10000000, past the end"):
        RecordIOReader(rec_path)


def test_index_of_another_file_is_an_input_error(packed_tree):
    _, rec_path = packed_tree
    idx_path = rec_path.with_suffix(".idx")
    idx_path.write_text(idx_path.read_text().replace("\t40\n", "\t44\n"))  # key 1 points 4 bytes in
    with pytest.raises(InputError, match="record 1 at byte 44 does not start with the RecordIO magic"):
        RecordIOReader(rec_path).read(1)
    with pytest.raises(InputError, match="magic"):
        RecordIOFaceDataset(rec_path)


@pytest.mark.parametrize("label", [1.5, -1.0, float("nan")])
def test_label_that_is_not_a_class_index_is_an_input_error(tmp_path, label):
    image = image_file_bytes(0, tmp_dir=tmp_path)
    rec_path = write_rec(tmp_path / "labels.rec", {0: pack_record(0, image), 1: pack_record(label, image)})
    with pytest.raises(InputError, match=r"labels\.rec: record 1 has label"):
        RecordIOFaceDataset(rec_path)


def test_undecodable_image_is_an_input_error(tmp_path):
    image = image_file_bytes(0, tmp_dir=tmp_path)
    rec_path = write_rec(tmp_path / "bad.rec", {0: pack_record(0, image), 1: pack_record(1, b"not an image")})
    dataset = RecordIOFaceDataset(rec_path)
    assert dataset[0][1] == 0
    with pytest.raises(InputError, match=r"bad\.rec: record 1 does not decode as an image"):
        dataset[1]


def test_missing_or_malformed_index_is_an_input_error(tmp_path):
    image = image_file_bytes(0, tmp_dir=tmp_path)
    rec_path = write_rec(tmp_path / "a.rec", {0: pack_record(0, image)})
    with pytest.raises(InputError, match="index not found"):
        RecordIOReader(rec_path, tmp_path / "missing.idx")
    rec_path.with_suffix(".idx").write_text("0 0\n")
    with pytest.raises(InputError, match="a.idx"):
        RecordIOReader(rec_path)
    rec_path.with_suffix(".idx").write_text("0\t99999999999999999999\n")  # past int64
    with pytest.raises(InputError, match="a.idx: not a RecordIO index"):
        RecordIOReader(rec_path)


def test_a_header_end_far_past_the_index_is_an_input_error(tmp_path):
    images = {key: pack_record(0, image_file_bytes(key, tmp_dir=tmp_path)) for key in (1, 2)}
    header = {0: pack_record(0, b"", label_vector=[1e30, 1e30])}  # corrupt: no int64, no arange of it
    rec_path = write_rec(tmp_path / "big.rec", {**header, **images})
    with pytest.raises(InputError, match="big.rec: the header record 0 ends the image keys at .* last key 2"):
        RecordIOFaceDataset(rec_path)


def test_labels_of_100k_records_come_from_one_vectorised_pass(tmp_path, monkeypatch):
    """The labels come from the first 36 bytes of each record, gathered by numpy: no read per record."""
    record = encode_record(pack_record(0, b"\xff" * 200))
    num_records = 100_000
    labels = np.arange(num_records) % 997
    data = np.frombuffer(record * num_records, dtype=np.uint8).reshape(num_records, len(record)).copy()
    data[:, 12:16] = labels.astype("<f4").view(np.uint8).reshape(num_records, 4)  # the header's label field
    rec_path = tmp_path / "big.rec"
    rec_path.write_bytes(data.tobytes())
    rec_path.with_suffix(".idx").write_text("".join(f"{k}\t{k * len(record)}\n" for k in range(num_records)))

    header_reads = []
    read_header = RecordIOReader.read_header
    monkeypatch.setattr(
        RecordIOReader, "read_header", lambda self, key: header_reads.append(key) or read_header(self, key)
    )
    dataset = RecordIOFaceDataset(rec_path)
    assert np.array_equal(dataset.labels, labels) and dataset.num_classes == 997
    assert header_reads == [0]  # only record 0, to see whether it is an insightface header


def insightface_rec(rec_path: Path, counts, image_labels=None, ranges=None) -> Path:
    """A .rec in insightface's layout by hand: header [a, b], images 1 .. a-1 (label = identity index unless
    `image_labels` says otherwise), then one record per identity with [first, end) (or `ranges`)."""
    num_images, num_identities = sum(counts), len(counts)
    starts = np.concatenate([[1], 1 + np.cumsum(counts)])
    ranges = ranges if ranges is not None else list(zip(starts[:-1], starts[1:], strict=True))
    labels = image_labels if image_labels is not None else np.repeat(np.arange(num_identities), counts)
    image_end = num_images + 1
    records = {0: pack_record(0, b"", label_vector=[image_end, image_end + num_identities])}
    for key in range(1, image_end):
        records[key] = pack_record(int(labels[key - 1]), b"\xff" * 40, id=key)
    for identity, (first, end) in enumerate(ranges):
        records[image_end + identity] = pack_record(0, b"", label_vector=[first, end])
    return write_rec(rec_path, records)


def count_label_reads(monkeypatch) -> list[int]:
    """Records whose first bytes `read_labels` gathers (one entry per call: how many)."""
    reads = []
    gather = recordio.gather_record_words

    def counting(rec_path, offsets, *args, **kwargs):
        reads.append(len(offsets))
        return gather(rec_path, offsets, *args, **kwargs)

    monkeypatch.setattr(recordio, "gather_record_words", counting)
    return reads


def test_labels_come_from_the_identity_records_not_from_every_image(tmp_path, monkeypatch):
    """Face records are about a disk page each: reading a few bytes of every one reads nearly the whole .rec
    (all of Glint360K at every start). The identity records give the labels; 2 images of each of 512 spread
    identities check them."""
    counts = np.random.default_rng(0).integers(1, 9, size=3000)
    rec_path = insightface_rec(tmp_path / "faces.rec", counts)
    reads = count_label_reads(monkeypatch)
    header_reads = []
    read_header = RecordIOReader.read_header
    monkeypatch.setattr(
        RecordIOReader, "read_header", lambda self, key: header_reads.append(key) or read_header(self, key)
    )
    dataset = RecordIOFaceDataset(rec_path)
    assert np.array_equal(dataset.labels, np.repeat(np.arange(3000), counts)) and dataset.num_classes == 3000
    assert reads == [3000]  # the identity records, stored together after the images
    # record 0 (twice: for the image keys, then for the identity keys), then 2 images of 512 identities
    assert len(header_reads) == 2 + 1024 and sum(counts) > 3 * 4024


@pytest.mark.parametrize("case", ["labels in another order", "ranges with a gap", "ranges past the images"])
def test_identity_records_that_do_not_match_the_images_are_not_trusted(tmp_path, case):
    """Then every image's own label is read, and the dataset has the labels the images carry."""
    counts = [3, 1, 2, 3] * 100
    labels = np.repeat(np.arange(len(counts)), counts)
    starts = np.concatenate([[1], 1 + np.cumsum(counts)])
    ranges = list(zip(starts[:-1], starts[1:], strict=True))
    if case == "labels in another order":
        labels = len(counts) - 1 - labels
    elif case == "ranges with a gap":
        ranges[5] = (ranges[5][0] + 1, ranges[5][1])
    else:
        ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
    rec_path = insightface_rec(tmp_path / "faces.rec", counts, image_labels=labels, ranges=ranges)
    assert np.array_equal(RecordIOFaceDataset(rec_path).labels, labels)


def test_cli_packs_and_reports_bad_input(tiny_face_tree, tmp_path, capsys):
    rec_path = tmp_path / "cli" / "faces.rec"
    assert main(["--dataroot", str(tiny_face_tree), "--output", str(rec_path), "--no-progress"]) == 0
    assert "12 images of 4 identities" in capsys.readouterr().out
    assert len(RecordIOFaceDataset(rec_path)) == 12
    assert main(["--dataroot", str(tiny_face_tree), "--output", str(rec_path), "--no-progress"]) == 0
    assert "12 images of 4 identities; it was already complete" in capsys.readouterr().out
    assert main(["--dataroot", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.rec")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset folder not found") and err.count("\n") == 1
    # no .rec name (next to an existing pack) or a folder: refused, the pack untouched
    before = rec_path.with_suffix(".idx").read_bytes()
    for output in (rec_path.with_suffix(""), rec_path.parent):
        assert main(["--dataroot", str(tiny_face_tree), "--output", str(output), "--no-progress"]) == 2
        assert f"--output {output}: name the .rec file to write" in capsys.readouterr().err
    assert rec_path.with_suffix(".idx").read_bytes() == before


def test_cli_verify_names_the_images_it_leaves_out(tiny_face_tree, tmp_path, capsys):
    broken = sorted(tiny_face_tree.rglob("*.jpg"))[0]
    broken.write_bytes(b"not a jpeg")
    rec_path = tmp_path / "verified.rec"
    argv = ["--dataroot", str(tiny_face_tree), "--output", str(rec_path), "--no-progress", "--verify"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "11 images of 4 identities" in out
    assert f"1 unreadable images left out:\n  {broken}" in out
    assert len(RecordIOFaceDataset(rec_path)) == 11


def test_cli_runs_as_a_script_from_the_repository_root(tiny_face_tree, tmp_path):
    rec_path = tmp_path / "script.rec"
    result = subprocess.run(
        [
            sys.executable,
            "datasets/pack_recordio.py",
            "--dataroot",
            str(tiny_face_tree),
            "--output",
            str(rec_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert rec_path.is_file() and rec_path.with_suffix(".idx").is_file()


class RecordsByKey:
    """A stand-in reader: which keys exist, and which of them hold an image (the rest: identity records)."""

    def __init__(self, image_keys, other_keys, rec_path="big.rec"):
        self.images, self.others, self.rec_path = set(image_keys), set(other_keys), rec_path

    def __contains__(self, key):
        return key in self.images or key in self.others

    def read_header(self, key):
        return None, 100 if key in self.images else 0


def test_a_float32_header_end_past_2_24_is_corrected_to_where_the_images_stop():
    true_end = 42_474_558  # WebFace42M: 42,474,557 images from key 1
    rounded = int(np.float32(true_end))
    assert rounded == 42_474_560  # what insightface's float32 header label gives back
    near = range(true_end - 20, true_end)
    reader = RecordsByKey(near, range(true_end, true_end + 20))
    assert recordio.exact_image_end(reader, rounded) == true_end
    below = int(np.float32(true_end + 3))  # a true end that float32 rounds down
    reader = RecordsByKey(range(true_end - 20, true_end + 3), range(true_end + 3, true_end + 20))
    assert below < true_end + 3 and recordio.exact_image_end(reader, below) == true_end + 3
    with pytest.raises(InputError, match="holds an image"):
        recordio.exact_image_end(RecordsByKey(range(true_end - 20, true_end + 20), []), rounded)


def test_a_header_end_past_the_exact_range_does_not_take_identity_records_for_images(tmp_path, monkeypatch):
    images = {key: pack_record(key % 2, image_file_bytes(key, tmp_dir=tmp_path)) for key in range(1, 6)}
    identities = {6: pack_record(0, b"", label_vector=[1, 4]), 7: pack_record(0, b"", label_vector=[4, 6])}
    header = {0: pack_record(0, b"", label_vector=[7, 8])}  # the end (6) rounded up by one
    rec_path = write_rec(tmp_path / "big.rec", {**header, **images, **identities})
    monkeypatch.setattr(recordio, "MAX_EXACT_FLOAT32_INT", 4)  # as if these keys were past 2^24
    dataset = RecordIOFaceDataset(rec_path)
    assert dataset.keys.tolist() == [1, 2, 3, 4, 5] and dataset.num_classes == 2


def test_a_pack_past_the_exact_float32_range_is_written_and_read_back(make_face_tree, tmp_path, monkeypatch):
    """Glint360K has 17.1M images: its key ranges round in float32, as in insightface's own file of it."""
    root = make_face_tree(counts=(3, 1, 2, 3))
    monkeypatch.setattr(recordio_writer, "MAX_EXACT_FLOAT32_INT", 4)  # as if these keys were past 2^24
    monkeypatch.setattr(recordio, "MAX_EXACT_FLOAT32_INT", 4)
    rec_path = tmp_path / "big.rec"
    write_recordio(root, rec_path)
    dataset = RecordIOFaceDataset(rec_path)
    assert dataset.keys.tolist() == list(range(1, 10)) and dataset.labels.tolist() == [
        0,
        0,
        0,
        1,
        2,
        2,
        3,
        3,
        3,
    ]
    with pytest.raises(InputError, match="4 identities are too many"):
        monkeypatch.setattr(recordio_writer, "MAX_EXACT_FLOAT32_INT", 3)
        write_recordio(root, tmp_path / "more_classes_than_float32_holds.rec")


def test_a_header_end_rounded_down_to_2_24_keeps_the_last_image(tmp_path, monkeypatch):
    """A pack of exactly 2^24 images ends its images at 2^24 + 1, which float32 rounds down to 2^24."""
    images = {key: pack_record(key % 2, image_file_bytes(key, tmp_dir=tmp_path)) for key in range(1, 5)}
    identities = {5: pack_record(0, b"", label_vector=[1, 3]), 6: pack_record(0, b"", label_vector=[3, 5])}
    header = {0: pack_record(0, b"", label_vector=[4, 7])}  # the end (5) rounded down to the limit
    rec_path = write_rec(tmp_path / "exact.rec", {**header, **images, **identities})
    monkeypatch.setattr(recordio, "MAX_EXACT_FLOAT32_INT", 4)  # as if 4 were 2^24
    assert RecordIOFaceDataset(rec_path).keys.tolist() == [1, 2, 3, 4]


def test_a_rec_tables_paths_are_made_per_row_and_name_the_record(packed_tree):
    from datasets.face_source import RecordPaths, open_face_table

    _, rec_path = packed_tree
    table, decode = open_face_table(str(rec_path))
    assert isinstance(table.paths, RecordPaths) and len(table.paths) == 9  # no string array of every row
    assert [table.paths[row] for row in (0, 8)] == [f"{rec_path}#1", f"{rec_path}#9"]
    assert np.array_equal(np.asarray(decode(table.paths[3])), np.asarray(RecordIOFaceDataset(rec_path)[3][0]))


def test_a_payload_holding_the_magic_number_is_written_in_parts_as_dmlc_does():
    body = b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + b"ij" + MAGIC_BYTES  # the last one unaligned
    data = encode_record(body)
    # dmlc-core's WriteRecord: split at each 4-aligned magic, flags 1, 2 ... 3, those 4 bytes left out
    parts, offset = [], 0
    while offset < len(data):
        magic, lrecord = struct.unpack_from("<II", data, offset)
        flag, length = lrecord >> 29, lrecord & ((1 << 29) - 1)
        parts.append((magic, flag, data[offset + 8 : offset + 8 + length]))
        offset += 8 + length + (-length % 4 if flag in (0, 3) else 0)
    assert parts == [(MAGIC, 1, b"abcd"), (MAGIC, 2, b"efgh"), (MAGIC, 3, b"ij" + MAGIC_BYTES)]
    assert offset == len(data) and len(data) % 4 == 0
    assert encode_record(b"abcdefgh") == struct.pack("<II", MAGIC, 8) + b"abcdefgh"  # flag 0: whole


def test_a_pack_with_split_records_reads_back_and_resumes_byte_identical(
    make_face_tree, tmp_path, monkeypatch
):
    root = make_face_tree(counts=(3, 2))
    first = root / "id_000" / "img_00.jpg"  # key 1; its payload is a 24-byte header + the file's bytes
    first.write_bytes(first.read_bytes() + b"\0" * (-first.stat().st_size % 4) + MAGIC_BYTES * 2 + b"tail")
    whole = write_recordio(root, tmp_path / "whole" / "train.rec")
    reader = RecordIOReader(whole.rec_path)
    assert unpack_header(reader.read(1))[1] == first.read_bytes()  # the parts joined back
    with open(whole.rec_path, "rb") as f:  # record 1 is in three parts, as a dmlc reader expects
        f.seek(int(reader.offsets_of([1])[0]))
        assert struct.unpack("<II", f.read(8))[1] >> 29 == 1

    append, calls = recordio_writer._append, []

    def interrupted(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args)
        append(*args)

    rec_path = tmp_path / "resumed" / "train.rec"
    monkeypatch.setattr(recordio_writer, "_append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_recordio(root, rec_path)
    monkeypatch.setattr(recordio_writer, "_append", append)
    assert write_recordio(root, rec_path).num_resumed == 3  # the split record 1 counted as whole
    assert rec_path.read_bytes() == Path(whole.rec_path).read_bytes()
