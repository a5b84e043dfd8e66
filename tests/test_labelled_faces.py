"""LabelledFaceDataset, and the CSV reading and bad-image replacement it shares with the triplet dataset."""

import logging
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets.face_table import FaceImageLoader, group_rows_by_class, read_face_csv
from datasets.labelled_faces import LabelledFaceDataset
from datasets.transforms import eval_transform
from errors import InputError


def write_csv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- read_face_csv


def test_table_matches_the_tree(tiny_face_csv):
    root, csv_path = tiny_face_csv
    table = read_face_csv(root, csv_path)
    assert table.num_classes == 4 and table.names == ["id_000", "id_001", "id_002", "id_003"]
    assert table.labels.dtype == np.int64 and table.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    expected = [
        os.path.join(root, f"id_{i:03d}", f"img_{k:02d}{'.jpg' if k % 2 == 0 else '.png'}")
        for i in range(4)
        for k in range(3)
    ]
    assert [str(p) for p in table.paths] == expected
    assert len(table.fingerprint) == 64 and table.root_dir == str(root)


def test_fingerprint_changes_with_the_contents_only(tiny_face_csv, tmp_path):
    root, csv_path = tiny_face_csv
    copy = tmp_path / "copy.csv"
    copy.write_bytes(csv_path.read_bytes())
    assert read_face_csv(root, copy).fingerprint == read_face_csv(root, csv_path).fingerprint
    lines = csv_path.read_text().splitlines()
    write_csv(copy, lines[:-1])
    assert read_face_csv(root, copy).fingerprint != read_face_csv(root, csv_path).fingerprint


def test_original_three_column_csv_resolves_extensions_from_disk(make_face_tree, tmp_path):
    # id_000 mixes .jpg and .png (per-file lookup), id_001 has only .png (one extension for the folder)
    root = make_face_tree(counts=(3, 2))
    for path in list((root / "id_001").iterdir()):
        if path.suffix == ".jpg":
            path.rename(path.with_suffix(".png"))
    csv_path = write_csv(
        tmp_path / "old.csv",
        [
            "id,name,class",
            "img_00,id_000,0",
            "img_01,id_000,0",
            "img_02,id_000,0",
            "img_00,id_001,1",
            "img_01,id_001,1",
        ],
    )
    table = read_face_csv(root, csv_path)
    assert [os.path.basename(str(p)) for p in table.paths] == [
        "img_00.jpg",
        "img_01.png",
        "img_02.jpg",
        "img_00.png",
        "img_01.png",
    ]
    assert all(os.path.isfile(p) for p in table.paths)


def test_an_ext_column_is_trusted_without_touching_the_disk(tmp_path):
    root = tmp_path / "empty_root"
    root.mkdir()
    csv_path = write_csv(tmp_path / "f.csv", ["id,name,class,ext", "a,p,0,.jpg", "b,p,0,png", "c,q,1,.webp"])
    table = read_face_csv(root, csv_path)
    assert [str(p) for p in table.paths] == [
        os.path.join(root, "p", "a.jpg"),
        os.path.join(root, "p", "b.png"),  # a missing dot is added
        os.path.join(root, "q", "c.webp"),
    ]


