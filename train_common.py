"""What both training scripts share: arguments, device, torchrun/DDP, mixed precision, seeding, checkpoints,
logging, the per-epoch LFW validation and the training loop itself.

A script describes its task (its data, its model, its loss step) with a ``TrainingTask``; ``run_training`` does
the rest. Device, distributed and precision are settled once in ``setup_runtime`` and the loop never asks which
device it is on.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from errors import InputError, report_input_errors
from models import MODEL_NAMES

log = logging.getLogger("facenet")

CHECKPOINT_FORMAT_VERSION = 1
OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adam")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
# a run stops when this many steps in a row had a non-finite loss
MAX_CONSECUTIVE_NONFINITE = 5
LOG_EVERY_STEPS = 10
DEMO_ROOT = Path("demo_data")


# --------------------------------------------------------------------------------------------- arguments


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


# what --demo changes in both scripts; each adds its own (epochs, batch size, ...)
DEMO_DEFAULTS = {
    "model": "resnet18",
    "image_size": 64,
    "optimizer": "adam",
    "lr": 0.001,
    "num_workers": 2,
    "lfw_batch_size": 128,
}


def base_parser(description: str, default_output_name: str) -> argparse.ArgumentParser:
    """The parser both scripts start from: the original's flags and the additions listed in README.md."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataroot", "-d", type=str, help="training images: one folder per identity (required)"
    )
    data.add_argument("--lfw", type=str, help="LFW images, aligned like the training images (required)")
    data.add_argument(
        "--lfw_pairs",
        type=str,
        help="the LFW pairs file (pairs.txt); default: pairs.txt or lfw_pairs.txt in --lfw",
    )
    data.add_argument(
        "--dataset_csv",
        type=str,
        default=None,
        help="CSV of the training images from datasets/generate_csv_files.py; default: written into --output_dir",
    )
    data.add_argument(
        "--image_size",
        type=positive_int,
        default=160,
        help="side of the square input images (aligned LFW is 160)",
    )
    data.add_argument(
        "--num_workers",
        type=int,
        default=8,
        help="data-loading processes (capped at the CPUs this process may use)",
    )
    data.add_argument(
        "--demo",
        action="store_true",
        help="train on the built-in synthetic dataset (generated into demo_data/ if absent) with small settings",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model", type=str, default="resnet34", choices=MODEL_NAMES, help="architecture")
    model.add_argument("--embedding_dim", type=positive_int, default=128, help="size of the embedding")
    model.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="start from ImageNet weights (needs the network or a warm torch hub cache)",
    )

    train = parser.add_argument_group("training")
    train.add_argument(
        "--epochs", type=positive_int, default=30, help="total number of epochs (also when resuming)"
    )
    train.add_argument("--batch_size", type=positive_int, default=64, help="training batch size per process")
    train.add_argument("--optimizer", type=str, default="adagrad", choices=OPTIMIZERS, help="optimizer")
    train.add_argument("--lr", type=positive_float, default=0.001, help="learning rate")
    train.add_argument(
        "--lr_schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="constant (the original) or cosine decay to zero over --epochs, stepped per epoch",
    )
    train.add_argument(
        "--seed", type=int, default=0, help="seed for weights, triplets, sampling and augmentation"
    )
    train.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="auto",
        help="mixed precision: auto = bf16 on GPUs that support it, fp16 with a gradient scaler on older GPUs, "
        "off on the CPU",
    )
    train.add_argument(
        "--device", type=str, default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N"
    )

    run = parser.add_argument_group("validation, output and resume")
    run.add_argument("--lfw_batch_size", type=positive_int, default=64, help="batch size for embedding LFW")
    run.add_argument(
        "--lfw_validation_epoch_interval",
        type=positive_int,
        default=1,
        help="validate on LFW every this many epochs (and always after the last)",
    )
    run.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help=f"everything the run writes goes here; default: runs/{default_output_name}_<model>_<date-time>, "
        "or the resumed run's folder",
    )
    run.add_argument(
        "--resume_path",
        "--resume",
        dest="resume_path",
        type=str,
        default=None,
        help="checkpoint to resume from",
    )
    return parser


