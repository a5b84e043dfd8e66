"""The training engine (training/): samplers, the step's bookkeeping, precision, schedules and resume."""

import csv
import json
import math
import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import train_center
import train_margin
import train_triplet
from datasets.samplers import PKBatchSampler
from datasets.triplet_dataset import generate_triplets
from errors import InputError
from losses import TripletLoss
from models import build_model
from tests.training_data import common_args
from training.builders import LearningRateSchedule, build_optimizer, load_optimizer_state
from training.checkpoint import latest_checkpoint
from training.coordination import StopRequested
from training.data import (
    DistinctRepeats,
    ImagesToDevice,
    SeededSamples,
    ShardSampler,
    SkipBatches,
    make_loader,
    shuffled_steps,
)
from training.engine import MAX_CONSECUTIVE_NONFINITE, Trainer, TrainingDiverged, TrainingTask
from training.records import EpochTotals, History, plot_history
from training.runtime import Runtime
from training.step import StepOutput, backward_and_step, loss_for_ddp
from training.validation import Validator

# ------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("shuffle", [False, True])
def test_shard_sampler_shares_are_disjoint_equal_and_cover_the_epoch(shuffle):
    num_items, world_size = 23, 3
    shares = [
        list(ShardSampler(num_items, rank, world_size, shuffle=shuffle, seed=7)) for rank in range(world_size)
    ]
    assert [len(share) for share in shares] == [7, 7, 7]  # 23 // 3; the remainder is dropped
    union = [item for share in shares for item in share]
    assert len(set(union)) == 21 and set(union) <= set(range(num_items))
    if shuffle:
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(7)).tolist()
        assert union == order[:21]  # one permutation from the seed alone, cut into contiguous shares
        assert union != sorted(union)
    else:
        assert union == list(range(21))


def test_shard_sampler_keeps_blocks_of_pregenerated_triplets_in_one_batch():
    # generate_triplets draws each block of batch_size triplets from P people; under DDP every process's
    # batches must still be such blocks (a share starting mid-block would mix 2P people into each batch)
    labels = np.repeat(np.arange(200), 5)
    batch_size, people = 64, 4
    triplets = generate_triplets(
        labels, 1000, np.random.default_rng(0), num_human_identities_per_batch=people, batch_size=batch_size
    )
    for world_size in (1, 2, 3):
        shares = [
            list(ShardSampler(len(triplets), rank, world_size, block=batch_size))
            for rank in range(world_size)
        ]
        assert len({len(share) for share in shares}) == 1
        assert len(set().union(*shares)) == sum(len(share) for share in shares)  # disjoint
        for share in shares:
            batches = [share[i : i + batch_size] for i in range(0, len(share), batch_size)]
            assert all(len(set(labels[triplets[batch][:, [0, 2]].ravel()])) <= people for batch in batches)
    assert len(ShardSampler(1000, 0, 1, block=batch_size)) == 1000  # one process: the short last block runs
    assert len(ShardSampler(1000, 1, 2, block=batch_size)) == 448  # 500 rounded down to whole blocks
    assert len(ShardSampler(100, 1, 2, block=64)) == 50  # a share smaller than a block is kept whole


def test_repeats_within_a_p_x_k_batch_get_their_own_augmentation():
    """Identities with fewer than K images repeat them in a batch; each repeat must be a new draw of the
    augmentation (not the same pixels), while first occurrences load exactly as before."""

    class RandomlyAugmented(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, index):
            return torch.full((1,), float(index)), torch.rand(4)  # the draw stands for crop and flip

    labels = [0, 0, 1, 1, 1, 1]  # identity 0 has 2 images: K = 4 repeats them
    pk = PKBatchSampler(labels, identities_per_batch=2, images_per_identity=4, num_batches=3, seed=1)
    keyed = list(DistinctRepeats(pk))
    assert [[item if isinstance(item, int) else item[0] for item in batch] for batch in keyed] == list(pk)
    samples = SeededSamples(RandomlyAugmented(), seed=5)
    for batch in keyed:
        indices = [item if isinstance(item, int) else item[0] for item in batch]
        draws = [samples[item][1] for item in batch]
        assert len({tuple(draw.tolist()) for draw in draws}) == len(batch)  # repeats differ too
        for item, index, draw in zip(batch, indices, draws, strict=True):
            if isinstance(item, int):  # a first occurrence: the draw of the plain index, as before
                assert torch.equal(draw, samples[index][1])
        assert any(isinstance(item, tuple) for item in batch)
        assert [samples[item][0].item() for item in batch] == indices


