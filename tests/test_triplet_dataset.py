import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch

from datasets.transforms import eval_transform
from datasets.triplet_dataset import TripletFaceDataset, generate_triplets
from errors import InputError


def synthetic_labels(num_rows=100_000, num_classes=3_000, seed=0):
    """Shuffled labels with uneven class sizes, including many one-image identities and unused labels."""
    rng = np.random.default_rng(seed)
    sizes = rng.geometric(0.03, size=num_classes)
    sizes[rng.random(num_classes) < 0.2] = 1
    sizes[::97] = 0  # gaps in the label values
    labels = np.repeat(np.arange(num_classes), sizes)[:num_rows]
    return rng.permutation(labels)


def assert_valid_triplets(triplets, labels):
    counts = np.bincount(labels)
    assert triplets.dtype == np.int64 and triplets.ndim == 2 and triplets.shape[1] == 3
    assert triplets.min() >= 0 and triplets.max() < len(labels)
    anchor, positive, negative = (labels[triplets[:, i]] for i in range(3))
    assert np.all(triplets[:, 0] != triplets[:, 1])  # different images ...
    assert np.all(anchor == positive)  # ... of the same identity
    assert np.all(anchor != negative)
    assert np.all(counts[anchor] >= 2)  # one-image identities are never anchors


def test_large_sample_properties():
    labels = synthetic_labels()
    triplets = generate_triplets(labels, 200_000, np.random.default_rng(1))
    assert triplets.shape == (200_000, 3)
    assert_valid_triplets(triplets, labels)
    counts = np.bincount(labels)
    eligible = np.flatnonzero(counts >= 2)
    # anchors cover (nearly) every eligible identity, negatives also reach one-image identities
    assert len(np.unique(labels[triplets[:, 0]])) > 0.99 * len(eligible)
    assert np.any(counts[labels[triplets[:, 2]]] == 1)


def test_deterministic_per_seed():
    labels = synthetic_labels(20_000)
    a = generate_triplets(labels, 5000, np.random.default_rng(7))
    b = generate_triplets(labels, 5000, np.random.default_rng(7))
    c = generate_triplets(labels, 5000, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_distribution_matches_the_enumerated_one():
    """Every valid triplet of a tiny label set has the probability the original sampling gives it."""
    labels = np.array([2, 0, 1, 2, 1, 3, 2])  # class sizes: 0:1, 1:2, 2:3, 3:1
    counts = np.bincount(labels)
    eligible = np.flatnonzero(counts >= 2)
    present = np.flatnonzero(counts > 0)
    expected = {}
    for a in range(len(labels)):
        for p in range(len(labels)):
            for n in range(len(labels)):
                la, ln = labels[a], labels[n]
                if a != p and labels[p] == la and ln != la and counts[la] >= 2:
                    # uniform anchor identity, ordered image pair, uniform other identity, uniform image
                    probability = (
                        1 / len(eligible) / (counts[la] * (counts[la] - 1)) / (len(present) - 1) / counts[ln]
                    )
                    expected[(a, p, n)] = probability
    num = 300_000
    triplets = generate_triplets(labels, num, np.random.default_rng(3))
    observed = Counter(map(tuple, triplets.tolist()))
    assert set(observed) == set(expected)
    for key, probability in expected.items():
        # 5 standard deviations of a binomial count
        assert abs(observed[key] - num * probability) < 5 * np.sqrt(num * probability * (1 - probability)) + 1


def test_blocks_use_a_fixed_number_of_identities():
    labels = synthetic_labels(50_000)
    counts = np.bincount(labels)
    batch_size, identities = 64, 8
    triplets = generate_triplets(labels, 64 * 50 + 10, np.random.default_rng(0), identities, batch_size)
    assert len(triplets) == 64 * 50 + 10
    assert_valid_triplets(triplets, labels)
    for start in range(0, len(triplets), batch_size):
        block = triplets[start : start + batch_size]
        used = set(labels[block[:, 0]]) | set(labels[block[:, 2]])
        assert len(used) <= identities
        assert all(counts[c] >= 2 for c in used)
    # blocks differ from one another
    first_block = set(labels[triplets[:64, 0]])
    assert first_block != set(labels[triplets[64:128, 0]])


def test_block_option_errors():
    labels = np.repeat(np.arange(5), 3)
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="needs batch_size"):
        generate_triplets(labels, 10, rng, num_human_identities_per_batch=3)
    with pytest.raises(InputError, match="more than the 5 identities"):
        generate_triplets(labels, 10, rng, num_human_identities_per_batch=6, batch_size=4)
    with pytest.raises(InputError, match="at least 2"):
        generate_triplets(labels, 10, rng, num_human_identities_per_batch=1, batch_size=4)


