"""--init_from, --reinit_head and --freeze_backbone_epochs: fine-tuning from any face checkpoint, on the CPU.

The source checkpoints are built here in every layout the loader reads (tests/checkpoint_layouts.py writes
them as their authors did; facenet-pytorch's InceptionResnetV1 is saved as its plain state dict), and each
starts a one-epoch run on the tiny synthetic dataset of tests/training_data.py.
"""

import os
import subprocess
import sys

import pytest
import torch

import train_center
import train_margin
import train_triplet
import training.engine
from tests.checkpoint_layouts import (
    EMBEDDING_DIM,
    THIS_REPO_MEAN,
    THIS_REPO_STD,
    original_2019_checkpoint,
    original_2020_checkpoint,
    randomize_batch_norm,
    reference_resnet,
    save_like_numpy1,
    state_dict_of,
    this_repository_checkpoint,
)
from tests.training_data import REPO
from training.cli import parse_args
from training.finetune import is_backbone, is_head

ORIGINAL_2021 = (140, (0.6071, 0.4609, 0.3944), (0.2457, 0.2175, 0.2129))
FACENET = (160, (127.5 / 255,) * 3, (128 / 255,) * 3)
ALIGNMENT = {"template": "arcface112", "image_size": 112, "margin": 0}
SCRIPTS = {"triplet": train_triplet, "center": train_center, "margin": train_margin}


def run_args(data, output_dir, source, *extra):
    """A tiny one-process run from ``source``: no --model, --embedding_dim or --image_size (the checkpoint's)."""
    return [
        "--dataroot", data.train_dir,
        "--lfw", data.lfw_dir,
        "--lfw_pairs", data.pairs_path,
        "--output_dir", output_dir,
        "--init_from", source,
        "--num_workers", "0",
        "--seed", "3",
        "--lfw_batch_size", "32",
        "--batch_size", "8",
        "--num_triplets_train", "16",
        "--amp", "off",
        *extra,
    ]  # fmt: skip


def run(data, output_dir, source, *extra, task="triplet", resume=False) -> int:
    argv = run_args(data, output_dir, source, *extra)
    if task != "triplet":  # the other scripts have no triplet flags
        index = argv.index("--num_triplets_train")
        del argv[index : index + 2]
    if resume:  # --resume_path instead of --init_from
        del argv[argv.index("--init_from") : argv.index("--init_from") + 2]
    return SCRIPTS[task].main([str(a) for a in argv])


def checkpoint_of(output_dir, epoch: int, model: str = "resnet18", task: str = "triplet") -> dict:
    path = output_dir / "checkpoints" / f"model_{model}_{task}_epoch_{epoch}.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def ours(tmp_path):
    """A center-loss checkpoint of this repository: resnet18, 16-d, 40 px, its own mean and std, an alignment."""
    net = reference_resnet(18, "sequential", num_classes=5, seed=21)
    path = tmp_path / "ours.pt"
    torch.save(
        {**this_repository_checkpoint(net, image_size=40, num_classes=5), "alignment": ALIGNMENT}, path
    )
    expected = {key: value for key, value in state_dict_of(net).items() if "classifier" not in key}
    return path, expected


def facenet_source(tmp_path):
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(22)
    facenet = randomize_batch_norm(InceptionResnetV1(classify=True, num_classes=7), seed=22).eval()
    path = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(facenet.state_dict(), path)  # as facenet-pytorch publishes it: a plain state dict
    return path, {f"model.{k}": v for k, v in facenet.state_dict().items() if not k.startswith("logits.")}


def original_source(tmp_path, year: str):
    if year == "2019":
        net = reference_resnet(18, "linear", seed=23)
        path = tmp_path / "model_resnet18_triplet.pt"
        save_like_numpy1(original_2019_checkpoint(net, "resnet18"), path, legacy_format=True)
    else:
        net = reference_resnet(18, "sequential", seed=24)
        path = tmp_path / f"model_resnet18_triplet_{year}.pt"
        save_like_numpy1(original_2020_checkpoint(net), path)
    return path, state_dict_of(net)


