"""End-to-end tests of train_center.py on a tiny synthetic dataset, on the CPU."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_center
from losses import CenterLoss
from tests.training_data import REPO, common_args
from training.runtime import Runtime
from training.step import backward_and_step


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


class FixedFeatures(torch.nn.Module):
    """A stand-in embedding model whose (N, D, 1, 1) "images" are the features (so the oracle knows them)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.classifier = torch.nn.Linear(dim, num_classes, dtype=torch.float64)

    def forward_training(self, images, logit_scale):
        features = images.flatten(1)
        return features, self.classifier(features * logit_scale)


def center_step(weight: float, features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor):
    """One step of the real CenterTask (its step, then backward_and_step); returns the new centers."""
    lr = 0.5
    task = train_center.CenterTask.__new__(train_center.CenterTask)
    task.args = SimpleNamespace(center_loss_weight=weight)
    task.runtime = Runtime(torch.device("cpu"))
    task.to_device = lambda images: images  # the features are the "images": no uint8 conversion here
    task.center_loss = CenterLoss(*centers.shape).double()
    task.center_loss.centers.data.copy_(centers)
    model = FixedFeatures(centers.shape[0], centers.shape[1])
    step_module = train_center.CenterLossModule(model, task.center_loss, logit_scale=1.0)
    task.optimizers = [
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.optim.SGD(task.center_loss.parameters(), lr=lr),
    ]
    out = task.step(step_module, (features[:, :, None, None], labels))
    backward_and_step(task, out.loss)
    return task.center_loss.centers.detach().clone()


def test_centers_move_by_lr_times_the_unweighted_center_gradient_whatever_the_weight():
    """The centers' SGD step is lr * dL_C/dc (L_C = mean_i ||x_i - c_yi||^2, written out here), for any
    --center_loss_weight: the weight is undone on the centers' gradient before their optimizer steps."""
    torch.manual_seed(0)
    features = torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1])
    centers = torch.randn(3, 4, dtype=torch.float64)
    # the oracle: d/dc_j of mean_i ||x_i - c_yi||^2 is (2 / batch) * sum over members of (c_j - x_i)
    expected = centers.clone()
    for j in range(3):
        members = features[labels == j]
        expected[j] -= 0.5 * (2.0 / len(features)) * (len(members) * centers[j] - members.sum(dim=0))
    for weight in (0.007, 1.0):
        torch.testing.assert_close(center_step(weight, features, labels, centers), expected)
    assert torch.equal(expected[2], centers[2])  # a class without members stays put


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


def test_a_val_target_named_like_the_lfw_folders_results_is_named_in_the_error(
    tiny_demo_data, tmp_path, capsys
):
    clash = tmp_path / "lfw.bin"
    clash.write_bytes(b"")
    assert run_main(center_args(tiny_demo_data, tmp_path / "out", "--val_targets", clash)) == 2
    assert capsys.readouterr().err == (
        f"error: --val_targets {clash}: 'lfw' names the --lfw folder's results; rename the file\n"
    )


def test_a_replaced_unreadable_image_is_in_train_log_too(tiny_demo_data, tmp_path, capsys):
    """The data pipeline's warnings belong to the run: train.log keeps them, not only the console."""
    import shutil

    data = tmp_path / "faces"
    shutil.copytree(tiny_demo_data.train_dir, data)
    broken = sorted(data.rglob("*.png"))[0]
    broken.write_text("not an image")
    assert run_main(center_args(tiny_demo_data, tmp_path / "out", "--dataroot", data, "--epochs", "1")) == 0
    text = (tmp_path / "out" / "train.log").read_text()
    assert f"replaced unreadable {broken}" in text
    assert f"replaced unreadable {broken}" in "".join(capsys.readouterr())  # and on the console, once
    # the run's handlers end with it: a later use of the datasets package does not write into this train.log
    import logging

    assert not logging.getLogger("datasets").handlers and not logging.getLogger("facenet").handlers


