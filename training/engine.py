"""The task API and the training loop.

A script describes its task with a `TrainingTask` (its data, its model, its loss step); `run_training` does
the rest. How a batch flows: the task's dataset -> its sampler (this process's share of the epoch) -> a
DataLoader -> ``task.step`` (forward, loss) -> `backward_and_step` (backward, the task's optimizers) ->
after the epoch, the LFW validator, the CSV log, the plots and a checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import eval_metrics
from datasets.transforms import mean_and_std, normalization_entry
from devices import amp_name
from errors import InputError, user_error
from fileio import save_torch_atomic
from losses.partial_fc import mix_seed
from training.builders import LearningRateSchedule, load_optimizer_state
from training.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    check_resume_position,
    checkpoint_path,
    is_plain_flag_value,
    load_resume_checkpoint,
    release_output_dir,
    resumed_changes,
    state_error,
)
from training.cli import check_common_args, was_given
from training.coordination import FailureWatch, StopRequested, agree_on_step, agree_to_stop
from training.finetune import apply_backbone_freeze, load_initial_weights, settle_run_settings
from training.records import EpochTotals, History, append_csv_row, plot_history
from training.run_folder import agreed_latest_checkpoint, prepare_output
from training.runtime import (
    Runtime,
    barrier,
    close_run_logs,
    configure_logging,
    log,
    precision_note,
    seed_everything,
    set_precision,
    setup_runtime,
)
from training.step import StepOutput, backward_and_step, loss_for_ddp
from training.validation import Validator
from verification import NonFiniteEmbeddings

# a run stops when this many steps in a row had a non-finite loss
MAX_CONSECUTIVE_NONFINITE = 5
LOG_EVERY_STEPS = 10


class TrainingTask:
    """The part of a training run that differs between triplet and center-loss training.

    Subclasses set ``name`` and ``count_name``, build ``model`` (the embedding model, what checkpoints
    store), ``step_module`` (what DDP wraps and what ``step`` runs: the model, or the model with loss
    parameters of its own) and ``optimizers``, and implement ``steps_per_epoch``, ``batches`` and ``step``.
    """

    name = "task"
    count_name = "samples"
    min_batch_size = 1  # --batch_size counts images where it is 2: batch norm cannot train on one image
    divergence_hint = "lower --lr"  # what to try when the loss stops being finite

    def __init__(self, args: argparse.Namespace, runtime: Runtime):
        self.args = args
        self.runtime = runtime
        self.model: nn.Module
        self.step_module: nn.Module
        self.optimizers: list[torch.optim.Optimizer]

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def batches(self, epoch: int, start_step: int) -> Iterable:
        """The batches of ``epoch`` from ``start_step`` on; the same batches whatever ran before."""
        raise NotImplementedError

    def step(self, step_module: nn.Module, batch) -> StepOutput:
        """Forward and loss of one batch, through ``step_module`` (DDP-wrapped when distributed)."""
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Called after the gradients are unscaled and before the optimizers step."""

    def scheduled_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers whose lr follows --lr_schedule and --warmup_epochs (default: all)."""
        return self.optimizers

    def trained_tensors(self) -> list[torch.Tensor]:
        """Every tensor training changes besides the model's own (checked to be finite at each epoch's end):
        by default, what the optimizers hold."""
        return [
            p for optimizer in self.optimizers for group in optimizer.param_groups for p in group["params"]
        ]

    num_classes: int | None = None  # the identities of a classifier (center loss, margin softmax)

    def checkpoint_extras(self) -> dict:
        return {}

    def check_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint this task cannot continue, before any of its weights are loaded."""
        if self.num_classes is not None and checkpoint.get("num_classes") != self.num_classes:
            raise InputError(
                f"--resume_path: the checkpoint was trained on {checkpoint.get('num_classes')} identities, "
                f"the dataset has {self.num_classes}"
            )

    def load_checkpoint_extras(self, checkpoint: dict) -> None:
        pass


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite; the message says what to try."""


class Trainer:
    """Runs a task's epochs: steps, the per-epoch validation and log, checkpoints, resume and stop requests."""

    def __init__(self, task: TrainingTask, output_dir: Path, validator: Validator | None):
        self.task = task
        self.args = task.args
        self.runtime = task.runtime
        self.output_dir = output_dir
        self.validator = validator
        self.step_module = task.step_module
        if self.runtime.distributed:
            device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            # a frozen backbone's parameters take no part in the backward pass: DDP must expect that
            self.step_module = nn.parallel.DistributedDataParallel(
                task.step_module,
                device_ids=device_ids,
                find_unused_parameters=self.args.freeze_backbone_epochs > 0,
            )
        self.backbone_frozen = False
        self.steps_per_epoch = task.steps_per_epoch()
        self.schedule = LearningRateSchedule.for_run(
            self.args, task.scheduled_optimizers(), self.args.epochs, self.steps_per_epoch
        )
        if getattr(self.args, "warmup_epochs", 0.0) > self.args.epochs:
            log.warning(
                f"--warmup_epochs {self.args.warmup_epochs} is longer than --epochs {self.args.epochs}: the lr "
                "will not reach --lr in this run"
            )
        self.scaler = torch.amp.GradScaler(self.runtime.device.type, enabled=self.runtime.use_grad_scaler)
        self.history = History()
        self.best_distance_threshold: float | None = None
        self.validation_precision: str | None = None  # the precision that threshold was measured in
        # where a resumed run continues: epoch, step within it, and that epoch's totals so far
        self.start_epoch = 0
        self.start_step = 0
        self.resumed_totals = EpochTotals()
        self.interrupted_path: Path | None = None
        self.consecutive_nonfinite = 0
        self.stop_agreed = False  # some process was asked to stop: all stop after the same step
        self.steps_completed = 0  # by this process (a failure before the first leaves nothing worth keeping)

    # ----- checkpoints

    def checkpoint_state(self, completed_epochs: int, step_in_epoch: int, totals: EpochTotals) -> dict:
        task, args = self.task, self.args
        state = {
            # the original repository's keys
            "epoch": completed_epochs,
            "embedding_dimension": args.embedding_dim,
            "batch_size_training": args.batch_size,
            "model_state_dict": task.model.state_dict(),
            "model_architecture": args.model,
            "optimizer_model_state_dict": task.optimizers[0].state_dict(),
            "best_distance_threshold": self.best_distance_threshold,
            # the precision that threshold was measured in: validate_on_LFW.py evaluates in it by default
            "validation_precision": self.validation_precision,
            # what exact resume and inference need
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "task": task.name,
            "image_size": args.image_size,
            # the run's mean and std: those of the checkpoint it started from, or the default
            "normalization": normalization_entry(*mean_and_std(args.normalization)),
            "args": {key: value for key, value in vars(args).items() if is_plain_flag_value(value)},
            "scheduler_state_dict": self.schedule.state_dict(),
            "grad_scaler_state_dict": self.scaler.state_dict(),
            "step_in_epoch": step_in_epoch,
            "world_size": self.runtime.world_size,
            "partial_epoch": {
                "loss_sum": totals.loss_sum,
                "count": totals.count,
                "skipped_steps": totals.skipped_steps,
                "nonfinite_steps": totals.nonfinite_steps,
            },
            "history": vars(self.history),
        }
        if args.alignment is not None:  # how the training crops were made, when known
            state["alignment"] = dict(args.alignment)
        return state

    def save(
        self,
        completed_epochs: int,
        step_in_epoch: int = 0,
        totals: EpochTotals | None = None,
        name_suffix: str | None = None,
    ):
        """Rank 0 writes the checkpoint (mid-epoch ones are ``_interrupted``); returns its path there.

        Every rank calls it: the task's extras may be collective (a sharded classifier gathers its rows).
        """
        path = None
        extras = self.task.checkpoint_extras()
        if self.runtime.is_main:
            interrupted = step_in_epoch > 0
            path = checkpoint_path(
                self.output_dir,
                self.args.model,
                self.task.name,
                completed_epochs + interrupted,
                interrupted,
                suffix=name_suffix,
            )
            state = self.checkpoint_state(completed_epochs, step_in_epoch, totals or EpochTotals())
            save_torch_atomic({**state, **extras}, path)
        barrier(self.runtime)
        return path

    def save_periodic(self, epoch: int, step: int, totals: EpochTotals) -> None:
        """--checkpoint_every_steps: a mid-epoch checkpoint ``..._epoch_<N>_step_<S>.pt``; the previous
        one of this epoch is removed once the new one is written, and the last once the epoch's own
        checkpoint is (epoch-end checkpoints all stay)."""
        path = self.save(epoch, step, totals, name_suffix=f"_step_{step}")
        self.remove_step_checkpoints(epoch + 1, keep=path)

    def remove_step_checkpoints(self, epoch_number: int, keep: Path | None = None) -> None:
        if self.runtime.is_main and self.args.checkpoint_every_steps:
            pattern = f"model_{self.args.model}_{self.task.name}_epoch_{epoch_number}_step_*.pt"
            for older in (self.output_dir / "checkpoints").glob(pattern):
                if older != keep:
                    older.unlink(missing_ok=True)

    def resume(self, checkpoint: dict) -> None:
        check_resume_position(checkpoint, self.args, self.runtime)
        self.task.check_checkpoint(checkpoint)
        try:
            self.load_state(checkpoint)
        except InputError:
            raise
        # a checkpoint edited, or from elsewhere: one line naming it, not load_state_dict's pages
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            raise InputError(
                f"--resume_path {self.args.resume_path}: does not fit this run ({state_error(error)})"
            ) from None
        previous = self.history.primary
        current = next(iter(self.validator.targets), None) if self.validator is not None else None
        if previous is not None and current is not None and previous != current:
            log.warning(
                f"the run was validated on {previous} first, now on {current}: the checkpoints' "
                f"best_distance_threshold and the accuracy plot's main line follow {current} from now on"
            )
        if self.start_epoch >= self.args.epochs:  # --resume_path auto on a finished run lands here too
            log.info(
                f"resumed from {self.args.resume_path}: the run has all of its {self.start_epoch} epochs "
                "(--epochs counts them all); nothing to train, pass a larger --epochs to continue"
            )
        else:
            where = f"epoch {self.start_epoch + 1} of {self.args.epochs}" + (
                f", step {self.start_step + 1} of {self.steps_per_epoch}" if self.start_step else ""
            )
            log.info(f"resumed from {self.args.resume_path}: continuing at {where}")
        changes = resumed_changes(checkpoint, self.args)
        if changes:
            log.info(f"changed on the command line: {', '.join(changes)}")

    def load_state(self, checkpoint: dict) -> None:
        """The weights, optimizer and scaler states, the task's extras, history and position."""
        task = self.task
        task.model.load_state_dict(checkpoint["model_state_dict"])
        load_optimizer_state(task.optimizers[0], checkpoint["optimizer_model_state_dict"])
        # a run saved without fp16 (bf16 or fp32, or on another machine under --amp auto) has no loss scale
        # to restore, and an fp16 run resumed from it starts from the scaler's default
        if checkpoint["grad_scaler_state_dict"]:
            self.scaler.load_state_dict(checkpoint["grad_scaler_state_dict"])
        task.load_checkpoint_extras(checkpoint)
        self.best_distance_threshold = checkpoint["best_distance_threshold"]
        self.validation_precision = checkpoint.get("validation_precision")
        self.history = History(**checkpoint["history"])
        self.start_epoch = checkpoint["epoch"]
        self.start_step = checkpoint["step_in_epoch"]
        self.resumed_totals = EpochTotals(**checkpoint["partial_epoch"])

    # ----- training

    def train_epoch(self, epoch: int, stop: StopRequested) -> EpochTotals | None:
        """One epoch; returns its totals, or None when a stop request cut it short (after a checkpoint)."""
        start_step = self.start_step if epoch == self.start_epoch else 0
        totals = self.resumed_totals if start_step else EpochTotals()
        self.step_module.train()
        self.freeze_backbone(epoch < self.args.freeze_backbone_epochs)
        total = self.task.steps_per_epoch()
        progress = tqdm(
            total=total,
            initial=start_step,
            desc=f"epoch {epoch + 1}/{self.args.epochs}",
            disable=not self.runtime.is_main or not sys.stderr.isatty(),
            dynamic_ncols=True,
        )
        batches = iter(self.task.batches(epoch, start_step))
        for step in range(start_step + 1, total + 1):
            self.train_step(epoch, step, batches, totals, stop)
            progress.update()
            if step % LOG_EVERY_STEPS == 0 or step == total:
                progress.set_postfix(
                    loss=f"{totals.loss_sum / max(totals.count, 1):.4f}",
                    **{self.task.count_name: int(totals.count)},
                )
            if self.stop_agreed and step < total:
                progress.close()
                self.interrupted_path = self.save(epoch, step, totals)
                return None
            if (
                self.args.checkpoint_every_steps
                and step % self.args.checkpoint_every_steps == 0
                and step < total
            ):
                self.save_periodic(epoch, step, totals)
        progress.close()
        return totals

    def freeze_backbone(self, frozen: bool) -> None:
        """--freeze_backbone_epochs: only the embedding head and the loss's own parameters train."""
        apply_backbone_freeze(self.task.model, self.args, frozen, self.backbone_frozen, self.task.optimizers)
        self.backbone_frozen = frozen

    def train_step(self, epoch: int, step: int, batches, totals: EpochTotals, stop: StopRequested) -> None:
        """Load and forward a batch; agree with the other processes (one all-reduce); then, unless a loss
        was non-finite, backward and the optimizer steps. An exception ends the run on every process
        (``coordination.FailureWatch``)."""
        runtime = self.runtime
        batch = next(batches)
        # the model's own randomness (dropout) from (seed, epoch, step, rank): a resumed epoch draws what the
        # uninterrupted one did, and the processes of a run draw different masks for their different images
        torch.manual_seed(mix_seed(self.args.seed, epoch, step, runtime.rank))
        self.schedule.apply(epoch * self.steps_per_epoch + step - 1)  # the lr follows the position alone
        with torch.autocast(
            runtime.device.type, dtype=runtime.amp_dtype, enabled=runtime.amp_dtype is not None
        ):
            out = self.task.step(self.step_module, batch)
        verdict = agree_on_step(out, stop.signal_name is not None, runtime)
        self.stop_agreed = self.stop_agreed or verdict.stop
        self.steps_completed += 1  # also for a skipped step: the data and the model ran
        if not verdict.nonfinite and verdict.count > 0:
            self.consecutive_nonfinite = 0
            loss = loss_for_ddp(out, verdict.count, runtime.world_size)
            if backward_and_step(self.task, loss, self.scaler, self.args.clip_grad_norm, runtime):
                totals.loss_sum += verdict.loss_sum
                totals.count += verdict.count
            else:  # an fp16 gradient overflow: nothing trained; the scaler lowered its scale
                totals.skipped_steps += 1
            return
        totals.skipped_steps += 1
        for optimizer in self.task.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if not verdict.nonfinite:
            # no process's batch held a triplet (one identity only, or only singletons): nothing to learn from,
            # and an optimizer step on zero gradients would still move the weights (momentum, weight decay)
            return
        totals.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        log.warning(f"epoch {epoch + 1} step {step}: non-finite loss, step skipped")
        if self.consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
            raise TrainingDiverged(
                f"stopping: {MAX_CONSECUTIVE_NONFINITE} steps in a row had a non-finite loss "
                f"(epoch {epoch + 1}, step {step}); {self.task.divergence_hint} or try --amp off"
            )

    def finish_epoch(self, epoch: int, totals: EpochTotals, seconds: float) -> None:
        """Log the epoch, validate when due, write the CSV row, the plots and the checkpoint."""
        completed = epoch + 1
        lr = self.task.optimizers[0].param_groups[0]["lr"]  # the epoch's last step's
        log.info(
            f"epoch {completed}/{self.args.epochs}: average {self.task.name} loss {totals.average_loss:.6f} "
            f"over {int(totals.count)} {self.task.count_name}, {totals.skipped_steps} steps skipped, "
            f"{seconds:.1f} s, lr {lr:g}"
        )
        row = {
            "epoch": completed,
            "train_loss": totals.average_loss,
            f"num_{self.task.count_name}": int(totals.count),
            "skipped_steps": totals.skipped_steps,
            "epoch_seconds": round(seconds, 3),
            "lr": lr,
        }
        self.history.epochs.append(completed)
        self.history.losses.append(totals.average_loss)
        validate = completed % self.args.lfw_validation_epoch_interval == 0 or completed == self.args.epochs
        self.check_finite_state(completed)
        # the same on every process (agreed per step)
        if totals.nonfinite_steps >= self.task.steps_per_epoch():
            raise TrainingDiverged(
                f"stopping: every step of epoch {completed} had a non-finite loss, so nothing trained and it is "
                f"not saved; {self.task.divergence_hint} or try --amp off"
            )
        if self.runtime.is_main:  # the other processes wait for it in the checkpoint's collectives
            try:
                if validate:
                    row.update(self.validate(completed))
            except Exception:
                # an unreadable pairs image, a model whose embeddings overflow: the trained epoch is kept
                self.record_epoch(row)
                path = self.save(completed)
                log.error(
                    f"validation after epoch {completed} failed (below); the epoch is saved without it in "
                    f"{path}: resume from it with --resume_path once that is fixed"
                )
                raise
            self.record_epoch(row)
        self.save(completed)
        self.remove_step_checkpoints(completed)  # the epoch's own checkpoint supersedes them

    def record_epoch(self, row: dict) -> None:
        append_csv_row(self.output_dir / "training_log.csv", row)
        plot_history(self.history, self.output_dir / "plots")

    def check_finite_state(self, completed: int) -> None:
        """Weights or batch-norm statistics that are not finite (a finite loss can still come with an inf
        gradient) end the run before they are validated or saved. The weights are the same on every process,
        the batch-norm statistics each process's own; one process stopping here stops all (FailureWatch)."""
        # the model's, and the loss's own: the centers, or this process's shard of the classifier
        trained = self.task.trained_tensors()
        state = itertools.chain(self.task.model.parameters(), self.task.model.buffers(), trained)
        if not all(bool(torch.isfinite(tensor).all()) for tensor in state if tensor.is_floating_point()):
            raise TrainingDiverged(
                f"stopping: after epoch {completed} the weights are not finite, so this epoch is not "
                "saved; resume from the last checkpoint with a lower --lr, or try --amp off"
            )

    def validate(self, completed: int) -> dict[str, float]:
        """Run the validator; remember accuracies and the primary target's threshold; return the log row's
        columns: the primary target's whole summary, and accuracy and ROC AUC of every other target."""
        row: dict[str, float] = {}
        try:
            results = self.validator(self.task.model, completed)
        except NonFiniteEmbeddings as error:
            raise TrainingDiverged(
                f"stopping: after epoch {completed}, {error} (the weights are finite; a lower --lr may help)"
            ) from None
        self.history.validated_epochs.append(completed)
        for index, (name, metrics) in enumerate(results.items()):
            summary = eval_metrics.metrics_summary(metrics)
            self.history.record_target(
                name, completed, float(summary["accuracy_mean"]), float(summary["accuracy_std"]), index == 0
            )
            if index == 0:
                self.best_distance_threshold = float(summary["best_distance_threshold_mean"])
                self.validation_precision = amp_name(self.runtime.eval_amp_dtype)
                row.update(summary)
            else:
                for key in ("accuracy_mean", "accuracy_std", "roc_auc"):
                    row[f"{name}_{key}"] = summary[key]
        return row

    def fit(self) -> int:
        """Every remaining epoch; the exit status (0, or 130 / 143 after SIGINT / SIGTERM on any process)."""
        with StopRequested() as stop:
            for epoch in range(self.start_epoch, self.args.epochs):
                started = time.perf_counter()
                totals = self.train_epoch(epoch, stop)
                reason = stop.signal_name or "a stop request on another process"
                if totals is None:
                    log.warning(
                        f"{reason}: stopped in epoch {epoch + 1}; resume with --resume_path "
                        f"{self.interrupted_path or 'auto'}"
                    )
                    return stop.exit_status
                self.finish_epoch(epoch, totals, time.perf_counter() - started)
                self.stop_agreed = self.stop_agreed or agree_to_stop(
                    stop.signal_name is not None, self.runtime
                )
                if self.stop_agreed and epoch + 1 == self.args.epochs:
                    log.info(f"{reason} came after the last step: the run is complete")
                elif self.stop_agreed:
                    path = checkpoint_path(self.output_dir, self.args.model, self.task.name, epoch + 1, False)
                    log.warning(
                        f"{reason}: stopped after epoch {epoch + 1}; resume with --resume_path {path}"
                    )
                    return stop.exit_status
        if self.start_epoch < self.args.epochs:
            log.info(f"training finished; checkpoints, log and plots in {self.output_dir}")
        return 0


