"""Which training method learns fastest? A small-scale learning benchmark on real LFW faces, on the CPU.

    python benchmarks/bench_learning.py          # hard, batch_hard and each script from its defaults, seed 0,
                                                 # then the best two again with seed 1
    python benchmarks/bench_learning.py --budget_seconds 90 --methods center center:lr=3e-3 \
        batch_hard:margin=0.5 --seeds 0 --name tuning --no-plot         # a tuning pass

Protocol. LFW's ten folds are identity-disjoint. The models train on every image in lfw_112 of the identities
that appear in folds 1-5 of lfw_pairs.txt (a folder of symlinks under --work_dir, listed by generate_csv) and
are evaluated on the 3,000 pairs of folds 6-10, in file order, with the repository's own evaluation
(verification.evaluate_model_on_lfw -> eval_metrics.evaluate_lfw with five folds). The script checks that no
identity is on both sides.

Methods, all ResNet-18 from scratch with the same augmentation (datasets.transforms.train_transform):
  hard        pre-generated random triplets, keeping d(a,n) - d(a,p) < margin (the original repository's rule)
  semihard    pre-generated random triplets, keeping d(a,p) < d(a,n) < d(a,p) + margin (FaceNet)
  batch_hard  online mining over P identities x K images (Hermans et al. 2017)
  batch_all   online mining, every in-batch triplet with a positive loss
  center      cross-entropy on the scaled unit embedding + center loss (train_center.py)
  arcface     margin softmax s * cos(theta + m) on the target class (train_margin.py --loss arcface)
  cosface     margin softmax s * (cos theta - m) (train_margin.py --loss cosface)
  combined    s * (cos(m1 theta + m2) - m3) (train_margin.py --loss combined)
A method name may carry overrides of any flag of its training script: `batch_hard:margin=0.5,lr=3e-3`.
The triplet and center methods use Adam at --lr with a constant lr. The margin methods start from
MARGIN_BASE (below), train_margin.py's own defaults (Adam 1e-3 with the centers at SGD 100x that, s = 64,
poly decay, one epoch of warmup); README.md has what did better here, e.g.
`cosface:optimizer=adam,lr=1e-3,weight_decay=1e-5,margin_scale=32,warmup_epochs=0.2,batch_size=64,
center_momentum=0.5`. --lr and --margin of this script (the triplet margin) do not apply to them: override
them per method.

The real code is driven, not re-implemented: each run parses its flags with the script's own
`get_args_parser()`, builds `TripletTask` / `CenterTask` / `MarginTask` on `training.runtime.Runtime(cpu)`,
iterates `task.batches(epoch, 0)` and applies `task.step` exactly as `training.engine.Trainer` does (the lr
schedule's `apply(global_step)`, backward, `task.before_optimizer_step()`, optimizer steps, zero_grad).

Learning-rate schedule. Each run follows its script's --lr_schedule and --warmup_epochs through
`training.builders.LearningRateSchedule` over `task.scheduled_optimizers()`, with warmup steps
round(warmup_epochs x steps_per_epoch), applied before every step, as the Trainer does. A budgeted run has no
--epochs of its own (it is given 100000 and stopped by the budget), and a decay over 100000 epochs would be
no decay at all. So a decaying schedule (cosine, poly) decays over the epochs the budget affords, as if the
script had been run with `--epochs E` and stopped at the budget: after the first CALIBRATION_STEPS steps
after step 0 (which pays one-off costs), the CPU seconds a step takes give the steps left in the budget, and
E = ceil(all the steps the budget affords / steps_per_epoch). The schedule has E epochs from then on.
Rounding up, the lr ends the budget small but not zero (how small depends on how much of the last epoch the
budget reaches). It is an estimate: a step's CPU time varies with the machine's load by several percent, so a
run whose budget ends near a whole number of epochs may overshoot E epochs by a few steps, taken at lr 0
(compare the record's `steps` with E x steps_per_epoch). The first CALIBRATION_STEPS + 1 steps use the
horizon of --epochs: the same lr when they are warmup steps (poly and cosine do not decay during warmup),
within a few percent otherwise. E is in each run's record (`lr_schedule`). A constant schedule with no
warmup (the triplet and center methods) sets every lr to its base value at every step, so those runs are
what they were before the schedule was applied.

Fair budget. The machine is shared, so wall time is unfair between runs. Every run gets the same budget of
process CPU time (`time.process_time()`), with one torch thread and `num_workers=0`, so image decoding and
augmentation are counted and no thread spins while waiting for a busy core. Evaluation is paused out of the
budget. Each run is its own process (`--jobs` of them at once), so the clock holds nothing but that run.

Outputs in --output: <name>.md (the table), <name>.json (settings, curves, per-run records) and, unless
--no-plot, <name>_curves.png (accuracy against training CPU seconds). Finished runs are cached in
--work_dir/records and reused when the same run is asked for again: the cache key is the run's settings and a
hash of the repository's Python files (`code_fingerprint`), so a change of the code is a new run.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_center  # noqa: E402
import train_margin  # noqa: E402
import train_triplet  # noqa: E402
from train_margin import MARGIN_DEFAULTS, MARGIN_SCALE_DEFAULT  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"  # ../shared/data from the repository root
MARGIN_METHODS = ("arcface", "cosface", "combined")  # train_margin.py --loss <method>
# each training script run from its own defaults: only the protocol (model, image size, data) is set
DEFAULTS_METHODS = ("triplet_defaults", "center_defaults", "margin_defaults")
METHODS = ("hard", "semihard", "batch_hard", "batch_all", "center", *MARGIN_METHODS, *DEFAULTS_METHODS)
DEFAULT_METHODS = ("hard", "batch_hard", *DEFAULTS_METHODS)
SPLITS = {"1-5": range(0, 5), "6-10": range(5, 10)}  # --train_folds -> the training folds (0-based)
FAR_KEY = "tar_at_far_0.01"
# the settings every method shares; the per-method ones are in method_settings()
COMMON_DEFAULTS = {"model": "resnet18", "optimizer": "adam", "lr": 1e-3}
# the margin methods' base: train_margin.py's own defaults (optimizer, lr, schedule, warmup, batch) and scale, taken
# from the script so the two cannot drift; they are part of each run's settings, so the table shows them and a
# change of the script's defaults is a new cache key, not a reuse of old runs
MARGIN_BASE = {"model": "resnet18", **MARGIN_DEFAULTS, "margin_scale": MARGIN_SCALE_DEFAULT}
# the flags that make a recipe, shown for the defaults rows (as the script resolved them)
RECIPE_KEYS = (
    "triplet_selection", "batch_size", "identities_per_batch", "images_per_identity", "margin", "loss",
    "margin_scale", "optimizer", "lr", "weight_decay", "lr_schedule", "warmup_epochs", "classifier_lr_scale",
    "logit_scale", "center_loss_weight", "center_loss_lr",
)  # fmt: skip
# steps timed to estimate how many the budget affords (the decay horizon of cosine and poly schedules)
CALIBRATION_STEPS = 10


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Accuracy against training CPU time of the training methods, on LFW folds 1-5 -> 6-10 "
        "(or 6-10 -> 1-5).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--budget_seconds", type=float, default=240.0, help="training CPU seconds per run")
    parser.add_argument(
        "--eval_every",
        type=float,
        default=None,
        help="also evaluate every this many training CPU seconds (default: budget / 2); always at the end",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help=f"methods ({', '.join(METHODS)}), each optionally with flag overrides: name:flag=value,flag=value",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds")
    parser.add_argument(
        "--train_folds",
        choices=tuple(SPLITS),
        default="1-5",
        help="the LFW folds whose identities are trained on; the other five are the test pairs",
    )
    parser.add_argument(
        "--repeat_best",
        type=int,
        default=2,
        help="run the seeds after the first only for this many methods, the best after the first seed "
        "(0: every method gets every seed)",
    )
    parser.add_argument("--image_size", type=int, default=64, help="input side in pixels (lfw_112 is 112)")
    parser.add_argument(
        "--lr", type=float, default=COMMON_DEFAULTS["lr"], help="learning rate (adam; not the margin methods)"
    )
    parser.add_argument("--margin", type=float, default=0.2, help="triplet margin (not the margin methods)")
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate the untrained network of the first seed (where its curves start)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one process and one thread each")
    parser.add_argument(
        "--output", type=str, default=str(REPO / "benchmarks" / "results"), help="results folder"
    )
    parser.add_argument("--name", type=str, default="learning", help="stem of the result files")
    parser.add_argument(
        "--plot", action=argparse.BooleanOptionalAction, default=True, help="write <name>_curves.png"
    )
    parser.add_argument(
        "--reuse", action=argparse.BooleanOptionalAction, default=True, help="reuse cached finished runs"
    )
    parser.add_argument("--work_dir", type=str, default="/tmp/bench_learning", help="scratch folder")
    parser.add_argument(
        "--data", type=str, default=str(SHARED_DATA), help="folder with lfw_112, lfw_pairs.txt"
    )
    return parser


# --------------------------------------------------------------------------------------------- data split


def prepare_split(data_dir: Path, work_dir: Path, train_folds: str = "1-5") -> dict:
    """Symlink tree of the training identities, its CSV, and a pairs file of the test folds only.

    Returns the paths and counts. Raises if an identity would be both trained on and evaluated on.
    """
    from datasets.generate_csv_files import generate_csv
    from datasets.lfw_dataset import read_pairs

    lfw_dir, pairs_path = data_dir / "lfw_112", data_dir / "lfw_pairs.txt"
    parsed = read_pairs(pairs_path)
    names_by_fold = [set() for _ in range(parsed.num_folds)]
    for (first, _), (second, _), fold in zip(parsed.first, parsed.second, parsed.fold_of_pair, strict=True):
        names_by_fold[fold].update((first, second))
    train_fold_ids = SPLITS[train_folds]
    train_names = set().union(*(names_by_fold[fold] for fold in train_fold_ids))
    test_folds = [fold for fold in range(parsed.num_folds) if fold not in train_fold_ids]
    test_names = set().union(*(names_by_fold[fold] for fold in test_folds))
    overlap = train_names & test_names
    if overlap:
        raise AssertionError(f"{len(overlap)} identities in both the training and the test folds")

    # the first split keeps the folder names it always had (its cached runs stay valid)
    work_dir = work_dir if train_folds == "1-5" else work_dir / f"train_folds_{train_folds}"
    tree = work_dir / "train_tree"
    tree.mkdir(parents=True, exist_ok=True)
    for name in sorted(train_names):
        link, target = tree / name, (lfw_dir / name).resolve()
        if target.is_dir() and not link.exists():
            link.symlink_to(target, target_is_directory=True)
    if {path.name for path in tree.iterdir()} & test_names:
        raise AssertionError(f"{tree} holds an identity of the test folds")
    csv_path = work_dir / "train.csv"
    summary = generate_csv(tree, csv_path)

    test_name = f"{test_folds[0] + 1}-{test_folds[-1] + 1}"
    test_pairs_path = work_dir / f"pairs_folds_{test_name.replace('-', '_')}.txt"
    write_fold_subset(pairs_path, test_pairs_path, test_folds)
    return {
        "train_folds": train_folds,
        "test_folds": test_name,
        "train_tree": str(tree),
        "train_csv": str(csv_path),
        "lfw_dir": str(lfw_dir),
        "test_pairs": str(test_pairs_path),
        "num_train_identities": summary.num_identities,
        "num_train_images": summary.num_images,
        "num_test_pairs": int(sum(1 for fold in parsed.fold_of_pair if fold in test_folds)),
    }


def write_fold_subset(pairs_path: Path, out_path: Path, folds: list[int]) -> None:
    """The lines of `folds` of a headed pairs file, in file order, under a header with their fold count."""
    lines = [line for line in pairs_path.read_text().splitlines() if line.strip()]
    num_folds, per_kind = (int(field) for field in lines[0].split())
    block = 2 * per_kind
    body = [line for fold in folds for line in lines[1 + fold * block : 1 + (fold + 1) * block]]
    if len(lines) != 1 + num_folds * block:
        raise AssertionError(f"{pairs_path}: expected {num_folds * block} pair lines")
    out_path.write_text(f"{len(folds)}\t{per_kind}\n" + "\n".join(body) + "\n")


# --------------------------------------------------------------------------------------------- run specs


def parse_method(spec: str) -> tuple[str, dict[str, str]]:
    """`batch_hard:margin=0.5,lr=3e-3` -> ("batch_hard", {"margin": "0.5", "lr": "3e-3"})."""
    method, _, rest = spec.partition(":")
    if method not in METHODS + ("untrained",):
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}, untrained")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{spec!r}: overrides are flag=value")
        overrides[key] = value
    return method, overrides


def method_settings(method: str, bench_args: argparse.Namespace, overrides: dict[str, str]) -> dict:
    """The training-script flags (without paths and seed) of a method, overrides applied last."""
    if method in DEFAULTS_METHODS:  # the protocol only; every other flag is the script's default
        return {"model": COMMON_DEFAULTS["model"], "image_size": bench_args.image_size, **overrides}
    if method in MARGIN_METHODS:
        return {**MARGIN_BASE, "image_size": bench_args.image_size, "loss": method, **overrides}
    settings = {**COMMON_DEFAULTS, "image_size": bench_args.image_size, "lr": bench_args.lr}
    if method in ("hard", "semihard"):
        # 32 triplets = 96 images a step; a new random 1,280 triplets every "epoch"
        settings.update(triplet_selection=method, margin=bench_args.margin, batch_size=32)
        settings.update(num_triplets_train=1280)
    elif method in ("batch_hard", "batch_all"):
        settings.update(triplet_selection=method, margin=bench_args.margin)
        settings.update(identities_per_batch=16, images_per_identity=4, num_triplets_train=1280)
    else:
        settings.update(batch_size=64)  # center loss: --logit_scale, --center_loss_* keep their defaults
    settings.update(overrides)
    return settings


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha1 of the repository's Python files (the code a run trains with), tests and virtualenvs left out."""
    digest = hashlib.sha1()
    tops = [
        top for top in REPO.iterdir() if top.name not in ("tests", "runs") and not top.name.startswith(".")
    ]
    files: list[Path] = []
    for top in tops:
        files += [top] if top.suffix == ".py" else sorted(top.rglob("*.py")) if top.is_dir() else []
    for path in sorted(files):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def run_key(
    method: str, settings: dict, seed: int, budget: float, eval_points: list[float], train_folds: str = "1-5"
) -> str:
    parts = [method, settings, seed, budget, eval_points, code_fingerprint()]
    if train_folds != "1-5":  # the first split's keys stay what they were
        parts.append(train_folds)
    if method in DEFAULTS_METHODS:  # the defaults live in the script: a change of them is a new run
        parts.append(script_defaults(method))
    text = json.dumps(parts, sort_keys=True, default=str)
    return f"{method}-s{seed}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def script_argv(method: str, settings: dict, seed: int, split: dict, output_dir: Path) -> list[str]:
    argv = [
        "--dataroot", split["train_tree"], "--dataset_csv", split["train_csv"],
        "--lfw", split["lfw_dir"], "--lfw_pairs", split["test_pairs"],
        "--output_dir", str(output_dir), "--num_workers", "0", "--seed", str(seed), "--epochs", "100000",
    ]  # fmt: skip
    for key, value in settings.items():
        if str(value).lower() in ("true", "false"):  # a boolean flag: --key / --no-key
            argv.append(f"--{key}" if str(value).lower() == "true" else f"--no-{key}")
        else:
            argv += [f"--{key}", *str(value).split()]  # "1 0.3 0.2": a flag of several values
    return argv