@pytest.fixture
def spy_initial_weights(monkeypatch):
    """The run's model state right after --init_from's weights went in (before any step)."""
    seen = {}
    real = training.engine.load_initial_weights

    def spy(model, source, args):
        real(model, source, args)
        seen.update({key: value.detach().clone() for key, value in model.state_dict().items()})

    monkeypatch.setattr(training.engine, "load_initial_weights", spy)
    return seen


def assert_backbone_equal(state: dict, expected: dict, architecture: str = "resnet18") -> int:
    """Every backbone tensor of ``expected`` is bit-identical in ``state``; returns how many were compared."""
    compared = 0
    for key, value in expected.items():
        if is_backbone(key, architecture):
            assert torch.equal(state[key].to(value.dtype), value), key
            compared += 1
    assert compared > 0
    return compared


# ------------------------------------------------------------------------------------------ every layout


@pytest.mark.parametrize("layout", ["ours", "original-2019", "original-2020", "original-2021", "facenet"])
def test_init_from_each_layout_trains_with_its_preprocessing(
    tiny_demo_data, tmp_path, ours, spy_initial_weights, layout
):
    extra, alignment, architecture, new_head = [], None, "resnet18", False
    if layout == "ours":
        (source, expected), preprocessing, alignment = ours, (40, THIS_REPO_MEAN, THIS_REPO_STD), ALIGNMENT
    elif layout == "facenet":
        (source, expected), preprocessing, architecture = (
            facenet_source(tmp_path),
            FACENET,
            "inception_resnet_v1",
        )
    else:
        source, expected = original_source(tmp_path, layout.removeprefix("original-"))
        preprocessing, new_head = (224, (0.5,) * 3, (0.5,) * 3), layout == "original-2019"
        if layout == "original-2021":  # the 2020 keys: only the preset tells its preprocessing
            extra, preprocessing = ["--preprocess", "original-2021"], ORIGINAL_2021
    output_dir = tmp_path / "run"
    assert run(tiny_demo_data, output_dir, source, "--epochs", "1", *extra) == 0

    # the run started from the source's weights (a 2019 head has no counterpart: its head is new)
    compared = assert_backbone_equal(spy_initial_weights, expected, architecture)
    head_keys = [key for key in expected if is_head(key, architecture)]
    if not new_head:
        assert head_keys and all(torch.equal(spy_initial_weights[k], expected[k]) for k in head_keys)
        assert compared + len(head_keys) == len(expected)
    checkpoint = checkpoint_of(output_dir, 1, architecture)
    assert checkpoint["model_architecture"] == architecture
    assert checkpoint["embedding_dimension"] == (512 if layout == "facenet" else EMBEDDING_DIM)
    size, mean, std = preprocessing
    assert checkpoint["image_size"] == size
    assert checkpoint["normalization"]["mean"] == pytest.approx(mean)
    assert checkpoint["normalization"]["std"] == pytest.approx(std)
    assert checkpoint.get("alignment") == alignment
    assert checkpoint["args"]["init_from"] == str(source) and checkpoint["epoch"] == 1


@pytest.mark.parametrize("how", ["resume_path", "auto"])
def test_resume_keeps_the_preprocessing_of_the_source(tiny_demo_data, tmp_path, ours, how):
    output_dir = tmp_path / "run"
    auto = ["--resume_path", "auto"] if how == "auto" else []  # the same command twice, as a requeued job
    assert run(tiny_demo_data, output_dir, ours[0], "--epochs", "1", *auto) == 0
    if how == "auto":
        assert run(tiny_demo_data, output_dir, ours[0], "--epochs", "2", *auto) == 0
    else:
        first = output_dir / "checkpoints" / "model_resnet18_triplet_epoch_1.pt"
        assert (
            run(tiny_demo_data, output_dir, ours[0], "--epochs", "2", "--resume_path", first, resume=True)
            == 0
        )
    assert "resumed from" in (output_dir / "train.log").read_text()
    second = checkpoint_of(output_dir, 2)
    assert (second["image_size"], second["alignment"], second["epoch"]) == (40, ALIGNMENT, 2)
    assert second["normalization"] == {"mean": list(THIS_REPO_MEAN), "std": list(THIS_REPO_STD)}