def parse_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, demo_defaults: dict
) -> argparse.Namespace:
    """Parse; under ``--demo``, the demo defaults (shared, then the script's) apply to every flag not given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--demo" in argv:
        parser.set_defaults(**{**DEMO_DEFAULTS, **demo_defaults})
    args = parser.parse_args(argv)
    if not args.demo:
        missing = [
            flag for flag, value in (("--dataroot/-d", args.dataroot), ("--lfw", args.lfw)) if not value
        ]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def check_common_args(args: argparse.Namespace) -> None:
    """Every cheap check of files and values, before any work or writing."""
    if args.num_workers < 0:
        raise InputError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if args.demo:
        return  # the demo's data is generated later, at known paths
    dataroot = Path(args.dataroot)
    if not dataroot.is_dir():
        raise InputError(f"--dataroot {args.dataroot}: no such folder")
    if not any(dataroot.iterdir()):
        raise InputError(f"--dataroot {args.dataroot}: the folder is empty")
    if not Path(args.lfw).is_dir():
        raise InputError(f"--lfw {args.lfw}: no such folder")
    args.lfw_pairs = resolve_lfw_pairs(args.lfw, args.lfw_pairs)
    if args.dataset_csv is not None and not Path(args.dataset_csv).is_file():
        raise InputError(f"--dataset_csv {args.dataset_csv}: no such file")
    if args.resume_path is not None and not Path(args.resume_path).is_file():
        raise InputError(f"--resume_path {args.resume_path}: no such file")


def resolve_lfw_pairs(lfw_dir: str, lfw_pairs: str | None) -> str:
    if lfw_pairs is not None:
        if not Path(lfw_pairs).is_file():
            raise InputError(f"--lfw_pairs {lfw_pairs}: no such file")
        return lfw_pairs
    for name in ("pairs.txt", "lfw_pairs.txt", "LFW_pairs.txt"):
        candidate = Path(lfw_dir) / name
        if candidate.is_file():
            return str(candidate)
    raise InputError(f"no LFW pairs file: pass --lfw_pairs (none of pairs.txt, lfw_pairs.txt in {lfw_dir})")


def prepare_demo_data(args: argparse.Namespace) -> None:
    """Point the run at the synthetic demo dataset, generating it first if needed."""
    from datasets.make_demo_dataset import make_demo_dataset

    demo = make_demo_dataset(DEMO_ROOT, num_workers=2)
    args.dataroot = args.dataroot or str(demo.train_dir)
    args.lfw = args.lfw or str(demo.lfw_dir)
    args.lfw_pairs = args.lfw_pairs or str(demo.pairs_path)


def run_script(main_body, argv: list[str] | None) -> int:
    """Run a script's body, turning bad input into one line on stderr and exit status 2."""
    try:
        return report_input_errors(lambda: main_body(argv))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    """Where and how this process computes; settled once, before anything is built."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    amp_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def use_grad_scaler(self) -> bool:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none
        return self.amp_dtype == torch.float16


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device name (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def resolve_amp(choice: str, device: torch.device) -> torch.dtype | None:
    if choice == "off" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if choice == "fp16" and device.type != "cuda":
        raise InputError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp off on the CPU")
    return torch.bfloat16 if choice == "bf16" else torch.float16


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Device, process group (under torchrun) and precision."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world_size, local_rank, resolve_amp(args.amp, device))


def usable_workers(requested: int, world_size: int = 1) -> int:
    """The requested data workers, capped so the processes on this machine do not outnumber its CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(requested, cpus // max(1, world_size)))


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """One seed per epoch, so an epoch's data and augmentation do not depend on what ran before (exact resume)."""
    return seed * 100_003 + epoch


def configure_logging(output_dir: Path | None, is_main: bool) -> None:
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if output_dir is not None and is_main:
        to_file = logging.FileHandler(output_dir / "train.log")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(to_file)


# --------------------------------------------------------------------------------------------- optimisation


def build_optimizer(name: str, parameters: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The original repository's four optimizers with its settings (weight decay 1e-5 on all)."""
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=1e-5)
    if name == "adagrad":
        return torch.optim.Adagrad(parameters, lr=lr, initial_accumulator_value=0.1, weight_decay=1e-5)
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, alpha=0.99, eps=1e-8, weight_decay=1e-5)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=1e-5)
    raise InputError(f"--optimizer {name}: choose one of {', '.join(OPTIMIZERS)}")


