"""End-to-end tests of train_triplet.py on a tiny synthetic dataset, on the CPU."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval_metrics
import train_triplet
from datasets.lfw_dataset import find_lfw_image, read_pairs
from errors import InputError
from inference import FaceEmbedder, distance
from tests.training_data import REPO, common_args
from training.cli import parse_args


def run_main(args) -> int:
    return train_triplet.main([str(a) for a in args])


def triplet_args(data, output_dir, *extra):
    return [*common_args(data, output_dir), "--num_triplets_train", "24", "--batch_size", "8", *extra]


def pairwise_oracle(checkpoint_path, data) -> dict:
    """LFW metrics of a checkpoint from the pairs file read line by line, each pair embedded on its own."""
    pairs = read_pairs(data.pairs_path)
    embedder = FaceEmbedder(checkpoint_path)
    distances = [
        distance(
            *embedder.embed([find_lfw_image(str(data.lfw_dir), *a), find_lfw_image(str(data.lfw_dir), *b)])
        )
        for a, b in zip(pairs.first, pairs.second, strict=True)
    ]
    metrics = eval_metrics.evaluate_lfw(np.array(distances, dtype=np.float64), pairs.issame, num_folds=10)
    return eval_metrics.metrics_summary(metrics)


def test_one_epoch_writes_every_file(tiny_demo_data, tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert run_main(triplet_args(tiny_demo_data, output_dir, "--epochs", "1")) == 0
    out = capsys.readouterr().out
    assert "Accuracy on LFW" in out and "TAR" in out and "average triplet loss" in out

    checkpoint_path = output_dir / "checkpoints" / "model_resnet18_triplet_epoch_1.pt"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    original_keys = {
        "epoch",
        "embedding_dimension",
        "batch_size_training",
        "model_state_dict",
        "model_architecture",
        "optimizer_model_state_dict",
        "best_distance_threshold",
    }
    assert original_keys <= set(checkpoint)
    assert checkpoint["epoch"] == 1 and checkpoint["model_architecture"] == "resnet18"
    assert checkpoint["embedding_dimension"] == 16 and checkpoint["batch_size_training"] == 8
    assert type(checkpoint["best_distance_threshold"]) is float
    assert checkpoint["validation_precision"] == "off"  # --amp auto validates in fp32 on the CPU
    assert {"model.fc.0.weight", "model.fc.3.weight"} <= set(checkpoint["model_state_dict"])

    with (output_dir / "training_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    # the default, batch-all over 3 batches of 2 identities x 4 images: at most 2 * 4 * 3 * 4 triplets each
    assert 0 < int(rows[0]["num_triplets"]) <= 3 * 96
    # the logged validation is that of the saved model: an independent evaluation (each pair's two images
    # embedded alone by the inference API, then the ten-fold protocol) gives the same numbers
    oracle = pairwise_oracle(checkpoint_path, tiny_demo_data)
    assert float(rows[0]["accuracy_mean"]) == pytest.approx(oracle["accuracy_mean"], abs=1e-9)
    assert float(rows[0]["roc_auc"]) == pytest.approx(oracle["roc_auc"], abs=1e-6)
    assert checkpoint["best_distance_threshold"] == pytest.approx(oracle["best_distance_threshold_mean"])
    for name in ("roc_resnet18_epoch_1.png", "lfw_accuracies.png", "training_loss.png"):
        assert (output_dir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((output_dir / "run_config.json").read_text())
    assert config["task"] == "triplet" and config["margin"] == 0.2
    assert (output_dir / "train.log").read_text().count("Accuracy on LFW") == 1
    assert list(output_dir.glob("**/*.tmp*")) == []


@pytest.mark.parametrize("selection", ["hard-selection-pass", "semihard", "batch_hard", "batch_all"])
def test_other_selection_rules_train(tiny_demo_data, tmp_path, selection):
    extra = ["--epochs", "1", "--triplet_selection", selection.removesuffix("-selection-pass")]
    if selection.endswith("-selection-pass"):
        extra.append("--selection_pass")
    if selection.startswith("batch"):
        extra += ["--identities_per_batch", "4", "--images_per_identity", "3"]
    assert run_main(triplet_args(tiny_demo_data, tmp_path / selection, *extra)) == 0
    checkpoint = torch.load(
        tmp_path / selection / "checkpoints" / "model_resnet18_triplet_epoch_1.pt", weights_only=True
    )
    assert checkpoint["args"]["triplet_selection"] == selection.removesuffix("-selection-pass")
    assert checkpoint["args"]["selection_pass"] is selection.endswith("-selection-pass")
    assert checkpoint["history"]["epochs"] == [1]
    # --identities_per_batch 4 x 3 images overrides --batch_size 8, and the log says so
    note = (
        "batches of 4 identities x 3 images = 12 images, not --batch_size 8 (--identities_per_batch decides)"
    )
    assert (note in (tmp_path / selection / "train.log").read_text()) is selection.startswith("batch")


@pytest.mark.parametrize(
    "extra, most_triplets",
    [
        ([], 2 * 2 * 96),  # batch-all: 2 processes x 2 steps of 2 identities x 4 images
        (["--triplet_selection", "hard"], 24),
        (["--triplet_selection", "hard", "--selection_pass"], 24),
    ],
    ids=["batch-all", "one-pass", "selection-pass"],
)
def test_two_processes_with_gloo(tiny_demo_data, tmp_path, extra, most_triplets):
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "train_triplet.py",
        *(str(a) for a in triplet_args(tiny_demo_data, output_dir, "--epochs", "1", *extra)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "x2 processes" in result.stdout
    assert result.stdout.count("Accuracy on LFW") == 1  # validation on rank 0 only
    checkpoint = torch.load(
        output_dir / "checkpoints" / "model_resnet18_triplet_epoch_1.pt", weights_only=True
    )
    assert checkpoint["epoch"] == 1
    # pre-generated: each of the two processes trained on its own 12 of the 24 triplets (2 steps of 8 + 4)
    with (output_dir / "training_log.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert 0 < int(row["num_triplets"]) <= most_triplets


@pytest.mark.parametrize(
    "change, message",
    [
        (["--dataroot", "/nonexistent/faces"], "--dataroot /nonexistent/faces: no such folder"),
        (["--lfw", "/nonexistent/lfw"], "--lfw /nonexistent/lfw: no such folder or file"),
        (["--lfw_pairs", "/nonexistent/pairs.txt"], "--lfw_pairs /nonexistent/pairs.txt: no such file"),
        (["--resume_path", "/nonexistent/ckpt.pt"], "--resume_path /nonexistent/ckpt.pt: no such file"),
        (["--resume_path", "/tmp"], "--resume_path /tmp: a folder, not a file"),
        (["--init_from", "/tmp"], "--init_from /tmp: a folder, not a file"),
    ],
)
def test_bad_paths_are_one_line_errors(tiny_demo_data, tmp_path, capsys, change, message):
    args = triplet_args(tiny_demo_data, tmp_path / "out", "--epochs", "1", *change)
    assert run_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}"
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--batch_size", "0"),
        ("--epochs", "-1"),
        ("--embedding_dim", "0"),
        ("--margin", "0"),
        ("--model", "vgg"),
        ("--seed", "-1"),  # numpy refuses negative seeds, torch ones past 64 bits: both refused up front
        ("--seed", "99999999999999999999"),
    ],
)
def test_bad_values_exit_before_any_work(tiny_demo_data, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as raised:
        run_main(triplet_args(tiny_demo_data, tmp_path / "out", flag, value))
    assert raised.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_from_another_architecture_or_task_is_refused(tiny_demo_data, tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert run_main(triplet_args(tiny_demo_data, output_dir, "--epochs", "1")) == 0
    checkpoint = output_dir / "checkpoints" / "model_resnet18_triplet_epoch_1.pt"
    capsys.readouterr()
    args = triplet_args(tiny_demo_data, output_dir, "--epochs", "2", "--resume_path", checkpoint)
    args[args.index("resnet18")] = "resnet34"
    assert run_main(args) == 2
    assert "model_architecture 'resnet18' but --model is 'resnet34'" in capsys.readouterr().err
    not_a_checkpoint = tmp_path / "junk.pt"
    not_a_checkpoint.write_bytes(b"not a checkpoint")
    args = triplet_args(tiny_demo_data, output_dir, "--epochs", "2", "--resume_path", not_a_checkpoint)
    assert run_main(args) == 2
    assert "error: --resume_path: could not read checkpoint" in capsys.readouterr().err


def test_a_run_refused_for_bad_data_leaves_its_folder_free(tiny_demo_data, tmp_path, capsys):
    """Bad training data is found after the folder is claimed; the corrected command must not then be told
    the folder holds an earlier run. A folder the user made stays, empty; one the run made goes."""
    not_images = tmp_path / "not_images" / "someone"
    not_images.mkdir(parents=True)
    (not_images / "notes.txt").write_text("no faces here")
    made = tmp_path / "made"
    made.mkdir()
    for output_dir in (tmp_path / "new", made):
        args = triplet_args(tiny_demo_data, output_dir, "--epochs", "1")
        args[args.index("--dataroot") + 1] = not_images.parent
        assert run_main(args) == 2
        assert "error:" in capsys.readouterr().err
        assert output_dir == made and list(made.iterdir()) == [] or not output_dir.exists()
        assert run_main(triplet_args(tiny_demo_data, output_dir, "--epochs", "1")) == 0
        assert (output_dir / "checkpoints" / "model_resnet18_triplet_epoch_1.pt").is_file()


def test_an_earlier_run_without_a_checkpoint_is_not_offered_for_resuming(tmp_path):
    """A run that failed mid-epoch (bad data found late) leaves its log and settings but no checkpoint: the
    refusal says so rather than pointing at a --resume_path there is nothing for."""
    from errors import InputError
    from training.checkpoint import claim_output_dir

    (tmp_path / "run_config.json").write_text('{"task": "triplet"}')
    with pytest.raises(InputError, match="holds a run with no checkpoint yet .* --resume_path auto"):
        claim_output_dir(tmp_path, {"task": "triplet"}, resuming=False)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model_resnet18_triplet_epoch_1.pt").write_bytes(b"")
    with pytest.raises(InputError, match="holds an earlier run; resume it with --resume_path"):
        claim_output_dir(tmp_path, {"task": "triplet"}, resuming=False)


def test_never_writes_into_another_runs_folder(tiny_demo_data, tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert run_main(triplet_args(tiny_demo_data, output_dir, "--epochs", "1")) == 0
    before = {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")}
    capsys.readouterr()
    assert run_main(triplet_args(tiny_demo_data, output_dir, "--epochs", "1")) == 2
    assert "holds an earlier run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")} == before


def test_a_resume_refused_for_bad_input_leaves_the_runs_folder_as_it_was(tiny_demo_data, tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert run_main(triplet_args(tiny_demo_data, output_dir, "--epochs", "1")) == 0
    before = sorted(path.name for path in output_dir.iterdir())
    checkpoint = output_dir / "checkpoints" / "model_resnet18_triplet_epoch_1.pt"
    foreign_csv = tmp_path / "foreign.csv"
    foreign_csv.write_text("a,b\n1,2\n")
    capsys.readouterr()
    resume = ["--resume_path", checkpoint, "--epochs", "2", "--dataset_csv", foreign_csv]
    assert run_main(triplet_args(tiny_demo_data, output_dir, *resume)) == 2
    assert "missing column" in capsys.readouterr().err
    assert sorted(path.name for path in output_dir.iterdir()) == before  # no run_config_resume_1.json

    (output_dir / "run_config.json").write_text("{not json")
    assert run_main(triplet_args(tiny_demo_data, output_dir, "--resume_path", "auto")) == 2
    err = capsys.readouterr().err
    assert (
        f"error: --output_dir {output_dir}: its run_config.json is unreadable" in err and err.count("\n") == 1
    )
    assert run_main(triplet_args(tiny_demo_data, "", "--epochs", "1")) == 2
    assert "error: --output_dir is empty" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as raised:
        train_triplet.main(["-h"])
    assert raised.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--dataroot",
        "--lfw",
        "--lfw_pairs",
        "--resume_path",
        "--pretrained [WEIGHTS]",
        "--no-pretrained",
        "--triplet_selection",
        "--num_triplets_train",
        "--training_triplets_path",
        "--amp",
        "--demo",
    ):
        assert flag in text, flag


def test_sigint_checkpoints_mid_epoch_and_resume_finishes(tiny_demo_data, tmp_path, monkeypatch, capsys):
    import signal

    real_step = train_triplet.TripletTask.step
    calls = []

    def step_then_interrupt(self, module, batch):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C arrives during the second step
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, module, batch)

    monkeypatch.setattr(train_triplet.TripletTask, "step", step_then_interrupt)
    output_dir = tmp_path / "run"
    assert run_main(triplet_args(tiny_demo_data, output_dir, "--epochs", "1")) == 130
    interrupted = output_dir / "checkpoints" / "model_resnet18_triplet_epoch_1_interrupted.pt"
    captured = capsys.readouterr()
    assert f"resume with --resume_path {interrupted}" in captured.out
    assert "SIGINT: stopping after this step with a checkpoint (Ctrl-C again stops at once" in captured.err
    state = torch.load(interrupted, weights_only=True)
    assert state["epoch"] == 0 and state["step_in_epoch"] == 2  # the step in flight was finished
    # nothing validated yet: no threshold, and no precision it was measured in
    assert state["best_distance_threshold"] is None and state["validation_precision"] is None
    monkeypatch.setattr(train_triplet.TripletTask, "step", real_step)
    assert (
        run_main(triplet_args(tiny_demo_data, output_dir, "--epochs", "1", "--resume_path", interrupted)) == 0
    )
    final = torch.load(output_dir / "checkpoints" / "model_resnet18_triplet_epoch_1.pt", weights_only=True)
    assert final["epoch"] == 1 and final["step_in_epoch"] == 0
    assert final["validation_precision"] == "off"  # validated after the resumed epoch, in fp32 on the CPU


def test_demo_defaults_apply_only_to_flags_not_given():
    parser = train_triplet.get_args_parser()
    args = parse_args(parser, ["--demo", "--epochs", "1"], train_triplet.DEMO_DEFAULTS)
    assert (args.model, args.image_size, args.epochs) == ("resnet18", 64, 1)
    assert args.num_triplets_train == train_triplet.DEMO_DEFAULTS["num_triplets_train"]
    plain = parse_args(train_triplet.get_args_parser(), ["-d", "x", "--lfw", "y"], {})
    assert (plain.model, plain.image_size, plain.num_triplets_train) == ("resnet34", 160, 1_100_000)
    with pytest.raises(SystemExit):
        parse_args(train_triplet.get_args_parser(), ["--lfw", "y"], {})  # --dataroot missing


# ----- the two ways through a step of pre-generated triplets


class _NoBatchNorm(torch.nn.Module):
    """An embedding network whose samples do not interact, so the two ways must agree exactly."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )
        self.head = torch.nn.Linear(4, 8)

    def forward(self, x):
        return torch.nn.functional.normalize(self.head(self.body(x)), dim=1)


