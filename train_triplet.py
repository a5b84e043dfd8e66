"""Train a face-embedding model with triplet loss, validating on LFW after each epoch.

    python train_triplet.py --dataroot VGGFACE2 --lfw LFW --lfw_pairs pairs.txt --model resnet34
    torchrun --nproc_per_node 4 train_triplet.py ...        # DistributedDataParallel, one process per GPU
    python train_triplet.py --demo                           # synthetic data, a few CPU minutes

Two ways to get triplets:
- pre-generated random triplets (the original's way), of which a step trains on those the selection rule
  keeps: ``hard`` (the original's ``d(a, n) - d(a, p) < margin``) or ``semihard`` (FaceNet's);
- online mining in batches of P identities x K images: ``batch_hard`` or ``batch_all`` (Hermans et al. 2017).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable

import torch
from torch import nn

from datasets.labelled_faces import LabelledFaceDataset
from datasets.samplers import PKBatchSampler
from datasets.transforms import train_transform
from datasets.triplet_dataset import TripletFaceDataset
from errors import InputError
from losses import TripletLoss, batch_all_triplets, batch_hard_triplets, triplet_selection_mask
from losses.triplet_loss import with_nonfinite_of
from training.builders import build_embedding_model, build_optimizer
from training.cli import (
    base_parser,
    boolean_text,
    parse_args,
    positive_float,
    positive_int,
    run_script,
    was_given,
)
from training.data import (
    DistinctRepeats,
    ImagesToDevice,
    ShardSampler,
    SkipBatches,
    ensure_dataset_csv,
    make_loader,
    shard_length,
    stack_triplets,
)
from training.engine import TrainingTask, run_training
from training.runtime import Runtime, log
from training.step import StepOutput

PREGENERATED_RULES = ("hard", "semihard")
ONLINE_RULES = ("batch_hard", "batch_all")

# small enough to finish in a few CPU minutes, large enough to end far above chance on the demo pairs; the
# recipe is the script's own default (batch-all over 16 identities x 4 images, Adam); online mining counts
# --num_triplets_train in images, so 6,400 is 100 steps an epoch
DEMO_DEFAULTS = {
    "epochs": 2,
    "num_triplets_train": 6400,
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = base_parser(
        "Train a face-embedding model with triplet loss; validate on LFW after each epoch.",
        default_output_name="triplet",
    )
    triplets = parser.add_argument_group("triplets")
    triplets.add_argument(
        "--num_triplets_train",
        type=positive_int,
        default=1_100_000,
        help="triplets per epoch (online mining: an epoch has as many steps as these triplets would)",
    )
    triplets.add_argument(
        "--iterations_per_epoch",
        type=positive_int,
        default=None,
        help="the 2021 original's measure of an epoch: its steps; sets --num_triplets_train to this x "
        "--batch_size and, like the original, pre-generated triplets unless --triplet_selection says",
    )
    triplets.add_argument(
        "--use_semihard_negatives",
        type=boolean_text,
        default=None,
        metavar="{True,False}",
        help="the 2021 original's switch: True is --triplet_selection semihard, False is hard",
    )
    triplets.add_argument(
        "--training_triplets_path",
        type=str,
        default=None,
        help="a triplets .npy written by an earlier run, used for every epoch instead of new random triplets",
    )
    triplets.add_argument("--margin", type=positive_float, default=0.2, help="triplet loss margin")
    triplets.add_argument(
        "--triplet_selection",
        choices=PREGENERATED_RULES + ONLINE_RULES,
        default=None,
        help="hard: the original's d(a,n) - d(a,p) < margin on random triplets; semihard: FaceNet's "
        "d(a,p) < d(a,n) < d(a,p) + margin; batch_hard / batch_all: online mining in batches of "
        "--batch_size images, --images_per_identity per identity (Hermans et al. 2017). Default: batch_all, "
        "which learned fastest in benchmarks/bench_learning.py; hard when --training_triplets_path, "
        "--num_human_identities_per_batch or --iterations_per_epoch (flags of pre-generated triplets) is "
        "given, or as --use_semihard_negatives says",
    )
    triplets.add_argument(
        "--selection_pass",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="hard / semihard: choose the triplets with a forward pass without gradients, then run forward "
        "and backward over the chosen ones only, which skips the backward of the easy triplets (faster "
        "once fewer than about 2/3 are hard); batch norm then normalises the training pass with the "
        "chosen triplets' own statistics, which learned less per step in benchmarks/bench_learning.py. "
        "Default: one pass over every triplet with the loss masked to the chosen ones, as the original",
    )
    triplets.add_argument(
        "--num_human_identities_per_batch",
        type=positive_int,
        default=None,
        help="pre-generated triplets: draw each batch's triplets from this many identities (default: any)",
    )
    triplets.add_argument(
        "--identities_per_batch",
        type=positive_int,
        default=None,
        help="online mining: P, the identities in a batch (default: --batch_size / --images_per_identity)",
    )
    triplets.add_argument(
        "--images_per_identity",
        type=positive_int,
        default=4,
        help="online mining: K, the images of each identity in a batch",
    )
    return parser


def resolve_batch_composition(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on other flags (the selection rule, P for online mining) and refuse the
    combinations that contradict them, with a one-line InputError.

    Pre-generated triplets stay the rule of a run that names their flags, so the original's command
    lines keep their meaning; anything else mines online, P x K = --batch_size images a step.
    """
    if args.use_semihard_negatives is not None:
        rule = "semihard" if args.use_semihard_negatives else "hard"
        if args.triplet_selection not in (None, rule):
            raise InputError(
                f"--use_semihard_negatives {args.use_semihard_negatives} means --triplet_selection {rule}, "
                f"not {args.triplet_selection}; give one of them"
            )
        args.triplet_selection = rule
    if args.iterations_per_epoch is not None:
        if was_given(args, "num_triplets_train"):
            raise InputError(
                "--iterations_per_epoch and --num_triplets_train both set an epoch's length; give one of them"
            )
        args.num_triplets_train = args.iterations_per_epoch * args.batch_size
    if args.triplet_selection is None:
        pregenerated = (
            args.training_triplets_path is not None
            or args.num_human_identities_per_batch
            or args.iterations_per_epoch is not None
        )
        args.triplet_selection = "hard" if pregenerated else "batch_all"
    if args.training_triplets_path is not None and args.triplet_selection in ONLINE_RULES:
        raise InputError(
            "--training_triplets_path needs pre-generated triplets: use --triplet_selection hard or semihard"
        )
    if args.triplet_selection in ONLINE_RULES:
        if args.num_human_identities_per_batch is not None and not was_given(
            args, "num_human_identities_per_batch"
        ):
            # kept from a pre-generated run that this resumed one switches to online mining: it no longer applies
            args.num_human_identities_per_batch = None
        if args.num_human_identities_per_batch is not None:
            raise InputError(
                "--num_human_identities_per_batch shapes pre-generated triplets (--triplet_selection hard or "
                f"semihard); --triplet_selection {args.triplet_selection} takes --identities_per_batch"
            )
        if args.images_per_identity < 2:
            raise InputError(
                f"--images_per_identity {args.images_per_identity}: online mining needs at least 2 images of "
                "each identity in a batch (a positive)"
            )
        if args.identities_per_batch is not None and args.identities_per_batch < 2:
            raise InputError(
                f"--identities_per_batch {args.identities_per_batch}: online mining needs at least 2 "
                "identities in a batch (a negative)"
            )
    if args.triplet_selection in ONLINE_RULES and args.identities_per_batch is None:
        args.identities_per_batch = args.batch_size // args.images_per_identity
        if args.identities_per_batch < 2:
            raise InputError(
                f"--batch_size {args.batch_size} holds fewer than 2 identities of --images_per_identity "
                f"{args.images_per_identity} images; online mining needs a negative identity in every batch"
            )