def build_embedding_model(
    args: argparse.Namespace, runtime: Runtime, num_classes: int | None = None
) -> nn.Module:
    """The model on its device, channels_last (faster convolutions on GPUs and on recent CPUs)."""
    from models import build_model

    try:
        model = build_model(
            args.model, args.embedding_dim, num_classes=num_classes, pretrained=args.pretrained
        )
    except RuntimeError as error:  # ImageNet weights that could not be downloaded
        raise InputError(f"--pretrained: {error}") from None
    return model.to(runtime.device, memory_format=torch.channels_last)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, epochs: int):
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


# --------------------------------------------------------------------------------------------- checkpoints


def save_atomically(state: dict, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a kill never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_resume_checkpoint(path: str, args: argparse.Namespace, task_name: str) -> dict:
    """A checkpoint of this repository, checked to belong to the same kind of run."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, a pickle with code in it, not a torch file at all
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"--resume_path {path}: not a loadable checkpoint ({first_line[:200]})") from None
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise InputError(f"--resume_path {path}: not a training checkpoint (no model_state_dict)")
    if checkpoint.get("format_version") != CHECKPOINT_FORMAT_VERSION or "task" not in checkpoint:
        raise InputError(
            f"--resume_path {path}: not a resumable checkpoint of this repository; "
            "use it for evaluation with validate_on_LFW.py"
        )
    if checkpoint["task"] != task_name:
        raise InputError(
            f"--resume_path {path}: a {checkpoint['task']} checkpoint cannot resume {task_name} training"
        )
    for key, flag in (("model_architecture", "model"), ("embedding_dimension", "embedding_dim")):
        if checkpoint[key] != getattr(args, flag):
            raise InputError(
                f"--resume_path {path}: the checkpoint has {key} {checkpoint[key]!r} "
                f"but --{flag} is {getattr(args, flag)!r}"
            )
    return checkpoint


# --------------------------------------------------------------------------------------------- output folder


def default_output_dir(args: argparse.Namespace, task_name: str) -> Path:
    if args.resume_path is not None:
        resumed = Path(args.resume_path).resolve().parent
        return resumed.parent if resumed.name == "checkpoints" else resumed
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{'demo_' if args.demo else ''}{task_name}_{args.model}_{stamp}"


RUN_IDENTITY_KEYS = ("task", "model", "embedding_dim", "dataroot", "seed")


def claim_output_dir(output_dir: Path, run_config: dict, resuming: bool) -> None:
    """Make sure this run may write into ``output_dir``: never over another run's files."""
    config_path = output_dir / "run_config.json"
    if output_dir.exists() and any(output_dir.iterdir()):
        if not config_path.is_file():
            raise InputError(
                f"--output_dir {output_dir}: the folder holds other files; choose an empty or new folder"
            )
        previous = json.loads(config_path.read_text())
        if not resuming:
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


# --------------------------------------------------------------------------------------------- data


def ensure_dataset_csv(args: argparse.Namespace, runtime: Runtime) -> str:
    """The training CSV: ``--dataset_csv``, or one listed now from ``--dataroot`` into the output folder."""
    from datasets.generate_csv_files import generate_csv

    if args.dataset_csv is not None:
        return args.dataset_csv
    csv_path = Path(args.output_dir) / "dataset.csv"
    if runtime.is_main and not csv_path.is_file():
        summary = generate_csv(args.dataroot, csv_path)
        log.info(
            f"listed {summary.num_images} images of {summary.num_identities} identities in {csv_path}"
            + (f" ({summary.num_skipped_files} other files skipped)" if summary.num_skipped_files else "")
        )
    barrier(runtime)
    return str(csv_path)


class ShardSampler(Sampler[int]):
    """This process's share of ``range(num_items)`` for one epoch, from item ``start`` of the share on.

    Shares are contiguous and of equal length, so every process runs the same number of steps and blocks of
    consecutive items (triplets drawn from a few identities per batch) stay together. With ``shuffle`` the
    order is a permutation drawn from ``seed`` alone.
    """

    def __init__(self, num_items: int, rank: int, world_size: int, start: int = 0, shuffle=False, seed=0):
        self.num_items, self.rank, self.world_size = num_items, rank, world_size
        self.start, self.shuffle, self.seed = start, shuffle, seed
        self.share = num_items // world_size

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(
                self.num_items, generator=torch.Generator().manual_seed(self.seed)
            ).tolist()
        else:
            order = range(self.num_items)
        share = order[self.rank * self.share : (self.rank + 1) * self.share]
        return iter(share[self.start :])

    def __len__(self) -> int:
        return self.share - self.start


class SkipBatches(Sampler[list[int]]):
    """A batch sampler without its first ``start`` batches (to continue an interrupted epoch)."""

    def __init__(self, batch_sampler, start: int):
        self.batch_sampler, self.start = batch_sampler, start

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.start, None)

    def __len__(self) -> int:
        return len(self.batch_sampler) - self.start