def test_classes_are_renumbered_in_value_order_and_rows_may_be_unsorted(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    lines = ["id,name,class,ext", "a,x,10,.jpg", "b,y,5,.jpg", "c,z,700,.jpg", "d,y,5,.jpg", "e,x,10,.jpg"]
    table = read_face_csv(root, write_csv(tmp_path / "f.csv", lines))
    assert table.names == ["y", "x", "z"] and table.num_classes == 3
    assert table.labels.tolist() == [1, 0, 2, 0, 1]
    # huge or negative class values take the np.unique path and give the same dense labels
    lines = ["id,name,class,ext", "a,x,10,.jpg", "b,y,-5,.jpg", "c,z,9000000000,.jpg", "d,y,-5,.jpg"]
    table = read_face_csv(root, write_csv(tmp_path / "g.csv", lines))
    assert table.names == ["y", "x", "z"] and table.labels.tolist() == [1, 0, 2, 0]


def test_ids_keep_leading_zeros_and_na_like_strings(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    lines = ["id,name,class,ext", "0001_01,NA,0,.jpg", "NaN,NA,0,.jpg", "007,null,1,.png"]
    table = read_face_csv(root, write_csv(tmp_path / "f.csv", lines))
    assert [os.path.relpath(str(p), root) for p in table.paths] == [
        os.path.join("NA", "0001_01.jpg"),
        os.path.join("NA", "NaN.jpg"),
        os.path.join("null", "007.png"),
    ]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_line_endings_and_trailing_blank_lines(tmp_path, newline):
    root = tmp_path / "r"
    root.mkdir()
    rows = [b"id,name,class,ext"] + [b"a%d,x%d,%d,.jpg" % (i, i // 3, i // 3) for i in range(10)]
    csv_path = tmp_path / "f.csv"
    csv_path.write_bytes(newline.join(rows) + newline * 3)
    table = read_face_csv(root, csv_path)
    assert [os.path.relpath(str(p), root) for p in table.paths] == [
        os.path.join(f"x{i // 3}", f"a{i}.jpg") for i in range(10)
    ]
    assert table.labels.tolist() == [i // 3 for i in range(10)]


@pytest.mark.parametrize(
    "lines,message",
    [
        (["id,name", "a,x"], "missing column(s) class"),
        (["name,id2", "x,a"], "missing column(s) id, class"),
        (["id,name,class,ext"], "no rows"),
        (["id,name,class,ext", "a,x,zero,.jpg"], "could not parse"),
        (["id,name,class,ext", "a,x,0,.jpg", "b,y,0,.jpg"], "class 0 is given to two identities"),
        (["id,name,class,ext", "a,x,0,.jpg", "b,x,1,.jpg"], "identity 'x' appears under more than one class"),
        (["id,name,class,ext", "a,x,0,.jpg", ",x,0,.jpg"], "row 3 has an empty id"),
    ],
)
def test_bad_csvs_are_one_line_input_errors(tmp_path, lines, message):
    root = tmp_path / "r"
    root.mkdir()
    csv_path = write_csv(tmp_path / "bad.csv", lines)
    with pytest.raises(InputError) as error:
        read_face_csv(root, csv_path)
    assert message in str(error.value) and str(csv_path) in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_or_empty_files_and_folders(tiny_face_csv, tmp_path):
    root, csv_path = tiny_face_csv
    with pytest.raises(InputError, match="csv file not found"):
        read_face_csv(root, tmp_path / "nope.csv")
    with pytest.raises(InputError, match="dataset folder not found"):
        read_face_csv(tmp_path / "nope", csv_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="empty"):
        read_face_csv(root, empty)


def test_old_csv_against_the_wrong_root_is_refused(tiny_face_csv, tmp_path):
    root, _ = tiny_face_csv
    csv_path = write_csv(tmp_path / "old.csv", ["id,name,class", "img_00,id_000,0", "img_00,id_001,1"])
    wrong_root = tmp_path / "wrong"
    wrong_root.mkdir()
    with pytest.raises(InputError, match="is the dataset root right"):
        read_face_csv(wrong_root, csv_path)


def test_group_rows_by_class_matches_a_python_grouping():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 50, size=5000)
    groups = group_rows_by_class(labels, 52)
    assert len(groups.starts) == 53 and groups.counts[50:].tolist() == [0, 0]
    for label in range(52):
        assert groups.rows(label).tolist() == np.flatnonzero(labels == label).tolist()
    sorted_labels = np.sort(labels)
    assert group_rows_by_class(sorted_labels).order.tolist() == list(range(5000))


# ---------------------------------------------------------------- FaceImageLoader


def corrupt(path):
    path.write_bytes(path.read_bytes()[:100])


def test_a_bad_image_is_replaced_by_the_same_identity_and_logged(tiny_face_csv, caplog):
    root, csv_path = tiny_face_csv
    table = read_face_csv(root, csv_path)
    bad_row = 4  # id_001/img_01.png
    corrupt(root / "id_001" / "img_01.png")
    loader = FaceImageLoader(table, transform=None)
    with caplog.at_level(logging.WARNING, logger="datasets.face_table"):
        image = loader(bad_row, avoid=(3,))
    # the replacement is id_001's other image that is not avoided: img_02.jpg
    expected = loader.decode(str(table.paths[5]))
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert loader.num_bad == 1 and loader.bad_rows == {bad_row}
    assert str(root / "id_001" / "img_01.png") in caplog.text
    # the bad file is not decoded again, but still counted
    loader(bad_row)
    assert loader.num_bad == 2


def test_a_replacement_depends_on_the_samples_seed_not_on_what_the_process_loaded_before(
    make_face_tree, tmp_path
):
    """The trainer seeds torch per sample (seed, epoch, index): a resumed epoch, or another worker, must
    replace a bad image by the same one the uninterrupted run used."""
    from datasets.generate_csv_files import generate_csv

    root = make_face_tree(counts=(2, 8))
    generate_csv(root, tmp_path / "faces.csv")
    table = read_face_csv(root, tmp_path / "faces.csv")
    corrupt(root / "id_001" / "img_00.jpg")
    bad_row = 2

    def replacement(seed: int, loads_before: int) -> bytes:
        loader = FaceImageLoader(table)
        for _ in range(loads_before):
            loader(0)
        torch.manual_seed(seed)
        return np.asarray(loader(bad_row)).tobytes()

    for seed in (0, 1, 2):
        assert replacement(seed, 0) == replacement(seed, 1) == replacement(seed, 5)
    assert len({replacement(seed, 0) for seed in range(8)}) > 1  # still a random one of the identity


def test_an_identity_without_readable_images_stops_with_an_input_error(tiny_face_csv):
    root, csv_path = tiny_face_csv
    table = read_face_csv(root, csv_path)
    for path in (root / "id_002").iterdir():
        corrupt(path)
    loader = FaceImageLoader(table)
    with pytest.raises(InputError, match="'id_002' has no readable image"):
        loader(6)


def test_a_rec_cut_short_during_training_stops_rather_than_replacing_images(make_face_tree, tmp_path):
    """The reader's own InputError (a truncated record) is not an unreadable image to replace: the file is."""
    from datasets.recordio_writer import write_recordio

    rec_path = tmp_path / "train.rec"
    write_recordio(make_face_tree(counts=(3, 3)), rec_path)
    dataset = LabelledFaceDataset(rec_path)
    os.truncate(rec_path, rec_path.stat().st_size - 100)  # the last image record loses its end
    last_image = len(dataset) - 1
    with pytest.raises(InputError, match=r"train\.rec: record \d+ .*truncated"):
        dataset[last_image]
    assert dataset.loader.num_bad == 0 and not dataset.loader.bad_rows


@pytest.mark.parametrize(
    "source, hint",
    [
        ("folder", "datasets/generate_csv_files.py --verify"),
        ("recordio", "datasets/pack_recordio.py --verify"),
    ],
)
def test_too_many_bad_loads_stop_with_an_input_error(tiny_face_csv, source, hint):
    root, csv_path = tiny_face_csv
    table = read_face_csv(root, csv_path)
    if source == "recordio":  # the same rows, as if listed from a .rec: the message names the packer
        table = table._replace(root_dir=str(root) + ".rec")
    corrupt(root / "id_000" / "img_00.jpg")
    loader = FaceImageLoader(table, max_bad_fraction=0.1, min_loads=10)
    for row in range(12):  # 1 bad of 13 loads (the replacement is a load too) stays under 10%
        loader(row)
    with pytest.raises(InputError, match=r"image loads failed \(more than 10%\)") as error:
        for _ in range(3):
            loader(0)
    assert hint in str(error.value)


# ---------------------------------------------------------------- LabelledFaceDataset


def test_labelled_dataset_items(tiny_face_csv):
    root, csv_path = tiny_face_csv
    dataset = LabelledFaceDataset(root, csv_path, transform=eval_transform(24))
    assert len(dataset) == 12 and dataset.num_classes == 4
    assert dataset.labels.tolist() == dataset.table.labels.tolist()
    image, label = dataset[7]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    assert label == 2 and isinstance(label, int)
    expected = eval_transform(24)(dataset.loader.decode(str(dataset.table.paths[7])))
    torch.testing.assert_close(image, expected)


def test_labelled_dataset_through_a_two_worker_dataloader(tiny_face_csv):
    root, csv_path = tiny_face_csv
    dataset = LabelledFaceDataset(root, csv_path, transform=eval_transform(16))
    loader = DataLoader(dataset, batch_size=5, num_workers=2, shuffle=False)
    labels = torch.cat([batch_labels for _, batch_labels in loader])
    assert labels.tolist() == dataset.labels.tolist()