@pytest.mark.parametrize(
    "labels,message",
    [
        (np.arange(10), "no identity has two or more images"),
        (np.zeros(10, dtype=np.int64), "at least two identities"),
    ],
)
def test_impossible_label_sets(labels, message):
    with pytest.raises(InputError, match=message):
        generate_triplets(labels, 10, np.random.default_rng(0))


@pytest.mark.parametrize("num_triplets", [0, -1, 2.5, True])
def test_num_triplets_must_be_a_positive_int(num_triplets):
    with pytest.raises(InputError, match="num_triplets"):
        generate_triplets(np.repeat(np.arange(3), 2), num_triplets, np.random.default_rng(0))


# ---------------------------------------------------------------- TripletFaceDataset


def test_dataset_items_are_anchor_positive_negative_images(tiny_face_csv):
    root, csv_path = tiny_face_csv
    dataset = TripletFaceDataset(root, csv_path, num_triplets=20, transform=eval_transform(16), seed=3)
    assert len(dataset) == 20 and dataset.triplets_path is None
    assert_valid_triplets(dataset.triplets, dataset.table.labels)
    anchor, positive, negative = dataset[5]
    for image in (anchor, positive, negative):
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    rows = dataset.triplets[5]
    decode = dataset.loader.decode
    for image, row in zip((anchor, positive, negative), rows, strict=True):
        torch.testing.assert_close(image, eval_transform(16)(decode(str(dataset.table.paths[row]))))


def test_seed_and_epoch_give_new_reproducible_triplets(tiny_face_csv):
    root, csv_path = tiny_face_csv

    def triplets(**kwargs):
        return TripletFaceDataset(root, csv_path, num_triplets=50, **kwargs).triplets

    assert np.array_equal(triplets(seed=1, epoch=2), triplets(seed=1, epoch=2))
    assert not np.array_equal(triplets(seed=1, epoch=2), triplets(seed=1, epoch=3))
    assert not np.array_equal(triplets(seed=1, epoch=2), triplets(seed=2, epoch=2))
    # set_epoch gives what a dataset built for that epoch gives, without re-reading the csv
    dataset = TripletFaceDataset(root, csv_path, num_triplets=50, seed=1, epoch=0)
    dataset.set_epoch(2)
    assert np.array_equal(dataset.triplets, triplets(seed=1, epoch=2))
    with pytest.raises(InputError, match="seed"):
        triplets(seed=-1)


def test_set_epoch_saves_each_epochs_file(tiny_face_csv, tmp_path):
    root, csv_path = tiny_face_csv
    dataset = TripletFaceDataset(root, csv_path, num_triplets=8, output_dir=tmp_path / "run", seed=2)
    first = dataset.triplets_path
    dataset.set_epoch(1)
    assert dataset.triplets_path == str(tmp_path / "run" / "training_triplets_8_seed2_epoch1.npy")
    assert dataset.triplets_path != first
    assert np.array_equal(np.load(dataset.triplets_path), dataset.triplets)


def test_save_then_reload(tiny_face_csv, tmp_path):
    root, csv_path = tiny_face_csv
    out = tmp_path / "run"
    saved = TripletFaceDataset(root, csv_path, num_triplets=40, output_dir=out, seed=4, epoch=1)
    assert saved.triplets_path == str(out / "training_triplets_40_seed4_epoch1.npy")
    sidecar = json.loads((out / "training_triplets_40_seed4_epoch1.json").read_text())
    assert sidecar["csv_fingerprint"] == saved.table.fingerprint and sidecar["num_rows"] == 12
    assert np.array_equal(np.load(saved.triplets_path), saved.triplets)

    loaded = TripletFaceDataset(
        root, csv_path, num_triplets=40, training_triplets_path=saved.triplets_path, seed=99
    )
    assert np.array_equal(loaded.triplets, saved.triplets) and loaded.triplets_path == saved.triplets_path
    assert sorted(p.name for p in out.iterdir()) == [
        "training_triplets_40_seed4_epoch1.json",
        "training_triplets_40_seed4_epoch1.npy",
    ]


