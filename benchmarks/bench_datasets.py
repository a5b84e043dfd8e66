"""Benchmark the data pipeline: CSV indexing + triplet generation at VGGFace2 scale, LFW indexing, decoding.

    python benchmarks/bench_datasets.py

1. A CSV with VGGFace2's exact shape (3,311,286 rows, 9,131 identities, from the `Sample_Num` column of
   ../shared/data/vggface2_identity_meta.csv) is written once to a temporary folder; then read_face_csv, the
   generation of 1,100,000 triplets alone, and the whole TripletFaceDataset (read + generate + save) are timed.
2. LFWDataset on ../shared/data/lfw_112 with ../shared/data/lfw_pairs.txt.
3. Decode + transform throughput of one worker (torch.set_num_threads(1), as in a DataLoader worker) on the
   LFW crops, PIL vs torchvision.io.decode_image, at 112 and 160 px, for the train and eval transforms.

Each stage runs in a fresh process, so "peak MB" is that stage's own peak resident memory above the process's
memory once the imports are done (ru_maxrss). Times are the best of --repeats runs; "cpu s" is the process CPU
time of that run (the wall time also counts waiting for the CPU when other programs share the machine), and
decode rates are images per CPU second: what one DataLoader worker does with a core of its own.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
NUM_TRIPLETS = 1_100_000


def write_vggface2_shaped_csv(meta_path: Path, csv_path: Path) -> tuple[int, int]:
    """id,name,class,ext rows with VGGFace2's per-identity image counts; ids look like VGGFace2's `0001_01`."""
    import pandas as pd

    meta = pd.read_csv(meta_path, skipinitialspace=True)
    counts = meta["Sample_Num"].to_numpy()
    names = meta["Class_ID"].astype(str).str.strip().to_numpy()
    stems = [f"{i // 100 + 1:04d}_{i % 100 + 1:02d}" for i in range(int(counts.max()))]
    with open(csv_path, "w", encoding="utf-8") as f:
        f.write("id,name,class,ext\n")
        for label, (name, count) in enumerate(zip(names, counts, strict=True)):
            f.write("".join(f"{stem},{name},{label},.jpg\n" for stem in stems[:count]))
    return int(counts.sum()), len(counts)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _timed(function, repeats: int):
    """(best wall s, cpu s of that run, result of the last run)."""
    best = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if best is None or wall < best[0]:
            best = (wall, cpu)
        if _ < repeats - 1:
            del result
    return best[0], best[1], result


def stage_read_csv(root, csv_path, repeats):
    from datasets.face_table import read_face_csv

    base = _peak_rss_mb()
    wall, cpu, table = _timed(lambda: read_face_csv(root, csv_path), repeats)
    return [("read_face_csv (3.3M rows)", wall, cpu, _peak_rss_mb() - base, f"{len(table.paths):,} rows")]


def stage_generate(root, csv_path, repeats):
    import numpy as np

    from datasets.face_table import read_face_csv
    from datasets.triplet_dataset import generate_triplets

    labels = read_face_csv(root, csv_path).labels
    base = _peak_rss_mb()
    rows = []
    wall, cpu, triplets = _timed(
        lambda: generate_triplets(labels, NUM_TRIPLETS, np.random.default_rng(0)), repeats
    )
    rows.append(("generate_triplets 1.1M", wall, cpu, _peak_rss_mb() - base, f"{triplets.shape}"))
    wall, cpu, triplets = _timed(
        lambda: generate_triplets(labels, NUM_TRIPLETS, np.random.default_rng(0), 32, 320), repeats
    )
    rows.append(
        ("generate_triplets 1.1M, 32 ids per 320", wall, cpu, _peak_rss_mb() - base, f"{triplets.shape}")
    )
    return rows


def stage_triplet_dataset(root, csv_path, repeats):
    from datasets.triplet_dataset import TripletFaceDataset

    out = Path(tempfile.mkdtemp(prefix="bench_triplets_"))
    base = _peak_rss_mb()
    wall, cpu, dataset = _timed(
        lambda: TripletFaceDataset(root, csv_path, NUM_TRIPLETS, output_dir=out), repeats
    )
    rows = [
        (
            "TripletFaceDataset: read + generate + save",
            wall,
            cpu,
            _peak_rss_mb() - base,
            f"{len(dataset):,} triplets",
        )
    ]
    path = dataset.triplets_path
    del dataset
    wall, cpu, dataset = _timed(
        lambda: TripletFaceDataset(root, csv_path, NUM_TRIPLETS, training_triplets_path=path), repeats
    )
    rows.append(
        (
            "TripletFaceDataset: read + load + check",
            wall,
            cpu,
            _peak_rss_mb() - base,
            f"{len(dataset):,} triplets",
        )
    )
    return rows


def stage_lfw(repeats):
    from datasets.lfw_dataset import LFWDataset

    base = _peak_rss_mb()
    wall, cpu, lfw = _timed(
        lambda: LFWDataset(SHARED_DATA / "lfw_112", SHARED_DATA / "lfw_pairs.txt"), repeats
    )
    detail = f"{len(lfw):,} images, {len(lfw.pairs):,} pairs"
    return [("LFWDataset (lfw_112, standard pairs)", wall, cpu, _peak_rss_mb() - base, detail)]


def stage_decode(num_images, repeats):
    import torch
    from torchvision.io import ImageReadMode, decode_image

    from datasets.image_files import load_image
    from datasets.lfw_dataset import LFWDataset
    from datasets.transforms import eval_transform, train_transform

    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    paths = LFWDataset(SHARED_DATA / "lfw_112", SHARED_DATA / "lfw_pairs.txt").image_paths[:num_images]
    decoders = {
        "PIL (load_image)": load_image,
        "torchvision.io.decode_image": lambda p: decode_image(p, mode=ImageReadMode.RGB),
    }
    rows = []
    for size in (112, 160):
        for kind, make in (("train", train_transform), ("eval", eval_transform)):
            transform = make(size)
            for decoder_name, decode in decoders.items():
                for p in paths[:20]:  # warm-up
                    transform(decode(p))
                wall, cpu, _ = _timed(lambda d=decode, t=transform: [t(d(p)) for p in paths], repeats)
                rows.append(
                    (f"{decoder_name} + {kind}_transform({size})", wall, cpu, None, _rate(len(paths), cpu))
                )
    for decoder_name, decode in decoders.items():
        wall, cpu, _ = _timed(lambda d=decode: [d(p) for p in paths], repeats)
        rows.append((f"{decoder_name}, decode only", wall, cpu, None, _rate(len(paths), cpu)))
    return rows


def _rate(num_images: int, cpu_seconds: float) -> str:
    # per CPU second: what one worker with a core of its own does, whatever else shares the machine
    return f"{num_images / cpu_seconds:,.0f} img/s per worker"


def _run_in_fresh_process(function, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def format_table(rows) -> str:
    lines = ["| stage | wall s | cpu s | peak MB | result |", "| --- | ---: | ---: | ---: | --- |"]
    for name, wall, cpu, peak, detail in rows:
        peak_text = "" if peak is None else f"{peak:,.0f}"
        lines.append(f"| {name} | {wall:.3f} | {cpu:.3f} | {peak_text} | {detail} |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per measurement; the best wall time is kept"
    )
    parser.add_argument("--num_images", type=int, default=1000, help="LFW images per decode measurement")
    parser.add_argument("--skip_vggface2", action="store_true", help="skip the 3.3M-row CSV stages")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_datasets_") as tmp:
        if not args.skip_vggface2:
            root, csv_path = Path(tmp) / "images", Path(tmp) / "vggface2.csv"
            root.mkdir()  # never read: the ext column means no image is touched while indexing
            start = time.perf_counter()
            num_rows, num_ids = write_vggface2_shaped_csv(
                SHARED_DATA / "vggface2_identity_meta.csv", csv_path
            )
            print(
                f"wrote {csv_path.name}: {num_rows:,} rows, {num_ids:,} identities, "
                f"{csv_path.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - start:.1f} s",
                flush=True,
            )
            for stage in (stage_read_csv, stage_generate, stage_triplet_dataset):
                rows += _run_in_fresh_process(stage, str(root), str(csv_path), args.repeats)
        rows += _run_in_fresh_process(stage_lfw, args.repeats)
        rows += _run_in_fresh_process(stage_decode, args.num_images, args.repeats)
    print(format_table(rows))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
