"""Benchmark a RecordIO .rec against a folder of JPEGs at ~100,000 images: listing the dataset, and loading it.

    python benchmarks/bench_recordio.py [--work_dir DIR] [--repetitions 13] [--num_loaded 3000]

1. The 7,701 LFW crops of ../shared/data/lfw_112 are repeated `--repetitions` times (hard links, or copies
   where links fail) into identity folders `<Name>_rNN`: 13 repetitions give 100,113 images of 55,653
   identities, about VGGFace2's images per identity (the folders are small, the file count is what matters).
   The folder is then packed with `write_recordio` (timed, for reference).
2. Listing: the folder route is `generate_csv` (walk every identity folder) + `read_face_csv`, and
   `read_face_csv` alone (a CSV made beforehand); the .rec route is `RecordIOFaceDataset(...)`: parse the .idx
   and read every label from the record headers.
3. Loading: images per second through a DataLoader (batch 64) with `num_workers` 0 and 1, the training
   transform `train_transform(112)`, one torch thread per process, over the same `--num_loaded` random rows,
   from `LabelledFaceDataset` (one JPEG file per image) and from `RecordIOFaceDataset` (positioned reads in
   one file). The rate is timed from the first batch on, so worker start-up is left out.

The files were just written, so both routes read from a warm page cache: the numbers compare the per-file
costs (open, stat, directory look-ups) with positioned reads in one file, not the disk. On a cold disk, or a
network file system, the gap in listing and loading is wider. Times are the best of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def build_tree(source: Path, root: Path, repetitions: int) -> tuple[int, int, str]:
    """Repeat every identity folder of `source` into `root`; (images, identities, 'hard links' / 'copies')."""
    names = sorted(entry.name for entry in os.scandir(source) if entry.is_dir())
    files = {name: sorted(os.listdir(source / name)) for name in names}
    how = "hard links"
    num_images = 0
    for repetition in range(repetitions):
        for name in names:
            folder = root / f"{name}_r{repetition:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for file_name in files[name]:
                target = folder / file_name
                if not target.exists():
                    try:
                        os.link(source / name / file_name, target)
                    except OSError:
                        shutil.copyfile(source / name / file_name, target)
                        how = "copies"
                num_images += 1
    return num_images, repetitions * len(names), how


def best_time(function, repeats: int):
    """(best wall seconds, result of the last run)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def images_per_second(dataset, rows, num_workers: int, batch_size: int) -> float:
    import torch
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(
        Subset(dataset, rows),
        batch_size=batch_size,
        num_workers=num_workers,
        worker_init_fn=lambda _: torch.set_num_threads(1),
    )
    batches = iter(loader)
    next(batches)  # the first batch includes the worker's start-up
    start, count = time.perf_counter(), 0
    for images, _ in batches:
        count += len(images)
    return count / (time.perf_counter() - start)