# ------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            ["--model", "resnet34"],
            "--model resnet34 conflicts with --init_from {source}, a resnet18 checkpoint",
        ),
        (
            ["--model", "resnet34", "--reinit_head"],
            "--reinit_head replaces the embedding head, not the backbone",
        ),
        (
            ["--embedding_dim", "8"],
            "--embedding_dim 8 conflicts with --init_from {source}, whose embedding_dim is 16",
        ),
        (
            ["--image_size", "64"],
            "--image_size 64 conflicts with --init_from {source}, which takes 40 px images",
        ),
        (["--pretrained"], "--init_from and --pretrained both choose the starting weights"),
        (
            ["--resume_path", "{source}"],
            "--init_from starts a new run from a checkpoint's weights and --resume_path",
        ),
    ],
)
def test_conflicting_flags_are_one_line_errors(tiny_demo_data, tmp_path, ours, capsys, extra, expected):
    source = ours[0]
    output_dir = tmp_path / "run"
    extra = [value.format(source=source) for value in extra]
    assert run(tiny_demo_data, output_dir, source, "--epochs", "1", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert expected.format(source=source) in err
    assert not output_dir.exists()


def test_missing_or_unreadable_init_file_is_named(tiny_demo_data, tmp_path, capsys):
    missing = tmp_path / "absent.pt"
    assert run(tiny_demo_data, tmp_path / "a", missing, "--epochs", "1") == 2
    assert capsys.readouterr().err == f"error: --init_from {missing}: no such file\n"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert run(tiny_demo_data, tmp_path / "b", junk, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --init_from: could not read checkpoint {junk}") and err.count("\n") == 1


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--preprocess", "original-2021"], "--preprocess applies to the checkpoint of --init_from"),
        (["--reinit_head"], "--reinit_head applies to the checkpoint of --init_from"),
        (["--freeze_backbone_epochs", "1"], "--freeze_backbone_epochs keeps starting weights fixed"),
    ],
)
def test_init_flags_without_init_from_are_errors(tiny_demo_data, tmp_path, capsys, extra, expected):
    argv = run_args(tiny_demo_data, tmp_path / "run", "x", "--epochs", "1", *extra)
    del argv[argv.index("--init_from") : argv.index("--init_from") + 2]
    assert train_triplet.main([str(a) for a in argv]) == 2
    assert expected in capsys.readouterr().err


def test_defaults_are_unchanged_and_only_given_flags_count():
    parser = train_triplet.get_args_parser()
    plain = parse_args(parser, ["-d", "x", "--lfw", "y"], {})
    assert (plain.model, plain.embedding_dim, plain.image_size, plain.freeze_backbone_epochs) == (
        "resnet34",
        128,
        160,
        0,
    )
    argv = ["--demo", "--init_from", "a.pt", "--embedding_dim", "8", "--freeze_back", "1"]
    demo = parse_args(train_triplet.get_args_parser(), argv, {})
    assert demo.model == "resnet18" and demo.embedding_dim == 8  # the demo's default; an abbreviated flag
    assert demo.freeze_backbone_epochs == 1 and "model" not in demo.given_flags
    assert {"embedding_dim", "init_from", "demo", "freeze_backbone_epochs"} <= set(demo.given_flags)


def test_reinit_head_trains_a_new_head_of_the_requested_size(
    tiny_demo_data, tmp_path, ours, spy_initial_weights
):
    source, expected = ours
    output_dir = tmp_path / "run"
    assert (
        run(tiny_demo_data, output_dir, source, "--epochs", "1", "--reinit_head", "--embedding_dim", "8") == 0
    )
    assert_backbone_equal(spy_initial_weights, expected)
    assert spy_initial_weights["model.fc.3.weight"].shape == (8, 512)
    assert not torch.equal(spy_initial_weights["model.fc.0.weight"], expected["model.fc.0.weight"])
    checkpoint = checkpoint_of(output_dir, 1)
    assert checkpoint["embedding_dimension"] == 8 and checkpoint["image_size"] == 40
    assert checkpoint["model_state_dict"]["model.fc.3.weight"].shape == (8, 512)


# ------------------------------------------------------------------------------------------ freezing


def backbone_changed(state: dict, expected: dict) -> bool:
    return any(not torch.equal(state[k], v) for k, v in expected.items() if is_backbone(k, "resnet18"))