def make_loader(dataset, args: argparse.Namespace, runtime: Runtime, epoch: int, **sampling) -> DataLoader:
    """A DataLoader whose workers' random streams depend only on (seed, epoch)."""
    workers = usable_workers(args.num_workers, runtime.world_size)
    return DataLoader(
        dataset,
        num_workers=workers,
        pin_memory=runtime.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(epoch_seed(args.seed, epoch)),
        **sampling,
    )


# --------------------------------------------------------------------------------------------- the task


@dataclass
class StepOutput:
    """What a task's step returns: the loss to back-propagate and the bookkeeping of the epoch average."""

    loss: torch.Tensor  # mean over the samples trained on (a zero with a graph when there were none)
    loss_sum: torch.Tensor  # loss x number of samples, detached
    count: torch.Tensor  # number of samples (triplets, images) the loss is a mean over


class TrainingTask:
    """The part of a training run that differs between triplet and center-loss training.

    Subclasses set ``name`` and ``count_name``, build ``model`` (the unwrapped embedding model),
    ``train_module`` (what DDP wraps and what ``step`` calls), ``optimizers`` and ``trainable`` (the
    parameters of every optimizer), and implement ``batches`` and ``step``.
    """

    name = "task"
    count_name = "samples"

    def __init__(self, args: argparse.Namespace, runtime: Runtime):
        self.args = args
        self.runtime = runtime
        self.model: nn.Module
        self.train_module: nn.Module
        self.optimizers: list[torch.optim.Optimizer]

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def batches(self, epoch: int, start_step: int) -> Iterable:
        """The batches of ``epoch`` from ``start_step`` on; the same batches whatever ran before."""
        raise NotImplementedError

    def step(self, module: nn.Module, batch) -> StepOutput:
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Called after the gradients are unscaled and before the optimizers step."""

    def checkpoint_extras(self) -> dict:
        return {}

    def load_checkpoint_extras(self, checkpoint: dict) -> None:
        pass


# --------------------------------------------------------------------------------------------- validation


class LFWValidator:
    """Embeds the LFW images once per validation, evaluates, logs, plots; main process only."""

    def __init__(self, args: argparse.Namespace, runtime: Runtime, output_dir: Path):
        from datasets.lfw_dataset import LFWDataset
        from datasets.transforms import eval_transform

        self.args = args
        self.runtime = runtime
        self.output_dir = output_dir
        self.dataset = LFWDataset(args.lfw, args.lfw_pairs, transform=eval_transform(args.image_size))

    def __call__(self, model: nn.Module, epoch: int):
        import eval_metrics
        import plots
        from validate_on_LFW import evaluate_model_on_lfw

        metrics, _ = evaluate_model_on_lfw(
            model,
            self.dataset,
            self.runtime.device,
            batch_size=self.args.lfw_batch_size,
            num_workers=usable_workers(self.args.num_workers),
            amp_dtype=self.runtime.amp_dtype,
            progress=sys.stderr.isatty(),
        )
        for line in eval_metrics.format_metrics(metrics):
            log.info(line)
        plots.plot_roc_lfw(
            metrics.false_positive_rate,
            metrics.true_positive_rate,
            metrics.roc_auc,
            self.output_dir / "plots" / f"roc_{self.args.model}_epoch_{epoch}.png",
            title=f"LFW ROC, epoch {epoch}",
        )
        return metrics


# --------------------------------------------------------------------------------------------- the loop


@dataclass
class History:
    """Per-epoch results, kept in the checkpoint so plots and logs survive a resume."""

    epochs: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    validated_epochs: list[int] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    accuracy_stds: list[float] = field(default_factory=list)


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite; the message says what to try."""


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop finishes the current step, checkpoints and exits."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def all_reduce_sum(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def apply_step(task: TrainingTask, loss: torch.Tensor, scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward and the task's optimizer steps; the scaler is a no-op unless training in fp16."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    scaler.scale(loss).backward()
    for optimizer in task.optimizers:
        scaler.unscale_(optimizer)
    task.before_optimizer_step()
    for optimizer in task.optimizers:
        scaler.step(optimizer)
    scaler.update()
    for optimizer in task.optimizers:
        optimizer.zero_grad(set_to_none=True)


