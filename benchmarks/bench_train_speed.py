"""Triplet-training throughput: this repository's training step against the original's, in one run.

    python benchmarks/bench_train_speed.py                        # ResNet-34 at 160 px on this machine
    python benchmarks/bench_train_speed.py --device cuda --image_size 160 224 --with_data

"Original" is the seed repository's step: fp32, NCHW, three forward passes, hard triplets picked through a
numpy round trip, the loss on them, backward through everything. "Ours" runs with channels_last, mixed
precision as --amp auto chooses for the device, and the trainer's backward_and_step:
- the default step of train_triplet.py (its parser's defaults: batch-all mining over P x K = --batch_size
  images, Adam), one forward pass over the batch;
- with pre-generated triplets (--triplet_selection hard), one forward pass over anchors, positives and
  negatives together through the script's own step functions, and either
- the loss masked to the hard triplets (the default for those), or
- --selection_pass: a forward pass without gradients picks the hard triplets, then forward and backward
  run over those only. Its cost depends on the share of triplets that are hard, so it is timed at
  fixed shares (--hard_shares) like those real runs log (num_triplets in training_log.csv divided by
  --num_triplets_train), and at the share the hard rule keeps on these synthetic inputs (printed, over
  the timed steps; the same batch is trained on again and again, so that share soon falls).

Images/s counts the images of the triplets a step consumes (3 per triplet), trained on or not. The
compute line prints the FLOPs of forward + backward per image (torch.utils.flop_counter) and the rate of a
large fp32 matmul on the same threads: their ratio bounds any step that does the original's work.
With --with_data the one-pass step also runs on batches from a DataLoader over real LFW images
(../shared/data/lfw_112), loading, decoding and augmenting included; the model-only figure is its ceiling.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_triplet  # noqa: E402
from devices import AMP_CHOICES, auto_amp, resolve_amp, resolve_device, usable_workers  # noqa: E402
from losses import TripletLoss  # noqa: E402
from models import build_model  # noqa: E402
from training.builders import build_optimizer  # noqa: E402
from training.step import backward_and_step  # noqa: E402

SHARED_LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw_112"


def synthetic_batches(batch_size: int, image_size: int, count: int):
    generator = torch.Generator().manual_seed(0)
    batch = [torch.randn(batch_size, 3, image_size, image_size, generator=generator) for _ in range(3)]
    for _ in range(count):
        yield batch


def synthetic_pk_batches(batch_size: int, image_size: int, count: int, images_per_identity: int):
    """(images, labels) batches of batch_size images, images_per_identity of each identity."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.arange(batch_size) // images_per_identity
    for _ in range(count):
        yield images, labels


def real_batches(batch_size: int, image_size: int, count: int, workers: int, tmp: Path):
    """Triplet batches decoded and augmented from the LFW images by the repository's own dataset."""
    from torch.utils.data import DataLoader

    from datasets.generate_csv_files import generate_csv
    from datasets.transforms import train_transform
    from datasets.triplet_dataset import TripletFaceDataset

    csv_path = tmp / "lfw.csv"
    generate_csv(SHARED_LFW, csv_path)
    dataset = TripletFaceDataset(
        SHARED_LFW, csv_path, batch_size * count, transform=train_transform(image_size)
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None,
        persistent_workers=workers > 0,
    )
    yield from loader