def head_changed(state: dict, expected: dict) -> bool:
    return all(not torch.equal(state[k], v) for k, v in expected.items() if k.endswith("fc.3.weight"))


@pytest.mark.parametrize("task", ["triplet", "center", "margin"])
def test_frozen_epoch_trains_only_the_head_and_the_loss(tiny_demo_data, tmp_path, ours, task):
    source, expected = ours
    output_dir = tmp_path / "run"
    assert (
        run(tiny_demo_data, output_dir, source, "--epochs", "1", "--freeze_backbone_epochs", "1", task=task)
        == 0
    )
    checkpoint = checkpoint_of(output_dir, 1, task=task)
    state = checkpoint["model_state_dict"]
    assert_backbone_equal(state, expected)  # weights and batch-norm statistics alike
    assert head_changed(state, expected)
    if task == "center":  # a new classifier over the new identities, trained with the head
        assert state["model.classifier.weight"].shape == (6, EMBEDDING_DIM)


def test_backbone_trains_after_the_frozen_epochs_and_a_resume_stays_frozen(tiny_demo_data, tmp_path, ours):
    source, expected = ours
    two = tmp_path / "freeze_1_of_2"
    assert run(tiny_demo_data, two, source, "--epochs", "2", "--freeze_backbone_epochs", "1") == 0
    assert not backbone_changed(checkpoint_of(two, 1)["model_state_dict"], expected)
    assert backbone_changed(checkpoint_of(two, 2)["model_state_dict"], expected)

    # frozen for 2 epochs, stopped after 1; the resume (flag not repeated) continues frozen
    resumed = tmp_path / "freeze_2_resumed"
    assert run(tiny_demo_data, resumed, source, "--epochs", "1", "--freeze_backbone_epochs", "2") == 0
    first = resumed / "checkpoints" / "model_resnet18_triplet_epoch_1.pt"
    assert run(tiny_demo_data, resumed, source, "--epochs", "2", "--resume_path", first, resume=True) == 0
    state = checkpoint_of(resumed, 2)["model_state_dict"]
    assert_backbone_equal(state, expected)
    assert not torch.equal(
        state["model.fc.3.weight"], checkpoint_of(resumed, 1)["model_state_dict"]["model.fc.3.weight"]
    )


def test_freeze_under_two_processes_with_gloo(tiny_demo_data, tmp_path, ours):
    source, expected = ours
    output_dir = tmp_path / "ddp"
    argv = run_args(tiny_demo_data, output_dir, source, "--epochs", "2", "--freeze_backbone_epochs", "1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["train_triplet.py", *(str(a) for a in argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "x2 processes" in result.stdout
    assert not backbone_changed(checkpoint_of(output_dir, 1)["model_state_dict"], expected)
    assert head_changed(checkpoint_of(output_dir, 1)["model_state_dict"], expected)
    assert backbone_changed(checkpoint_of(output_dir, 2)["model_state_dict"], expected)


def test_sgd_trains_the_backbone_after_the_frozen_epochs_as_plain_sgd_would():
    """Only the head has momentum buffers after frozen steps; torch's fused SGD takes all or none (a TypeError
    at the first step after the unfreeze). The completed buffers give plain SGD's update exactly."""
    from models import build_model
    from training.builders import build_optimizer
    from training.finetune import complete_momentum_buffers, set_backbone_frozen

    torch.manual_seed(0)
    model = build_model("resnet18", embedding_dim=8)
    reference = build_model("resnet18", embedding_dim=8)
    reference.load_state_dict(model.state_dict())
    ours = build_optimizer("sgd", model.parameters(), lr=0.1, weight_decay=1e-5)
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-5, foreach=False)
    images = torch.randn(4, 3, 32, 32)
    for frozen in (True, False, False):
        for net, optimizer in ((model, ours), (reference, plain)):
            net.train()
            set_backbone_frozen(net, "resnet18", frozen)
            if not frozen:
                complete_momentum_buffers([optimizer])
            optimizer.zero_grad(set_to_none=True)
            net(images).pow(2).sum().backward()
            optimizer.step()
    for (name, ours_value), theirs in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(ours_value, theirs, rtol=1e-5, atol=1e-6, msg=name)
