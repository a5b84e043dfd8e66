"""Train a face-embedding model with a margin softmax (ArcFace, CosFace or their combination), validating on LFW.

    python train_margin.py --dataroot VGGFACE2 --lfw LFW --lfw_pairs pairs.txt --model resnet34
    python train_margin.py --dataroot faces_emore/train.rec --val_targets faces_emore/lfw.bin --sample_rate 0.1
    torchrun --nproc_per_node 8 train_margin.py ...        # the classifier is sharded over the 8 processes
    python train_margin.py --demo

The loss is the cross-entropy of ``s * (cos(m1 * theta + m2) - m3)`` on the target class and ``s * cos theta``
elsewhere, theta the angle between the unit embedding and the unit class center: ArcFace (Deng et al. 2019,
https://arxiv.org/abs/1801.07698) is m2 = 0.5, CosFace (Wang et al. 2018, https://arxiv.org/abs/1801.09414)
m3 = 0.35. Past theta + m2 = pi the ArcFace target would grow again with the angle; there, as ArcFace's
reference implementations do, it becomes ``cos theta - sin(pi - m2) * m2`` (losses/margin_softmax.py).

The classifier (`losses.partial_fc.CosineClassifier`) is split over the processes, each holding
num_classes / world_size centers, and with ``--sample_rate r`` (PartialFC, An et al. 2021) each step uses every
positive class of the global batch and a random share r of the others. It stays outside DDP; its own SGD
(`PartialSGD`) steps only the centers a step used. Both optimizers follow --lr_schedule and --warmup_epochs:
from scratch at s = 64 a margin loss diverges without warmup.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from datasets.labelled_faces import LabelledFaceDataset
from datasets.transforms import train_transform
from errors import InputError, first_line
from losses.margin_softmax import LOSS_MARGINS
from losses.partial_fc import CosineClassifier, PartialSGD
from training.builders import build_embedding_model, build_optimizer, is_out_of_memory
from training.cli import (
    base_parser,
    non_negative_float,
    parse_args,
    positive_float,
    run_script,
    unit_interval_float,
)
from training.data import (
    ImagesToDevice,
    classifier_classes,
    ensure_dataset_csv,
    shuffled_batches,
    shuffled_steps,
)
from training.engine import TrainingTask, run_training
from training.runtime import Runtime
from training.step import StepOutput

LOSSES = ("arcface", "cosface", "combined")
MARGIN_SCALE_DEFAULT = 64.0  # s of both papers
# the combined margin of the ArcFace paper's Table 1 (m1, m2, m3) = (1, 0.3, 0.2)
COMBINED_MARGINS = (1.0, 0.3, 0.2)

# the script's own defaults, where margin training wants other values than the triplet scripts': the best
# recipe of benchmarks/bench_learning.py (Adam for the network, SGD at 100x its lr for the class centers,
# warmup then poly decay). The papers' recipe is --optimizer sgd --lr 0.1 --weight_decay 5e-4.
MARGIN_DEFAULTS = {
    "optimizer": "adam",
    "lr": 0.001,
    "weight_decay": 1e-5,
    "lr_schedule": "poly",
    "warmup_epochs": 1.0,
    "batch_size": 128,
}

DEMO_DEFAULTS = {
    "epochs": 3,
    "batch_size": 64,
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = base_parser(
        "Train a face-embedding model with ArcFace / CosFace margin softmax; validate on LFW each epoch.",
        default_output_name="margin",
    )
    margin = parser.add_argument_group("margin softmax")
    margin.add_argument("--loss", choices=LOSSES, default="arcface", help="which margin")
    margin.add_argument(
        "--margin_scale", type=positive_float, default=MARGIN_SCALE_DEFAULT, help="s, the logit scale"
    )
    margin.add_argument(
        "--margin",
        type=non_negative_float,
        default=None,
        help="arcface: the angular margin m2 (default 0.5); cosface: the cosine margin m3 (default 0.35)",
    )
    margin.add_argument(
        "--margins",
        type=non_negative_float,
        nargs=3,
        metavar=("M1", "M2", "M3"),
        default=COMBINED_MARGINS,
        help="combined: s * (cos(m1 * theta + m2) - m3)",
    )
    margin.add_argument(
        "--sample_rate",
        type=positive_float,
        default=1.0,
        help="PartialFC: the share of class centers each step uses, the batch's positives always among them "
        "(more when the positives alone exceed it); 1 = all",
    )
    margin.add_argument(
        "--classifier_lr_scale",
        type=positive_float,
        default=None,
        help="the class centers' SGD lr is --lr times this (momentum 0.9, the model's --weight_decay); "
        "default: 1 with --optimizer sgd, else 100 (the adaptive optimizers' lr is about 100x smaller)",
    )
    margin.add_argument(
        "--center_momentum",
        type=unit_interval_float,
        default=None,
        metavar="M",
        help="class centers as moving averages of their embeddings instead of learned by SGD: each center in "
        "a batch becomes normalize(M * center + (1 - M) * the class's mean embedding direction) (Smirnov et "
        "al. 2021's prototype memory; with few images per identity it learned much better in "
        "benchmarks/bench_learning.py, at 0.5); default: learned centers, as the papers",
    )
    parser.set_defaults(**MARGIN_DEFAULTS)
    return parser


def classifier_lr_scale(args: argparse.Namespace) -> float:
    if args.classifier_lr_scale is not None:
        return args.classifier_lr_scale
    # SGD's lr (0.1 in the papers) suits the centers as it is; the adaptive optimizers' (1e-3) is ~100x smaller
    return 1.0 if args.optimizer == "sgd" else 100.0


def margins_of(args: argparse.Namespace) -> tuple[float, float, float]:
    """(m1, m2, m3) from --loss, --margin and --margins."""
    if args.loss == "combined":
        if args.margin is not None:
            raise InputError(
                "--margin sets arcface's or cosface's margin; give --margins M1 M2 M3 for combined"
            )
        m1, m2, m3 = args.margins
        if m1 <= 0:
            raise InputError(f"--margins: M1 multiplies the angle and must be above 0, got {m1:g}")
        return m1, m2, m3
    if "margins" in getattr(args, "given_flags", ()):  # on the command line (not merely the default)
        raise InputError(f"--margins sets the combined loss's margins; --loss {args.loss} takes --margin")
    m1, m2, m3 = LOSS_MARGINS[args.loss]
    if args.margin is None:
        return m1, m2, m3
    return (m1, args.margin, m3) if args.loss == "arcface" else (m1, m2, args.margin)


class MarginTask(TrainingTask):
    name = "margin"
    divergence_hint = "lower --lr or --margin_scale"
    count_name = "images"
    min_batch_size = 2

    def __init__(self, args: argparse.Namespace, runtime: Runtime):
        super().__init__(args, runtime)
        if args.sample_rate > 1:
            raise InputError(f"--sample_rate must be in (0, 1], got {args.sample_rate}")
        csv_path = ensure_dataset_csv(args, runtime)
        self.dataset = LabelledFaceDataset(
            args.dataroot, csv_path, transform=train_transform(args.image_size, normalize=False)
        )
        self.to_device = ImagesToDevice(runtime.device, args.normalization)
        self.num_classes = classifier_classes(self.dataset, args)
        if self.num_classes < runtime.world_size:
            raise InputError(
                f"{self.num_classes} identities cannot be split over {runtime.world_size} processes"
            )
        self.num_steps = shuffled_steps(len(self.dataset), args.batch_size, runtime)
        self.model = build_embedding_model(args, runtime.device)
        try:
            self.classifier = CosineClassifier(
                self.num_classes,
                args.embedding_dim,
                sample_rate=args.sample_rate,
                margin=margins_of(args),
                scale=args.margin_scale,
                seed=args.seed,
                center_momentum=args.center_momentum,
            ).to(runtime.device)
        except ValueError as error:  # a margin outside what the formula allows
            raise InputError(f"--loss {args.loss}: {error}") from None
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            raise InputError(
                f"the classifier of {self.num_classes} identities x --embedding_dim {args.embedding_dim} does "
                f"not fit in the memory of {runtime.device}; use more processes, which shard it "
                f"({first_line(error)})"
            ) from None
        # only the backbone goes into DDP: the classifier is sharded, each process steps its own centers
        self.step_module = self.model
        self.optimizers = [
            build_optimizer(args.optimizer, self.model.parameters(), args.lr, args.weight_decay)
        ]
        if args.center_momentum is None:  # learned centers; moving-average ones need no optimizer
            self.optimizers.append(
                PartialSGD(
                    self.classifier,
                    lr=args.lr * classifier_lr_scale(args),
                    momentum=0.9,
                    weight_decay=args.weight_decay,
                )
            )

    def centers_optimizer(self) -> PartialSGD | None:
        return self.optimizers[1] if len(self.optimizers) > 1 else None

    def trained_tensors(self) -> list[torch.Tensor]:
        # the centers' optimizer holds them, unless they are moving averages
        trained = super().trained_tensors()
        return trained if self.centers_optimizer() is not None else [*trained, self.classifier.weight]

    def steps_per_epoch(self) -> int:
        return self.num_steps

    def batches(self, epoch: int, start_step: int):
        return shuffled_batches(self.dataset, self.args, self.runtime, epoch, start_step)

    def step(self, step_module: nn.Module, batch) -> StepOutput:
        images, labels = batch
        images = self.to_device(images)
        labels = labels.to(self.runtime.device, non_blocking=True)
        # the classifier returns the mean over the global batch, the same on every process; weighting it by
        # this process's count makes the trainer's all-reduced average that same mean
        loss = self.classifier(step_module(images).float(), labels)
        count = torch.tensor(float(labels.numel()), device=labels.device)
        return StepOutput(loss=loss, loss_sum=loss.detach().double() * count, count=count, global_mean=True)

    def checkpoint_extras(self) -> dict:
        # a collective: every process sends its centers (and their momentum) to rank 0
        return {
            "num_classes": self.num_classes,
            "classifier_state_dict": self.classifier.full_state_dict(self.centers_optimizer()),
            "margins": list(self.classifier.margin),
            "margin_scale": self.classifier.scale,
        }

    def load_checkpoint_extras(self, checkpoint: dict) -> None:
        self.classifier.load_full_state_dict(checkpoint["classifier_state_dict"], self.centers_optimizer())


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        args = parse_args(get_args_parser(), argv, DEMO_DEFAULTS)
        return run_training(args, MarginTask)

    return run_script(body, argv)


if __name__ == "__main__":
    sys.exit(main())