class OurStep:
    """train_triplet.py's step for pre-generated triplets, through the script's own functions.

    ``hard_fraction`` None: the hard rule decides; a number: that share of each batch's triplets is chosen
    (the first ones), so that the selection pass can be timed at the shares real training runs see.
    """

    def __init__(self, model, device, amp_dtype, selection_pass, hard_fraction=None, margin=0.2):
        self.model = model.to(device, memory_format=torch.channels_last)
        self.device, self.amp_dtype = device, amp_dtype
        self.optimizer = build_optimizer("adagrad", self.model.parameters(), 1e-3)
        self.task = SimpleNamespace(optimizers=[self.optimizer], before_optimizer_step=lambda: None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.loss_fn = TripletLoss(margin)
        self.chosen, self.offered = torch.zeros((), dtype=torch.float64, device=device), 0
        self.train_step = (
            train_triplet.select_then_train if selection_pass else train_triplet.masked_single_pass
        )
        self.select = (
            train_triplet.selection_rule(margin, "hard")
            if hard_fraction is None
            else first_share(hard_fraction)
        )

    def __call__(self, batch):
        images = torch.cat(batch).to(self.device, non_blocking=True, memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss, chosen = self.train_step(self.model, images, self.select, self.loss_fn)
        self.chosen += chosen  # no sync: read once, after the measurements
        self.offered += images.shape[0] // 3
        backward_and_step(self.task, loss, self.scaler)
        return loss.detach()


class DefaultStep:
    """train_triplet.py's default step: batch-all mining over a P x K batch of --batch_size images, with the
    script's default optimizer, lr and margin, channels_last and the --amp precision."""

    def __init__(self, model, device, amp_dtype, defaults: argparse.Namespace):
        self.model = model.to(device, memory_format=torch.channels_last)
        self.device, self.amp_dtype = device, amp_dtype
        self.optimizer = build_optimizer(
            defaults.optimizer, self.model.parameters(), defaults.lr, defaults.weight_decay
        )
        self.task = SimpleNamespace(optimizers=[self.optimizer], before_optimizer_step=lambda: None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.loss_fn = TripletLoss(defaults.margin)
        self.rule, self.margin = defaults.triplet_selection, defaults.margin

    def __call__(self, batch):
        images, labels = batch
        images = images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            embeddings = self.model(images)
        loss, _ = train_triplet.online_triplet_loss(embeddings, labels, self.rule, self.margin, self.loss_fn)
        backward_and_step(self.task, loss, self.scaler)
        return loss.detach()


def images_of(batch) -> int:
    """Images a batch feeds the model: a (images, labels) P x K batch, or three triplet tensors."""
    if len(batch) == 2 and batch[1].ndim == 1:
        return int(batch[0].shape[0])
    return 3 * int(batch[0].shape[0])


def first_share(fraction: float):
    def select(anchor, positive, negative):
        mask = torch.zeros(anchor.shape[0], dtype=torch.bool, device=anchor.device)
        mask[: max(1, round(fraction * anchor.shape[0]))] = True
        return mask

    return select


class OriginalStep:
    """The seed repository's step, rewritten here from its description (fp32, NCHW, three passes)."""

    def __init__(self, model, device, margin=0.2):
        self.model = model.to(device)
        self.device, self.margin = device, margin
        self.optimizer = build_optimizer("adagrad", self.model.parameters(), 1e-3)

    def __call__(self, batch):
        anchor_images, positive_images, negative_images = (t.to(self.device) for t in batch)
        anchor = self.model(anchor_images)
        positive = self.model(positive_images)
        negative = self.model(negative_images)
        positive_distances = F.pairwise_distance(anchor, positive)
        negative_distances = F.pairwise_distance(anchor, negative)
        hard = np.where((negative_distances - positive_distances < self.margin).cpu().numpy().flatten())[0]
        loss = TripletLoss(self.margin)(anchor[hard], positive[hard], negative[hard])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, batches, device, warmup: int) -> float:
    """Images/s over the batches after ``warmup``, timed to the device's completion."""
    seconds, images = [], 0
    for index, batch in enumerate(batches):
        if index == warmup and isinstance(step, OurStep):
            step.chosen.zero_()  # the share of hard triplets over the timed steps only
            step.offered = 0
        synchronize(device)
        started = time.perf_counter()
        step(batch)
        synchronize(device)
        if index >= warmup:
            seconds.append(time.perf_counter() - started)
            images += images_of(batch)
    return images / sum(seconds)


def measure_pipeline(step, batches, device, warmup: int) -> float:
    """Images/s of the whole loop (loading included), from the end of warm-up to the last step's completion."""
    images = 0
    started = None
    for index, batch in enumerate(batches):
        if index == warmup:
            synchronize(device)
            started = time.perf_counter()
        step(batch)
        if index >= warmup:
            images += 3 * batch[0].shape[0]
    synchronize(device)
    return images / (time.perf_counter() - started)


def flops_per_image(model_name: str, image_size: int) -> tuple[float, float]:
    """FLOPs of (forward + backward, forward alone) per image, counted by torch on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(model_name, 128).train()
    images = torch.randn(4, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    train = counter.get_total_flops() / 4
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return train, counter.get_total_flops() / 4


def matmul_flops_per_second(device, size: int = 4096, repeats: int = 5, dtype=torch.float32) -> float:
    """The best of a few size x size matmuls in ``dtype``: a practical peak for this device and thread count."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--image_size", type=int, nargs="+", default=[160])
    parser.add_argument(
        "--batch_size",
        type=int,
        default=64,
        help="train_triplet.py's --batch_size (its default): triplets a step for the original's and the "
        "hard-rule steps, images a step (P x K) for the default batch-all step",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating measurements of each; median kept"
    )
    parser.add_argument(
        "--hard_shares",
        type=float,
        nargs="*",
        default=[0.5, 0.25, 0.1],
        help="shares of hard triplets to time the selection pass at",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", choices=AMP_CHOICES)
    parser.add_argument("--with_data", action="store_true", help="also measure with real data loading")
    parser.add_argument("--num_workers", type=int, default=None)
    return parser


def print_setup(args, device, amp_dtype) -> None:
    """One line: the device, the precision and the batch and step counts measured."""
    where = torch.cuda.get_device_name(device) + " GPU" if device.type == "cuda" else f"{os.cpu_count()} CPUs"
    print(
        f"device {device} ({where}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"ours: amp {amp_dtype}, channels_last; batch {args.batch_size} triplets "
        f"({3 * args.batch_size} images) a step, {args.steps} timed steps after {args.warmup} warm-up, "
        f"median of {args.repeats}"
    )
    if args.amp == "auto":
        print(f"--amp auto chose {auto_amp(device)[1]}")


def print_table_header(with_data: bool) -> None:
    print(
        "| model | px | step | hard triplets | img/s | speed-up |"
        + (" with data img/s | of ceiling |" if with_data else "")
    )
    print("| --- | ---: | --- | ---: | ---: | ---: |" + (" ---: | ---: |" if with_data else ""))


def step_makers(hard_shares, device, amp_dtype) -> dict:
    """{(step name, hard triplets): model -> step}, the original's first (the speed-ups are relative to it)."""
    defaults = train_triplet.get_args_parser().parse_args([])
    train_triplet.resolve_batch_composition(defaults)
    makers = {
        ("original: fp32, NCHW, three passes", "rule"): lambda model: OriginalStep(model, device),
        (
            f"ours, default: {defaults.triplet_selection}, {defaults.optimizer}",
            "all in batch",
        ): lambda model: DefaultStep(model, device, amp_dtype, defaults),
        ("ours, hard rule, one pass", "rule"): lambda model: OurStep(model, device, amp_dtype, False),
        ("ours, selection pass (--selection_pass)", "rule"): lambda model: OurStep(
            model, device, amp_dtype, True
        ),
    }
    for share in hard_shares:
        makers[("ours, selection pass (--selection_pass)", f"{share:.0%}")] = lambda model, share=share: (
            OurStep(model, device, amp_dtype, True, hard_fraction=share)
        )
    return makers


def time_steps(makers: dict, args, image_size: int, device):
    """Median images/s of each step on synthetic batches, the hard rule's shares, and a one-pass step.

    The one-pass step (of the last repeat) is kept for the measurement with data; None without --with_data.
    """
    rates = {key: [] for key in makers}
    shares: dict[tuple, str] = {}
    with_data_step = None
    count = args.warmup + args.steps
    for _ in range(args.repeats):  # alternate, so drifting machine load hits all alike
        for key, make in makers.items():
            # one model alive at a time, built afresh from the same seed, so that no step runs
            # beside the memory of the others
            torch.manual_seed(0)
            step = make(build_model(args.model, 128))
            if isinstance(step, DefaultStep):
                batches = synthetic_pk_batches(args.batch_size, image_size, count, images_per_identity=4)
            else:
                batches = synthetic_batches(args.batch_size, image_size, count)
            rates[key].append(measure(step, batches, device, args.warmup))
            if key[1] == "rule" and isinstance(step, OurStep):  # what the rule kept while timed
                shares[key] = f"rule: {step.chosen.item() / step.offered:.0%}"
            if args.with_data and "one pass" in key[0]:
                with_data_step = step
            del step
            gc.collect()
    medians = {key: statistics.median(values) for key, values in rates.items()}
    return medians, shares, with_data_step


def measure_with_data(step, args, image_size: int, workers: int, device) -> float:
    """Images/s of `step` on batches loaded, decoded and augmented from the LFW images."""
    count = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        batches = real_batches(args.batch_size, image_size, 4 * count, workers, Path(tmp))
        return measure_pipeline(step, batches, device, args.warmup)


def print_compute(image_size, train_flops, forward_flops, peaks: dict, original_rate, rates: dict) -> None:
    """How close the original and our steps come to the FLOP bounds that the matmul peaks set."""
    fp32 = peaks[torch.float32]
    print(
        f"compute at {image_size} px: {train_flops / 1e9:.2f} GFLOP per image forward + backward "
        f"({forward_flops / 1e9:.2f} forward alone); fp32 matmul peak {fp32 / 1e9:.0f} GFLOP/s, so an fp32 "
        f"step doing the original's work cannot pass {fp32 / train_flops:.1f} img/s = "
        f"{fp32 / train_flops / original_rate:.2f}x the original, which reached "
        f"{original_rate * train_flops / fp32:.0%} of that peak",
        flush=True,
    )
    for dtype, peak in peaks.items():
        if dtype == torch.float32:
            continue
        print(
            f"{dtype} matmul peak {peak / 1e9:.0f} GFLOP/s: a step doing that work in {dtype} cannot pass "
            f"{peak / train_flops:.1f} img/s = {peak / train_flops / original_rate:.2f}x the original; "
            + "; ".join(f"{name} reached {rate * train_flops / peak:.0%}" for name, rate in rates.items()),
            flush=True,
        )


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    workers = args.num_workers if args.num_workers is not None else usable_workers(16)
    print_setup(args, device, amp_dtype)
    # measured again after each size; the higher one counts
    dtypes = [torch.float32] + ([amp_dtype] if amp_dtype is not None else [])
    peaks = {dtype: matmul_flops_per_second(device, dtype=dtype) for dtype in dtypes}
    print_table_header(args.with_data)
    for image_size in args.image_size:
        train_flops, forward_flops = flops_per_image(args.model, image_size)
        makers = step_makers(args.hard_shares, device, amp_dtype)
        medians, shares, with_data_step = time_steps(makers, args, image_size, device)
        original_rate = next(iter(medians.values()))
        one_pass_key = next(key for key in makers if "one pass" in key[0])
        ours = {  # the steps that do the work they are given (not the selection pass on its easy batch)
            key[0]: rate
            for key, rate in list(medians.items())[1:]
            if key[1] in ("rule", "all in batch") and "selection pass" not in key[0]
        }
        for key, rate in medians.items():
            row = (
                f"| {args.model} | {image_size} | {key[0]} | {shares.get(key, key[1])} | {rate:.1f} "
                f"| {rate / original_rate:.2f}x |"
            )
            if args.with_data and key == one_pass_key:
                with_data = measure_with_data(with_data_step, args, image_size, workers, device)
                row += f" {with_data:.1f} | {with_data / rate:.2f} |"
            elif args.with_data:
                row += " | |"
            print(row, flush=True)
        peaks = {
            dtype: max(peak, matmul_flops_per_second(device, dtype=dtype)) for dtype, peak in peaks.items()
        }
        print_compute(image_size, train_flops, forward_flops, peaks, original_rate, ours)


if __name__ == "__main__":
    main()
