"""Checkpoints and the output folder: where a run writes, what it may overwrite, how it resumes.

A checkpoint is plain data (tensors, numbers, strings, lists, dicts), written atomically from the unwrapped
model; it keeps the original repository's keys and adds what an exact resume and inference need.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from checkpoint_loading import CHECKPOINT_FORMAT_VERSION, read_checkpoint
from datasets.transforms import mean_and_std, normalization_entry
from errors import InputError, first_line
from training.cli import was_given
from training.runtime import close_run_logs, log

# a folder holding a run with other values of these is another run, never to be written into
RUN_IDENTITY_KEYS = ("task", "model", "embedding_dim", "dataroot", "seed")


def checkpoint_path(
    output_dir: Path, model: str, task_name: str, epoch: int, interrupted: bool, suffix: str | None = None
) -> Path:
    """``checkpoints/model_<model>_<task>_epoch_<N>[_interrupted | suffix].pt``: N epochs completed, or for a
    mid-epoch checkpoint, N is the epoch in progress."""
    if suffix is None:
        suffix = "_interrupted" if interrupted else ""
    return output_dir / "checkpoints" / f"model_{model}_{task_name}_epoch_{epoch}{suffix}.pt"


def latest_checkpoint(
    output_dir: Path,
    model: str | None,
    task_name: str,
    world_size: int | None = None,
    batch_size: int | None = None,
) -> Path | None:
    """The checkpoint of ``output_dir`` a resubmitted run continues from, or None (``model`` None: of any
    architecture): the one written last, then the one furthest into training (epoch, step).

    Written last, not furthest: a run resumed from an earlier checkpoint leaves the abandoned branch's later
    files behind, and its own new ones must win. With ``world_size``, a mid-epoch checkpoint saved with
    another number of processes (or another ``batch_size``, when given) is passed over, since its position
    cannot be continued (``check_resume_position``): the run goes on from the newest one that can.

    Checkpoints are written atomically, so every file found is complete; each is opened memory-mapped to read
    its position, which costs next to nothing even for large files. An unreadable one is skipped.
    """
    candidates = []
    for path in (output_dir / "checkpoints").glob(f"model_{model or '*'}_{task_name}_epoch_*.pt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            position = (int(state["epoch"]), int(state["step_in_epoch"]))
            saved_with = (int(state["batch_size_training"]), int(state.get("world_size", 1)))
            written = path.stat().st_mtime_ns
        except Exception as error:  # noqa: BLE001 - not a readable checkpoint: not a candidate
            log.warning(
                f"--resume_path auto: passing over {path.name}, which does not load ({first_line(error)})"
            )
            continue
        if world_size is not None and position[1] > 0:
            if saved_with[1] != world_size or batch_size not in (None, saved_with[0]):
                log.warning(
                    f"--resume_path auto: passing over {path.name}, saved mid-epoch on {saved_with[1]} "
                    f"process(es) with batch size {saved_with[0]}"
                )
                continue
        candidates.append((written, position, str(path)))
    return Path(max(candidates)[2]) if candidates else None


def check_resume_position(checkpoint: dict, args: argparse.Namespace, runtime) -> None:
    """A mid-epoch position counts batches of one batch size over one number of processes: refuse others."""
    if not checkpoint.get("step_in_epoch"):
        return  # an epoch boundary: any batch size or world size continues from there
    saved = (checkpoint["batch_size_training"], checkpoint.get("world_size", 1))
    if saved != (args.batch_size, runtime.world_size):
        raise InputError(
            f"--resume_path {args.resume_path} was saved mid-epoch with batch size {saved[0]} on {saved[1]} "
            f"process(es); resume it with the same, or resume from the last epoch's checkpoint"
        )


def load_resume_checkpoint(path: str, args: argparse.Namespace, task_name: str) -> dict:
    """A checkpoint of this repository, checked to belong to the same kind of run."""
    try:
        checkpoint = read_checkpoint(path)
    except InputError as error:
        raise InputError(f"--resume_path: {error}") from None
    if "model_state_dict" not in checkpoint:
        raise InputError(f"--resume_path {path}: not a training checkpoint (no model_state_dict)")
    if checkpoint.get("format_version") != CHECKPOINT_FORMAT_VERSION or "task" not in checkpoint:
        raise InputError(
            f"--resume_path {path}: not a resumable checkpoint of this repository; "
            "use it for evaluation with validate_on_LFW.py"
        )
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise InputError(f"--resume_path {path}: an incomplete checkpoint (no {', '.join(missing)})")
    if checkpoint["task"] != task_name:
        raise InputError(
            f"--resume_path {path}: a {checkpoint['task']} checkpoint cannot resume {task_name} training"
        )
    adopt_resumed_settings(checkpoint, args)
    return checkpoint


# what resuming reads besides the model's weights and the task's own extras
RESUME_KEYS = (
    "model_architecture", "embedding_dimension", "image_size", "normalization", "epoch", "step_in_epoch",
    "batch_size_training", "optimizer_model_state_dict", "grad_scaler_state_dict", "best_distance_threshold",
    "history", "partial_epoch",
)  # fmt: skip


def state_error(error: Exception) -> str:
    """Why a checkpoint's state did not load, in one line (load_state_dict's first mismatch, a missing key)."""
    if isinstance(error, KeyError):
        return f"no {error.args[0]!r}" if error.args else "a missing key"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        lines = lines[1:]
    detail = lines[0] if lines else type(error).__name__
    return detail if len(detail) <= 200 else detail[:197] + "..."


def is_plain_flag_value(value) -> bool:
    """A flag value a checkpoint records: a number, string, bool or None, or a list of them."""
    if isinstance(value, (list, tuple)):
        return all(is_plain_flag_value(item) and not isinstance(item, (list, tuple)) for item in value)
    return value is None or isinstance(value, (str, int, float, bool))


# How a run learns. A resumed run keeps the checkpoint's value of each flag the command line does not give,
# so `--resume_path X` alone continues the run as it began (a flag given on the command line wins: a new
# --lr or more --epochs take effect; the optimizer itself cannot change, its state would not fit)
RESUMED_RECIPE = (
    "epochs", "seed", "optimizer", "lr", "weight_decay", "lr_schedule", "warmup_epochs", "batch_size",
    "freeze_backbone_epochs", "clip_grad_norm", "amp",
    # train_triplet.py
    "triplet_selection", "margin", "identities_per_batch", "images_per_identity", "num_triplets_train",
    "num_human_identities_per_batch", "selection_pass",
    # train_center.py
    "center_loss_lr", "center_loss_weight", "logit_scale",
    # train_margin.py
    "loss", "margin_scale", "margins", "sample_rate", "classifier_lr_scale", "center_momentum",
)  # fmt: skip


def adopt_resumed_settings(checkpoint: dict, args: argparse.Namespace) -> None:
    """A resumed run continues as it began: its model, embedding size and preprocessing (image size, mean,
    std, alignment) come from the checkpoint, and a flag given on the command line that contradicts them is
    an InputError; so does another --optimizer. Every other flag of RESUMED_RECIPE not on the command line
    takes the checkpoint's value."""
    for key, flag in (
        ("model_architecture", "model"),
        ("embedding_dimension", "embedding_dim"),
        ("image_size", "image_size"),
    ):
        if was_given(args, flag) and checkpoint[key] != getattr(args, flag):
            raise InputError(
                f"--resume_path {args.resume_path}: the checkpoint has {key} {checkpoint[key]!r} "
                f"but --{flag} is {getattr(args, flag)!r}"
            )
        setattr(args, flag, checkpoint[key])
    args.normalization = normalization_entry(*mean_and_std(checkpoint["normalization"]))
    args.alignment = checkpoint.get("alignment")
    saved = checkpoint.get("args", {})
    if was_given(args, "optimizer") and saved.get("optimizer", args.optimizer) != args.optimizer:
        raise InputError(
            f"--resume_path {args.resume_path}: the run trains with --optimizer {saved['optimizer']}, "
            f"not {args.optimizer} (its state would not fit); start a new run with --init_from instead"
        )
    # P of a P x K batch follows a new --batch_size or --images_per_identity unless given itself; and
    # train_margin.py's --margin means another margin under another --loss, so that loss's default applies
    derived = set()
    if any(was_given(args, f) for f in ("batch_size", "images_per_identity")):
        derived.add("identities_per_batch")
    if was_given(args, "loss") and saved.get("loss", args.loss) != args.loss:
        derived.add("margin")
    for flag in RESUMED_RECIPE:
        if flag in saved and hasattr(args, flag) and not was_given(args, flag) and flag not in derived:
            setattr(args, flag, saved[flag])


