"""Training from a RecordIO .rec and validating on .bin verification sets, end to end, on the CPU."""

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eval_metrics
import train_center
import train_triplet
from datasets.generate_csv_files import generate_csv
from datasets.labelled_faces import LabelledFaceDataset
from datasets.lfw_dataset import LFWDataset
from datasets.recordio_writer import write_recordio
from datasets.transforms import eval_transform
from datasets.triplet_dataset import TripletFaceDataset
from datasets.verification_bin import VerificationBinDataset, write_verification_bin
from tests.conftest import SHARED_DATA
from tests.training_data import common_args
from verification import evaluate_model_on_lfw


@pytest.fixture(scope="module")
def packed(tiny_demo_data, tmp_path_factory):
    """The tiny demo training folder as a .rec, its CSV, and its LFW-like part as a .bin."""
    root = tmp_path_factory.mktemp("formats")
    rec = root / "train.rec"
    write_recordio(tiny_demo_data.train_dir, rec)
    csv_path = root / "train.csv"
    generate_csv(tiny_demo_data.train_dir, csv_path)
    bin_path = root / "demo_pairs.bin"
    write_verification_bin(tiny_demo_data.lfw_dir, tiny_demo_data.pairs_path, bin_path)
    return rec, csv_path, bin_path


def test_labelled_dataset_from_a_rec_equals_the_folder(tiny_demo_data, packed):
    rec, csv_path, _ = packed
    from_rec = LabelledFaceDataset(rec, transform=eval_transform(32))
    from_folder = LabelledFaceDataset(tiny_demo_data.train_dir, csv_path, transform=eval_transform(32))
    assert from_rec.num_classes == from_folder.num_classes == 6 and len(from_rec) == len(from_folder) == 30
    assert from_rec.labels.tolist() == from_folder.labels.tolist()
    for index in range(len(from_rec)):
        (image, label), (expected, expected_label) = from_rec[index], from_folder[index]
        assert label == expected_label and torch.equal(image, expected)


def test_triplet_dataset_from_a_rec_draws_and_loads_the_same_triplets(tiny_demo_data, packed, tmp_path):
    rec, csv_path, _ = packed
    common = {"num_triplets": 20, "transform": eval_transform(32), "seed": 5}
    from_rec = TripletFaceDataset(rec, None, output_dir=tmp_path / "rec", **common)
    from_folder = TripletFaceDataset(tiny_demo_data.train_dir, csv_path, **common)
    np.testing.assert_array_equal(from_rec.triplets, from_folder.triplets)
    for index in range(len(from_rec)):
        for image, expected in zip(from_rec[index], from_folder[index], strict=True):
            assert torch.equal(image, expected)
    # the saved triplets belong to the .rec: reusable with it, refused with the folder's CSV
    reused = TripletFaceDataset(rec, None, training_triplets_path=from_rec.triplets_path, **common)
    np.testing.assert_array_equal(reused.triplets, from_rec.triplets)
    with pytest.raises(ValueError, match="generated for another csv"):
        TripletFaceDataset(
            tiny_demo_data.train_dir, csv_path, training_triplets_path=from_rec.triplets_path, **common
        )


def read_log(output_dir):
    with (output_dir / "training_log.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(
    "script, extra",
    [
        (train_triplet, ["--num_triplets_train", "24", "--batch_size", "8"]),
        (train_triplet, ["--num_triplets_train", "24", "--triplet_selection", "batch_all"]
         + ["--identities_per_batch", "3", "--images_per_identity", "3"]),
        (train_center, ["--batch_size", "10"]),
    ],
    ids=["triplet-hard", "triplet-batch-all", "center"],
)  # fmt: skip
def test_every_training_mode_trains_from_a_rec_and_validates_on_a_bin(
    tiny_demo_data, packed, tmp_path, script, extra
):
    rec, _, bin_path = packed
    args = common_args(tiny_demo_data, tmp_path / "run")
    args[args.index("--dataroot") + 1] = rec
    args += [*extra, "--epochs", "1", "--val_targets", bin_path]
    assert script.main([str(a) for a in args]) == 0
    assert not (tmp_path / "run" / "dataset.csv").exists()  # the .idx lists the images: no folder walk
    (row,) = read_log(tmp_path / "run")
    # the .bin holds the same pairs as the LFW folder + pairs file: the same model scores the same on both
    assert float(row["demo_pairs_accuracy_mean"]) == pytest.approx(float(row["accuracy_mean"]), abs=1e-12)
    assert float(row["demo_pairs_roc_auc"]) == pytest.approx(float(row["roc_auc"]), abs=1e-12)
    assert (tmp_path / "run" / "plots" / "roc_demo_pairs_resnet18_epoch_1.png").is_file()
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert "Accuracy on LFW" in log_text and "Accuracy on demo_pairs" in log_text