def test_any_seed_the_command_line_accepts_seeds_the_samples():
    from training.runtime import epoch_seed

    class Draw(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(3)

    largest = SeededSamples(Draw(), epoch_seed(2**32 - 1, 7))  # --seed's upper bound: past 64 bits here
    assert torch.equal(largest[2], largest[2]) and not torch.equal(largest[2], largest[3])
    small = SeededSamples(Draw(), epoch_seed(3, 1))  # seeds that fit keep the draws they had
    torch.manual_seed(epoch_seed(3, 1) * 1_000_003 + 2)
    assert torch.equal(small[2], torch.rand(3))


def test_shard_sampler_starts_mid_share():
    full = list(ShardSampler(20, 1, 2, shuffle=True, seed=3))
    resumed = ShardSampler(20, 1, 2, start=4, shuffle=True, seed=3)
    assert list(resumed) == full[4:] and len(resumed) == len(full) - 4


def test_an_epoch_without_a_step_is_an_input_error():
    """A process whose share is one image has no batch (batch norm cannot train on one): the run used to train
    nothing and exit 0; now it is refused, naming the count."""
    cpu = torch.device("cpu")
    assert shuffled_steps(2, 10, Runtime(cpu)) == 1 and shuffled_steps(21, 10, Runtime(cpu)) == 2
    assert shuffled_steps(4, 10, Runtime(cpu, rank=1, world_size=2)) == 1
    with pytest.raises(
        InputError, match="--dataroot has too few training images: 1; a step needs at least 2"
    ):
        shuffled_steps(1, 10, Runtime(cpu))
    with pytest.raises(InputError, match="3 over 2 processes leave 1 each"):
        shuffled_steps(3, 10, Runtime(cpu, rank=1, world_size=2))


def test_skip_batches_drops_exactly_the_first_batches():
    batches = torch.utils.data.BatchSampler(range(10), batch_size=3, drop_last=False)
    skipped = SkipBatches(batches, 2)
    assert list(skipped) == list(batches)[2:] == [[6, 7, 8], [9]]
    assert len(skipped) == 2
    assert list(SkipBatches(batches, 0)) == list(batches)


# ------------------------------------------------------------------------------------------- the step


class LinearTask(TrainingTask):
    """A task whose loss is chosen per step: a real finite loss, or NaN."""

    name = "linear"
    count_name = "samples"

    def __init__(self, runtime):
        args = SimpleNamespace(
            lr_schedule="constant", epochs=1, seed=0, model="linear", embedding_dim=2, clip_grad_norm=None
        )
        super().__init__(args, runtime)
        torch.manual_seed(0)
        self.model = self.step_module = nn.Linear(3, 2)
        self.optimizers = [torch.optim.SGD(self.model.parameters(), lr=0.1)]

    def steps_per_epoch(self):
        return 10

    def step(self, step_module, batch):
        inputs, finite, *empty = batch  # empty: nothing to learn from (a batch without a triplet)
        loss = step_module(inputs).pow(2).mean()
        if not finite:
            loss = loss * float("nan")
        count = torch.tensor(0.0 if empty and empty[0] else float(inputs.shape[0]))
        loss = loss * (count > 0)
        return StepOutput(loss=loss, loss_sum=loss.detach().double() * count, count=count)


def test_a_step_with_nothing_to_learn_from_leaves_the_weights_alone(tmp_path):
    """No triplet in any batch: the gradients are zero, yet SGD's momentum and weight decay (Adam's too)
    would still move the weights. The step is skipped and counted."""
    task = LinearTask(Runtime(torch.device("cpu")))
    task.optimizers = [torch.optim.SGD(task.model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)]
    trainer = Trainer(task, tmp_path, validator=None)
    inputs, totals, no_stop = torch.randn(4, 3), EpochTotals(), StopRequested()
    trainer.train_step(0, 1, iter([(inputs, True)]), totals, no_stop)  # momentum to carry on with
    before = [p.detach().clone() for p in task.model.parameters()]
    trainer.train_step(0, 2, iter([(inputs, True, True)]), totals, no_stop)
    assert all(torch.equal(a, b) for a, b in zip(before, task.model.parameters(), strict=True))
    assert all(p.grad is None for p in task.model.parameters())
    assert (totals.count, totals.skipped_steps, totals.nonfinite_steps) == (4, 1, 0)
    trainer.train_step(0, 3, iter([(inputs, True)]), totals, no_stop)  # and training goes on
    assert not torch.equal(before[0], task.model.weight) and totals.count == 8


def test_a_nonfinite_loss_skips_the_step_and_five_in_a_row_stop_the_run(tmp_path):
    task = LinearTask(Runtime(torch.device("cpu")))
    trainer = Trainer(task, tmp_path, validator=None)
    inputs = torch.randn(4, 3)
    totals = EpochTotals()
    no_stop = StopRequested()  # not entered: no signal handlers, no request

    def step(number, finite):
        trainer.train_step(0, number, iter([(inputs, finite)]), totals, no_stop)

    before = [p.detach().clone() for p in task.model.parameters()]
    step(1, False)
    assert all(torch.equal(a, b) for a, b in zip(before, task.model.parameters(), strict=True))
    assert all(p.grad is None for p in task.model.parameters())  # nothing left for the next step
    assert (totals.skipped_steps, totals.count) == (1, 0.0)

    step(2, True)  # a finite step trains and resets the streak
    assert not torch.equal(before[0], task.model.weight)
    assert totals.count == 4 and totals.loss_sum > 0
    for number in range(3, 3 + MAX_CONSECUTIVE_NONFINITE - 1):
        step(number, False)
    with pytest.raises(TrainingDiverged, match="5 steps in a row"):
        step(99, False)
    assert totals.skipped_steps == 1 + MAX_CONSECUTIVE_NONFINITE


def test_the_lr_schedules_step_by_step_with_warmup():
    """2 epochs of 3 steps, 2 warmup steps; the factors written out by hand from the definitions: warmup
    (step + 1) / 2 over steps 0-1; cosine (1 + cos(pi x epoch / 2)) / 2 per epoch; poly (1 - (step - 2) / 4)^2
    after the warmup."""
    expected = {
        "constant": [0.5, 1, 1, 1, 1, 1],
        "cosine": [0.5, 1, 1, 0.5, 0.5, 0.5],
        "poly": [0.5, 1, 1, 0.5625, 0.25, 0.0625],
    }
    for name, factors in expected.items():
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
        schedule = LearningRateSchedule(name, [optimizer], epochs=2, steps_per_epoch=3, warmup_steps=2)
        lrs = []
        for step in range(6):
            schedule.apply(step)
            lrs.append(optimizer.param_groups[0]["lr"])
        assert lrs == pytest.approx([0.2 * f for f in factors]), name
    # --warmup_epochs in whole steps: half a step rounds up, and any warmup lasts at least one step
    for warmup_epochs, steps in ((0.5, 2), (0.1, 1), (0.0, 0), (1.0, 3)):
        args = SimpleNamespace(lr_schedule="constant", warmup_epochs=warmup_epochs)
        assert LearningRateSchedule.for_run(args, [], 2, 3).warmup_steps == steps


def test_images_reach_the_model_normalised_with_the_runs_mean_and_std():
    """The uint8 batch a worker sends becomes (x / 255 - mean) / std with the run's own statistics (those of
    the checkpoint it starts from), channels_last; None is the default 0.5 / 0.5."""
    images = torch.randint(
        0, 256, (2, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for normalization, (m, s) in (({"mean": mean, "std": std}, (mean, std)), (None, ([0.5] * 3, [0.5] * 3))):
        out = ImagesToDevice(torch.device("cpu"), normalization)(images)
        by_hand = (images.double() / 255 - torch.tensor(m).view(1, 3, 1, 1)) / torch.tensor(s).view(
            1, 3, 1, 1
        )
        torch.testing.assert_close(out.double(), by_hand, rtol=0, atol=1e-6)
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("max_norm", [None, 0.5, 1e6])
def test_clip_grad_norm_bounds_the_models_step_as_torch_defines_it(max_norm):
    """SGD at lr 1 moves the weights by the gradient itself: with --clip_grad_norm that move has norm
    min(norm, max_norm) and the gradient's direction (torch.nn.utils.clip_grad_norm_'s definition)."""
    task = LinearTask(Runtime(torch.device("cpu")))
    task.optimizers = [torch.optim.SGD(task.model.parameters(), lr=1.0)]
    inputs = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)) * 10
    reference = nn.Linear(3, 2)
    reference.load_state_dict(task.model.state_dict())
    reference(inputs).pow(2).mean().backward()
    gradient = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert gradient.norm() > 0.5  # so that 0.5 clips and 1e6 does not
    before = torch.cat([p.detach().flatten() for p in task.model.parameters()])
    backward_and_step(task, task.model(inputs).pow(2).mean(), clip_grad_norm=max_norm)
    moved = before - torch.cat([p.detach().flatten() for p in task.model.parameters()])
    expected = gradient if max_norm is None else gradient * min(1.0, max_norm / (gradient.norm() + 1e-6))
    torch.testing.assert_close(moved, expected, rtol=1e-5, atol=1e-6)


def nan_losses_after(monkeypatch, finite_steps: int = 0) -> None:
    """train_triplet's step returns its real loss for the first ``finite_steps`` steps, NaN after them."""
    real_step, calls = train_triplet.TripletTask.step, []

    def step(self, step_module, batch):
        out = real_step(self, step_module, batch)
        calls.append(1)
        if len(calls) <= finite_steps:
            return out
        return StepOutput(loss=out.loss * float("nan"), loss_sum=out.loss_sum * float("nan"), count=out.count)

    monkeypatch.setattr(train_triplet.TripletTask, "step", step)


def test_a_run_whose_loss_stays_nonfinite_exits_with_status_3(tiny_demo_data, tmp_path, monkeypatch, capsys):
    nan_losses_after(monkeypatch)
    args = [*common_args(tiny_demo_data, tmp_path / "run"), "--num_triplets_train", "48", "--batch_size", "8"]
    assert train_triplet.main([str(a) for a in args]) == 3
    out = capsys.readouterr().out
    assert "5 steps in a row had a non-finite loss" in out and "lower --lr" in out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_nonfinite_streak_runs_across_epochs(tiny_demo_data, tmp_path, monkeypatch, capsys):
    """Three steps an epoch, the first finite and every later loss NaN: the streak reaches five in epoch
    two (it used to restart with each epoch, so a run of short epochs never stopped)."""
    nan_losses_after(monkeypatch, finite_steps=1)
    args = common_args(tiny_demo_data, tmp_path / "run")
    args += ["--num_triplets_train", "24", "--batch_size", "8", "--epochs", "4"]
    assert train_triplet.main([str(a) for a in args]) == 3
    assert "5 steps in a row had a non-finite loss (epoch 2, step 3)" in capsys.readouterr().out


def test_an_epoch_in_which_no_step_trained_ends_the_run(tiny_demo_data, tmp_path, monkeypatch, capsys):
    """Every step of a short epoch skipped (a --margin_scale too large for float32, say): the run used to
    save the untrained weights as that epoch's checkpoint and exit 0."""
    nan_losses_after(monkeypatch)
    args = common_args(tiny_demo_data, tmp_path / "run")
    args += ["--num_triplets_train", "24", "--batch_size", "8", "--epochs", "1"]
    assert train_triplet.main([str(a) for a in args]) == 3
    out = capsys.readouterr().out
    assert "every step of epoch 1 had a non-finite loss, so nothing trained" in out
    assert "not saved; lower --lr or try --amp off" in out  # the triplet task's hint: it has no scale flag
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_an_epoch_of_fp16_overflow_skips_only_is_not_divergence(tiny_demo_data, tmp_path, monkeypatch):
    """GradScaler calibrates its scale by skipping the first steps that overflow: a short first epoch of
    only such skips is normal, and the run goes on."""
    import training.engine as engine

    real, calls = engine.backward_and_step, []

    def overflow_first_three(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 3:
            for optimizer in args[0].optimizers:
                optimizer.zero_grad(set_to_none=True)
            return False  # what backward_and_step reports for an fp16 overflow
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "backward_and_step", overflow_first_three)
    args = common_args(tiny_demo_data, tmp_path / "run")
    args += ["--num_triplets_train", "24", "--batch_size", "8", "--epochs", "2"]
    assert train_triplet.main([str(a) for a in args]) == 0
    with (tmp_path / "run" / "training_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["skipped_steps"]), int(r["num_triplets"]) > 0) for r in rows] == [(3, False), (0, True)]


def poison_running_mean(task):
    task.model.model.bn1.running_mean.fill_(float("nan"))


def poison_one_center(task):
    with torch.no_grad():
        task.center_loss.centers[0, 0] = float("inf")


POISON_CASES = {
    # batch norm trains on batch statistics, so a NaN running mean leaves the loss finite
    "triplet-batch-norm-statistics": (train_triplet, ["--num_triplets_train", "24", "--batch_size", "8"],
                                      poison_running_mean),
    # one inf center outside the batch's classes leaves the loss finite too: the centers are checked as well
    "center-loss-centers": (train_center, ["--batch_size", "10"], poison_one_center),
}  # fmt: skip


@pytest.mark.parametrize("case", POISON_CASES)
def test_weights_that_became_nonfinite_with_a_finite_loss_end_the_run_unsaved(
    tiny_demo_data, tmp_path, monkeypatch, capsys, case
):
    """The epoch's end catches weights gone non-finite before validation (which would blame its input) and
    before writing a useless checkpoint."""
    script, extra, poison = POISON_CASES[case]
    task_class = train_triplet.TripletTask if script is train_triplet else train_center.CenterTask
    real_step = task_class.step

    def poisoning_step(self, step_module, batch):
        poison(self)
        return real_step(self, step_module, batch)

    monkeypatch.setattr(task_class, "step", poisoning_step)
    args = [*common_args(tiny_demo_data, tmp_path / "run"), *extra, "--epochs", "1"]
    assert script.main([str(a) for a in args]) == 3
    out = capsys.readouterr().out
    assert "after epoch 1 the weights are not finite" in out and "lower --lr" in out
    assert not list((tmp_path / "run").rglob("*.pt"))


def test_a_bf16_autocast_step_on_the_cpu_is_close_to_fp32():
    """The real triplet step under the autocast the trainer uses: loss and gradients close to fp32's."""
    torch.manual_seed(0)
    model = build_model("resnet18", embedding_dim=16).to(memory_format=torch.channels_last)
    images = torch.randn(3 * 8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    select = train_triplet.selection_rule(10.0, "hard")  # margin 10: every triplet is kept, on both sides
    results = {}
    for dtype in (None, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss, count = train_triplet.masked_single_pass(model, images, select, TripletLoss(margin=10.0))
        loss.backward()
        gradient = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[dtype] = (loss.item(), int(count), gradient)
    (loss32, count32, grad32), (loss16, count16, grad16) = results[None], results[torch.bfloat16]
    assert count32 == count16 == 8
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert torch.isfinite(grad16).all()
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.85


# ------------------------------------------------------------------------------------------- whole runs


def final_checkpoint(output_dir, task, epoch):
    path = output_dir / "checkpoints" / f"model_resnet18_{task}_epoch_{epoch}.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


RESUME_CASES = {
    # script, its flags (3 steps an epoch), lr schedule, the step during which SIGINT arrives (counting
    # from 1 over the run): 3 = the last step of epoch 1, so the run stops after that epoch; 5 = mid-epoch 2
    "triplet-constant-after-epoch": (
        train_triplet,
        ["--num_triplets_train", "24", "--batch_size", "8"],
        "constant",
        3,
    ),
    "center-cosine-mid-epoch": (train_center, ["--batch_size", "10"], "cosine", 5),
    "triplet-cosine-mid-epoch": (
        train_triplet,
        ["--num_triplets_train", "24", "--batch_size", "8"],
        "cosine",
        5,
    ),
    # moving-average centers: no optimizer of their own, their values alone carry the state
    "margin-moving-centers-mid-epoch": (
        train_margin,
        ["--batch_size", "10", "--center_momentum", "0.5"],
        "constant",
        5,
    ),
    # PartialFC's sampled centers and their momentum must resume too
    "margin-poly-mid-epoch": (
        train_margin,
        ["--batch_size", "10", "--sample_rate", "0.5", "--warmup_epochs", "0.5"],
        "poly",
        5,
    ),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_an_interrupted_run_resumes_to_the_same_result(tiny_demo_data, tmp_path, monkeypatch, case):
    """A run stopped by SIGINT and resumed from its checkpoint ends with the weights, optimizer, schedule
    and history of the same run uninterrupted."""
    script, extra, schedule, interrupt_at = RESUME_CASES[case]
    task_class = {train_triplet: train_triplet.TripletTask, train_center: train_center.CenterTask,
                  train_margin: train_margin.MarginTask}[script]  # fmt: skip
    task = task_class.name
    args = [*common_args(tiny_demo_data, tmp_path), *extra, "--lr_schedule", schedule, "--epochs", "2"]

    def run(output_dir, *more):
        argv = [str(a) for a in args] + ["--output_dir", str(output_dir), *(str(m) for m in more)]
        return script.main(argv)

    assert run(tmp_path / "straight") == 0
    real_step, calls = task_class.step, []

    def step_then_interrupt(self, step_module, batch):
        calls.append(1)
        if len(calls) == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, step_module, batch)

    monkeypatch.setattr(task_class, "step", step_then_interrupt)
    assert run(tmp_path / "split") == 130
    monkeypatch.setattr(task_class, "step", real_step)
    if interrupt_at % 3:  # mid-epoch: the epoch in flight is saved as "interrupted"
        checkpoint = tmp_path / "split" / "checkpoints" / f"model_resnet18_{task}_epoch_2_interrupted.pt"
    else:
        checkpoint = tmp_path / "split" / "checkpoints" / f"model_resnet18_{task}_epoch_1.pt"
    assert checkpoint.is_file()
    assert run(tmp_path / "split", "--resume_path", checkpoint) == 0

    a, b = final_checkpoint(tmp_path / "straight", task, 2), final_checkpoint(tmp_path / "split", task, 2)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key
    keys = ("optimizer_model_state_dict", "optimizer_centerloss_state_dict", "center_loss_state_dict",
            "classifier_state_dict")  # fmt: skip
    for key in keys:
        if key in a:
            assert str(a[key]) == str(b[key]), key
    assert a["history"] == b["history"]
    assert a["scheduler_state_dict"] == b["scheduler_state_dict"]
    with (tmp_path / "split" / "training_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    # the lr of each epoch's last step: cosine over 2 epochs is lr, then lr * (1 + cos(pi / 2)) / 2; poly
    # after a warmup of round(0.5 x 3) = 2 steps is lr * (1 - (step - 2) / 4)^2 at 0-based steps 2 and 5
    base = 0.001
    expected = {
        "constant": [base, base],
        "cosine": [base, base * (1 + math.cos(math.pi / 2)) / 2],
        "poly": [base * (1 - (2 - 2) / 4) ** 2, base * (1 - (5 - 2) / 4) ** 2],
    }[schedule]
    assert [float(row["lr"]) for row in rows] == pytest.approx(expected)


def test_a_run_saved_without_loss_scaling_resumes_under_fp16s_gradient_scaler(
    tiny_demo_data, tmp_path, monkeypatch
):
    """A checkpoint from a bf16 or fp32 run (an A100, a CPU) resumed where --amp auto picks fp16 (a V100): the
    saved scaler state is empty, and the resumed run starts from the scaler's default scale."""
    args = [*common_args(tiny_demo_data, tmp_path / "run"), "--batch_size", "10", "--amp", "off"]
    assert train_center.main([str(a) for a in [*args, "--epochs", "1"]]) == 0
    saved = tmp_path / "run" / "checkpoints" / "model_resnet18_center_epoch_1.pt"
    assert torch.load(saved, map_location="cpu", weights_only=True)["grad_scaler_state_dict"] == {}
    # fp16 autocast needs CUDA; the scaler alone runs on the CPU, which is what resuming exercises
    monkeypatch.setattr(Runtime, "use_grad_scaler", property(lambda self: True))
    assert train_center.main([str(a) for a in [*args, "--epochs", "2", "--resume_path", saved]]) == 0
    final = final_checkpoint(tmp_path / "run", "center", 2)
    assert final["epoch"] == 2 and final["grad_scaler_state_dict"]["scale"] > 0


def test_a_resume_from_an_earlier_checkpoint_keeps_the_first_config_and_the_abandoned_log_rows(
    tiny_demo_data, tmp_path, capsys
):
    """Resuming from epoch 1 of a two-epoch run (--resume_path auto after the newest checkpoint was cut short
    by a crash): the unreadable file is named, the first run's run_config.json stays, the resume gets its own,
    and the abandoned epoch-2 row moves to training_log_superseded.csv instead of leaving two epoch-2 rows."""
    output_dir = tmp_path / "run"
    args = [str(a) for a in common_args(tiny_demo_data, output_dir)] + ["--batch_size", "10", "--epochs", "2"]
    assert train_center.main(args) == 0
    first_config = (output_dir / "run_config.json").read_bytes()
    newest = output_dir / "checkpoints" / "model_resnet18_center_epoch_2.pt"
    newest.write_bytes(
        newest.read_bytes()[:1000]
    )  # a crash mid-write on a file system without atomic renames
    capsys.readouterr()
    assert train_center.main([*args, "--resume_path", "auto"]) == 0
    printed = "".join(capsys.readouterr())
    assert "passing over model_resnet18_center_epoch_2.pt, which does not load" in printed
    assert (output_dir / "run_config.json").read_bytes() == first_config
    assert json.loads((output_dir / "run_config_resume_1.json").read_text())["resume_path"].endswith(
        "epoch_1.pt"
    )
    with (output_dir / "training_log.csv").open() as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]
    with (output_dir / "training_log_superseded.csv").open() as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["2"]
    assert final_checkpoint(output_dir, "center", 2)["epoch"] == 2  # rewritten whole


def test_resume_keeps_the_runs_recipe_and_a_flag_given_changes_it(tiny_demo_data, tmp_path, capsys):
    """`--resume_path X` with only the data paths continues the run as it began (optimizer, lr, margin, seed,
    batch: not this script's defaults); a flag given on the command line changes it; another optimizer is
    refused (its state would not fit)."""
    output_dir = tmp_path / "run"
    recipe = ["--optimizer", "sgd", "--lr", "0.01", "--margin", "0.5", "--num_triplets_train", "24",
              "--batch_size", "8", "--lr_schedule", "constant", "--clip_grad_norm", "5",
              "--amp", "off"]  # fmt: skip
    assert (
        train_triplet.main(
            [str(a) for a in common_args(tiny_demo_data, output_dir)] + recipe + ["--epochs", "1"]
        )
        == 0
    )
    places = ["--dataroot", tiny_demo_data.train_dir, "--lfw", tiny_demo_data.lfw_dir, "--lfw_pairs",
              tiny_demo_data.pairs_path, "--num_workers", "0", "--lfw_batch_size", "32"]  # fmt: skip

    def resume(epoch, *more):
        path = output_dir / "checkpoints" / f"model_resnet18_triplet_epoch_{epoch}.pt"
        return train_triplet.main([str(a) for a in [*places, "--resume_path", path, *more]])

    assert resume(1, "--epochs", "2") == 0
    second = final_checkpoint(output_dir, "triplet", 2)
    for flag, value in {"optimizer": "sgd", "lr": 0.01, "margin": 0.5, "seed": 3, "batch_size": 8,
                        "num_triplets_train": 24, "embedding_dim": 16, "image_size": 32,
                        "clip_grad_norm": 5.0, "amp": "off"}.items():  # fmt: skip
        assert second["args"][flag] == value, flag
    assert [group["lr"] for group in second["optimizer_model_state_dict"]["param_groups"]] == [0.01]
    assert "momentum_buffer" in next(iter(second["optimizer_model_state_dict"]["state"].values()))

    assert resume(2, "--epochs", "3", "--lr", "0.005") == 0
    third = final_checkpoint(output_dir, "triplet", 3)
    assert third["args"]["lr"] == 0.005 and third["args"]["optimizer"] == "sgd"
    assert [group["lr"] for group in third["optimizer_model_state_dict"]["param_groups"]] == [0.005]
    assert "--lr 0.01 -> 0.005" in (output_dir / "train.log").read_text()

    # a finished run resumed (its --epochs kept): nothing to train, said so, nothing rewritten
    saved = {path: path.stat().st_mtime_ns for path in (output_dir / "checkpoints").iterdir()}
    assert resume(3) == 0
    assert (
        "the run has all of its 3 epochs (--epochs counts them all); nothing to train"
        in (output_dir / "train.log").read_text()
    )
    assert {path: path.stat().st_mtime_ns for path in (output_dir / "checkpoints").iterdir()} == saved
    assert (output_dir / "run_config_resume_2.json").exists()  # the two resumes that trained
    assert not (output_dir / "run_config_resume_3.json").exists()  # not the one that had nothing to train

    capsys.readouterr()
    assert resume(3, "--epochs", "4", "--optimizer", "adam") == 2
    assert "trains with --optimizer sgd, not adam" in capsys.readouterr().err
    # every resume trained in the run's own precision (--amp off), not the default's (auto)
    log_text = (output_dir / "train.log").read_text()
    assert log_text.count("mixed precision off (--amp off)") == 4 and "--amp auto chose" not in log_text
    # a run begun on a GPU in fp16 cannot continue on the CPU without a new --amp: said so, naming the file
    third["args"]["amp"] = "fp16"
    fp16_run = tmp_path / "fp16.pt"
    torch.save(third, fp16_run)
    argv = [*places, "--resume_path", fp16_run, "--epochs", "4"]
    assert train_triplet.main([str(a) for a in argv]) == 2
    assert f"--resume_path {fp16_run}: the run's --amp fp16 needs a CUDA device" in capsys.readouterr().err


def test_data_workers_give_a_reproducible_run(tiny_demo_data, tmp_path):
    """Two worker processes load and augment; the same seed gives the same weights, run after run."""
    weights = []
    for name in ("a", "b"):
        args = [
            *common_args(tiny_demo_data, tmp_path / name),
            "--num_triplets_train",
            "24",
            "--batch_size",
            "8",
        ]
        args[args.index("--num_workers") + 1] = "2"
        assert train_triplet.main([str(a) for a in args + ["--epochs", "1"]]) == 0
        weights.append(final_checkpoint(tmp_path / name, "triplet", 1)["model_state_dict"])
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_the_fused_optimizer_steps_as_the_default_kernel_and_keeps_its_kernel_on_resume(name):
    """build_optimizer picks torch's fused kernel on the CPU (torch >= 2.4 has it); the oracle is the same
    optimizer with torch's default kernel, over a few steps of real gradients."""
    torch.manual_seed(0)
    fused_model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    plain_model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    plain_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(name, fused_model.parameters(), lr=1e-2, weight_decay=1e-4)
    plain_class = type(fused)
    options = {"momentum": 0.9} if name == "sgd" else {}
    plain = plain_class(plain_model.parameters(), lr=1e-2, weight_decay=1e-4, **options)
    assert fused.param_groups[0]["fused"] is True
    for _ in range(5):
        inputs = torch.randn(8, 12)
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a checkpoint written by the default kernel does not switch the fused one off, and vice versa
    load_optimizer_state(fused, plain.state_dict())
    assert fused.param_groups[0]["fused"] is True
    load_optimizer_state(plain, fused.state_dict())
    assert not plain.param_groups[0]["fused"]
    torch.testing.assert_close(fused.state_dict()["state"][0], plain.state_dict()["state"][0], rtol=0, atol=0)


def test_a_repeated_sigterm_keeps_the_graceful_stop_and_a_second_ctrl_c_stops_at_once(capsys):
    # a cluster's preemption can reach a process twice (the scheduler and torchrun both signal it)
    with StopRequested() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGTERM" and stop.exit_status == 143
    assert capsys.readouterr().err.count("SIGTERM: stopping after this step") == 1
    with StopRequested() as stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)


class SignalsItself(torch.utils.data.Dataset):
    """Each sample sends SIGTERM to the process that loads it, as a cluster's stop reaches every process."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        os.kill(os.getpid(), signal.SIGTERM)
        return torch.tensor([index])


def test_data_workers_leave_stop_signals_to_the_main_process():
    args = SimpleNamespace(num_workers=1, seed=0)
    loader = make_loader(SignalsItself(), args, Runtime(torch.device("cpu")), epoch=0, batch_size=2)
    # a worker that took the SIGTERM would die, and the loader would fail ("worker exited unexpectedly")
    assert torch.cat(list(loader)).flatten().tolist() == [0, 1, 2, 3]


def fake_checkpoint(path, epoch, step=0, batch_size=8, world_size=1, written=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": epoch,
        "step_in_epoch": step,
        "batch_size_training": batch_size,
        "world_size": world_size,
    }
    torch.save(state, path)
    os.utime(path, ns=(1_700_000_000_000_000_000 + written, 1_700_000_000_000_000_000 + written))
    return path


def test_auto_resume_takes_the_checkpoint_written_last_and_passes_over_positions_it_cannot_continue(tmp_path):
    folder = tmp_path / "checkpoints"
    epoch_2 = fake_checkpoint(folder / "model_resnet18_triplet_epoch_2.pt", 2, written=1)
    # an abandoned branch: interrupted in epoch 3 on 4 processes, before the run was resumed from epoch 2
    fake_checkpoint(folder / "model_resnet18_triplet_epoch_3_interrupted.pt", 2, 800, world_size=4, written=2)
    (folder / "model_resnet18_triplet_epoch_9.pt").write_text("not a checkpoint")
    assert latest_checkpoint(tmp_path, "resnet18", "triplet", world_size=2).name == epoch_2.name
    # the same number of processes can continue it (the brute-force order: written last)
    assert latest_checkpoint(tmp_path, "resnet18", "triplet", world_size=4).name.endswith("_interrupted.pt")
    assert latest_checkpoint(tmp_path, "resnet18", "triplet", world_size=4, batch_size=16) == epoch_2
    # the resumed run's own newer checkpoint wins over the abandoned one further into training
    step_file = fake_checkpoint(
        folder / "model_resnet18_triplet_epoch_3_step_100.pt", 2, 100, world_size=4, written=3
    )
    assert latest_checkpoint(tmp_path, "resnet18", "triplet", world_size=4) == step_file
    assert latest_checkpoint(tmp_path, "resnet34", "triplet", world_size=4) is None


def test_a_steps_dropout_depends_on_seed_epoch_step_and_rank_not_on_what_ran_before(tmp_path):
    """So an epoch resumed mid-way draws the masks the uninterrupted epoch drew, and the processes' masks
    differ (the same mask on every rank would train DDP on one mask)."""

    def weights_after(epoch=0, step=3, rank=0, seed=0, consume_random_numbers_first=False) -> torch.Tensor:
        task = LinearTask(Runtime(torch.device("cpu"), rank=rank))
        task.args.seed = seed
        task.model = task.step_module = nn.Sequential(nn.Dropout(0.5), nn.Linear(3, 2))
        torch.manual_seed(1)  # the same initial weights for every call
        task.model[1].reset_parameters()
        task.optimizers = [torch.optim.SGD(task.model.parameters(), lr=0.1)]
        trainer = Trainer(task, tmp_path, validator=None)
        if consume_random_numbers_first:
            torch.rand(1000)
        inputs = torch.ones(16, 3)
        trainer.train_step(epoch, step, iter([(inputs, True)]), EpochTotals(), StopRequested())
        return task.model[1].weight.detach().clone()

    reference = weights_after()
    assert torch.equal(reference, weights_after(consume_random_numbers_first=True))
    for other in (dict(step=4), dict(epoch=1), dict(rank=1), dict(seed=1)):
        assert not torch.equal(reference, weights_after(**other)), other


@pytest.mark.parametrize("epochs, status", [(2, 143), (1, 0)])  # after the last epoch the run is complete
def test_a_stop_request_during_validation_ends_the_run_after_that_epochs_checkpoint(
    tiny_demo_data, tmp_path, monkeypatch, epochs, status
):
    real_validate = Trainer.validate

    def validate_then_sigterm(self, completed):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_validate(self, completed)

    monkeypatch.setattr(Trainer, "validate", validate_then_sigterm)
    argv = [
        *common_args(tiny_demo_data, tmp_path / "run"),
        "--epochs",
        epochs,
        "--num_triplets_train",
        "24",
        "--batch_size",
        "8",
    ]
    assert train_triplet.main([str(a) for a in argv]) == status
    checkpoints = sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["model_resnet18_triplet_epoch_1.pt"]  # no step of epoch 2 ran


def _two_epochs_failing_validation(tiny_demo_data, output_dir):
    argv = [*common_args(tiny_demo_data, output_dir), "--epochs", "2", "--num_triplets_train", "24",
            "--batch_size", "8", "--lr_schedule", "constant"]  # fmt: skip
    return train_triplet.main([str(a) for a in argv])


def test_a_validation_that_fails_keeps_the_trained_epoch(tiny_demo_data, tmp_path, monkeypatch, capsys):
    """An unreadable pairs image found after hours of training: the epoch's checkpoint and log row are
    written before the one-line error, and resuming from it goes on."""
    real_call = Validator.__call__

    def fail_at_epoch_2(self, model, epoch):
        if epoch == 2:
            raise InputError("LFW image unreadable: lfw/x/x_0001.png (OSError: image file is truncated)")
        return real_call(self, model, epoch)

    monkeypatch.setattr(Validator, "__call__", fail_at_epoch_2)
    output_dir = tmp_path / "run"
    assert _two_epochs_failing_validation(tiny_demo_data, output_dir) == 2
    assert "error: LFW image unreadable" in capsys.readouterr().err
    checkpoint = final_checkpoint(output_dir, "triplet", 2)
    assert checkpoint["epoch"] == 2 and checkpoint["history"]["validated_epochs"] == [1]
    with open(output_dir / "training_log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert rows[0]["accuracy_mean"] and not rows[1]["accuracy_mean"]
    assert "the epoch is saved without it" in (output_dir / "train.log").read_text()


def test_nonfinite_embeddings_at_validation_stop_the_run_after_saving_the_epoch(
    tiny_demo_data, tmp_path, monkeypatch
):
    import verification

    real_embed = verification.embed_dataset

    def one_nan_row(*args, **kwargs):
        embeddings = real_embed(*args, **kwargs).clone()
        embeddings[3] = float("nan")
        return embeddings

    monkeypatch.setattr(verification, "embed_dataset", one_nan_row)
    output_dir = tmp_path / "run"
    assert _two_epochs_failing_validation(tiny_demo_data, output_dir) == 3
    log_text = (output_dir / "train.log").read_text()
    assert "stopping: after epoch 1, LFW: the model's embeddings of 1 of " in log_text
    assert final_checkpoint(output_dir, "triplet", 1)["epoch"] == 1


def test_check_finite_embeddings_counts_the_bad_rows_and_names_the_precision():
    from verification import NonFiniteEmbeddings, check_finite_embeddings

    embeddings = torch.ones(10, 4)
    check_finite_embeddings(embeddings, None)  # finite: nothing raised
    embeddings[2, 1] = float("inf")
    embeddings[7] = float("nan")
    with pytest.raises(
        NonFiniteEmbeddings, match="embeddings of 2 of 10 images are not finite .* in bf16; try --amp off"
    ):
        check_finite_embeddings(embeddings, torch.bfloat16)


def test_each_targets_accuracies_keep_their_epochs_when_a_resume_changes_the_targets(tmp_path, monkeypatch):
    import plots

    history = History()
    for epoch in (1, 2, 3):
        history.validated_epochs.append(epoch)
        history.record_target("lfw", epoch, 0.7 + epoch / 100, 0.01, primary=True)
        history.record_target("cfp_fp", epoch, 0.6 + epoch / 100, 0.02, primary=False)
    for epoch in (4, 5):  # resumed with --val_targets cfp_fp.bin only
        history.validated_epochs.append(epoch)
        history.record_target("cfp_fp", epoch, 0.6 + epoch / 100, 0.02, primary=True)
    assert history.target_series("lfw") == ([1, 2, 3], [0.71, 0.72, 0.73], [0.01] * 3)
    assert history.target_series("cfp_fp")[0] == [1, 2, 3, 4, 5]
    drawn = {}
    monkeypatch.setattr(plots, "plot_accuracy_lfw", lambda *args, **kwargs: drawn.update(args=args, **kwargs))
    plot_history(history, tmp_path)
    assert drawn["name"] == "cfp_fp" and list(drawn["args"][0]) == [1, 2, 3, 4, 5]
    assert drawn["others"] == {"lfw": ([1, 2, 3], [0.71, 0.72, 0.73])}
    # a checkpoint from before targets kept their epochs: the old values line up with the last epochs
    legacy = History(validated_epochs=[1, 2, 3, 4], accuracies=[0.5] * 4, accuracy_stds=[0.1] * 4,
                     target_accuracies={"lfw": [0.5] * 4, "cfp_fp": [0.6, 0.7]})  # fmt: skip
    legacy.validated_epochs.append(5)
    legacy.record_target("lfw", 5, 0.8, 0.1, primary=True)
    legacy.record_target("cfp_fp", 5, 0.9, 0.2, primary=False)
    assert legacy.target_series("cfp_fp")[:2] == ([3, 4, 5], [0.6, 0.7, 0.9])
    assert legacy.target_series("lfw") == ([1, 2, 3, 4, 5], [0.5] * 4 + [0.8], None)


def test_restarts_on_torchruns_shared_store_get_the_workaround_named():
    from training.runtime import restart_store_warning

    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_store_warning(shared)
    assert restart_store_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert restart_store_warning({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert restart_store_warning({}) is None


# ----------------------------------------------------------------------------- DDP: processes' shares

KEPT_PER_RANK = ([0, 1, 2], [3, 4, 5, 6, 7, 8, 9])  # 3 and 7 triplets kept: the processes' counts differ


def _tiny_problem():
    torch.manual_seed(0)
    inputs = torch.randn(10, 4, dtype=torch.float64)
    return inputs, nn.Linear(4, 1).double()


def _ddp_share_worker(rank, out_dir):
    import torch.distributed as dist

    inputs, model = _tiny_problem()
    ddp = nn.parallel.DistributedDataParallel(model)
    per_triplet = ddp(inputs[KEPT_PER_RANK[rank]]).squeeze(1) ** 2
    count = torch.tensor(float(len(KEPT_PER_RANK[rank])), dtype=torch.float64)
    out = StepOutput(loss=per_triplet.mean(), loss_sum=per_triplet.sum().detach(), count=count)
    global_count = count.clone()
    dist.all_reduce(global_count)
    loss_for_ddp(out, float(global_count), dist.get_world_size()).backward()
    torch.save([p.grad for p in model.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_trains_on_the_mean_over_every_process_triplets_when_their_counts_differ(tmp_path):
    from tests.gloo_processes import run_on_gloo

    run_on_gloo(_ddp_share_worker, str(tmp_path))
    inputs, model = _tiny_problem()
    (model(inputs).squeeze(1) ** 2).mean().backward()  # one process, all ten triplets
    expected = [p.grad for p in model.parameters()]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for grad, want in zip(got, expected, strict=True):
            torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)
    # what DDP alone gives (the average of the two processes' means) is another gradient: the case is a real one
    naive = []
    for kept in KEPT_PER_RANK:
        inputs, model = _tiny_problem()
        (model(inputs[kept]).squeeze(1) ** 2).mean().backward()
        naive.append([p.grad for p in model.parameters()])
    assert max(float(((a + b) / 2 - c).abs().max()) for a, b, c in zip(*naive, expected, strict=True)) > 1e-3


def test_a_loss_already_over_the_global_batch_is_left_as_it_is():
    loss = torch.tensor(2.0, requires_grad=True)
    out = StepOutput(loss=loss, loss_sum=loss.detach() * 3, count=torch.tensor(3.0), global_mean=True)
    assert loss_for_ddp(out, 10.0, 2) is loss
    local = StepOutput(loss=loss, loss_sum=loss.detach() * 3, count=torch.tensor(3.0))
    assert loss_for_ddp(local, 10.0, 2).item() == pytest.approx(2.0 * 2 * 3 / 10)  # W x its share
    assert loss_for_ddp(local, 3.0, 1) is loss  # one process: its mean is the mean


# ----------------------------------------------------------------------------- fp16: one skip for all


def _two_optimizer_task(seed=0):
    """A model and a loss parameter of its own (the centers, a classifier shard), each with its optimizer."""
    torch.manual_seed(seed)
    model, centers = nn.Linear(3, 1), nn.Parameter(torch.randn(3))
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD([centers], lr=0.1)]
    return SimpleNamespace(
        model=model, centers=centers, optimizers=optimizers, before_optimizer_step=lambda: None
    )


def _loss(task, centers_overflow: bool):
    inputs = torch.ones(4, 3)
    loss = task.model(inputs).pow(2).mean() + (task.centers * inputs).sum()
    if centers_overflow:  # only the centers' gradient is inf, as when one shard's logits overflow in fp16
        task.overflow_hook = task.centers.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    return loss


def test_an_fp16_overflow_in_one_optimizer_skips_every_optimizer():
    task = _two_optimizer_task()
    before = [p.detach().clone() for p in (*task.model.parameters(), task.centers)]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert backward_and_step(task, _loss(task, centers_overflow=True), scaler) is False
    after = [p.detach() for p in (*task.model.parameters(), task.centers)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the model did not step either
    assert scaler.get_scale() == 512.0
    task.overflow_hook.remove()
    assert backward_and_step(task, _loss(task, centers_overflow=False), scaler) is True
    assert not torch.equal(before[0], task.model.weight.detach())


def _overflow_worker(rank, out_dir):
    task = _two_optimizer_task()
    task.model = nn.parallel.DistributedDataParallel(task.model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    stepped = backward_and_step(
        task, _loss(task, centers_overflow=rank == 0), scaler, runtime=SimpleNamespace(distributed=True)
    )
    torch.save(
        {"stepped": stepped, "scale": scaler.get_scale(), "weight": task.model.module.weight.detach()},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def test_an_fp16_overflow_on_one_process_skips_the_step_and_lowers_the_scale_on_every_process(tmp_path):
    from tests.gloo_processes import run_on_gloo

    run_on_gloo(_overflow_worker, str(tmp_path))
    initial = _two_optimizer_task().model.weight.detach()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["stepped"] is False and result["scale"] == 512.0
        assert torch.equal(result["weight"], initial)


def test_a_data_workers_error_ends_the_process_with_its_line(tiny_demo_data, tmp_path):
    """An identity whose every image is unreadable, found by a data worker: the process prints the one line
    and exits 2. It used to print the line and then wait for ever at exit on its workers, which ignore
    SIGTERM (so a cluster job held its GPUs until its time limit)."""
    import shutil
    import subprocess
    import sys

    from tests.training_data import REPO

    dataroot = tmp_path / "faces"
    shutil.copytree(tiny_demo_data.train_dir, dataroot)
    broken = sorted(path for path in dataroot.iterdir() if path.is_dir())[0]
    for image in broken.iterdir():
        image.write_bytes(b"not an image")
    args = common_args(tiny_demo_data, tmp_path / "run")
    args[args.index("--dataroot") + 1] = dataroot
    args[args.index("--num_workers") + 1] = "1"
    command = [sys.executable, "train_triplet.py", *map(str, args), "--num_triplets_train", "96"]
    command += ["--batch_size", "8", "--epochs", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: identity '{broken.name}' has no readable image left" in result.stderr


@pytest.mark.parametrize(
    "raised, pretrained, expected",
    [
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2e11 bytes"), False,
         "--model resnet18 with --embedding_dim 64 does not fit in the memory of cpu (DefaultCPUAllocator"),
        (RuntimeError("HTTP Error 404"), True, "--pretrained: HTTP Error 404"),
        (RuntimeError("a bug"), False, None),  # not the user's: its traceback is kept
    ],
)  # fmt: skip
def test_a_model_that_cannot_be_built_names_the_flag_responsible(monkeypatch, raised, pretrained, expected):
    """An --embedding_dim too large for memory was reported as a --pretrained problem (which was not given)."""
    import training.builders as builders

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(builders, "build_model", fail)
    args = SimpleNamespace(model="resnet18", embedding_dim=64, pretrained=pretrained)
    if expected is None:
        with pytest.raises(RuntimeError, match="a bug"):
            builders.build_embedding_model(args, torch.device("cpu"))
    else:
        with pytest.raises(InputError) as error:
            builders.build_embedding_model(args, torch.device("cpu"))
        assert str(error.value).startswith(expected)