def test_a_triplets_file_of_another_csv_is_refused(tiny_face_csv, make_face_tree, tmp_path):
    root, csv_path = tiny_face_csv
    saved = TripletFaceDataset(root, csv_path, num_triplets=10, output_dir=tmp_path / "run")
    other_root = make_face_tree(counts=(2, 2, 2), root=tmp_path / "other")
    from datasets.generate_csv_files import generate_csv

    generate_csv(other_root, tmp_path / "other.csv")
    with pytest.raises(InputError, match="generated for another csv") as error:
        TripletFaceDataset(other_root, tmp_path / "other.csv", 10, training_triplets_path=saved.triplets_path)
    assert "\n" not in str(error.value)


def tampered(tmp_path, tiny_face_csv, change):
    root, csv_path = tiny_face_csv
    saved = TripletFaceDataset(root, csv_path, num_triplets=10, output_dir=tmp_path / "run")
    change(saved.triplets_path, saved.triplets)
    return lambda: TripletFaceDataset(root, csv_path, 10, training_triplets_path=saved.triplets_path)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda path, t: open(path, "wb").write(b"\x93NUMPY garbage"), "not a readable .npy"),
        (lambda path, t: open(path, "wb").write(b""), "not a readable .npy"),
        (lambda path, t: np.save(path, t + 100), "row indices outside 0..11"),
        (lambda path, t: np.save(path, t[:, :2]), r"expected an \(N, 3\) integer array"),
        (lambda path, t: np.save(path, t.astype(np.float32)), "integer array"),
        (lambda path, t: np.save(path, t[:, [0, 2, 1]]), "do not pair an anchor with its own identity"),
        (lambda path, t: open(path[:-4] + ".json", "w").write("{not json"), "unreadable"),
        (
            lambda path, t: open(path[:-4] + ".json", "w").write('{"format": "other"}'),
            "not a triplets sidecar",
        ),
    ],
)
def test_corrupted_triplets_files_are_refused(tiny_face_csv, tmp_path, change, message):
    build = tampered(tmp_path, tiny_face_csv, change)
    with pytest.raises(InputError, match=message):
        build()


def test_missing_triplets_file_or_sidecar(tiny_face_csv, tmp_path):
    root, csv_path = tiny_face_csv
    with pytest.raises(InputError, match="triplets file not found"):
        TripletFaceDataset(root, csv_path, 10, training_triplets_path=tmp_path / "none.npy")
    saved = TripletFaceDataset(root, csv_path, num_triplets=10, output_dir=tmp_path / "run")
    (tmp_path / "run" / "training_triplets_10_seed0_epoch0.json").unlink()
    with pytest.raises(InputError, match="sidecar .* is missing"):
        TripletFaceDataset(root, csv_path, 10, training_triplets_path=saved.triplets_path)


def test_a_tree_without_two_images_of_anyone_is_refused(make_face_tree, tmp_path):
    from datasets.generate_csv_files import generate_csv

    root = make_face_tree(counts=(1, 1, 1))
    generate_csv(root, tmp_path / "single.csv")
    with pytest.raises(InputError, match="single.csv: no identity has two or more images"):
        TripletFaceDataset(root, tmp_path / "single.csv", 10)


def test_a_corrupt_image_is_replaced_within_its_identity(tiny_face_csv, caplog):
    root, csv_path = tiny_face_csv
    dataset = TripletFaceDataset(root, csv_path, num_triplets=30, transform=eval_transform(16), seed=0)
    index = 0
    anchor_row, positive_row, _ = dataset.triplets[index]
    bad_path = dataset.table.paths[anchor_row]
    with open(bad_path, "r+b") as f:
        f.truncate(60)
    with caplog.at_level(logging.WARNING, logger="datasets.face_table"):
        anchor, positive, _ = dataset[index]
    assert str(bad_path) in caplog.text and dataset.loader.num_bad == 1
    # the stand-in is another image of the same identity, not the positive (each identity has 3 images)
    label = dataset.table.labels[anchor_row]
    others = [r for r in np.flatnonzero(dataset.table.labels == label) if r not in (anchor_row, positive_row)]
    decode = dataset.loader.decode
    expected = [eval_transform(16)(decode(str(dataset.table.paths[r]))) for r in others]
    assert any(torch.equal(anchor, e) for e in expected)
