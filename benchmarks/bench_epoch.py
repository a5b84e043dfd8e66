"""One whole training epoch, the original repository's code path against `train_triplet.py` from its defaults.

    python benchmarks/bench_epoch.py                      # 640 triplets' worth of images, LFW crops
    python benchmarks/bench_epoch.py --num_triplets 320 --repeats 2

Equal work: the same images (../shared/data/lfw_112), the same model, image size, batch size and data workers
(train_triplet.py's defaults, read from its parser), and the same number of images through the network:
the original trains on N pre-generated triplets (3N images, --batch_size triplets = 3 x --batch_size images a
step); ours on 3N images mined online (--batch_size images a step, --num_triplets_train 3N).

- "original" is the seed's epoch as this repository reads its code (rewritten here, not copied): random
  triplets drawn one by one in Python, a Dataset that opens each image with PIL and runs torchvision's
  Resize, RandomHorizontalFlip, RandomRotation(5), ToTensor, Normalize, a DataLoader handing float32 triplet
  batches to the main process, then per batch three forward passes in fp32 NCHW, the hard triplets picked
  through numpy, the loss on them, backward and an Adagrad step (benchmarks/bench_train_speed.OriginalStep).
- "ours" is `train_triplet.py` itself, run as a subprocess with only the data paths, --epochs 1 and
  --num_triplets_train set: everything else (selection rule, optimizer, precision, workers, uint8 batches
  normalised on the device) is what a user gets. Its epoch time is the script's own `epoch_seconds`
  (training_log.csv): loading, augmentation and every step, not the start-up or the validation after it.

Both clocks start when the epoch's first batch is asked for and stop after its last step, so the data
workers' start-up is inside both. The original's triplet generation is timed apart (the original paid it
before every epoch; ours needs none online) and is not in its epoch time. The two run in turn, --repeats
rounds, median kept. The compute line gives the ceiling: FLOPs per image (forward + backward) against the
fastest fp32 and bf16 matrix products of this machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_triplet  # noqa: E402
from benchmarks.bench_train_speed import OriginalStep, flops_per_image, matmul_flops_per_second  # noqa: E402
from datasets.generate_csv_files import generate_csv  # noqa: E402
from devices import auto_amp, resolve_device, usable_workers  # noqa: E402
from models import build_model  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
ORIGINAL_MEAN, ORIGINAL_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def original_triplets(paths_by_class: list[list[str]], num_triplets: int, seed: int) -> list[tuple]:
    """Random triplets one at a time, as the original's generator: a class with two images or more for the
    anchor and positive, another class for the negative."""
    rng = np.random.default_rng(seed)
    with_pairs = [index for index, paths in enumerate(paths_by_class) if len(paths) >= 2]
    triplets = []
    for _ in range(num_triplets):
        positive_class = with_pairs[rng.integers(len(with_pairs))]
        negative_class = positive_class
        while negative_class == positive_class:
            negative_class = int(rng.integers(len(paths_by_class)))
        anchor, positive = rng.choice(len(paths_by_class[positive_class]), 2, replace=False)
        negative = rng.integers(len(paths_by_class[negative_class]))
        triplets.append(
            (
                paths_by_class[positive_class][anchor],
                paths_by_class[positive_class][positive],
                paths_by_class[negative_class][negative],
            )
        )
    return triplets


class OriginalTripletDataset(Dataset):
    """Each item: three images opened with PIL and transformed to float32 tensors, in a dict."""

    def __init__(self, triplets: list[tuple], image_size: int):
        self.triplets = triplets
        self.transform = transforms.Compose(
            [
                transforms.Resize(size=image_size),
                transforms.RandomHorizontalFlip(),
                transforms.RandomRotation(degrees=5),
                transforms.ToTensor(),
                transforms.Normalize(mean=ORIGINAL_MEAN, std=ORIGINAL_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, index: int) -> dict:
        names = ("anc_img", "pos_img", "neg_img")
        return {
            name: self.transform(Image.open(path).convert("RGB"))
            for name, path in zip(names, self.triplets[index], strict=True)
        }


def images_by_class(root: Path) -> list[list[str]]:
    classes = sorted(path for path in root.iterdir() if path.is_dir())
    return [sorted(str(image) for image in folder.iterdir()) for folder in classes]


def run_original(args, defaults, workers: int) -> dict:
    """The original's epoch: generation (timed apart), then loading, augmentation and steps."""
    started = time.perf_counter()
    triplets = original_triplets(images_by_class(args.lfw_dir), args.num_triplets, seed=0)
    generation = time.perf_counter() - started
    loader = DataLoader(
        OriginalTripletDataset(triplets, defaults.image_size),
        batch_size=defaults.batch_size,
        num_workers=workers,
        shuffle=False,
    )
    torch.manual_seed(0)
    model = build_model(defaults.model, defaults.embedding_dim).train()
    step = OriginalStep(model, torch.device("cpu"), margin=defaults.margin)
    images = 0
    started = time.perf_counter()
    for batch in loader:
        step((batch["anc_img"], batch["pos_img"], batch["neg_img"]))
        images += 3 * batch["anc_img"].shape[0]
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "images": images, "generation_seconds": generation}


def small_pairs_file(lfw_dir: Path, pairs_path: Path, out: Path) -> Path:
    """The first 3 matched and 3 mismatched pairs of each fold: the validation after ours' epoch stays cheap."""
    lines = [line for line in pairs_path.read_text().splitlines() if line.strip()]
    num_folds, per_kind = (int(field) for field in lines[0].split())
    keep = []
    for fold in range(num_folds):
        block = lines[1 + fold * 2 * per_kind : 1 + (fold + 1) * 2 * per_kind]
        keep += block[:3] + block[per_kind : per_kind + 3]
    out.write_text(f"{num_folds}\t3\n" + "\n".join(keep) + "\n")
    return out