# --------------------------------------------------------------------------------------------- one run


class TrainingClock:
    """Process CPU seconds spent training: the process's CPU time minus the paused (evaluation) intervals."""

    def __init__(self):
        self.start = time.process_time()
        self.paused = 0.0

    def elapsed(self) -> float:
        return time.process_time() - self.start - self.paused

    def pause(self) -> float:
        return time.process_time()

    def resume(self, paused_at: float) -> None:
        self.paused += time.process_time() - paused_at


def images_in(batch) -> int:
    """Images a batch feeds through the model: (images, labels), or one stacked (3B, C, H, W) triplet batch."""
    if getattr(batch, "ndim", 0) == 4:  # pre-generated triplets arrive stacked: anchors, positives, negatives
        return int(batch.shape[0])
    return sum(int(part.shape[0]) for part in batch if getattr(part, "ndim", 0) == 4)


def evaluate(task, lfw_dataset) -> dict:
    import eval_metrics
    from verification import evaluate_model_on_lfw

    metrics, _ = evaluate_model_on_lfw(
        task.model, lfw_dataset, task.runtime.device, batch_size=128, num_workers=0, progress=False
    )
    if len(metrics.accuracy) != 5:
        raise AssertionError(f"expected 5 evaluation folds, got {len(metrics.accuracy)}")
    return eval_metrics.metrics_summary(metrics)