def test_a_bin_alone_validates_the_run(tiny_demo_data, packed, tmp_path):
    _, _, bin_path = packed
    args = [*common_args(tiny_demo_data, tmp_path / "run"), "--num_triplets_train", "24", "--batch_size", "8"]
    lfw_at = args.index("--lfw")
    del args[lfw_at : lfw_at + 4]  # no --lfw, no --lfw_pairs
    assert train_triplet.main([str(a) for a in args + ["--epochs", "1", "--val_targets", bin_path]]) == 0
    (row,) = read_log(tmp_path / "run")
    assert 0.0 < float(row["accuracy_mean"]) and "demo_pairs_accuracy_mean" not in row
    checkpoint = torch.load(
        tmp_path / "run" / "checkpoints" / "model_resnet18_triplet_epoch_1.pt", weights_only=True
    )
    assert checkpoint["best_distance_threshold"] == pytest.approx(float(row["best_distance_threshold_mean"]))
    assert checkpoint["history"]["target_accuracies"] == {"demo_pairs": [float(row["accuracy_mean"])]}


def test_an_lfw_bin_given_as_lfw_is_the_lfw_target(tiny_demo_data, packed, tmp_path):
    """validate_on_LFW.py takes `--lfw lfw.bin`, and so does training: the target is named lfw, as the folder."""
    _, _, bin_path = packed
    twin = tmp_path / "twin.bin"
    twin.write_bytes(bin_path.read_bytes())
    args = [*common_args(tiny_demo_data, tmp_path / "run"), "--num_triplets_train", "24", "--batch_size", "8"]
    lfw_at = args.index("--lfw")
    args[lfw_at : lfw_at + 4] = ["--lfw", bin_path]  # no --lfw_pairs
    assert train_triplet.main([str(a) for a in args + ["--epochs", "1", "--val_targets", twin]]) == 0
    (row,) = read_log(tmp_path / "run")
    assert 0.0 < float(row["accuracy_mean"]) == pytest.approx(float(row["twin_accuracy_mean"]), abs=1e-12)
    checkpoint = torch.load(
        tmp_path / "run" / "checkpoints" / "model_resnet18_triplet_epoch_1.pt", weights_only=True
    )
    assert set(checkpoint["history"]["target_accuracies"]) == {"lfw", "twin"}
    assert "Accuracy on LFW" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize(
    "change, message",
    [
        (["--dataroot", "{tmp}/missing.rec"], "--dataroot {tmp}/missing.rec: no such file"),
        (["--dataroot", "{tmp}/no_index.rec"], "its index {tmp}/no_index.idx is missing"),
        (["--val_targets", "{tmp}/missing.bin"], "--val_targets {tmp}/missing.bin: no such file"),
        (
            ["--lfw", "{tmp}/lfw.bin"],
            "--lfw_pairs goes with an --lfw folder; {tmp}/lfw.bin is a file (a .bin holds its pairs)",
        ),
    ],
)
def test_bad_rec_and_bin_paths_are_one_line_errors(tiny_demo_data, tmp_path, capsys, change, message):
    (tmp_path / "no_index.rec").write_bytes(b"")
    (tmp_path / "lfw.bin").write_bytes(b"")
    args = [*common_args(tiny_demo_data, tmp_path / "run"), "--epochs", "1"]
    args += [part.format(tmp=tmp_path) for part in change]
    assert train_triplet.main([str(a) for a in args]) == 2
    assert capsys.readouterr().err.strip().endswith(message.format(tmp=tmp_path))
    assert not (tmp_path / "run").exists()


class PooledEmbedder(nn.Module):
    """A fixed, cheap embedding model: pool to 4x4, a seeded linear map, normalise."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(48, 16)

    def forward(self, images):
        return F.normalize(self.linear(F.adaptive_avg_pool2d(images, 4).flatten(1)), dim=1)


def test_an_lfw_bin_evaluates_exactly_like_the_lfw_folder(tmp_path):
    """lfw.bin written from the shared LFW crops and pairs.txt: the same model gets the same metrics."""
    bin_path = tmp_path / "lfw.bin"
    write_verification_bin(SHARED_DATA / "lfw_112", SHARED_DATA / "lfw_pairs.txt", bin_path)
    model, transform = PooledEmbedder(), eval_transform(32)
    folder = LFWDataset(SHARED_DATA / "lfw_112", SHARED_DATA / "lfw_pairs.txt", transform=transform)
    packed = VerificationBinDataset(bin_path, transform=transform)
    folder_metrics, folder_distances = evaluate_model_on_lfw(model, folder, "cpu", 256, progress=False)
    bin_metrics, bin_distances = evaluate_model_on_lfw(model, packed, "cpu", 256, progress=False)
    np.testing.assert_array_equal(bin_distances, folder_distances)
    assert eval_metrics.metrics_summary(bin_metrics) == eval_metrics.metrics_summary(folder_metrics)
