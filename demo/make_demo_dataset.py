"""Write a small synthetic face dataset so that training and LFW validation run without any download.

The output mimics the two real datasets this repository works with:

    root/train/id_0000/id_0000_0001.png ...      VGGFace2-like: one folder per training identity
    root/lfw/Kalo_Merin/Kalo_Merin_0001.png ...  LFW-like: identities disjoint from the training ones
    root/lfw_pairs.txt                           the standard LFW pairs format (ten identity-disjoint folds)
    root/demo_dataset.json                       the generator parameters, written last

The faces are drawn by `demo/render.py`; this file lays them out as datasets, writes the pairs file and is
the command. The demo training (`train_triplet.py --demo`) calls `make_demo_dataset` itself.

Example:
    python demo/make_demo_dataset.py --output_dir data/demo
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from itertools import combinations
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.render import render_identity
from errors import InputError, report_input_errors

# bump when the drawing changes, so an old folder is not mistaken for the output of the new generator
GENERATOR_VERSION = 1
MARKER_NAME = "demo_dataset.json"
PAIRS_NAME = "lfw_pairs.txt"

# independent random streams, so that e.g. adding training identities does not change the LFW-like faces
_STREAM_TRAIN, _STREAM_LFW, _STREAM_LAYOUT = 0, 1, 2

_SYLLABLES = (
    "ka lo me rin sa to vi na el ra mi do an ze lu ko ta be ri so ha ni ve ma jo li de ga fe ur"
).split()


class DemoDataset(NamedTuple):
    """Where the generated dataset lies."""

    train_dir: Path
    lfw_dir: Path
    pairs_path: Path


def _save_images(folder: Path, name: str, images: np.ndarray):
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images, start=1):
        # compress_level is fixed so the bytes only depend on the pixels (and the Pillow/zlib version);
        # noisy images hardly compress, so the fastest level costs little space
        Image.fromarray(image).save(folder / f"{name}_{index:04d}.png", format="PNG", compress_level=1)


def _lfw_names(rng: np.random.Generator, count: int) -> list[str]:
    """Made-up unique First_Last names, so that LFW-style file names (with underscores) are exercised."""

    def word():
        return "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()

    names: list[str] = []
    seen = set()
    while len(names) < count:
        name = f"{word()}_{word()}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return sorted(names)


def _fold_pairs(rng, names, counts, pairs_per_fold):
    """Samples distinct same-person and different-person pairs among the identities of one fold."""
    candidates = [
        (name, i, j)
        for name, c in zip(names, counts, strict=True)
        for i, j in combinations(range(1, c + 1), 2)
    ]
    if len(candidates) < pairs_per_fold:
        raise InputError(
            f"a fold has only {len(candidates)} possible same-person pairs, fewer than --pairs_per_fold "
            f"{pairs_per_fold}; raise --num_lfw_identities or --max_images_per_lfw_identity"
        )
    picked = rng.choice(len(candidates), size=pairs_per_fold, replace=False)
    same = sorted(candidates[k] for k in picked)

    total = sum(counts)
    num_different = (total * total - sum(c * c for c in counts)) // 2
    if num_different < pairs_per_fold:
        raise InputError(
            f"a fold has only {num_different} possible different-person pairs, fewer than --pairs_per_fold "
            f"{pairs_per_fold}; raise --num_lfw_identities"
        )
    different = set()
    while len(different) < pairs_per_fold:
        a, b = sorted(rng.choice(len(names), size=2, replace=False))
        different.add(
            (names[a], int(rng.integers(1, counts[a] + 1)), names[b], int(rng.integers(1, counts[b] + 1)))
        )
    return same, sorted(different)


def _write_pairs(path: Path, folds, num_folds, pairs_per_fold):
    lines = [f"{num_folds}\t{pairs_per_fold}"]
    for same, different in folds:
        lines += [f"{name}\t{i}\t{j}" for name, i, j in same]
        lines += [f"{a}\t{i}\t{b}\t{j}" for a, i, b, j in different]
    path.write_text("\n".join(lines) + "\n")


def _check_params(params: dict):
    for key in (
        "num_train_identities",
        "images_per_identity",
        "num_lfw_identities",
        "pairs_per_fold",
        "num_folds",
    ):
        if params[key] < 1:
            raise InputError(f"{key} must be at least 1, got {params[key]}")
    if params["max_images_per_lfw_identity"] < 2:
        raise InputError(
            f"max_images_per_lfw_identity must be at least 2, got {params['max_images_per_lfw_identity']}"
        )
    if params["image_size"] < 16:
        raise InputError(f"image_size must be at least 16 pixels, got {params['image_size']}")
    if params["num_lfw_identities"] < 2 * params["num_folds"]:
        raise InputError(
            f"num_lfw_identities ({params['num_lfw_identities']}) must be at least twice num_folds "
            f"({params['num_folds']}): each fold needs two identities of its own"
        )


class _LfwPlan(NamedTuple):
    names: list[str]
    counts: list[int]  # images per identity, aligned with names
    folds: list  # per fold: (same-person pairs, different-person pairs)


def _plan_lfw(params: dict) -> _LfwPlan:
    """Names, image counts and pairs of the LFW-like part, drawn before any image so bad sizes fail fast."""
    rng = np.random.default_rng(np.random.SeedSequence((params["seed"], _STREAM_LAYOUT)))
    num_lfw = params["num_lfw_identities"]
    names = _lfw_names(rng, num_lfw)
    counts = rng.integers(2, params["max_images_per_lfw_identity"] + 1, size=num_lfw).tolist()
    # like real LFW, every identity belongs to exactly one fold
    folds = []
    for members in np.array_split(rng.permutation(num_lfw), params["num_folds"]):
        members = sorted(members)
        fold_names, fold_counts = [names[k] for k in members], [counts[k] for k in members]
        folds.append(_fold_pairs(rng, fold_names, fold_counts, params["pairs_per_fold"]))
    return _LfwPlan(names, counts, folds)


def _write_identity(job: tuple):
    """Renders and saves all images of one identity; a top-level function so worker processes can run it."""
    folder, name, identity_seed, num_images, image_size = job
    _save_images(Path(folder), name, render_identity(identity_seed, num_images, image_size))


def _generate(root: Path, params: dict, plan: _LfwPlan, num_workers: int):
    """Writes the whole dataset into root (a fresh folder), the marker last."""
    seed, size = params["seed"], params["image_size"]
    jobs = [
        (
            root / "train" / f"id_{index:04d}",
            f"id_{index:04d}",
            (seed, _STREAM_TRAIN, index),
            params["images_per_identity"],
            size,
        )
        for index in range(params["num_train_identities"])
    ]
    jobs += [
        (root / "lfw" / name, name, (seed, _STREAM_LFW, index), count, size)
        for index, (name, count) in enumerate(zip(plan.names, plan.counts, strict=True))
    ]
    if num_workers > 1:
        # every identity has its own random stream, so the files do not depend on the number of workers;
        # spawn, not fork: the caller may be a training script with live torch threads
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            list(pool.map(_write_identity, jobs, chunksize=8))
    else:
        for job in jobs:
            _write_identity(job)
    _write_pairs(root / PAIRS_NAME, plan.folds, params["num_folds"], params["pairs_per_fold"])
    (root / MARKER_NAME).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")


def _existing_dataset(root: Path, params: dict) -> bool:
    """True when root already holds this exact dataset; raises if it holds anything else."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise InputError(f"--output_dir {root} exists and is not a folder")
    marker = root / MARKER_NAME
    if marker.is_file():
        try:
            found = json.loads(marker.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{marker} is not a valid demo dataset marker: {error}") from error
        if found == params:
            return True
        raise InputError(
            f"--output_dir {root} holds a demo dataset made with other parameters ({marker}); "
            "delete it or choose another folder"
        )
    if any(root.iterdir()):
        raise InputError(
            f"--output_dir {root} is not empty and is not a demo dataset; refusing to overwrite it"
        )
    return False


def make_demo_dataset(
    root,
    seed: int = 0,
    num_train_identities: int = 160,
    images_per_identity: int = 20,
    num_lfw_identities: int = 200,
    max_images_per_lfw_identity: int = 6,
    image_size: int = 64,
    pairs_per_fold: int = 30,
    num_folds: int = 10,
    num_workers: int = 1,
) -> DemoDataset:
    """Writes the demo dataset under root, or returns at once if root already holds the same one.

    LFW-like identities have between 2 and max_images_per_lfw_identity images each and are split into
    num_folds identity-disjoint folds of pairs_per_fold same-person and pairs_per_fold different-person
    pairs. The files are a pure function of the arguments other than num_workers (processes that render
    in parallel). Raises InputError if root holds anything else.
    """
    root = Path(root)
    params = {
        "generator": "facenet-demo-faces",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_train_identities": int(num_train_identities),
        "images_per_identity": int(images_per_identity),
        "num_lfw_identities": int(num_lfw_identities),
        "max_images_per_lfw_identity": int(max_images_per_lfw_identity),
        "image_size": int(image_size),
        "pairs_per_fold": int(pairs_per_fold),
        "num_folds": int(num_folds),
    }
    _check_params(params)
    if num_workers < 1:
        raise InputError(f"num_workers must be at least 1, got {num_workers}")
    dataset = DemoDataset(root / "train", root / "lfw", root / PAIRS_NAME)
    if _existing_dataset(root, params):
        return dataset
    plan = _plan_lfw(params)

    # build in a sibling folder and rename it at the end, so an interrupted run never leaves half a dataset
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the dataset is not
        _generate(staging, params, plan, num_workers)
        try:
            if root.exists():
                root.rmdir()  # empty, checked above
            os.replace(staging, root)
        except OSError:
            # another process (a torchrun rank on a shared disk) finished the same dataset first
            if not _existing_dataset(root, params):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return dataset


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a small synthetic VGGFace2-like and LFW-like face dataset."
    )
    parser.add_argument(
        "--output_dir", required=True, help="folder to create (reused if it holds the same dataset)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_identities", type=int, default=160, help="training identities")
    parser.add_argument("--images_per_identity", type=int, default=20, help="images per training identity")
    parser.add_argument("--num_lfw_identities", type=int, default=200, help="LFW-like identities")
    parser.add_argument("--max_images_per_lfw_identity", type=int, default=6, help="each has 2 to this many")
    parser.add_argument("--image_size", type=int, default=64, help="square image side in pixels")
    parser.add_argument("--pairs_per_fold", type=int, default=30, help="same and different pairs per fold")
    parser.add_argument("--num_folds", type=int, default=10)
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes; the files do not depend on it",
    )
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    def body():
        dataset = make_demo_dataset(
            args.output_dir,
            seed=args.seed,
            num_train_identities=args.num_identities,
            images_per_identity=args.images_per_identity,
            num_lfw_identities=args.num_lfw_identities,
            max_images_per_lfw_identity=args.max_images_per_lfw_identity,
            image_size=args.image_size,
            pairs_per_fold=args.pairs_per_fold,
            num_folds=args.num_folds,
            num_workers=args.workers,
        )
        print(f"train: {dataset.train_dir}\nlfw: {dataset.lfw_dir}\npairs: {dataset.pairs_path}")

    return report_input_errors(body)


if __name__ == "__main__":
    sys.exit(main())