def _fixed_choice(chosen):
    return lambda anchor, positive, negative: torch.tensor(chosen)


def _gradients(module):
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize(
    "select",
    [_fixed_choice([True, False, True, False, False, True]), train_triplet.selection_rule(0.2, "hard")],
    ids=["fixed", "hard-rule"],
)
def test_select_then_train_equals_the_masked_pass_when_samples_do_not_interact(select):
    torch.manual_seed(0)
    model = _NoBatchNorm().double()  # float64, so summation order cannot hide a real difference
    twin = _NoBatchNorm().double()
    twin.load_state_dict(model.state_dict())
    images = torch.randn(18, 3, 8, 8, dtype=torch.float64)
    loss_fn = train_triplet.TripletLoss(margin=0.2)

    loss, count = train_triplet.masked_single_pass(model, images, select, loss_fn)
    loss.backward()
    twin_loss, twin_count = train_triplet.select_then_train(twin, images, select, loss_fn)
    twin_loss.backward()

    assert count.item() == twin_count.item() > 0
    torch.testing.assert_close(twin_loss, loss, rtol=1e-12, atol=1e-12)
    for ours, reference in zip(_gradients(twin), _gradients(model), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_select_then_train_updates_running_statistics_once_from_the_whole_batch():
    torch.manual_seed(0)
    from models import build_model

    model = build_model("resnet18", 16).train()
    reference = build_model("resnet18", 16).train()
    reference.load_state_dict(model.state_dict())
    images = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        reference(images)  # what the single pass does to the running statistics

    loss, count = train_triplet.select_then_train(
        model, images, _fixed_choice([True, False, False, True]), train_triplet.TripletLoss(0.2)
    )
    loss.backward()
    assert count.item() == 2
    buffers = dict(reference.named_buffers())
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert layers and all(layer.track_running_stats for layer in layers)


def test_select_then_train_with_no_triplet_chosen_still_back_propagates_zero():
    torch.manual_seed(0)
    model = _NoBatchNorm()
    images = torch.randn(12, 3, 8, 8)
    loss, count = train_triplet.select_then_train(
        model, images, _fixed_choice([False] * 4), train_triplet.TripletLoss(0.2)
    )
    loss.backward()  # every DDP rank must run a backward, chosen triplets or not
    assert count.item() == 0 and loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in _gradients(model))