def format_table(rows) -> str:
    lines = ["| measurement | folder of JPEGs | .rec | .rec / folder |", "|---|---|---|---|"]
    for name, folder, rec, unit, higher_is_better in rows:
        ratio = rec / folder if higher_is_better else folder / rec
        better = "faster" if ratio >= 1.005 else "slower" if ratio <= 0.995 else "same"
        digits = 0 if unit == "img/s" else 3
        lines.append(
            f"| {name} | {folder:,.{digits}f} {unit} | {rec:,.{digits}f} {unit} | {ratio:.2f}x {better} |"
        )
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work_dir", type=Path, default=None, help="where to build; kept (default: a temporary folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--repetitions", type=int, default=13, help="copies of LFW (13 -> 100,113 images)")
    parser.add_argument("--num_loaded", type=int, default=3000, help="random images loaded per rate")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="runs per timing; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def build_and_pack(root: Path, rec_path: Path, repetitions: int) -> tuple[int, float]:
    """Build the repeated LFW tree and pack it into `rec_path` afresh; (images, seconds the pack took)."""
    from datasets.recordio_writer import write_recordio

    start = time.perf_counter()
    num_images, num_identities, how = build_tree(SHARED_DATA / "lfw_112", root, repetitions)
    seconds = time.perf_counter() - start
    print(f"built {root}: {num_images:,} images of {num_identities:,} identities ({how}) in {seconds:.1f} s")
    start = time.perf_counter()
    rec_path.unlink(missing_ok=True)
    rec_path.with_suffix(".idx").unlink(missing_ok=True)
    write_recordio(root, rec_path)
    pack_seconds = time.perf_counter() - start
    print(f"packed {rec_path} ({rec_path.stat().st_size / 1e6:,.0f} MB) in {pack_seconds:.1f} s", flush=True)
    return num_images, pack_seconds


def time_listing(root: Path, csv_path: Path, rec_path: Path, num_images: int, repeats: int):
    """Best seconds of each way to list the dataset; also the opened .rec dataset, reused for loading."""
    from datasets.face_table import read_face_csv
    from datasets.generate_csv_files import generate_csv
    from datasets.recordio import RecordIOFaceDataset

    walk_and_read, _ = best_time(
        lambda: (generate_csv(root, csv_path), read_face_csv(root, csv_path)), repeats
    )
    read_only, table = best_time(lambda: read_face_csv(root, csv_path), repeats)
    open_rec, rec_dataset = best_time(lambda: RecordIOFaceDataset(rec_path), repeats)
    assert len(rec_dataset) == len(table.paths) == num_images
    print(
        f"listing: walk + csv {walk_and_read:.2f} s, csv {read_only:.2f} s, .rec {open_rec:.3f} s",
        flush=True,
    )
    return {"walk_and_read": walk_and_read, "read_only": read_only, "open_rec": open_rec}, rec_dataset


def loading_rates(root: Path, csv_path: Path, rec_dataset, num_images: int, args) -> dict:
    """Best images/s of each route with 0 and 1 workers, over the same random rows: {(route, workers): rate}."""
    import numpy as np

    from datasets.labelled_faces import LabelledFaceDataset
    from datasets.transforms import train_transform

    transform = train_transform(112)
    folder_dataset = LabelledFaceDataset(root, csv_path, transform=transform)
    rec_dataset.transform = transform
    rows = np.random.default_rng(args.seed).choice(num_images, size=args.num_loaded, replace=False).tolist()
    rates = {}
    for num_workers in (0, 1):
        for name, dataset in (("folder", folder_dataset), ("rec", rec_dataset)):
            rate = max(
                images_per_second(dataset, rows, num_workers, args.batch_size) for _ in range(args.repeats)
            )
            rates[name, num_workers] = rate
            print(f"{name}, num_workers={num_workers}: {rate:,.0f} images/s", flush=True)
    return rates


def summary_rows(num_images: int, listing: dict, rates: dict) -> list[tuple]:
    """The rows of the final table: (measurement, folder value, .rec value, unit, higher is better)."""
    open_rec = listing["open_rec"]
    return [
        (
            f"list {num_images:,} images: walk + CSV / .rec index + labels",
            listing["walk_and_read"],
            open_rec,
            "s",
            False,
        ),
        ("list: CSV made beforehand / .rec index + labels", listing["read_only"], open_rec, "s", False),
        ("load + train_transform(112), num_workers=0", rates["folder", 0], rates["rec", 0], "img/s", True),
        ("load + train_transform(112), num_workers=1", rates["folder", 1], rates["rec", 1], "img/s", True),
    ]


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    import torch

    torch.set_num_threads(1)
    # a --work_dir is the user's and stays; a temporary one goes unless --keep
    temporary = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="bench-recordio-") if temporary else args.work_dir)
    root, csv_path, rec_path = work_dir / "faces", work_dir / "faces.csv", work_dir / "faces.rec"
    try:
        num_images, pack_seconds = build_and_pack(root, rec_path, args.repetitions)
        listing, rec_dataset = time_listing(root, csv_path, rec_path, num_images, args.repeats)
        rates = loading_rates(root, csv_path, rec_dataset, num_images, args)
        command = " ".join(
            ["python", "benchmarks/bench_recordio.py", *(argv if argv is not None else sys.argv[1:])]
        )
        print()
        print(f"`{command}` ({os.cpu_count()} CPUs, warm page cache; pack took {pack_seconds:.0f} s)\n")
        print(format_table(summary_rows(num_images, listing, rates)))
    finally:
        if temporary and not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