Selector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def online_steps(num_images: int, images_per_step: int, world_size: int) -> int:
    """Steps per epoch of each process when mining online: its share of --num_triplets_train images (the
    original's flag; online it counts images), in batches of ``images_per_step``."""
    steps = math.ceil((num_images // world_size) / images_per_step)
    if steps == 0:
        raise InputError(
            f"--num_triplets_train {num_images} is fewer than the {world_size} processes: no process would "
            "train a step"
        )
    return steps


def selection_rule(margin: float, rule: str) -> Selector:
    return lambda anchor, positive, negative: triplet_selection_mask(anchor, positive, negative, margin, rule)


def online_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, rule: str, margin: float, loss_fn: TripletLoss
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online mining over a P x K batch: the mean loss over the triplets ``rule`` (batch_hard / batch_all)
    picks among ``embeddings``, and their count (no device sync)."""
    if rule == "batch_hard":
        anchors, positives, negatives = batch_hard_triplets(embeddings, labels)
    else:
        anchors, positives, negatives = batch_all_triplets(embeddings, labels, margin)
    if rule == "batch_hard":
        # one triplet per anchor: three (N, D) gathers are cheaper than over_batch's (N, N, D) differences.
        # index_select, not indexing: on the CPU its backward sums each embedding's rows in a fixed order, so
        # a seeded run repeats exactly
        picked = [embeddings.index_select(0, indices) for indices in (anchors, positives, negatives)]
        loss = with_nonfinite_of(loss_fn(*picked), embeddings)
    else:  # batch-all: about N^2 K triplets, so one (N, N) distance matrix
        loss = loss_fn.over_batch(embeddings, anchors, positives, negatives)
    return loss, torch.tensor(float(anchors.numel()), device=embeddings.device)


def masked_single_pass(
    step_module: nn.Module, images: torch.Tensor, select: Selector, loss_fn: TripletLoss
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over anchors, positives and negatives together (``images`` is their
    concatenation), the loss masked to the selected triplets: no device sync.

    Returns the mean loss over the selected triplets (a zero with a graph when there are none) and
    their count.
    """
    anchor, positive, negative = step_module(images).chunk(3)
    mask = select(anchor, positive, negative)
    return loss_fn(anchor, positive, negative, mask=mask), mask.sum().double()


def select_then_train(
    step_module: nn.Module, images: torch.Tensor, select: Selector, loss_fn: TripletLoss
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the triplets with a forward pass without gradients (it also updates batch norm's running
    statistics, from the whole batch as the single pass would), then forward and back-propagate only the
    chosen triplets, batch norm normalising them with their own statistics and leaving the running ones
    alone. Costs one device sync (how many were chosen) and saves the backward of every easy triplet.

    Returns what ``masked_single_pass`` returns. With none chosen, the first triplet goes through the
    training pass with a zero weight, so that every DistributedDataParallel rank runs a backward.
    """
    with torch.no_grad():
        anchor, positive, negative = step_module(images).chunk(3)
        chosen = select(anchor, positive, negative).nonzero().squeeze(1)
    count = chosen.numel()
    if count == 0:
        chosen = chosen.new_zeros(1)
    triplets = images.shape[0] // 3
    picked = torch.cat([images[part * triplets : (part + 1) * triplets][chosen] for part in range(3)])
    with running_statistics_frozen(step_module):
        anchor, positive, negative = step_module(picked.contiguous(memory_format=torch.channels_last)).chunk(
            3
        )
    loss = loss_fn(anchor, positive, negative)
    if count == 0:
        loss = loss * 0.0
    return loss, torch.tensor(float(count), dtype=torch.float64, device=images.device)


@contextlib.contextmanager
def running_statistics_frozen(module: nn.Module):
    """Batch norm layers in training mode normalise with the batch's statistics, as usual, but leave their
    running statistics (and batch count) untouched."""
    layers = [
        layer
        for layer in module.modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
    ]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


class TripletTask(TrainingTask):
    name = "triplet"
    count_name = "triplets"

    def __init__(self, args: argparse.Namespace, runtime: Runtime):
        super().__init__(args, runtime)
        resolve_batch_composition(args)
        self.online = args.triplet_selection in ONLINE_RULES
        if (
            args.triplet_selection == "batch_all"
            and was_given(args, "num_triplets_train")
            and not was_given(args, "triplet_selection")
        ):
            log.info(
                f"--num_triplets_train {args.num_triplets_train}: online batch-all mining, the default since the "
                "original, counts it in images (--batch_size images a step); --triplet_selection hard trains "
                "the original's random triplets"
            )
        csv_path = ensure_dataset_csv(args, runtime)
        transform = train_transform(args.image_size, normalize=False)  # normalised on the device
        self.to_device = ImagesToDevice(runtime.device, args.normalization)
        images_per_step = (
            args.identities_per_batch * args.images_per_identity if self.online else args.batch_size
        )
        if self.online and images_per_step != args.batch_size:
            log.info(
                f"batches of {args.identities_per_batch} identities x {args.images_per_identity} images = "
                f"{images_per_step} images, not --batch_size {args.batch_size}"
                + (" (--identities_per_batch decides)" if was_given(args, "identities_per_batch") else "")
            )
        if self.online:
            self.num_steps = online_steps(args.num_triplets_train, images_per_step, runtime.world_size)
            self.dataset = LabelledFaceDataset(args.dataroot, csv_path, transform=transform)
        else:
            self.dataset = TripletFaceDataset(
                root_dir=args.dataroot,
                csv_name=csv_path,
                num_triplets=args.num_triplets_train,
                training_triplets_path=args.training_triplets_path,
                transform=transform,
                output_dir=args.output_dir if runtime.is_main else None,
                seed=args.seed,
                num_human_identities_per_batch=args.num_human_identities_per_batch,
                batch_size=args.batch_size,
                epoch=0,
            )
            if len(self.dataset) < runtime.world_size:
                raise InputError(
                    f"{len(self.dataset)} triplets are fewer than the {runtime.world_size} processes"
                )
            share = shard_length(len(self.dataset), runtime.world_size, block=args.batch_size)
            self.num_steps = math.ceil(share / args.batch_size)
        self.model = build_embedding_model(args, runtime.device)
        self.step_module = self.model
        self.optimizers = [
            build_optimizer(args.optimizer, self.model.parameters(), args.lr, args.weight_decay)
        ]
        self.loss_fn = TripletLoss(margin=args.margin)

    def steps_per_epoch(self) -> int:
        return self.num_steps

    def batches(self, epoch: int, start_step: int):
        args, runtime = self.args, self.runtime
        if self.online:
            sampler = PKBatchSampler(
                self.dataset.labels,
                identities_per_batch=args.identities_per_batch,
                images_per_identity=args.images_per_identity,
                num_batches=self.num_steps,
                seed=args.seed,
                rank=runtime.rank,
                world_size=runtime.world_size,
            )
            sampler.set_epoch(epoch)
            return make_loader(
                self.dataset,
                args,
                runtime,
                epoch,
                batch_sampler=SkipBatches(DistinctRepeats(sampler), start_step),
            )
        if args.training_triplets_path is None and epoch > 0:
            # new random triplets every epoch, reproducible from (seed, epoch)
            self.dataset.set_epoch(epoch)
        sampler = ShardSampler(
            len(self.dataset),
            runtime.rank,
            runtime.world_size,
            start=start_step * args.batch_size,
            block=args.batch_size,  # the triplets of a batch come from --num_human_identities_per_batch people
        )
        return make_loader(
            self.dataset,
            args,
            runtime,
            epoch,
            sampler=sampler,
            batch_size=args.batch_size,
            collate_fn=stack_triplets,
        )

    def step(self, step_module, batch) -> StepOutput:
        device = self.runtime.device
        if self.online:
            images, labels = batch
            embeddings = step_module(self.to_device(images))
            labels = labels.to(device, non_blocking=True)
            loss, count = online_triplet_loss(
                embeddings, labels, self.args.triplet_selection, self.args.margin, self.loss_fn
            )
        else:
            images = self.to_device(batch)  # anchors, positives, negatives: stacked by the workers
            select = selection_rule(self.args.margin, self.args.triplet_selection)
            step = select_then_train if self.args.selection_pass else masked_single_pass
            loss, count = step(step_module, images, select, self.loss_fn)
        return StepOutput(loss=loss, loss_sum=loss.detach().double() * count, count=count)

    def checkpoint_extras(self) -> dict:
        return {"triplets_path": getattr(self.dataset, "triplets_path", None)}


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        args = parse_args(get_args_parser(), argv, DEMO_DEFAULTS)
        resolve_batch_composition(args)  # its errors before any work
        return run_training(args, TripletTask)

    return run_script(body, argv)


if __name__ == "__main__":
    sys.exit(main())