class Trainer:
    def __init__(self, task: TrainingTask, output_dir: Path, validator: LFWValidator | None):
        self.task = task
        self.args = task.args
        self.runtime = task.runtime
        self.output_dir = output_dir
        self.module = task.train_module
        if self.runtime.distributed:
            device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(task.train_module, device_ids=device_ids)
        self.scheduler = build_scheduler(self.args.lr_schedule, task.optimizers[0], self.args.epochs)
        self.scaler = torch.amp.GradScaler(self.runtime.device.type, enabled=self.runtime.use_grad_scaler)
        self.history = History()
        self.best_distance_threshold: float | None = None
        self.start_epoch = 0
        self.start_step = 0
        self.partial = (0.0, 0.0, 0)  # loss sum, count, skipped steps of an epoch interrupted mid-way
        self.resume_rng_state: torch.Tensor | None = None
        self.interrupted_path: Path | None = None
        self.validator = validator

    # ----- checkpoints

    def checkpoint_path(self, epoch: int, interrupted: bool = False) -> Path:
        suffix = "_interrupted" if interrupted else ""
        return (
            self.output_dir
            / "checkpoints"
            / f"model_{self.args.model}_{self.task.name}_epoch_{epoch}{suffix}.pt"
        )

    def checkpoint_state(self, completed_epochs: int, step_in_epoch: int, partial) -> dict:
        from datasets.transforms import FACE_MEAN, FACE_STD

        task = self.task
        state = {
            # the original repository's keys
            "epoch": completed_epochs,
            "embedding_dimension": self.args.embedding_dim,
            "batch_size_training": self.args.batch_size,
            "model_state_dict": task.model.state_dict(),
            "model_architecture": self.args.model,
            "optimizer_model_state_dict": task.optimizers[0].state_dict(),
            "best_distance_threshold": self.best_distance_threshold,
            # what exact resume and inference need
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "task": task.name,
            "image_size": self.args.image_size,
            "normalization": {"mean": list(FACE_MEAN), "std": list(FACE_STD)},
            "args": {
                key: value
                for key, value in vars(self.args).items()
                if value is None or isinstance(value, (str, int, float, bool))
            },
            "scheduler_state_dict": self.scheduler.state_dict(),
            "grad_scaler_state_dict": self.scaler.state_dict(),
            "step_in_epoch": step_in_epoch,
            "partial_epoch": {"loss_sum": partial[0], "count": partial[1], "skipped_steps": partial[2]},
            "history": vars(self.history),
            # epochs reseed from (seed, epoch); this state only continues an epoch interrupted mid-way
            "torch_rng_state": torch.get_rng_state(),
        }
        state.update(task.checkpoint_extras())
        return state

    def save(self, completed_epochs: int, step_in_epoch: int = 0, partial=(0.0, 0.0, 0)) -> Path | None:
        path = None
        if self.runtime.is_main:
            path = self.checkpoint_path(
                completed_epochs + (1 if step_in_epoch else 0), interrupted=step_in_epoch > 0
            )
            save_atomically(self.checkpoint_state(completed_epochs, step_in_epoch, partial), path)
        barrier(self.runtime)
        return path

    def resume(self, checkpoint: dict) -> None:
        task = self.task
        task.model.load_state_dict(checkpoint["model_state_dict"])
        task.optimizers[0].load_state_dict(checkpoint["optimizer_model_state_dict"])
        self.scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
        self.scaler.load_state_dict(checkpoint["grad_scaler_state_dict"])
        task.load_checkpoint_extras(checkpoint)
        self.best_distance_threshold = checkpoint["best_distance_threshold"]
        self.history = History(**checkpoint["history"])
        self.start_epoch = checkpoint["epoch"]
        self.start_step = checkpoint["step_in_epoch"]
        partial = checkpoint["partial_epoch"]
        self.partial = (partial["loss_sum"], partial["count"], partial["skipped_steps"])
        self.resume_rng_state = checkpoint["torch_rng_state"]
        where = f"epoch {self.start_epoch + 1}" + (f", step {self.start_step + 1}" if self.start_step else "")
        log.info(f"resumed from {self.args.resume_path}: continuing at {where} of {self.args.epochs}")

    # ----- training

    def train_epoch(self, epoch: int, stop: StopRequested) -> tuple[float, float, int] | None:
        """One epoch; returns (loss sum, count, skipped steps), or None when a stop request cut it short."""
        task, runtime = self.task, self.runtime
        start_step = self.start_step if epoch == self.start_epoch else 0
        loss_sum, count, skipped = self.partial if start_step else (0.0, 0.0, 0)
        consecutive_nonfinite = 0
        self.module.train()
        torch.manual_seed(epoch_seed(self.args.seed, epoch))
        if start_step and self.resume_rng_state is not None:
            torch.set_rng_state(self.resume_rng_state)
        total = task.steps_per_epoch()
        progress = tqdm(
            task.batches(epoch, start_step),
            total=total,
            initial=start_step,
            desc=f"epoch {epoch + 1}/{self.args.epochs}",
            disable=not runtime.is_main or not sys.stderr.isatty(),
            dynamic_ncols=True,
        )
        for step, batch in enumerate(progress, start=start_step + 1):
            with torch.autocast(
                runtime.device.type, dtype=runtime.amp_dtype, enabled=runtime.amp_dtype is not None
            ):
                out = task.step(self.module, batch)
            # a sync every step needs (the selection pass adds one more): ranks agree whether to apply it
            nonfinite = (~torch.isfinite(out.loss_sum)).double()
            stats = torch.stack([out.loss_sum.double().nan_to_num(), out.count.double(), nonfinite])
            step_loss_sum, step_count, nonfinite_ranks = all_reduce_sum(stats, runtime).tolist()
            if nonfinite_ranks:
                skipped += 1
                consecutive_nonfinite += 1
                for optimizer in task.optimizers:
                    optimizer.zero_grad(set_to_none=True)
                log.warning(f"epoch {epoch + 1} step {step}: non-finite loss, step skipped")
                if consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
                    raise TrainingDiverged(
                        f"stopping: {MAX_CONSECUTIVE_NONFINITE} steps in a row had a non-finite loss "
                        f"(epoch {epoch + 1}, step {step}); lower --lr or try --amp off"
                    )
            else:
                consecutive_nonfinite = 0
                self.apply_step(out.loss)
                loss_sum += step_loss_sum
                count += step_count
            if step % LOG_EVERY_STEPS == 0 or step == total:
                progress.set_postfix(loss=f"{loss_sum / max(count, 1):.4f}", **{task.count_name: int(count)})
            if stop.signal_name is not None and step < total:
                progress.close()
                self.interrupted_path = self.save(epoch, step, (loss_sum, count, skipped))
                return None
        progress.close()
        return loss_sum, count, skipped

    def apply_step(self, loss: torch.Tensor) -> None:
        apply_step(self.task, loss, self.scaler)

    def finish_epoch(self, epoch: int, loss_sum: float, count: float, skipped: int, seconds: float) -> None:
        completed = epoch + 1
        average = loss_sum / count if count else float("nan")
        lr = self.task.optimizers[0].param_groups[0]["lr"]
        self.scheduler.step()
        log.info(
            f"epoch {completed}/{self.args.epochs}: average {self.task.name} loss {average:.6f} over "
            f"{int(count)} {self.task.count_name}, {skipped} steps skipped, {seconds:.1f} s, lr {lr:g}"
        )
        row: dict[str, Any] = {
            "epoch": completed,
            "train_loss": average,
            f"num_{self.task.count_name}": int(count),
            "skipped_steps": skipped,
            "epoch_seconds": round(seconds, 3),
            "lr": lr,
        }
        self.history.epochs.append(completed)
        self.history.losses.append(average)
        validate = completed % self.args.lfw_validation_epoch_interval == 0 or completed == self.args.epochs
        if validate and self.runtime.is_main:
            import eval_metrics

            metrics = self.validator(self.task.model, completed)
            summary = eval_metrics.metrics_summary(metrics)
            self.best_distance_threshold = float(summary["best_distance_threshold_mean"])
            self.history.validated_epochs.append(completed)
            self.history.accuracies.append(float(summary["accuracy_mean"]))
            self.history.accuracy_stds.append(float(summary["accuracy_std"]))
            row.update(summary)
        if self.runtime.is_main:
            append_csv_row(self.output_dir / "training_log.csv", row)
            self.update_plots()
        self.save(completed)

    def update_plots(self) -> None:
        import plots

        plots_dir = self.output_dir / "plots"
        plots.plot_training_loss(self.history.epochs, self.history.losses, plots_dir / "training_loss.png")
        if self.history.validated_epochs:
            plots.plot_accuracy_lfw(
                self.history.validated_epochs,
                self.history.accuracies,
                plots_dir / "lfw_accuracies.png",
                stds=self.history.accuracy_stds,
            )

    def fit(self) -> int:
        with StopRequested() as stop:
            for epoch in range(self.start_epoch, self.args.epochs):
                started = time.perf_counter()
                result = self.train_epoch(epoch, stop)
                if result is None:
                    log.warning(
                        f"{stop.signal_name}: stopped in epoch {epoch + 1}; resume with "
                        f"--resume_path {self.interrupted_path}"
                    )
                    return 130 if stop.signal_name == "SIGINT" else 143
                loss_sum, count, skipped = result
                self.finish_epoch(epoch, loss_sum, count, skipped, time.perf_counter() - started)
                if stop.signal_name is not None:
                    log.warning(
                        f"{stop.signal_name}: stopped after epoch {epoch + 1}; resume with "
                        f"--resume_path {self.checkpoint_path(epoch + 1)}"
                    )
                    return 130 if stop.signal_name == "SIGINT" else 143
        log.info(f"training finished; checkpoints, log and plots in {self.output_dir}")
        return 0