def run_training(args: argparse.Namespace, task_class: type[TrainingTask]) -> int:
    """Everything from checked arguments to the last checkpoint; returns the exit status.

    Under torchrun, an exception on any process ends every process with that process's one-line message
    (``error: rank R: ...``) and exit status within about a second (``coordination.FailureWatch``).
    """
    check_common_args(args)
    if args.batch_size < task_class.min_batch_size:
        raise InputError(f"--batch_size {args.batch_size}: batch norm needs at least 2 images a step")
    runtime = setup_runtime(args)
    with FailureWatch(runtime) as watch:
        try:
            return train(args, task_class, runtime)
        except BaseException as error:
            first = watch.report(error, failure_status(error))
            if first is None:  # a single process
                if isinstance(error, TrainingDiverged):
                    log.error(str(error))
                    return 3
                raise
            own = first.rank == runtime.rank  # else this error most likely follows from that process's
            if own and user_error(error) is None and not isinstance(error, TrainingDiverged):
                log.exception(f"rank {runtime.rank}: failed")  # the traceback, for a bug
            watch.announce(first)
            return first.status
        finally:
            close_run_logs()  # the run's train.log and console handlers end with it (several runs per process)


def failure_status(error: BaseException) -> int:
    """The exit status of a run that ended with ``error``: `user_error`'s (2 bad input, 130 interrupted), 3
    diverged, else 1."""
    known = user_error(error)
    if known is not None:
        return known[0]
    return 3 if isinstance(error, TrainingDiverged) else 1