def test_pretrained_weights_the_model_has_none_of_are_a_one_line_error(tiny_demo_data, tmp_path, capsys):
    args = triplet_args(tiny_demo_data, tmp_path / "run", "--epochs", "1", "--pretrained", "vggface2")
    assert run_main(args) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --pretrained vggface2: resnet18 has no 'vggface2' weights")
        and err.count("\n") == 1
    )
    parser = train_triplet.get_args_parser()
    for argv, expected in ((["--pretrained"], True), (["--pretrained", "casia-webface"], "casia-webface"),
                           (["--no-pretrained"], False), ([], False)):  # fmt: skip
        assert parse_args(parser, ["-d", "x", "--lfw", "y", *argv], {}).pretrained == expected


# ----- the defaults: the best measured recipe, the original's command lines keep their meaning


def _resolved(argv):
    args = parse_args(train_triplet.get_args_parser(), ["-d", "x", "--lfw", "y", *argv], {})
    train_triplet.resolve_batch_composition(args)
    return args


def test_defaults_are_batch_all_with_adam_over_batch_size_images():
    args = _resolved([])
    assert (args.triplet_selection, args.optimizer, args.lr, args.margin) == ("batch_all", "adam", 1e-3, 0.2)
    assert (args.identities_per_batch, args.images_per_identity) == (16, 4)  # P x K = --batch_size 64
    args = _resolved(["--batch_size", "96", "--images_per_identity", "3"])
    assert args.identities_per_batch * args.images_per_identity == 96
    assert _resolved(["--batch_size", "96", "--identities_per_batch", "8"]).identities_per_batch == 8


