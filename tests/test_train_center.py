"""End-to-end tests of train_center.py on a tiny synthetic dataset, on the CPU."""

import csv
import os
import subprocess
import sys

import pytest
import torch

import train_center
from losses import CenterLoss
from tests.training_data import REPO, common_args


def run_main(args) -> int:
    return train_center.main([str(a) for a in args])


def center_args(data, output_dir, *extra):
    return [*common_args(data, output_dir), "--batch_size", "10", *extra]


def test_one_epoch_writes_every_file(tiny_demo_data, tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert run_main(center_args(tiny_demo_data, output_dir, "--epochs", "1")) == 0
    assert "Accuracy on LFW" in capsys.readouterr().out
    checkpoint = torch.load(
        output_dir / "checkpoints" / "model_resnet18_center_epoch_1.pt", map_location="cpu", weights_only=True
    )
    original_keys = {
        "epoch",
        "num_classes",
        "embedding_dimension",
        "batch_size_training",
        "model_state_dict",
        "model_architecture",
        "optimizer_model_state_dict",
        "optimizer_centerloss_state_dict",
        "best_distance_threshold",
    }
    assert original_keys <= set(checkpoint)
    assert checkpoint["num_classes"] == 6
    assert checkpoint["model_state_dict"]["model.classifier.weight"].shape == (6, 16)
    assert checkpoint["center_loss_state_dict"]["centers"].shape == (6, 16)
    with (output_dir / "training_log.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert int(row["num_images"]) == 30  # every image once
    for name in ("roc_resnet18_epoch_1.png", "lfw_accuracies.png", "training_loss.png"):
        assert (output_dir / "plots" / name).is_file()


def test_resume_gives_the_same_weights_and_centers(tiny_demo_data, tmp_path):
    straight = tmp_path / "straight"
    assert run_main(center_args(tiny_demo_data, straight, "--epochs", "2")) == 0
    split = tmp_path / "split"
    assert run_main(center_args(tiny_demo_data, split, "--epochs", "1")) == 0
    first = split / "checkpoints" / "model_resnet18_center_epoch_1.pt"
    assert run_main(center_args(tiny_demo_data, split, "--epochs", "2", "--resume_path", first)) == 0
    a = torch.load(straight / "checkpoints" / "model_resnet18_center_epoch_2.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "model_resnet18_center_epoch_2.pt", weights_only=True)
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key
    assert torch.equal(a["center_loss_state_dict"]["centers"], b["center_loss_state_dict"]["centers"])


def test_centers_step_divides_the_gradient_by_the_weight_before_stepping():
    """One training step of the real task moves the centers by lr * dL_center/dc, whatever the weight."""
    from types import SimpleNamespace

    weight, lr = 0.007, 0.5
    task = train_center.CenterTask.__new__(train_center.CenterTask)
    task.args = SimpleNamespace(center_loss_weight=weight)
    task.center_loss = CenterLoss(3, 4).double()
    task.optimizers = [torch.optim.SGD(task.center_loss.parameters(), lr=lr)]
    features = torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1])
    before = task.center_loss.centers.detach().clone()
    (weight * task.center_loss(features, labels)).backward()
    task.before_optimizer_step()
    task.optimizers[0].step()
    for j, n_j in ((0, 2), (1, 3)):
        members = features[labels == j]
        expected = before[j] - lr * (2.0 / 5) * (n_j * before[j] - members.sum(dim=0))
        torch.testing.assert_close(task.center_loss.centers[j].detach(), expected)
    torch.testing.assert_close(task.center_loss.centers[2].detach(), before[2])


def test_two_processes_with_gloo(tiny_demo_data, tmp_path):
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "train_center.py", *(str(a) for a in center_args(tiny_demo_data, output_dir, "--epochs", "1")),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("Accuracy on LFW") == 1
    with (output_dir / "training_log.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert int(row["num_images"]) == 30  # 15 per process


@pytest.mark.parametrize(
    "change, message",
    [
        (["--dataroot", "/nonexistent/faces"], "--dataroot /nonexistent/faces: no such folder"),
        (["--lfw_pairs", "/nonexistent/pairs.txt"], "--lfw_pairs /nonexistent/pairs.txt: no such file"),
    ],
)
def test_bad_paths_are_one_line_errors(tiny_demo_data, tmp_path, capsys, change, message):
    assert run_main(center_args(tiny_demo_data, tmp_path / "out", *change)) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


@pytest.mark.parametrize("flag", ["--center_loss_weight", "--center_loss_lr", "--logit_scale"])
def test_non_positive_center_settings_are_refused(tiny_demo_data, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as raised:
        run_main(center_args(tiny_demo_data, tmp_path / "out", flag, "0"))
    assert raised.value.code == 2 and flag in capsys.readouterr().err


def test_a_triplet_checkpoint_cannot_resume_center_training(tiny_demo_data, tmp_path, capsys):
    import train_triplet

    triplet_dir = tmp_path / "triplet"
    args = [
        *common_args(tiny_demo_data, triplet_dir),
        "--num_triplets_train",
        "8",
        "--batch_size",
        "8",
        "--epochs",
        "1",
    ]
    assert train_triplet.main([str(a) for a in args]) == 0
    checkpoint = triplet_dir / "checkpoints" / "model_resnet18_triplet_epoch_1.pt"
    capsys.readouterr()
    assert run_main(center_args(tiny_demo_data, tmp_path / "c", "--resume_path", checkpoint)) == 2
    assert "a triplet checkpoint cannot resume center training" in capsys.readouterr().err