@pytest.mark.parametrize("script", ["train_center", "train_margin"])
def test_a_dataset_of_one_identity_is_refused_naming_the_data(tiny_demo_data, tmp_path, capsys, script):
    import shutil

    import train_margin

    one = tmp_path / "one_identity"
    first = sorted(p for p in Path(tiny_demo_data.train_dir).iterdir() if p.is_dir())[0]
    shutil.copytree(first, one / first.name)
    main = {"train_center": train_center.main, "train_margin": train_margin.main}[script]
    args = center_args(tiny_demo_data, tmp_path / "out", "--dataroot", one)
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --dataroot {one}: 1 identity; training a classifier needs at least 2\n"
    assert not (tmp_path / "out").exists()


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


@pytest.mark.parametrize("script", ["train_center", "train_margin"])
def test_an_epoch_never_ends_on_a_batch_of_one_image(tiny_demo_data, tmp_path, capsys, script):
    """30 images in batches of 29 would leave one image for the last step, which batch norm refuses in
    training: that image waits for the next epoch; a --batch_size of 1 is refused before any work."""
    import train_margin

    main = {"train_center": train_center.main, "train_margin": train_margin.main}[script]
    args = [str(a) for a in common_args(tiny_demo_data, tmp_path / "run")] + ["--epochs", "1"]
    assert main(args + ["--batch_size", "29"]) == 0
    with open(tmp_path / "run" / "training_log.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert int(row["num_images"]) == 29  # one step of 29; the 30th image is not a step of its own
    capsys.readouterr()
    assert main([str(a) for a in common_args(tiny_demo_data, tmp_path / "one")] + ["--batch_size", "1"]) == 2
    err = capsys.readouterr().err
    assert "--batch_size 1: batch norm needs at least 2 images a step" in err and "Traceback" not in err
    assert not (tmp_path / "one").exists()


def _one_epoch_checkpoint(data, tmp_path) -> Path:
    assert run_main(center_args(data, tmp_path / "first", "--epochs", "1")) == 0
    return tmp_path / "first" / "checkpoints" / "model_resnet18_center_epoch_1.pt"


def test_checkpoints_that_cannot_resume_are_one_line_errors_naming_them(tiny_demo_data, tmp_path, capsys):
    checkpoint = _one_epoch_checkpoint(tiny_demo_data, tmp_path)
    # a dataset of 5 of the 6 identities: the classifier's rows would not fit
    fewer = tmp_path / "fewer"
    shutil.copytree(tiny_demo_data.train_dir, fewer)
    shutil.rmtree(sorted(path for path in fewer.iterdir() if path.is_dir())[0])
    resume = ["--resume_path", checkpoint, "--epochs", "2"]
    args = center_args(tiny_demo_data, tmp_path / "unused", *resume)
    args[args.index("--dataroot") + 1] = fewer
    capsys.readouterr()
    assert run_main(args) == 2
    err = capsys.readouterr().err
    assert "error: --resume_path: the checkpoint was trained on 6 identities, the dataset has 5" in err
    assert "Traceback" not in err

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cases = {
        "partial.pt": (
            {key: saved[key] for key in ("model_state_dict", "format_version", "task")},
            "an incomplete checkpoint (no model_architecture, embedding_dimension",
        ),
        "foreign.pt": (
            {**saved, "model_state_dict": {"x": torch.zeros(1)}},
            "does not fit this run (Missing key",
        ),
        "no_centers.pt": (
            {key: value for key, value in saved.items() if key != "center_loss_state_dict"},
            "does not fit this run (no 'center_loss_state_dict')",
        ),
    }
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / name)
        resume = ["--resume_path", tmp_path / name, "--epochs", "2"]
        assert run_main(center_args(tiny_demo_data, tmp_path / "unused", *resume)) == 2, name
        err = capsys.readouterr().err
        assert f"error: --resume_path {tmp_path / name}: {message}" in err, err
        assert len(err.strip().splitlines()) == 1, err