def train(args: argparse.Namespace, task_class: type[TrainingTask], runtime: Runtime) -> int:
    auto_resume = args.resume_path == "auto"
    if auto_resume:
        args.resume_path = agreed_latest_checkpoint(args, task_class.name, runtime)
    resume_checkpoint = (
        load_resume_checkpoint(args.resume_path, args, task_class.name) if args.resume_path else None
    )
    if resume_checkpoint is not None and not was_given(args, "amp"):
        try:  # the run's own --amp, adopted from the checkpoint
            set_precision(runtime, args)
        except InputError as error:
            raise InputError(f"--resume_path {args.resume_path}: the run's {error}") from None
    init_source = settle_run_settings(args, resume_checkpoint)  # --init_from decides model and preprocessing
    output_dir, validator, fresh, config_path = prepare_output(
        args, runtime, task_class.name, resuming=resume_checkpoint is not None or auto_resume
    )
    configure_logging(output_dir, runtime.is_main)
    if auto_resume and resume_checkpoint is None:
        log.info(f"--resume_path auto: no checkpoint in {output_dir}; starting from scratch")
    seed_everything(args.seed)
    trainer = None
    try:
        task = task_class(args, runtime)  # builds data, model and optimizers
        if init_source is not None:
            load_initial_weights(task.model, init_source, args)
        trainer = Trainer(task, output_dir, validator)
        if resume_checkpoint is not None:
            trainer.resume(resume_checkpoint)
            if trainer.start_epoch >= args.epochs and config_path is not None:
                # a finished run (resubmitted with auto): nothing trains, nothing to describe
                config_path.unlink(missing_ok=True)
        log.info(
            f"{task.name} training of {args.model} on {runtime.device}"
            f"{f' x{runtime.world_size} processes' if runtime.distributed else ''}, "
            f"{precision_note(args, runtime)}; output in {output_dir}"
        )
        return trainer.fit()
    except BaseException:
        # bad data or a setting the data contradicts, found before a step was completed (the first batch
        # included): leave a new folder as it was, free for the corrected command
        if trainer is None or trainer.steps_completed == 0:
            if fresh:
                release_output_dir(output_dir, remove_folder=fresh == "new")
            elif config_path is not None:  # a resume that failed to start: the folder keeps what it held
                config_path.unlink(missing_ok=True)
        raise