def append_csv_row(path: Path, row: dict) -> None:
    """Append ``row`` to a CSV log, writing the header first; a later row with new columns rewrites the header."""
    rows: list[dict] = []
    if path.is_file():
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    rows.append(row)
    columns: list[str] = []
    for existing in rows:
        columns.extend(key for key in existing if key not in columns)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def run_training(args: argparse.Namespace, task_class: type[TrainingTask]) -> int:
    """Everything from checked arguments to the last checkpoint; returns the exit status."""
    check_common_args(args)
    resume_checkpoint = (
        load_resume_checkpoint(args.resume_path, args, task_class.name) if args.resume_path else None
    )
    runtime = setup_runtime(args)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args, task_class.name)
    args.output_dir = str(output_dir)
    if args.demo:
        if runtime.is_main:
            prepare_demo_data(args)
        barrier(runtime)  # the other ranks find it generated
        if not runtime.is_main:
            prepare_demo_data(args)
    run_config = {"task": task_class.name, **vars(args)}
    validator = None
    if runtime.is_main:
        claim_output_dir(output_dir, run_config, resuming=resume_checkpoint is not None)
        validator = LFWValidator(args, runtime, output_dir)  # reads the pairs file: fails before any writing
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run_config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    barrier(runtime)
    configure_logging(output_dir, runtime.is_main)
    seed_everything(args.seed)
    task = task_class(args, runtime)  # builds data, model and optimizers
    trainer = Trainer(task, output_dir, validator)
    if resume_checkpoint is not None:
        trainer.resume(resume_checkpoint)
    log.info(
        f"{task.name} training of {args.model} on {runtime.device}"
        f"{f' x{runtime.world_size} processes' if runtime.distributed else ''}, "
        f"mixed precision {runtime.amp_dtype or 'off'}; output in {output_dir}"
    )
    try:
        return trainer.fit()
    except TrainingDiverged as error:
        log.error(str(error))
        return 3