@pytest.mark.parametrize(
    "argv", [["--training_triplets_path", "t.npy"], ["--num_human_identities_per_batch", "32"]]
)
def test_flags_of_pregenerated_triplets_keep_the_originals_hard_rule(argv):
    assert _resolved(argv).triplet_selection == "hard"
    assert _resolved([*argv, "--triplet_selection", "semihard"]).triplet_selection == "semihard"


def test_saved_triplets_with_online_mining_are_a_one_line_error(tiny_demo_data, tmp_path, capsys):
    argv = [*common_args(tiny_demo_data, tmp_path / "run"), "--training_triplets_path", "t.npy"]
    assert run_main([*argv, "--triplet_selection", "batch_all"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--training_triplets_path needs pre-generated triplets" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_batch_too_small_for_two_identities_is_a_one_line_error(tiny_demo_data, tmp_path, capsys):
    argv = [*common_args(tiny_demo_data, tmp_path / "run"), "--batch_size", "6", "--images_per_identity", "4"]
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch_size 6" in err[0] and "--images_per_identity 4" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--images_per_identity", "1"], "--images_per_identity 1: online mining needs at least 2 images"),
        (["--identities_per_batch", "1"], "--identities_per_batch 1: online mining needs at least 2 identities"),
        (["--triplet_selection", "batch_all", "--num_human_identities_per_batch", "4"],
         "--num_human_identities_per_batch shapes pre-generated triplets"),
    ],
)  # fmt: skip
def test_p_x_k_flags_online_mining_cannot_use_are_refused_before_any_folder(
    tiny_demo_data, tmp_path, capsys, flags, message
):
    assert run_main([*common_args(tiny_demo_data, tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_on_its_first_batch_leaves_no_folder_behind(tiny_demo_data, tmp_path, capsys):
    """Bad data found only when the first batch loads (a CSV naming images that are not there): the new
    folder is removed, so the corrected command can use it."""
    csv_path = tmp_path / "wrong.csv"
    csv_path.write_text(
        "id,name,class,ext\n" + "".join(f"img{i},ghost{i % 4},{i % 4},.jpg\n" for i in range(40))
    )
    assert run_main(triplet_args(tiny_demo_data, tmp_path / "run", "--dataset_csv", csv_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ghost" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    assert run_main(triplet_args(tiny_demo_data, tmp_path / "run", "--epochs", "1")) == 0


def test_the_original_2021_flag_names_are_accepted():
    """tamerthamoqa's 2021 train_triplet_loss.py renamed some flags; its command lines keep working."""
    parser = train_triplet.get_args_parser()
    old = parser.parse_args(["-d", "D", "--lfw", "L", "--model_architecture", "resnet50", "--embedding_dimension",
                             "256", "--learning_rate", "0.075", "--training_dataset_csv_path", "v.csv"])  # fmt: skip
    new = parser.parse_args(["-d", "D", "--lfw", "L", "--model", "resnet50", "--embedding_dim", "256",
                             "--lr", "0.075", "--dataset_csv", "v.csv"])  # fmt: skip
    assert vars(old) == vars(new)
    assert (new.model, new.embedding_dim, new.lr, new.dataset_csv) == ("resnet50", 256, 0.075, "v.csv")


def test_the_original_2021_epoch_and_semihard_flags_mean_what_they_meant(tiny_demo_data, tmp_path, capsys):
    args = _resolved(["--iterations_per_epoch", "5", "--batch_size", "8"])
    assert (args.num_triplets_train, args.triplet_selection) == (40, "hard")  # 5 steps of 8 triplets
    assert (
        _resolved(["--iterations_per_epoch", "5", "--triplet_selection", "batch_all"]).num_triplets_train
        == 320
    )
    for text, rule in (("False", "hard"), ("false", "hard"), ("True", "semihard"), ("1", "semihard")):
        assert _resolved(["--use_semihard_negatives", text]).triplet_selection == rule, text
    for argv, message in (
        (
            ["--use_semihard_negatives", "False", "--triplet_selection", "semihard"],
            "means --triplet_selection hard",
        ),
        (["--iterations_per_epoch", "5", "--num_triplets_train", "40"], "both set an epoch's length"),
    ):
        with pytest.raises(InputError, match=message):
            _resolved(argv)
    with pytest.raises(SystemExit):
        train_triplet.get_args_parser().parse_args(
            ["-d", "x", "--lfw", "y", "--use_semihard_negatives", "maybe"]
        )
    assert "expected True or False, got 'maybe'" in capsys.readouterr().err
    # an original command line without them trains the new default, and train.log says what its count means
    assert run_main(triplet_args(tiny_demo_data, tmp_path / "run", "--epochs", "1")) == 0
    assert "--num_triplets_train 24: online batch-all mining" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize("model, size, smallest", [("resnet18", "16", 32), ("inceptionresnetv2", "64", 75)])
def test_an_image_size_below_what_the_model_takes_is_refused_up_front(
    tiny_demo_data, tmp_path, capsys, model, size, smallest
):
    args = triplet_args(tiny_demo_data, tmp_path / "out", "--image_size", size)
    args[args.index("--model") + 1] = model
    assert run_main(args) == 2
    assert f"error: --image_size {size}: {model} needs at least {smallest} px" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["train_triplet", "train_center", "train_margin"])
def test_help_shows_defaults_that_exist_and_says_random_weights_are_the_default(script):
    import importlib

    text = importlib.import_module(script).get_args_parser().format_help()
    assert "(default: None)" not in text and "(default: True)" not in text
    assert "start from random weights, as without --pretrained" in text
    assert "(default: 0)" in text  # a zero default is still shown (--freeze_backbone_epochs, --seed)
    # a help that mentions the original's default still shows ours
    assert "adam learned faster in benchmarks/bench_learning.py) (default: adam)" in " ".join(text.split())


def test_a_pregenerated_run_resumed_with_online_mining_drops_the_pregenerated_batch_flag(
    tiny_demo_data, tmp_path
):
    """--num_human_identities_per_batch is kept from the checkpoint on resume; switching that run to online
    mining (allowed: the flag given wins) drops it rather than refusing a flag the user did not give."""
    output_dir = tmp_path / "run"
    assert (
        run_main(
            triplet_args(tiny_demo_data, output_dir, "--num_human_identities_per_batch", "2", "--epochs", "1")
        )
        == 0
    )
    checkpoint = output_dir / "checkpoints" / "model_resnet18_triplet_epoch_1.pt"
    places = ["--dataroot", tiny_demo_data.train_dir, "--lfw", tiny_demo_data.lfw_dir, "--lfw_pairs",
              tiny_demo_data.pairs_path, "--num_workers", "0", "--lfw_batch_size", "32"]  # fmt: skip
    assert (
        run_main([*places, "--resume_path", checkpoint, "--epochs", "2", "--triplet_selection", "batch_all"])
        == 0
    )
    saved = torch.load(output_dir / "checkpoints" / "model_resnet18_triplet_epoch_2.pt", weights_only=True)[
        "args"
    ]
    assert saved["triplet_selection"] == "batch_all" and saved["num_human_identities_per_batch"] is None


def test_online_steps_per_process_and_too_few_images_for_the_processes():
    assert train_triplet.online_steps(64, 64, 1) == 1 and train_triplet.online_steps(65, 64, 1) == 2
    assert train_triplet.online_steps(256, 64, 2) == 2 and train_triplet.online_steps(2, 64, 2) == 1
    with pytest.raises(InputError, match="--num_triplets_train 3 is fewer than the 4 processes"):
        train_triplet.online_steps(3, 64, 4)


def test_the_demo_gives_a_model_that_needs_more_than_its_64_px_its_smallest_size():
    def image_size(*argv):
        return parse_args(train_triplet.get_args_parser(), list(argv), train_triplet.DEMO_DEFAULTS).image_size

    assert image_size("--demo") == 64
    assert image_size("--demo", "--model", "inception_resnet_v1") == 75
    assert image_size("--demo", "--model", "inceptionresnetv2", "--image_size", "96") == 96
