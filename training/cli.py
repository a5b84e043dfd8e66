"""The command line both training scripts share: the original's flags, the additions, and the demo."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch.distributed as dist

from checkpoint_loading import PREPROCESS_PRESETS, preset_help
from datasets.image_files import is_recordio
from datasets.lfw_dataset import resolve_lfw_pairs
from demo.make_demo_dataset import make_demo_dataset
from devices import AMP_CHOICES
from errors import InputError, no_file_reason, report_input_errors, require_int
from models import MODEL_NAMES, min_image_size
from training.builders import LR_SCHEDULES, OPTIMIZERS

DEMO_ROOT = Path("demo_data")

# what --demo changes in both scripts; each adds its own (epochs, batch size, ...)
DEMO_DEFAULTS = {
    "model": "resnet18",
    "image_size": 64,
    "num_workers": 2,
    "lfw_batch_size": 128,
}


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        return require_int(int(text), "value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}") from None


def seed_int(text: str) -> int:
    """argparse type: a seed numpy and torch both take, 0 to 2**32 - 1."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {2**32 - 1}, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def unit_interval_float(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:  # nan fails too
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number of at least 0."""
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def boolean_text(text: str) -> bool:
    """argparse type of a flag that takes True or False (the original's spelling), read as what it says."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def pretrained_weights_name(text: str):
    """argparse type of --pretrained WEIGHTS: True for imagenet (as the bare flag), else the name."""
    name = text.strip().lower()
    if name in ("imagenet", "true"):
        return True
    if name in ("false", "none"):
        return False
    return name


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after a flag's help, except where there is nothing to show (None or False, a required
    flag) or the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.required or "default:" in text.lower():
            return text
        return super()._get_help_string(action)


def base_parser(description: str, default_output_name: str) -> argparse.ArgumentParser:
    """The parser both scripts start from: the original's flags and the additions listed in README.md."""
    parser = argparse.ArgumentParser(description=description, formatter_class=DefaultsHelpFormatter)
    _add_data_arguments(parser.add_argument_group("data"))
    _add_model_arguments(parser.add_argument_group("model"))
    _add_training_arguments(parser.add_argument_group("training"))
    _add_run_arguments(parser.add_argument_group("validation, output and resume"), default_output_name)
    # not flags: the run's preprocessing, settled from what it starts from (training/finetune.py);
    # None is the default normalisation (0.5, 0.5) and no known face alignment
    parser.set_defaults(normalization=None, alignment=None)
    return parser