def resumed_changes(checkpoint: dict, args: argparse.Namespace) -> list[str]:
    """The recipe flags whose value this resumed run changes, as ``--flag old -> new``."""
    saved = checkpoint.get("args", {})
    return [
        f"--{flag} {saved[flag]} -> {'its default' if getattr(args, flag) is None else getattr(args, flag)}"
        for flag in RESUMED_RECIPE
        if flag in saved and hasattr(args, flag) and saved[flag] != getattr(args, flag)
    ]


def default_output_dir(args: argparse.Namespace, task_name: str) -> Path:
    """The resumed run's folder, or ``runs/[demo_]<task>_<model>_<date-time>`` for a new run."""
    if args.resume_path is not None:
        resumed = Path(args.resume_path).resolve().parent
        return resumed.parent if resumed.name == "checkpoints" else resumed
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time()))
    return Path("runs") / f"{'demo_' if args.demo else ''}{task_name}_{args.model}_{stamp}"


def claim_output_dir(output_dir: Path, run_config: dict, resuming: bool) -> None:
    """Make sure this run may write into ``output_dir``: never over another run's files."""
    config_path = output_dir / "run_config.json"
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    if not config_path.is_file():
        raise InputError(
            f"--output_dir {output_dir}: the folder holds other files; choose an empty or new folder"
        )
    try:
        previous = json.loads(config_path.read_text())
        if not isinstance(previous, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        raise InputError(
            f"--output_dir {output_dir}: its run_config.json is unreadable ({first_line(error)}); "
            "choose a new --output_dir"
        ) from None
    if not resuming:
        if not any((output_dir / "checkpoints").glob("*.pt")):
            raise InputError(
                f"--output_dir {output_dir}: the folder holds a run with no checkpoint yet (still running, or "
                "ended before its first: see its train.log); choose a new --output_dir, or start it again "
                "there with --resume_path auto"
            )
        raise InputError(
            f"--output_dir {output_dir}: the folder holds an earlier run; resume it with --resume_path "
            "or choose a new --output_dir"
        )
    differing = [key for key in RUN_IDENTITY_KEYS if previous.get(key) != run_config.get(key)]
    if differing:
        raise InputError(
            f"--output_dir {output_dir}: the folder holds a different run ({', '.join(differing)} differ); "
            "choose a new --output_dir"
        )


def release_output_dir(output_dir: Path, remove_folder: bool) -> None:
    """Undo a claim of a folder that was new or empty, when the run failed before training (bad data):
    delete what it wrote (run_config.json, train.log, dataset.csv), and the folder when it made it."""
    close_run_logs()  # train.log is closed before it is deleted
    for child in output_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    if remove_folder:
        output_dir.rmdir()
