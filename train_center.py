"""Train a face-embedding model with cross-entropy plus center loss (Wen et al. 2016), validating on LFW.

    python train_center.py --dataroot VGGFACE2 --lfw LFW --lfw_pairs pairs.txt --model resnet34
    torchrun --nproc_per_node 4 train_center.py ...
    python train_center.py --demo

Loss = cross-entropy(logits) + center_loss_weight x center loss. The classifier sees the unit-norm embedding
times ``--logit_scale`` (see README.md for why). The centers have their own SGD optimizer at
``--center_loss_lr``; their gradient is divided by the loss weight before that optimizer steps, so the weight
sets how hard the embeddings are pulled to the centers and not how fast the centers move.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

from datasets.labelled_faces import LabelledFaceDataset
from datasets.transforms import train_transform
from losses import CenterLoss
from training.builders import build_embedding_model, build_optimizer, load_optimizer_state
from training.cli import base_parser, parse_args, positive_float, run_script
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

DEMO_DEFAULTS = {
    "epochs": 3,
    "batch_size": 64,
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = base_parser(
        "Train a face-embedding model with cross-entropy + center loss; validate on LFW each epoch.",
        default_output_name="center",
    )
    center = parser.add_argument_group("center loss")
    center.add_argument(
        "--center_loss_lr",
        type=positive_float,
        default=0.5,
        help="learning rate of the centers (SGD)",
    )
    center.add_argument(
        "--center_loss_weight",
        type=positive_float,
        default=0.007,
        help="weight of the center loss in the total loss",
    )
    center.add_argument(
        "--logit_scale",
        type=positive_float,
        default=16.0,
        help="the classifier sees the unit-norm embedding times this (1 = the original, which learns slowly)",
    )
    return parser


class CenterLossModule(nn.Module):
    """Model, classifier and center loss as one module, so DDP synchronises the centers' gradients too."""

    def __init__(self, model: nn.Module, center_loss: CenterLoss, logit_scale: float):
        super().__init__()
        self.model = model
        self.center_loss = center_loss
        self.logit_scale = logit_scale

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        embeddings, logits = self.model.forward_training(images, self.logit_scale)
        return logits, self.center_loss(embeddings, labels)


class CenterTask(TrainingTask):
    name = "center"
    divergence_hint = "lower --lr or --logit_scale"
    count_name = "images"
    min_batch_size = 2

    def __init__(self, args: argparse.Namespace, runtime: Runtime):
        super().__init__(args, runtime)
        csv_path = ensure_dataset_csv(args, runtime)
        self.dataset = LabelledFaceDataset(
            args.dataroot, csv_path, transform=train_transform(args.image_size, normalize=False)
        )
        self.to_device = ImagesToDevice(runtime.device, args.normalization)
        self.num_classes = classifier_classes(self.dataset, args)
        self.num_steps = shuffled_steps(len(self.dataset), args.batch_size, runtime)
        self.model = build_embedding_model(args, runtime.device, num_classes=self.num_classes)
        self.center_loss = CenterLoss(self.num_classes, args.embedding_dim).to(runtime.device)
        self.step_module = CenterLossModule(self.model, self.center_loss, args.logit_scale)
        self.optimizers = [
            build_optimizer(args.optimizer, self.model.parameters(), args.lr, args.weight_decay),
            torch.optim.SGD(self.center_loss.parameters(), lr=args.center_loss_lr),
        ]

    def steps_per_epoch(self) -> int:
        return self.num_steps

    def batches(self, epoch: int, start_step: int):
        return shuffled_batches(self.dataset, self.args, self.runtime, epoch, start_step)

    def step(self, step_module, batch) -> StepOutput:
        images, labels = batch
        images = self.to_device(images)
        labels = labels.to(self.runtime.device, non_blocking=True)
        logits, center_loss = step_module(images, labels)
        loss = F.cross_entropy(logits.float(), labels) + self.args.center_loss_weight * center_loss
        count = torch.tensor(float(labels.numel()), device=labels.device)
        return StepOutput(loss=loss, loss_sum=loss.detach().double() * count, count=count)

    def before_optimizer_step(self) -> None:
        # undo the loss weight on the centers' gradient BEFORE their optimizer steps (the original divided
        # after the step, which changed nothing)
        for parameter in self.center_loss.parameters():
            if parameter.grad is not None:
                parameter.grad.div_(self.args.center_loss_weight)

    def scheduled_optimizers(self) -> list[torch.optim.Optimizer]:
        # the centers move at their own fixed --center_loss_lr, as in the original
        return self.optimizers[:1]

    def checkpoint_extras(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "optimizer_centerloss_state_dict": self.optimizers[1].state_dict(),
            "center_loss_state_dict": self.center_loss.state_dict(),
            "logit_scale": self.args.logit_scale,
        }

    def load_checkpoint_extras(self, checkpoint: dict) -> None:
        load_optimizer_state(self.optimizers[1], checkpoint["optimizer_centerloss_state_dict"])
        self.center_loss.load_state_dict(checkpoint["center_loss_state_dict"])


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        args = parse_args(get_args_parser(), argv, DEMO_DEFAULTS)
        return run_training(args, CenterTask)

    return run_script(body, argv)


if __name__ == "__main__":
    sys.exit(main())