def _add_data_arguments(data) -> None:
    data.add_argument(
        "--dataroot",
        "-d",
        type=str,
        help="training images: a folder with one folder per identity, or a RecordIO train.rec (with its "
        "train.idx beside it) (required)",
    )
    data.add_argument(
        "--lfw",
        type=str,
        help="LFW images, aligned like the training images (with --lfw_pairs), or an lfw.bin (required unless "
        "--val_targets is given)",
    )
    data.add_argument(
        "--lfw_pairs",
        type=str,
        help="the LFW pairs file (pairs.txt); default: pairs.txt or lfw_pairs.txt in --lfw",
    )
    data.add_argument(
        "--val_targets",
        nargs="+",
        default=[],
        metavar="BIN",
        help="verification sets in insightface's .bin format (lfw.bin, cfp_fp.bin, agedb_30.bin, ...), "
        "each evaluated after every validation epoch like LFW (ten folds of consecutive pairs)",
    )
    data.add_argument(
        "--dataset_csv",
        "--training_dataset_csv_path",  # the name in the original's 2021 scripts
        dest="dataset_csv",
        type=str,
        default=None,
        help="CSV of the training images from datasets/generate_csv_files.py; default: written into "
        "--output_dir (a .rec needs none)",
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


def _add_model_arguments(model) -> None:
    # the second names are the original's 2021 scripts' (train_triplet_loss.py)
    model.add_argument(
        "--model", "--model_architecture", dest="model", type=str, default="resnet34", choices=MODEL_NAMES,
        metavar="MODEL", help=f"architecture: {', '.join(MODEL_NAMES)}",
    )  # fmt: skip
    model.add_argument(
        "--embedding_dim", "--embedding_dimension", dest="embedding_dim", type=positive_int, default=128,
        help="size of the embedding",
    )  # fmt: skip
    model.add_argument(
        "--pretrained",
        nargs="?",
        const=True,
        default=False,
        type=pretrained_weights_name,
        metavar="WEIGHTS",
        help="start from published weights: alone or 'imagenet', ImageNet's (ResNets, inceptionresnetv2); "
        "'vggface2' or 'casia-webface' for inception_resnet_v1 (facenet-pytorch's; its download and cache)",
    )
    model.add_argument(
        "--no-pretrained",
        dest="pretrained",
        action="store_false",
        default=argparse.SUPPRESS,  # --pretrained holds the default (False)
        help="start from random weights, as without --pretrained",
    )
    model.add_argument(
        "--init_from",
        type=str,
        default=None,
        metavar="CKPT",
        help="start from the weights of a face checkpoint (this repository's, the original's 2019/2020/2021 "
        "files, facenet-pytorch's InceptionResnetV1 state dict) with a fresh optimizer, epoch count and "
        "output folder; --model, --embedding_dim and the preprocessing (--image_size, mean, std) come from it",
    )
    model.add_argument(
        "--preprocess",
        choices=tuple(PREPROCESS_PRESETS),
        default=None,
        help=f"with --init_from: {preset_help()}",
    )
    model.add_argument(
        "--reinit_head",
        action="store_true",
        help="with --init_from: a new, randomly initialised embedding head at --embedding_dim (the backbone "
        "keeps the checkpoint's weights)",
    )


def _add_training_arguments(train) -> None:
    train.add_argument(
        "--epochs", type=positive_int, default=30, help="total number of epochs (also when resuming)"
    )
    train.add_argument("--batch_size", type=positive_int, default=64, help="training batch size per process")
    train.add_argument(
        "--optimizer",
        type=str,
        default="adam",
        choices=OPTIMIZERS,
        help="optimizer (the original's default was adagrad; adam learned faster in benchmarks/bench_learning.py)",
    )
    train.add_argument(
        "--lr", "--learning_rate", dest="lr", type=positive_float, default=0.001, help="learning rate"
    )
    train.add_argument(
        "--weight_decay", type=non_negative_float, default=1e-5, help="weight decay of the model's optimizer"
    )
    train.add_argument(
        "--lr_schedule",
        choices=LR_SCHEDULES,
        default="constant",
        help="constant (the original); cosine: decay to zero over --epochs, stepped per epoch; poly: "
        "(1 - progress)^2 per step after the warmup",
    )
    train.add_argument(
        "--warmup_epochs",
        type=non_negative_float,
        default=0.0,
        help="raise the lr linearly from 0 over this many epochs (fractions allowed), per step",
    )
    train.add_argument(
        "--clip_grad_norm",
        type=positive_float,
        default=None,
        metavar="MAX_NORM",
        help="before each step, scale the model's gradients down to this total norm when above it (after fp16 "
        "unscaling; arcface_torch clips at 5 for margin losses); default: no clipping",
    )
    train.add_argument(
        "--freeze_backbone_epochs",
        type=int,
        default=0,
        metavar="N",
        help="with --init_from or --pretrained: for the first N epochs train only the embedding head (and the "
        "loss's own parameters); the backbone's weights and batch-norm statistics stay as they were",
    )
    train.add_argument(
        "--seed", type=seed_int, default=0, help="seed for weights, triplets, sampling and augmentation"
    )
    train.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="auto",
        help="mixed precision: auto = bf16 on GPUs with native bf16 (compute capability 8.0+), fp16 with a "
        "gradient scaler on older GPUs, bf16 on CPUs with native bf16 (AVX-512 BF16, AMX), else off",
    )
    train.add_argument(
        "--device", type=str, default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N"
    )


def _add_run_arguments(run, default_output_name: str) -> None:
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
        help="checkpoint to resume from; auto: the newest checkpoint in --output_dir, or a fresh start when "
        "there is none (a preempted job can be resubmitted unchanged)",
    )
    run.add_argument(
        "--checkpoint_every_steps",
        type=positive_int,
        default=None,
        help="also checkpoint every this many steps within an epoch (the newest such one is kept until the "
        "epoch's own checkpoint is written)",
    )


def parse_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, demo_defaults: dict
) -> argparse.Namespace:
    """Parse; under ``--demo``, the demo defaults (shared, then the script's) apply to every flag not given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--demo" in argv:
        parser.set_defaults(**{**DEMO_DEFAULTS, **demo_defaults})
    args = parser.parse_args(argv)
    args.given_flags = given_flags(parser, argv)
    if args.demo and "image_size" not in args.given_flags:
        # the demo's 64 px is below the Inception models' 75: they get their smallest instead
        args.image_size = max(args.image_size, min_image_size(args.model))
    if not args.demo:
        missing = ["--dataroot/-d"] if not args.dataroot else []
        if not args.lfw and not args.val_targets:
            missing.append("--lfw (or --val_targets)")
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args


class _NothingDefaulted(argparse.Namespace):
    """A namespace that answers every attribute it lacks, so argparse fills in no default: what is in it after
    parsing was on the command line."""

    def __getattr__(self, name):
        if name.startswith("_"):  # argparse's own bookkeeping (unrecognised arguments) stays absent
            raise AttributeError(name)
        return None


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The destinations of the options on the command line (abbreviated or not), sorted: what the user chose,
    as opposed to a default that a checkpoint (--init_from, --resume_path) may decide instead."""
    return sorted(vars(parser.parse_args(argv, namespace=_NothingDefaulted())))


def was_given(args: argparse.Namespace, flag: str) -> bool:
    """Whether --``flag`` was on the command line; True when unknown (``args`` not made by `parse_args`)."""
    given = getattr(args, "given_flags", None)
    return given is None or flag in given


