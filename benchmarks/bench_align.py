"""Throughput of datasets/align_dataset.py on synthetic "typical web photos", on this machine's CPU.

    python benchmarks/bench_align.py                       # 150 photos, default aligner settings
    python benchmarks/bench_align.py --num_workers 1 --max_side 800 --min_face_size 24

The photos are built once (deterministically, from --seed) under --work_dir: an LFW face crop from
../shared/data/lfw_112 pasted at a random position and size (12% to 50% of the shorter side) onto a
640x480 ... 1280x800 background of a mosaic of pieces of other LFW photos turned on their side (hair, skin,
clothes: textures that tempt the detector), a colour gradient and sensor-like noise,
saved as JPEG quality 90. The timed run is the real command (`align_dataset.main`, worker processes,
progress bar off), from start to report; it prints photos/s, the CPU time it used, and the fraction of
photos in which a face was found. With --template arcface112 it also checks that each crop is the pasted
face: the aligned crop must correlate with the LFW crop it came from (both are ArcFace-aligned).
"""

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image, ImageFilter

from datasets import align_dataset
from devices import available_cpus

PHOTO_SIZES = [
    (640, 480),
    (800, 600),
    (1024, 768),
    (1280, 720),
    (1280, 800),
    (960, 640),
    (480, 640),
    (600, 800),
]


def make_background(rng, width, height, clutter):
    """A photo-like background: pieces of photos (no upright faces) over a gradient, plus noise."""
    small = Image.new("RGB", (max(1, width // 2), max(1, height // 2)))
    tile = max(small.width, small.height) // 6 + 1
    for top in range(0, small.height, tile):
        for left in range(0, small.width, tile):
            # a random 48 px piece of a photo (hair, skin, clothes, background), turned on its side
            x, y = rng.integers(0, 112 - 48, 2)
            patch = (
                Image.open(clutter[rng.integers(len(clutter))]).convert("RGB").crop((x, y, x + 48, y + 48))
            )
            patch = patch.rotate(int(rng.choice([90, 180, 270]))).resize(
                (tile, tile), Image.Resampling.BICUBIC
            )
            small.paste(patch, (left, top))
    background = np.asarray(
        small.resize((width, height), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1.5)),
        dtype=np.float32,
    )
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    gradient = rng.uniform(0, 255, 3) * (1 - ramp) + rng.uniform(0, 255, 3) * ramp
    background = 0.6 * background + 0.4 * gradient + rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))


def make_photos(lfw_dir, raw_dir, num_photos, seed):
    """Write the benchmark photos as raw_dir/<Name>/<Name>_NNNN.jpg; returns {relative path: truth}."""
    rng = np.random.default_rng(seed)
    identities = sorted(path for path in Path(lfw_dir).iterdir() if path.is_dir())
    clutter = [
        next(iter(sorted(identities[i].iterdir()))) for i in rng.choice(len(identities), 60, replace=False)
    ]
    truth = {}
    for index in range(num_photos):
        identity = identities[rng.integers(len(identities))]
        source = sorted(identity.iterdir())[rng.integers(len(list(identity.iterdir())))]
        width, height = PHOTO_SIZES[rng.integers(len(PHOTO_SIZES))]
        photo = make_background(rng, width, height, clutter)
        side = int(rng.uniform(0.12, 0.5) * min(width, height))
        left, top = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        photo.paste(
            Image.open(source).convert("RGB").resize((side, side), Image.Resampling.BICUBIC), (left, top)
        )
        relative = f"{identity.name}/{identity.name}_{index:04d}.jpg"
        (raw_dir / identity.name).mkdir(parents=True, exist_ok=True)
        photo.save(raw_dir / relative, quality=90)
        truth[relative] = {"source": str(source), "left": left, "top": top, "side": side}
    return truth


def prepare_photos(args):
    """Build the photos unless --work_dir already holds the same set."""
    raw_dir = args.work_dir / "raw"
    truth_path = args.work_dir / "truth.json"
    key = {"num_photos": args.num_photos, "seed": args.seed, "version": 3}
    if truth_path.exists():
        saved = json.loads(truth_path.read_text())
        if saved["key"] == key:
            return raw_dir, saved["truth"]
    shutil.rmtree(raw_dir, ignore_errors=True)
    truth = make_photos(args.lfw_dir, raw_dir, args.num_photos, args.seed)
    truth_path.write_text(json.dumps({"key": key, "truth": truth}))
    return raw_dir, truth


def crop_matches_source(crop_path, source_path, min_correlation=0.3):
    """True when an arcface112 crop correlates with the (ArcFace-aligned) LFW crop that was pasted."""
    crop = np.asarray(Image.open(crop_path).convert("L").resize((112, 112)), dtype=np.float64)
    source = np.asarray(Image.open(source_path).convert("L"), dtype=np.float64)
    # the central part, where the face is: the pasted crop's corners hold background in the photo
    crop, source = crop[16:-16, 16:-16].ravel(), source[16:-16, 16:-16].ravel()
    return np.corrcoef(crop, source)[0, 1] > min_correlation


def cpu_seconds():
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lfw_dir", type=Path, default=Path("../shared/data/lfw_112"))
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/bench_align"))
    parser.add_argument("--num_photos", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", choices=align_dataset.TEMPLATES, default="none")
    parser.add_argument("--max_side", type=int, default=None, help="passed on when given")
    parser.add_argument("--min_face_size", type=int, default=None, help="passed on when given")
    parser.add_argument("--num_workers", type=int, default=None, help="passed on when given")
    parser.add_argument("--batch_size", type=int, default=None, help="passed on when given")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    raw_dir, truth = prepare_photos(args)
    aligned_dir = args.work_dir / "aligned"
    shutil.rmtree(aligned_dir, ignore_errors=True)
    command = [
        "--input_dir",
        str(raw_dir),
        "--output_dir",
        str(aligned_dir),
        "--template",
        args.template,
        "--device",
        "cpu",
        "--no-progress",
    ]
    for flag in ("max_side", "min_face_size", "num_workers", "batch_size"):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    print("python datasets/align_dataset.py " + " ".join(command))
    cpu_before, start = cpu_seconds(), time.perf_counter()
    status = align_dataset.main(command)
    elapsed, cpu_used = time.perf_counter() - start, cpu_seconds() - cpu_before
    if status != 0:
        return status
    report = json.loads((aligned_dir / align_dataset.REPORT_NAME).read_text())
    found = report["totals"]["aligned"]
    print(
        f"{len(truth)} photos in {elapsed:.2f} s: {len(truth) / elapsed:.1f} photos/s wall, {cpu_used / len(truth) * 1000:.0f} ms CPU per photo"
    )
    cores = available_cpus()
    print(
        f"this run had {cpu_used / elapsed:.2f} of {cores} cores; with all {cores} free (CPU time bound): "
        f"~{cores * len(truth) / cpu_used:.1f} photos/s"
    )
    print(f"face found in {found}/{len(truth)} = {found / len(truth):.1%}")
    if args.template == "arcface112":
        matches = sum(
            crop_matches_source(
                align_dataset.output_path(relative, report_config(report, aligned_dir)), item["source"]
            )
            for relative, item in truth.items()
            if relative not in report["no_face"]
        )
        print(f"crop is the pasted face in {matches}/{found}")
    return 0


def report_config(report, aligned_dir):
    return align_dataset.AlignConfig(
        input_dir=report["input_dir"], output_dir=str(aligned_dir), **report["settings"]
    )


if __name__ == "__main__":
    sys.exit(main())