@dataclass
class RunProgress:
    """What a run has done so far: its accuracy curve and the counts its record reports."""

    curve: list[dict] = field(default_factory=list)
    epoch: int = 0
    steps: int = 0
    images: int = 0
    trained_on: float = 0.0
    skipped: int = 0
    loss_sum: float = 0.0  # since the last evaluation
    loss_count: float = 0.0
    eval_cpu: float = 0.0


def train_one(job: dict) -> dict:
    """One (method, settings, seed) run in this process; returns its record (also cached as JSON)."""
    import torch

    torch.set_num_threads(1)
    from training.runtime import Runtime, seed_everything

    argv, args, task_class = parse_run_flags(job)
    runtime = Runtime(torch.device("cpu"))
    lfw_dataset = load_test_pairs(args, job["split"])
    load_before = os.getloadavg()[0]
    wall_start = time.perf_counter()
    seed_everything(args.seed)
    task = task_class(args, runtime)
    schedule = None
    if job["method"] == "untrained":
        progress = RunProgress()
        progress.curve.append(
            {"train_cpu_s": 0.0, "steps": 0, "images": 0, "epochs": 0, **evaluate(task, lfw_dataset)}
        )
    else:
        progress, schedule = train_within_budget(job, task, args, lfw_dataset)
    record = {
        "key": job["key"],
        "code": code_fingerprint(),  # the repository's Python files the run trained with
        "method": job["method"],
        "settings": job["settings"],
        # the recipe as the task resolved it (defaults that depend on other flags filled in)
        "recipe": {key: value for key, value in vars(args).items() if key in RECIPE_KEYS},
        "seed": job["seed"],
        "budget_cpu_s": job["budget"],
        "clock": "process CPU time (time.process_time), 1 torch thread, num_workers=0, evaluation excluded",
        "curve": progress.curve,
        "final": progress.curve[-1],
        "steps": progress.steps,
        "images": progress.images,
        f"{task.count_name}_trained_on": progress.trained_on,
        "skipped_steps": progress.skipped,
        "lr_schedule": schedule.state_dict() if schedule is not None else None,
        "eval_cpu_s": round(progress.eval_cpu, 1),
        "wall_s": round(time.perf_counter() - wall_start, 1),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "argv": argv,
    }
    save_record(job, record)
    return record