def run_ours(args, work: Path, round_index: int) -> dict:
    """train_triplet.py from its defaults for one epoch of 3 x --num_triplets images; its own epoch time."""
    output_dir = work / f"ours_{round_index}"
    argv = [
        sys.executable, str(REPO / "train_triplet.py"),
        "--dataroot", str(args.lfw_dir), "--dataset_csv", str(work / "lfw.csv"),
        "--lfw", str(args.lfw_dir), "--lfw_pairs", str(work / "pairs_small.txt"),
        "--epochs", "1", "--num_triplets_train", str(3 * args.num_triplets), "--output_dir", str(output_dir),
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"train_triplet.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    with open(output_dir / "training_log.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    log = (output_dir / "train.log").read_text()
    amp = re.search(r"--amp auto chose ([^;]+)", log)
    steps = -(-3 * args.num_triplets // args.defaults.batch_size)
    return {
        "seconds": float(row["epoch_seconds"]),
        "images": steps * args.defaults.batch_size,
        "amp": amp.group(1) if amp else "",
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="One training epoch: the original's code path against train_triplet.py's defaults.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--num_triplets", type=int, default=640, help="the original's triplets (3x images)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds of both sides, taking turns to go first; median kept"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "benchmarks" / "results" / "epoch.json",
        help="JSON record of the command, every round and the summary",
    )
    parser.add_argument(
        "--lfw_dir", type=Path, default=SHARED_DATA / "lfw_112", help="images, one folder each"
    )
    parser.add_argument(
        "--lfw_pairs", type=Path, default=SHARED_DATA / "lfw_pairs.txt", help="LFW pairs file"
    )
    return parser


def print_report(args, workers: int, originals: list[dict], ours: list[dict]) -> dict:
    defaults = args.defaults
    original_rate = statistics.median(run["images"] / run["seconds"] for run in originals)
    our_rate = statistics.median(run["images"] / run["seconds"] for run in ours)
    generation = statistics.median(run["generation_seconds"] for run in originals)
    print(
        f"{defaults.model} at {defaults.image_size} px, batch {defaults.batch_size}, {workers} data workers, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"median of {args.repeats}"
    )
    print(f"ours: --amp auto chose {ours[0]['amp'] or '(not logged)'}")
    print("| epoch | images | seconds | img/s | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(
        f"| original: Python triplets, PIL + float32 batches, fp32 NCHW, three passes, Adagrad "
        f"| {originals[0]['images']} | {statistics.median(r['seconds'] for r in originals):.1f} "
        f"| {original_rate:.1f} | 1.00x |"
    )
    print(
        f"| ours: `train_triplet.py` defaults ({defaults.triplet_selection}, {defaults.optimizer}) "
        f"| {ours[0]['images']} | {statistics.median(r['seconds'] for r in ours):.1f} | {our_rate:.1f} "
        f"| {our_rate / original_rate:.2f}x |"
    )
    print(
        f"(the original also spent {generation:.2f} s generating its {args.num_triplets} triplets, not counted)"
    )
    train_flops, _ = flops_per_image(defaults.model, defaults.image_size)
    device = torch.device("cpu")
    fp32_peak = matmul_flops_per_second(device)
    bf16_peak = matmul_flops_per_second(device, dtype=torch.bfloat16)
    print(
        f"compute: {train_flops / 1e9:.2f} GFLOP per image forward + backward; matmul peaks fp32 "
        f"{fp32_peak / 1e9:.0f}, bf16 {bf16_peak / 1e9:.0f} GFLOP/s: at those peaks {fp32_peak / train_flops:.1f} "
        f"and {bf16_peak / train_flops:.1f} img/s; the original's epoch ran at "
        f"{original_rate * train_flops / fp32_peak:.0%} of the fp32 peak, ours at "
        f"{our_rate * train_flops / bf16_peak:.0%} of the bf16 peak"
    )
    return {
        "original_images_per_second": original_rate,
        "ours_images_per_second": our_rate,
        "speedup": our_rate / original_rate,
        "gflop_per_image": train_flops / 1e9,
        "matmul_gflops": {"fp32": fp32_peak / 1e9, "bf16": bf16_peak / 1e9},
    }


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    for path in (args.lfw_dir, args.lfw_pairs):
        if not path.exists():
            raise SystemExit(f"{path}: not found (see ../shared/data/README)")
    args.defaults = train_triplet.get_args_parser().parse_args([])
    train_triplet.resolve_batch_composition(args.defaults)
    workers = usable_workers(args.defaults.num_workers, 1)
    device = resolve_device("auto")
    if device.type != "cpu":
        raise SystemExit("this benchmark compares CPU epochs; run it on a machine without a GPU")
    print(f"--amp auto on this CPU: {auto_amp(device)[1]}")
    originals, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generate_csv(args.lfw_dir, work / "lfw.csv")
        small_pairs_file(args.lfw_dir, args.lfw_pairs, work / "pairs_small.txt")
        for round_index in range(args.repeats):
            # the sides take turns to go first, so neither always meets a cold page cache or a warm process
            sides = ("original", "ours") if round_index % 2 == 0 else ("ours", "original")
            for side in sides:
                if side == "original":
                    originals.append(run_original(args, args.defaults, workers))
                else:
                    ours.append(run_ours(args, work, round_index))
                seconds = (originals if side == "original" else ours)[-1]["seconds"]
                print(f"round {round_index + 1}: {side} {seconds:.1f} s", flush=True)
    summary = print_report(args, workers, originals, ours)
    record = {
        "command": "python benchmarks/bench_epoch.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "data_workers": workers,
        "rounds": {"original": originals, "ours": ours},
        **summary,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
