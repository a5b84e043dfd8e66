"""End-to-end tests of train_margin.py (ArcFace / CosFace with a sharded, sampled classifier) on the CPU."""

import csv
import os
import subprocess
import sys

import pytest
import torch

import train_margin
from inference import load_checkpoint
from losses.partial_fc import CosineClassifier
from tests.training_data import REPO, common_args


def margin_args(data, output_dir, *extra):
    args = [*common_args(data, output_dir), "--batch_size", "10", *extra]
    # margin training keeps its own defaults (adam, with the class centers at 100x the lr)
    for flag in ("--optimizer", "--lr"):
        at = args.index(flag)
        del args[at : at + 2]
    return [str(a) for a in args]


def checkpoint_of(output_dir, epoch):
    path = output_dir / "checkpoints" / f"model_resnet18_margin_epoch_{epoch}.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def test_one_epoch_writes_a_checkpoint_with_the_full_classifier(tiny_demo_data, tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert train_margin.main(margin_args(tiny_demo_data, output_dir, "--epochs", "1")) == 0
    assert "Accuracy on LFW" in capsys.readouterr().out
    checkpoint = checkpoint_of(output_dir, 1)
    for key in ("epoch", "num_classes", "embedding_dimension", "model_state_dict", "model_architecture",
                "optimizer_model_state_dict", "best_distance_threshold", "classifier_state_dict"):  # fmt: skip
        assert key in checkpoint, key
    classifier = checkpoint["classifier_state_dict"]
    assert checkpoint["num_classes"] == 6 and classifier["weight"].shape == (6, 16)
    assert classifier["optimizer"]["momentum_buffer"].shape == (6, 16)
    assert checkpoint["margins"] == [1.0, 0.5, 0.0] and checkpoint["margin_scale"] == 64.0
    assert checkpoint["args"]["optimizer"] == "adam" and checkpoint["args"]["lr_schedule"] == "poly"
    with (output_dir / "training_log.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert int(row["num_images"]) == 30
    # the warmup: one epoch of 3 steps rises to the full lr at the epoch's last step
    assert float(row["lr"]) == pytest.approx(1e-3)
    # the embedding model alone is what inference loads
    loaded = load_checkpoint(output_dir / "checkpoints" / "model_resnet18_margin_epoch_1.pt")
    assert loaded.embedding_dim == 16 and loaded.image_size == 32


def test_the_logged_loss_is_the_classifier_loss_of_the_saved_weights_at_lr_zero(tiny_demo_data, tmp_path):
    """With a zero lr nothing moves, so the epoch's average loss equals the cross-entropy of the initial
    classifier over the whole epoch, recomputed here from the checkpoint with the same batches."""
    output_dir = tmp_path / "run"
    args = margin_args(tiny_demo_data, output_dir, "--epochs", "1", "--lr", "1e-30", "--loss", "cosface")
    args += ["--amp", "off"]  # the recomputation below is in fp32
    assert train_margin.main(args) == 0
    checkpoint = checkpoint_of(output_dir, 1)
    parsed = train_margin.parse_args(train_margin.get_args_parser(), args, {})
    from training.runtime import Runtime, epoch_seed

    task = train_margin.MarginTask(parsed, Runtime(torch.device("cpu")))
    task.model.load_state_dict(checkpoint["model_state_dict"])
    task.model.train()
    torch.manual_seed(epoch_seed(parsed.seed, 0))
    total, count = 0.0, 0
    with torch.no_grad():
        for images, labels in task.batches(0, 0):
            classifier = CosineClassifier(6, 16, margin=(1.0, 0.0, 0.35), scale=64.0, seed=parsed.seed)
            loss = classifier(task.model(task.to_device(images)), labels)
            total += float(loss) * len(labels)
            count += len(labels)
    with (output_dir / "training_log.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert float(row["train_loss"]) == pytest.approx(total / count, rel=1e-4)


def test_sampled_classifier_trains_and_keeps_untouched_centers(tiny_demo_data, tmp_path):
    output_dir = tmp_path / "run"
    assert (
        train_margin.main(margin_args(tiny_demo_data, output_dir, "--epochs", "1", "--sample_rate", "0.2"))
        == 0
    )
    checkpoint = checkpoint_of(output_dir, 1)
    assert checkpoint["args"]["sample_rate"] == 0.2
    assert torch.isfinite(checkpoint["classifier_state_dict"]["weight"]).all()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sample_rate", "1.5"], "--sample_rate must be in (0, 1]"),
        (["--loss", "combined", "--margin", "0.3"], "give --margins M1 M2 M3 for combined"),
        (["--loss", "combined", "--margins", "0", "0.3", "0.2"], "--margins: M1 multiplies the angle"),
        (["--loss", "cosface", "--margins", "1", "0.3", "0.2"], "--loss cosface takes --margin"),
    ],
)
def test_bad_margin_settings_are_one_line_errors(tiny_demo_data, tmp_path, capsys, extra, message):
    assert train_margin.main(margin_args(tiny_demo_data, tmp_path / "run", "--epochs", "1", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("margins", [["1", "nan", "0.2"], ["1", "0.3", "inf"], ["1", "-0.5", "0"]])
def test_margins_that_are_not_finite_or_are_negative_are_refused(tiny_demo_data, tmp_path, capsys, margins):
    args = margin_args(tiny_demo_data, tmp_path / "run", "--loss", "combined", "--margins", *margins)
    with pytest.raises(SystemExit) as raised:
        train_margin.main(args)
    assert raised.value.code == 2
    assert "argument --margins: must be a number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_resume_under_another_loss_takes_that_losss_default_margin(tiny_demo_data, tmp_path):
    """--margin is ArcFace's angle or CosFace's cosine margin: a run begun with --loss arcface --margin 0.4
    and resumed with --loss cosface gets CosFace's 0.35, not an angle of 0.4 read as a cosine margin."""
    output_dir = tmp_path / "run"
    first = margin_args(tiny_demo_data, output_dir, "--epochs", "1", "--loss", "arcface", "--margin", "0.4")
    assert train_margin.main(first) == 0
    assert checkpoint_of(output_dir, 1)["margins"] == [1.0, 0.4, 0.0]
    checkpoints = output_dir / "checkpoints"

    def resume(epoch, *extra):
        at = str(checkpoints / f"model_resnet18_margin_epoch_{epoch}.pt")
        return margin_args(
            tiny_demo_data, output_dir, "--resume_path", at, "--epochs", str(epoch + 1), *extra
        )

    assert train_margin.main(resume(1, "--loss", "cosface")) == 0
    assert checkpoint_of(output_dir, 2)["margins"] == [1.0, 0.0, 0.35]
    # a switch to combined takes --margins without a clash with the run's --margin
    assert train_margin.main(resume(2, "--loss", "combined", "--margins", "1", "0.3", "0.2")) == 0
    assert checkpoint_of(output_dir, 3)["margins"] == [1.0, 0.3, 0.2]


def test_two_processes_shard_the_classifier(tiny_demo_data, tmp_path):
    output_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "train_margin.py", *margin_args(tiny_demo_data, output_dir, "--epochs", "1")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "x2 processes" in result.stdout and result.stdout.count("Accuracy on LFW") == 1
    checkpoint = checkpoint_of(output_dir, 1)
    # rank 0 gathered both shards (3 + 3 of the 6 classes) into one full classifier
    assert checkpoint["classifier_state_dict"]["weight"].shape == (6, 16)
    with (output_dir / "training_log.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert int(row["num_images"]) == 30


@pytest.mark.parametrize(
    "extra, centers_lr",
    [([], 0.1), (["--optimizer", "sgd", "--lr", "0.1"], 0.1), (["--classifier_lr_scale", "10"], 0.01)],
    ids=["adam-default", "sgd-papers", "explicit"],
)
def test_the_class_centers_lr_follows_the_optimizer(tiny_demo_data, tmp_path, extra, centers_lr):
    from training.runtime import Runtime

    args = margin_args(tiny_demo_data, tmp_path / "run", *extra)
    parsed = train_margin.parse_args(train_margin.get_args_parser(), args, {})
    task = train_margin.MarginTask(parsed, Runtime(torch.device("cpu")))
    assert task.optimizers[1].param_groups[0]["lr"] == pytest.approx(centers_lr)