def script_of(method: str) -> tuple:
    """The training script (module) a method runs and its task class."""
    if method in ("center", "center_defaults"):
        return train_center, train_center.CenterTask
    if method in (*MARGIN_METHODS, "margin_defaults"):
        return train_margin, train_margin.MarginTask
    return train_triplet, train_triplet.TripletTask


def script_defaults(method: str) -> dict:
    """The recipe flags' defaults of the method's script, as its parser has them."""
    script, _ = script_of(method)
    defaults = vars(script.get_args_parser().parse_args([]))
    return {key: defaults[key] for key in RECIPE_KEYS if key in defaults}


def parse_run_flags(job: dict) -> tuple[list[str], argparse.Namespace, type]:
    """The run's training-script argv, parsed by that script's own parser, and the task class to build."""
    output_dir = Path(job["work_dir"]) / "runs" / job["key"]
    output_dir.mkdir(parents=True, exist_ok=True)
    argv = script_argv(job["method"], job["settings"], job["seed"], job["split"], output_dir)
    # "untrained" is any triplet task evaluated before its first step: with the same seed every method starts
    # from the same embedding network (the center task's classifier is built after it)
    script, task_class = script_of(job["method"])
    return argv, script.get_args_parser().parse_args(argv), task_class


def load_test_pairs(args: argparse.Namespace, split: dict):
    """The LFW pairs of the test folds, checked to be the ones the split wrote."""
    from datasets.lfw_dataset import LFWDataset
    from datasets.transforms import eval_transform

    lfw_dataset = LFWDataset(args.lfw, args.lfw_pairs, transform=eval_transform(args.image_size))
    if len(lfw_dataset.issame) != split["num_test_pairs"]:
        raise AssertionError(f"the evaluation pairs are not the {split['num_test_pairs']} of the test folds")
    return lfw_dataset


