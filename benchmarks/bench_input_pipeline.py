"""Images per second that one data-loader worker delivers, uint8 (today's path) against float32 (the old one).

    python benchmarks/bench_input_pipeline.py [--sizes 112 160 224] [--gpu_images_per_second 2500]

One worker process (DataLoader, num_workers=1, batch 64, the training augmentation of
datasets/transforms.py on the shared LFW crops, decoded with PIL) runs for --seconds per setting; the
rate counts the batches the main process receives, so pickling through shared memory is included. The uint8
path stops at `PILToTensor` and leaves normalisation to the device (training/data.py ImagesToDevice); the
float path ends with `ToNormalizedTensor` as the workers did before. The table also gives the bytes per
image crossing shared memory and the host-to-device copy, and, for a model-only GPU rate (measure it with
benchmarks/gpu_check.sh; pass it with --gpu_images_per_second), how many workers keep that GPU fed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.data import DataLoader

from datasets.generate_csv_files import generate_csv
from datasets.labelled_faces import LabelledFaceDataset
from datasets.transforms import train_transform

SHARED_LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw_112"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 160, 224], help="input sides in pixels")
    parser.add_argument("--seconds", type=float, default=12.0, help="measured time per setting")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--gpu_images_per_second", type=float, default=None,
                        help="a model-only training rate to size the workers for (from gpu_check.sh)")  # fmt: skip
    parser.add_argument("--lfw", type=Path, default=SHARED_LFW)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/bench_input_pipeline"))
    return parser


def worker_rate(dataset, batch_size: int, seconds: float) -> float:
    """Images per second one worker delivers to the main process (after a warm-up batch)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=1, prefetch_factor=4,
                        persistent_workers=False, generator=torch.Generator().manual_seed(0))  # fmt: skip
    images, started = 0, None
    while True:
        for batch, _ in loader:
            if started is None:
                started = time.perf_counter()
                continue
            images += batch.shape[0]
            if time.perf_counter() - started >= seconds:
                return images / (time.perf_counter() - started)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    csv_path = args.work_dir / "lfw.csv"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if not csv_path.is_file():
        generate_csv(args.lfw, csv_path)
    print(f"python benchmarks/bench_input_pipeline.py {' '.join(sys.argv[1:])}".rstrip())
    print("\n| size | path | img/s per worker | bytes per image | workers for the GPU rate |")
    print("|---:|---|---:|---:|---:|")
    for size in args.sizes:
        for label, normalize in (("uint8 (now)", False), ("float32 (before)", True)):
            transform = train_transform(size, normalize=normalize)
            dataset = LabelledFaceDataset(args.lfw, csv_path, transform=transform)
            rate = worker_rate(dataset, args.batch_size, args.seconds)
            per_image = 3 * size * size * (4 if normalize else 1)
            needed = (
                "-"
                if args.gpu_images_per_second is None
                else str(math.ceil(args.gpu_images_per_second / rate))
            )
            print(f"| {size} | {label} | {rate:,.0f} | {per_image:,} | {needed} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
