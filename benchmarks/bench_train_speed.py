"""Triplet-training throughput: this repository's training step against the original's, in one run.

    python benchmarks/bench_train_speed.py                        # ResNet-34 at 160 px on this machine
    python benchmarks/bench_train_speed.py --device cuda --image_size 160 224 --with_data

"Ours" is the step train_triplet.py runs (TripletTask.step + the Trainer's optimizer step): one forward
pass over anchors, positives and negatives together, channels_last, mixed precision as --amp auto chooses
for the device, the selection as a mask (no device sync). "Original" is the seed repository's step: fp32,
NCHW, three forward passes, hard triplets picked through a numpy round trip, then the loss on them.

Images/s counts every image that went through forward and backward (3 per triplet). With --with_data the
batches come from a DataLoader over real LFW images (../shared/data/lfw_112) instead of tensors already in
memory, so the number includes decoding and augmentation; the model-only figure is the ceiling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_common  # noqa: E402
from losses import TripletLoss, triplet_selection_mask  # noqa: E402
from models import build_model  # noqa: E402

SHARED_LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw_112"


def synthetic_batches(batch_size: int, image_size: int, count: int):
    generator = torch.Generator().manual_seed(0)
    batch = [torch.randn(batch_size, 3, image_size, image_size, generator=generator) for _ in range(3)]
    for _ in range(count):
        yield batch


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
    def __init__(self, model, device, amp_dtype, margin=0.2):
        self.model = model.to(device, memory_format=torch.channels_last)
        self.device, self.amp_dtype, self.margin = device, amp_dtype, margin
        self.optimizer = train_common.build_optimizer("adagrad", self.model.parameters(), 1e-3)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.loss_fn = TripletLoss(margin)

    def __call__(self, batch):
        images = torch.cat(batch).to(self.device, non_blocking=True, memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            anchor, positive, negative = self.model(images).chunk(3)
            mask = triplet_selection_mask(anchor, positive, negative, self.margin)
            loss = self.loss_fn(anchor, positive, negative, mask=mask)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class OriginalStep:
    """The seed repository's step, rewritten here from its description (fp32, NCHW, three passes)."""

    def __init__(self, model, device, margin=0.2):
        self.model = model.to(device)
        self.device, self.margin = device, margin
        self.optimizer = train_common.build_optimizer("adagrad", self.model.parameters(), 1e-3)

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
        synchronize(device)
        started = time.perf_counter()
        step(batch)
        synchronize(device)
        if index >= warmup:
            seconds.append(time.perf_counter() - started)
            images += 3 * batch[0].shape[0]
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


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--image_size", type=int, nargs="+", default=[160])
    parser.add_argument("--batch_size", type=int, default=32, help="triplets per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating measurements of each; median kept"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", choices=train_common.AMP_CHOICES)
    parser.add_argument("--with_data", action="store_true", help="also measure with real data loading")
    parser.add_argument("--num_workers", type=int, default=None)
    args = parser.parse_args(argv)

    device = train_common.resolve_device(args.device)
    amp_dtype = train_common.resolve_amp(args.amp, device)
    workers = args.num_workers if args.num_workers is not None else train_common.usable_workers(16)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else os.cpu_count()} "
        f"{'GPU' if device.type == 'cuda' else 'CPUs'}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"ours: amp {amp_dtype}, channels_last, one pass; batch {args.batch_size} triplets"
    )
    print(
        "| model | px | original img/s | ours img/s | speed-up |"
        + (" ours with data img/s | of ceiling |" if args.with_data else "")
    )
    print("| --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if args.with_data else ""))
    for image_size in args.image_size:
        torch.manual_seed(0)
        ours = OurStep(build_model(args.model, 128), device, amp_dtype)
        original = OriginalStep(build_model(args.model, 128), device)
        ours_rates, original_rates = [], []
        count = args.warmup + args.steps
        for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
            original_rates.append(
                measure(original, synthetic_batches(args.batch_size, image_size, count), device, args.warmup)
            )
            ours_rates.append(
                measure(ours, synthetic_batches(args.batch_size, image_size, count), device, args.warmup)
            )
        ours_rate, original_rate = statistics.median(ours_rates), statistics.median(original_rates)
        row = f"| {args.model} | {image_size} | {original_rate:.1f} | {ours_rate:.1f} | {ours_rate / original_rate:.2f}x |"
        if args.with_data:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                batches = real_batches(args.batch_size, image_size, 4 * count, workers, Path(tmp))
                with_data = measure_pipeline(ours, batches, device, args.warmup)
            row += f" {with_data:.1f} | {with_data / ours_rate:.2f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