def build_schedule(task, args: argparse.Namespace, epochs: int):
    """The run's lr schedule as the Trainer builds it, over `epochs` epochs."""
    from training.builders import LearningRateSchedule

    return LearningRateSchedule.for_run(args, task.scheduled_optimizers(), epochs, task.steps_per_epoch())


def budget_epochs(
    budget: float, steps_done: int, elapsed: float, cpu_per_step: float, steps_per_epoch: int
) -> int:
    """The epochs the budget affords at `cpu_per_step` CPU seconds a step, rounded up (the decay horizon)."""
    steps_left = max(0.0, budget - elapsed) / max(cpu_per_step, 1e-9)
    return max(1, math.ceil((steps_done + steps_left) / max(1, steps_per_epoch)))


def train_within_budget(job: dict, task, args: argparse.Namespace, lfw_dataset):
    """Train as training.engine.Trainer does, evaluating at each of the job's CPU-time points, until the last.

    Returns the progress and the lr schedule it ended with (see the module docstring for its horizon).
    """
    import torch

    from training.runtime import epoch_seed
    from training.step import backward_and_step

    eval_points = list(job["eval_points"])
    clock = TrainingClock()
    progress = RunProgress()
    schedule = build_schedule(task, args, args.epochs)
    decays = args.lr_schedule != "constant"
    calibration_start = None
    while eval_points:
        task.step_module.train()
        torch.manual_seed(epoch_seed(args.seed, progress.epoch))
        for batch in task.batches(progress.epoch, 0):
            if decays and progress.steps == 1:
                calibration_start = clock.elapsed()
            elif decays and progress.steps == 1 + CALIBRATION_STEPS:
                cpu_per_step = (clock.elapsed() - calibration_start) / CALIBRATION_STEPS
                epochs = budget_epochs(
                    job["budget"], progress.steps, clock.elapsed(), cpu_per_step, task.steps_per_epoch()
                )
                schedule = build_schedule(task, args, epochs)
            schedule.apply(progress.steps)  # the global step, 0-based, as Trainer.train_step
            out = task.step(task.step_module, batch)
            if torch.isfinite(out.loss_sum):
                backward_and_step(task, out.loss, clip_grad_norm=args.clip_grad_norm)
                progress.loss_sum += float(out.loss_sum)
                progress.loss_count += float(out.count)
                progress.trained_on += float(out.count)
            else:  # the Trainer skips such a step too
                progress.skipped += 1
                for optimizer in task.optimizers:
                    optimizer.zero_grad(set_to_none=True)
            progress.steps += 1
            progress.images += images_in(batch)
            if clock.elapsed() >= eval_points[0]:
                add_evaluation(job["key"], task, lfw_dataset, clock, progress)
                eval_points.pop(0)
                if not eval_points:
                    break
        progress.epoch += 1
    return progress, schedule