def check_common_args(args: argparse.Namespace) -> None:
    """Every cheap check of files and values, before any work or writing."""
    if args.num_workers < 0:
        raise InputError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if args.output_dir is not None and not str(args.output_dir).strip():
        raise InputError("--output_dir is empty; name a folder, or leave the flag out for runs/<run name>")
    if args.resume_path == "auto":
        if args.output_dir is None:
            raise InputError("--resume_path auto needs --output_dir (the folder to look for checkpoints in)")
    elif args.resume_path is not None and not Path(args.resume_path).is_file():
        raise InputError(f"--resume_path {args.resume_path}: {no_file_reason(args.resume_path)}")
    check_init_args(args)
    smallest = min_image_size(args.model)
    if args.image_size < smallest:
        raise InputError(f"--image_size {args.image_size}: {args.model} needs at least {smallest} px")
    if args.demo:
        return  # the demo's data is generated later, at known paths
    check_dataroot(args)
    if args.lfw is not None:
        if Path(args.lfw).is_file():  # an lfw.bin, which holds its own pairs
            if args.lfw_pairs is not None:
                raise InputError(
                    f"--lfw_pairs goes with an --lfw folder; {args.lfw} is a file (a .bin holds its pairs)"
                )
        elif Path(args.lfw).is_dir():
            args.lfw_pairs = resolve_lfw_pairs(args.lfw, args.lfw_pairs)
        else:
            raise InputError(f"--lfw {args.lfw}: no such folder or file")
    for target in args.val_targets:
        if not Path(target).is_file():
            raise InputError(f"--val_targets {target}: {no_file_reason(target)}")
    names = [Path(target).stem for target in args.val_targets]
    if args.lfw is not None and "lfw" in names:
        clash = args.val_targets[names.index("lfw")]
        raise InputError(f"--val_targets {clash}: 'lfw' names the --lfw folder's results; rename the file")
    if len(set(names)) != len(names):
        raise InputError(f"--val_targets: two targets share a name ({', '.join(names)}); rename one file")


def check_init_args(args: argparse.Namespace) -> None:
    """--init_from and the flags that go with it: what the starting weights may be combined with."""
    if args.freeze_backbone_epochs < 0:
        raise InputError(f"--freeze_backbone_epochs must be 0 or more, got {args.freeze_backbone_epochs}")
    if args.init_from is None:
        for flag, value in (("--preprocess", args.preprocess), ("--reinit_head", args.reinit_head)):
            if value:
                raise InputError(f"{flag} applies to the checkpoint of --init_from, and none is given")
        if args.freeze_backbone_epochs and not args.pretrained and args.resume_path is None:
            raise InputError(
                "--freeze_backbone_epochs keeps starting weights fixed: give them with --init_from or --pretrained"
            )
        return
    if args.resume_path not in (None, "auto"):
        raise InputError(
            "--init_from starts a new run from a checkpoint's weights and --resume_path continues a run: "
            "give one of them"
        )
    if args.pretrained:
        raise InputError("--init_from and --pretrained both choose the starting weights: give one of them")
    if not Path(args.init_from).is_file():
        raise InputError(f"--init_from {args.init_from}: {no_file_reason(args.init_from)}")


def check_dataroot(args: argparse.Namespace) -> None:
    """A folder of identity folders (with an optional --dataset_csv), or a .rec with its .idx."""
    dataroot = Path(args.dataroot)
    if is_recordio(dataroot):
        if not dataroot.is_file():
            raise InputError(f"--dataroot {args.dataroot}: {no_file_reason(args.dataroot)}")
        if not dataroot.with_suffix(".idx").is_file():
            raise InputError(
                f"--dataroot {args.dataroot}: its index {dataroot.with_suffix('.idx')} is missing"
            )
        if args.dataset_csv is not None:
            raise InputError("--dataset_csv lists a folder of images; a .rec --dataroot needs none")
        return
    if not dataroot.is_dir():
        raise InputError(f"--dataroot {args.dataroot}: no such folder")
    if not any(dataroot.iterdir()):
        raise InputError(f"--dataroot {args.dataroot}: the folder is empty")
    if args.dataset_csv is not None and not Path(args.dataset_csv).is_file():
        raise InputError(f"--dataset_csv {args.dataset_csv}: {no_file_reason(args.dataset_csv)}")


def run_script(main_body, argv: list[str] | None) -> int:
    """Run a script's body, turning bad input into one line on stderr and exit status 2."""
    try:
        return report_input_errors(lambda: main_body(argv))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def prepare_demo_data(args: argparse.Namespace) -> None:
    """Point the run at the synthetic demo dataset, generating it first if needed."""
    demo = make_demo_dataset(DEMO_ROOT, num_workers=2)
    args.dataroot = args.dataroot or str(demo.train_dir)
    args.lfw = args.lfw or str(demo.lfw_dir)
    args.lfw_pairs = args.lfw_pairs or str(demo.pairs_path)
