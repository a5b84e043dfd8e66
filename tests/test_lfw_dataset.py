import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.lfw_dataset import LFWDataset, read_pairs
from datasets.transforms import eval_transform
from errors import InputError
from tests.conftest import SHARED_DATA

LFW_DIR = SHARED_DATA / "lfw_112"
LFW_PAIRS = SHARED_DATA / "lfw_pairs.txt"


def brute_force_pairs(pairs_path):
    """(name1, i, name2, j) per pair line, parsed the simplest way."""
    lines = Path(pairs_path).read_text().split("\n")[1:]
    pairs = []
    for line in filter(None, (line.strip() for line in lines)):
        fields = line.split("\t")
        if len(fields) == 3:
            pairs.append((fields[0], int(fields[1]), fields[0], int(fields[2])))
        else:
            pairs.append((fields[0], int(fields[1]), fields[2], int(fields[3])))
    return pairs


def image_key(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    name, number = stem.rsplit("_", 1)
    assert os.path.basename(os.path.dirname(path)) == name
    return name, int(number)


@pytest.fixture(scope="module")
def lfw():
    return LFWDataset(LFW_DIR, LFW_PAIRS)


def test_standard_lfw_shape(lfw):
    assert len(lfw) == len(lfw.image_paths) == 7701
    assert len(set(lfw.image_paths)) == 7701
    assert lfw.pairs.shape == (6000, 2) and lfw.pairs.dtype == np.int64
    assert lfw.issame.dtype == bool and int(lfw.issame.sum()) == 3000
    assert lfw.num_folds == 10
    assert np.array_equal(lfw.fold_of_pair, np.arange(6000) // 600)
    # each fold: 300 matched pairs then 300 mismatched ones
    assert np.array_equal(lfw.issame, np.tile(np.repeat([True, False], 300), 10))


def test_pairs_index_the_images_of_each_line_in_order(lfw):
    expected = brute_force_pairs(LFW_PAIRS)
    got = [(*image_key(lfw.image_paths[a]), *image_key(lfw.image_paths[b])) for a, b in lfw.pairs]
    assert got == expected
    assert all(same == (a[0] == a[2]) for same, a in zip(lfw.issame, expected, strict=True))


def test_items_are_image_and_index():
    dataset = LFWDataset(LFW_DIR, LFW_PAIRS, transform=eval_transform(112))
    image, index = dataset[123]
    assert index == 123 and image.shape == (3, 112, 112) and image.dtype == torch.float32
    assert -1.0 <= image.min() and image.max() <= 1.0


@pytest.fixture
def lfw_without_one_identity(tmp_path):
    """The real LFW tree through symlinks, minus one identity of fold 3 (both in matched and mismatched pairs)."""
    pairs = brute_force_pairs(LFW_PAIRS)
    removed = pairs[3 * 600][0]  # the first matched pair of fold 4 (index 3)
    root = tmp_path / "lfw"
    root.mkdir()
    for name in os.listdir(LFW_DIR):
        if name != removed:
            (root / name).symlink_to(LFW_DIR / name, target_is_directory=True)
    affected = [k for k, (n1, _, n2, _) in enumerate(pairs) if removed in (n1, n2)]
    return root, removed, affected


def test_a_missing_image_names_the_file(lfw_without_one_identity):
    root, removed, _ = lfw_without_one_identity
    with pytest.raises(InputError, match=f"LFW image missing: .*{removed}_\\d{{4}}\\.jpg") as error:
        LFWDataset(root, LFW_PAIRS)
    assert "\n" not in str(error.value)


def test_skip_missing_drops_only_the_affected_pairs_and_keeps_folds(lfw_without_one_identity, caplog):
    root, removed, affected = lfw_without_one_identity
    with caplog.at_level(logging.WARNING, logger="datasets.lfw_dataset"):
        dataset = LFWDataset(root, LFW_PAIRS, skip_missing=True)
    keep = np.ones(6000, dtype=bool)
    keep[affected] = False
    assert len(dataset.pairs) == 6000 - len(affected) and dataset.num_skipped_pairs == len(affected) > 0
    assert np.array_equal(dataset.fold_of_pair, (np.arange(6000) // 600)[keep])
    assert np.array_equal(dataset.issame, np.tile(np.repeat([True, False], 300), 10)[keep])
    expected = [p for p, k in zip(brute_force_pairs(LFW_PAIRS), keep, strict=True) if k]
    got = [(*image_key(dataset.image_paths[a]), *image_key(dataset.image_paths[b])) for a, b in dataset.pairs]
    assert got == expected
    assert all(removed not in path for path in dataset.image_paths)
    per_fold = np.bincount(np.arange(6000)[affected] // 600, minlength=10)
    detail = ", ".join(f"fold {f + 1}: {n}" for f, n in enumerate(per_fold) if n)
    assert f"skipped {len(affected)} of 6000 LFW pairs" in caplog.text and detail in caplog.text


def test_skip_missing_that_leaves_one_fold_says_so(make_lfw_tree):
    import shutil

    root, pairs_path = make_lfw_tree(num_folds=2, pairs_per_kind=2)
    for name in ("P1_0", "P1_1", "P1_2"):  # every image of fold 2
        shutil.rmtree(root / name)
    with pytest.raises(
        InputError, match=r"only fold 1 keeps pairs with both images .* \(4 pairs\); cross-validation"
    ):
        LFWDataset(root, pairs_path, skip_missing=True)


def test_tiny_lfw_with_png_and_jpeg_files(make_lfw_tree, tmp_path):
    for ext in (".png", ".jpeg"):
        root, pairs_path = make_lfw_tree(ext=ext, root=tmp_path / ext[1:])
        dataset = LFWDataset(root, pairs_path)
        assert all(path.endswith(ext) for path in dataset.image_paths)
        assert dataset.pairs.shape == (8, 2) and dataset.issame.tolist() == [True, True, False, False] * 2
        assert dataset.fold_of_pair.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
        # P0_0, P0_1 twice (1 and 2), P0_2 image 2 in fold 0: 5 images; the same in fold 1
        assert len(dataset) == 10


def test_pairs_file_without_header(make_lfw_tree):
    root, pairs_path = make_lfw_tree(header=False)
    parsed = read_pairs(pairs_path)
    assert parsed.num_folds == 1 and parsed.fold_of_pair.tolist() == [0] * 8
    assert LFWDataset(root, pairs_path).pairs.shape == (8, 2)


def test_view_1_header_and_a_byte_order_mark_are_read(make_lfw_tree):
    """LFW View 1's files have the pairs per kind alone in the header (one fold); editors on Windows may
    prepend a byte-order mark."""
    root, pairs_path = make_lfw_tree(num_folds=1, pairs_per_kind=3)
    lines = pairs_path.read_text().splitlines()
    pairs_path.write_text("\ufeff" + "\n".join(["3", *lines[1:]]) + "\n", encoding="utf-8")
    parsed = read_pairs(pairs_path)
    assert parsed.num_folds == 1 and parsed.issame.tolist() == [True] * 3 + [False] * 3


def test_pairs_without_folds_are_evaluated_in_folds_holding_both_kinds(make_lfw_tree):
    """A headerless file sorted by kind: consecutive blocks would test on one kind per fold."""
    from torch import nn

    from verification import evaluate_model_on_lfw

    root, pairs_path = make_lfw_tree(num_folds=1, pairs_per_kind=10, header=False)
    dataset = LFWDataset(root, pairs_path, transform=lambda image: torch.zeros(3, 2, 2))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    metrics, _ = evaluate_model_on_lfw(model, dataset, torch.device("cpu"), progress=False)
    assert metrics.positives_per_fold.tolist() == [1] * 10 and metrics.negatives_per_fold.tolist() == [1] * 10


@pytest.mark.parametrize(
    "line,message",
    [
        ("Name\t1", ":4: expected 'Name i j' or 'Name1 i Name2 j'"),
        ("A\t1\tB\t2\textra", ":4: expected"),
        ("A\tone\t2", ":4: 'one' is not an image number"),
        ("A\t1\tB\tx", ":4: 'x' is not an image number"),
    ],
)
def test_malformed_lines_report_their_number(make_lfw_tree, line, message):
    root, pairs_path = make_lfw_tree()
    lines = pairs_path.read_text().splitlines()
    lines[3] = line
    pairs_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=message) as error:
        LFWDataset(root, pairs_path)
    assert str(pairs_path) in str(error.value)


def test_header_that_does_not_match_the_pairs(make_lfw_tree):
    root, pairs_path = make_lfw_tree()
    pairs_path.write_text(pairs_path.read_text().replace("2\t2", "3\t2", 1))
    with pytest.raises(InputError, match="3 folds x 2 x 2 = 12 pairs, the file has 8"):
        LFWDataset(root, pairs_path)


def test_missing_folder_or_pairs_file(tiny_lfw, tmp_path):
    root, pairs_path = tiny_lfw
    with pytest.raises(InputError, match="LFW image folder not found"):
        LFWDataset(tmp_path / "nope", pairs_path)
    with pytest.raises(InputError, match="pairs file not found"):
        LFWDataset(root, tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(InputError, match="empty"):
        LFWDataset(root, empty)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"garbage\x00\xff")
    with pytest.raises(InputError, match="not a pairs file"):
        LFWDataset(root, binary)


def test_all_pairs_missing_even_with_skip(tiny_lfw, tmp_path):
    _, pairs_path = tiny_lfw
    (tmp_path / "void").mkdir()
    with pytest.raises(InputError, match="no LFW pair"):
        LFWDataset(tmp_path / "void", pairs_path, skip_missing=True)


def test_an_unreadable_image_is_an_input_error_not_a_substitute(tiny_lfw):
    root, pairs_path = tiny_lfw
    dataset = LFWDataset(root, pairs_path)
    Path(dataset.image_paths[2]).write_bytes(b"broken")
    with pytest.raises(InputError, match="LFW image unreadable: .*"):
        dataset[2]
    assert dataset[1][1] == 1