def add_evaluation(key: str, task, lfw_dataset, clock: TrainingClock, progress: RunProgress) -> None:
    """Evaluate with the clock paused, append the point to the curve and print it."""
    paused_at = clock.pause()
    point = {
        "train_cpu_s": round(clock.elapsed(), 2),
        "steps": progress.steps,
        "images": progress.images,
        "epochs": progress.epoch,
        "train_loss": progress.loss_sum / progress.loss_count if progress.loss_count else None,
        **evaluate(task, lfw_dataset),
    }
    progress.loss_sum = progress.loss_count = 0.0
    clock.resume(paused_at)
    progress.eval_cpu = clock.paused
    progress.curve.append(point)
    print(
        f"{key}: {point['train_cpu_s']:.0f} cpu-s, {progress.steps} steps, "
        f"accuracy {point['accuracy_mean']:.4f}",
        flush=True,
    )


def save_record(job: dict, record: dict) -> None:
    """Cache the record as <work_dir>/records/<key>.json, where run_jobs looks for it."""
    records_dir = Path(job["work_dir"]) / "records"
    records_dir.mkdir(parents=True, exist_ok=True)
    (records_dir / f"{job['key']}.json").write_text(json.dumps(record, indent=1) + "\n")


# --------------------------------------------------------------------------------------------- scheduling


def make_jobs(bench_args, specs, seeds, split, eval_points) -> list[dict]:
    jobs = []
    for spec in specs:
        method, overrides = parse_method(spec)
        settings = method_settings(method, bench_args, overrides)
        for seed in seeds:
            budget = 0.0 if method == "untrained" else bench_args.budget_seconds
            key = run_key(method, settings, seed, budget, eval_points, split["train_folds"])
            jobs.append(
                {
                    "spec": spec,
                    "method": method,
                    "settings": settings,
                    "seed": seed,
                    "key": key,
                    "budget": budget,
                    "eval_points": eval_points,
                    "work_dir": bench_args.work_dir,
                    "split": split,
                }
            )
    return jobs


def run_jobs(jobs: list[dict], num_jobs: int, reuse: bool) -> list[dict]:
    """Records of the jobs, in job order: cached ones read back, the others run in fresh processes."""
    records: dict[str, dict] = {}
    todo = []
    for job in jobs:
        cached = Path(job["work_dir"]) / "records" / f"{job['key']}.json"
        if reuse and cached.is_file():
            records[job["key"]] = json.loads(cached.read_text())
        else:
            todo.append(job)
    if todo:
        print(f"running {len(todo)} runs, {num_jobs} at a time ({len(jobs) - len(todo)} cached)", flush=True)
        # a fresh process per run: its CPU clock holds that run only, and no memory carries over
        with ProcessPoolExecutor(num_jobs, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
            for record in pool.map(train_one, todo):
                records[record["key"]] = record
    return [records[job["key"]] for job in jobs]


# --------------------------------------------------------------------------------------------- report


# implied by the method and run
UNSHOWN_SETTINGS = ("model", "triplet_selection", "num_triplets_train", "loss")


def settings_text(record: dict) -> str:
    settings = record["settings"]
    keys = ["image_size", "optimizer", "lr"]
    if record["method"] in DEFAULTS_METHODS:
        recipe = {key: value for key, value in record.get("recipe", {}).items() if value is not None}
        return "script defaults: " + ", ".join(f"{key}={value}" for key, value in recipe.items())
    if record["method"] == "untrained":
        keys = ["image_size"]
    elif record["method"] == "center":
        keys += ["batch_size", "logit_scale", "center_loss_weight", "center_loss_lr"]
    elif record["method"] in ("hard", "semihard"):
        keys += ["margin", "batch_size"]
    elif record["method"] in MARGIN_METHODS:
        keys += ["batch_size", "margin_scale", "margin", "margins", "weight_decay", "lr_schedule"]
        keys += ["warmup_epochs"]
    else:
        keys += ["margin", "identities_per_batch", "images_per_identity"]
    keys += [key for key in settings if key not in keys and key not in UNSHOWN_SETTINGS]  # overrides
    shown = {key: settings[key] for key in keys if key in settings}
    if record["method"] == "center":  # the script's defaults, unless overridden
        for key, default in (("logit_scale", 16.0), ("center_loss_weight", 0.007), ("center_loss_lr", 0.5)):
            shown.setdefault(key, default)
    return ", ".join(f"{key}={value}" for key, value in shown.items())


def trained_on(record: dict) -> str:
    """What the losses averaged over: the triplets the selection kept, or the images (center loss)."""
    for key, value in record.items():
        if key.endswith("_trained_on") and value:
            return f"{int(value)} {key.removesuffix('_trained_on')}"
    return "-"


def markdown_table(records: list[dict], test_folds: str = "6-10") -> list[str]:
    lines = [
        f"| method | settings | seed | LFW {test_folds} accuracy (mean ± std, 5 folds) | ROC AUC | TAR @ FAR 1e-2 "
        "| steps | images seen | loss averaged over | train CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        final = record["final"]
        lines.append(
            f"| {record['method']} | {settings_text(record)} | {record['seed']} "
            f"| {final['accuracy_mean']:.4f} ± {final['accuracy_std']:.4f} | {final['roc_auc']:.4f} "
            f"| {final[FAR_KEY + '_mean']:.4f} | {record['steps']} | {record['images']} | {trained_on(record)} "
            f"| {final['train_cpu_s']:.0f} |"
        )
    return lines


def seed_summary(records: list[dict]) -> list[str]:
    """Per (method, settings) with several seeds: the mean over seeds and the seed-to-seed spread."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["method"], settings_text(record)), []).append(record)
    lines = []
    for (method, settings), group in groups.items():
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda record: record["seed"])
        accuracies = [record["final"]["accuracy_mean"] for record in group]
        aucs = [record["final"]["roc_auc"] for record in group]
        mean = sum(accuracies) / len(accuracies)
        spread = max(accuracies) - min(accuracies)
        lines.append(
            f"- {method} ({settings}): accuracy {mean:.4f} over seeds "
            f"{', '.join(str(r['seed']) for r in group)} (spread {spread:.4f}; "
            f"{', '.join(f'{a:.4f}' for a in accuracies)}), ROC AUC {', '.join(f'{a:.4f}' for a in aucs)}"
        )
    return lines


def plot_curves(records: list[dict], path: Path, train_folds: str = "1-5", test_folds: str = "6-10") -> None:
    """Accuracy against training CPU seconds, one line per run (colour: method, line style: seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {method: f"C{index % 10}" for index, method in enumerate(METHODS)}
    styles = ["-", "--", ":", "-."]
    # several settings of one method (a tuning pass) each get a colour of their own
    variants = list(
        dict.fromkeys((r["method"], settings_text(r)) for r in records if r["method"] != "untrained")
    )
    if len(variants) > len({method for method, _ in variants}):
        colours = None
        cycle = [f"C{i}" for i in range(10)]

    def variant(record: dict) -> tuple[str, str]:
        return record["method"], settings_text(record)

    def short_settings(record: dict) -> str:
        """The settings that differ between the runs of this record's method."""
        same_method = [r["settings"] for r in records if r["method"] == record["method"]]
        varying = [k for k in record["settings"] if len({str(s.get(k)) for s in same_method}) > 1]
        return ", ".join(f"{key}={record['settings'][key]}" for key in varying) or "base"

    seeds = sorted({record["seed"] for record in records})
    # every curve starts at its seed's untrained network (the same for every method, see train_one)
    start = {record["seed"]: record["final"] for record in records if record["method"] == "untrained"}
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        for record in records:
            if record["method"] == "untrained":
                continue
            points = ([start[record["seed"]]] if record["seed"] in start else []) + record["curve"]
            x = [point["train_cpu_s"] for point in points]
            y = [point["accuracy_mean"] for point in points]
            ax.plot(
                x,
                y,
                marker="o",
                color=colours[record["method"]] if colours else cycle[variants.index(variant(record)) % 10],
                linestyle=styles[seeds.index(record["seed"]) % len(styles)],
                label=f"{record['method']} seed {record['seed']}"
                + (f" ({short_settings(record)})" if not colours else ""),
            )
        ax.set(
            xlabel="training time (process CPU seconds, 1 thread)",
            ylabel=f"accuracy, LFW folds {test_folds} (5-fold)",
            title=f"ResNet-18 from scratch on LFW folds {train_folds} identities",
        )
        ax.grid(alpha=0.3)
        if start:
            ax.plot([], [], " ", label="(x = 0: the untrained network)")
        ax.legend(loc="upper left", fontsize=8)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def write_report(bench_args, split, records, eval_points, output: Path) -> list[str]:
    lines = [
        f"# Learning benchmark: {bench_args.name}",
        "",
        f"Train: {split['num_train_images']} images of {split['num_train_identities']} identities (LFW folds "
        f"{split['train_folds']}); test: the {split['num_test_pairs']} pairs of folds {split['test_folds']}, "
        "evaluate_lfw with 5 folds. "
        f"Budget {bench_args.budget_seconds:g} s of process CPU time per run (1 torch thread, num_workers=0, "
        f"decoding and augmentation included, evaluation excluded); evaluated at "
        f"{', '.join(f'{p:g}' for p in eval_points)} CPU s. ResNet-18 from scratch, Adam unless stated.",
        "",
        *markdown_table(records, split["test_folds"]),
    ]
    summary = seed_summary(records)
    if summary:
        lines += ["", "Seed-to-seed:", *summary]
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{bench_args.name}.md").write_text("\n".join(lines) + "\n")
    data = {
        "command": "python benchmarks/bench_learning.py " + " ".join(sys.argv[1:]),
        "protocol": {"split": split, "budget_cpu_s": bench_args.budget_seconds, "eval_points": eval_points},
        "runs": [
            {key: value for key, value in record.items() if key != "argv"}
            | {
                "argv": [
                    a
                    if not a.startswith(bench_args.work_dir)
                    else "<work_dir>" + a[len(bench_args.work_dir) :]
                    for a in record["argv"]
                ]
            }
            for record in records
        ],
    }
    (output / f"{bench_args.name}.json").write_text(json.dumps(data, indent=1) + "\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    bench_args = parser.parse_args(argv)
    for spec in bench_args.methods:
        try:
            parse_method(spec)  # fail before any work
        except ValueError as error:
            parser.error(str(error))
    budget = bench_args.budget_seconds
    every = bench_args.eval_every or budget / 2
    eval_points = [round(every * i, 3) for i in range(1, math.ceil(budget / every - 1e-9))] + [budget]
    split = prepare_split(Path(bench_args.data), Path(bench_args.work_dir), bench_args.train_folds)
    print(
        f"train: {split['num_train_images']} images, {split['num_train_identities']} identities; "
        f"test: {split['num_test_pairs']} pairs; no identity overlap",
        flush=True,
    )
    first, later = bench_args.seeds[:1], bench_args.seeds[1:]
    records = run_jobs(
        make_jobs(bench_args, bench_args.methods, first, split, eval_points),
        bench_args.jobs,
        bench_args.reuse,
    )
    if later:
        ranked = sorted(records, key=lambda record: record["final"]["accuracy_mean"], reverse=True)
        repeat = ranked[: bench_args.repeat_best] if bench_args.repeat_best else ranked
        by_spec = {
            job["key"]: job["spec"]
            for job in make_jobs(bench_args, bench_args.methods, first, split, eval_points)
        }
        specs = [by_spec[record["key"]] for record in repeat]
        records += run_jobs(
            make_jobs(bench_args, specs, later, split, eval_points), bench_args.jobs, bench_args.reuse
        )
    records.sort(key=lambda record: (-record["final"]["accuracy_mean"], record["seed"]))
    if bench_args.baseline:  # one evaluation costs a tenth of a run: the first seed only
        records += run_jobs(
            make_jobs(bench_args, ["untrained"], first, split, [0.0]), bench_args.jobs, bench_args.reuse
        )
    lines = write_report(bench_args, split, records, eval_points, Path(bench_args.output))
    if bench_args.plot:
        plot_curves(
            records,
            Path(bench_args.output) / f"{bench_args.name}_curves.png",
            split["train_folds"],
            split["test_folds"],
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
