"""Say whether two face photos show the same person, using a checkpoint's LFW distance threshold.

    python compare_faces.py --model_path model.pt alice_1.jpg alice_2.jpg
    distance 0.8123 threshold 1.1900 same

The verdict is "same" when the distance is below the threshold the checkpoint stored (the best LFW
threshold found while training) or the one given with ``--threshold``. Many pairs at once:

    python compare_faces.py --model_path model.pt --pairs_csv pairs.csv --output_csv distances.csv

reads columns ``image1,image2`` and writes ``image1,image2,distance,same``; each distinct image is embedded
once. Photos should be aligned face crops like the training data, or, with ``--align``, any photos: the face
is then found with MTCNN and cropped the way the checkpoint's training data was (see inference.py; a photo
without a face is an error, of several faces the largest is used). ``--preprocess`` names the preprocessing
of a checkpoint that does not store its own (the original's 2021 files get ``original-2021`` from their layout).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from devices import resolve_device
from errors import InputError, report_input_errors
from fileio import atomic_write, refuse_to_replace
from inference import (
    PREPROCESS_PRESETS,
    FaceEmbedder,
    add_alignment_flags,
    check_threshold,
    decision_threshold,
    distance,
    load_checkpoint,
    preset_help,
    resolve_alignment,
)

CSV_COLUMNS = ("image1", "image2")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compare two face photos (or a CSV of pairs) with a checkpoint."
    )
    parser.add_argument(
        "--model_path", required=True, type=Path, help="checkpoint (.pt), any supported layout"
    )
    parser.add_argument("images", nargs="*", type=Path, help="the two photos to compare")
    parser.add_argument("--pairs_csv", type=Path, default=None, help="CSV with columns image1,image2")
    parser.add_argument("--output_csv", type=Path, default=None, help="where --pairs_csv results go")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_csv")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="distance below which two faces count as the same person",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--image_size", type=int, default=None, help="input size; default: the checkpoint's")
    parser.add_argument("--flip", action="store_true", help="also embed the mirrored photos and average")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--align",
        action="store_true",
        help="the photos are raw: detect the face (MTCNN; the largest if several) and align it the way "
        "the checkpoint's training crops were",
    )
    parser.add_argument("--preprocess", choices=tuple(PREPROCESS_PRESETS), default=None, help=preset_help())
    add_alignment_flags(parser)
    return parser


def check_args(args) -> None:
    """Exactly one of: two photos, or --pairs_csv with --output_csv."""
    if args.pairs_csv is None:
        if len(args.images) != 2:
            raise InputError(f"give exactly two images to compare (got {len(args.images)}), or --pairs_csv")
        if args.output_csv is not None:
            raise InputError("--output_csv goes with --pairs_csv")
    else:
        if args.images:
            raise InputError("give either two images or --pairs_csv, not both")
        if args.output_csv is None:
            raise InputError("--pairs_csv needs --output_csv for the results")
        if not args.pairs_csv.is_file():
            raise InputError(f"--pairs_csv: file not found: {args.pairs_csv}")
        if args.output_csv.resolve() == args.pairs_csv.resolve():
            raise InputError("--output_csv must differ from --pairs_csv (it would overwrite the input)")
        refuse_to_replace(args.output_csv, args.overwrite, "--output_csv")
    check_threshold(args.threshold)
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, got {args.batch_size}")


def verdict(pair_distance: float, threshold: float) -> bool:
    """Same person when strictly closer than the threshold, as eval_metrics decides on LFW."""
    return pair_distance < threshold


def read_pairs_csv(path: Path) -> pd.DataFrame:
    """The image1,image2 columns of `path`, relative paths resolved against the CSV's own folder."""
    try:
        table = pd.read_csv(path, dtype=str, skipinitialspace=True, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"could not read {path} as CSV: {str(error).splitlines()[0]}") from None
    missing = [column for column in CSV_COLUMNS if column not in table.columns]
    if missing:
        raise InputError(f"{path} needs columns image1,image2; missing {', '.join(missing)}")
    if table.empty:
        raise InputError(f"{path} has no pairs")
    for column in CSV_COLUMNS:
        empty = table.index[table[column].str.strip() == ""]
        if len(empty):
            raise InputError(f"{path}: empty {column} on data row {int(empty[0]) + 1}")
    return table[list(CSV_COLUMNS)]


def resolve_image(path_text: str, base: Path) -> Path:
    path = Path(path_text.strip())
    return path if path.is_absolute() else base / path


def check_images_exist(paths) -> None:
    for path in paths:
        if Path(path).is_dir():
            raise InputError(f"image {path}: a folder, not a file")
        if not Path(path).is_file():
            raise InputError(f"image not found: {path}")


def compare_pairs_csv(embedder: FaceEmbedder, args, threshold: float) -> pd.DataFrame:
    """Distances and verdicts for every pair in --pairs_csv, embedding each distinct image once."""
    table = read_pairs_csv(args.pairs_csv)
    base = args.pairs_csv.parent
    first = [resolve_image(text, base) for text in table["image1"]]
    second = [resolve_image(text, base) for text in table["image2"]]
    unique = list(dict.fromkeys(first + second))
    check_images_exist(unique)
    row_of = {path: row for row, path in enumerate(unique)}
    embeddings = embedder.embed(unique)
    distances = distance(embeddings[[row_of[p] for p in first]], embeddings[[row_of[p] for p in second]])
    return pd.DataFrame(
        {
            "image1": table["image1"].to_numpy(),
            "image2": table["image2"].to_numpy(),
            "distance": distances,
            "same": [verdict(value, threshold) for value in distances],
        }
    )


def run(args) -> None:
    check_args(args)
    if args.pairs_csv is None:
        check_images_exist(args.images)
    device = resolve_device(args.device)
    loaded = load_checkpoint(args.model_path, device, image_size=args.image_size, preprocess=args.preprocess)
    resolve_alignment(loaded, args.template, args.crop_margin, args.align)
    threshold = decision_threshold(
        args.threshold, loaded.best_distance_threshold, args.model_path, args.flip, loaded.threshold_note
    )
    embedder = FaceEmbedder(loaded, flip=args.flip, batch_size=args.batch_size, align=args.align)

    if args.pairs_csv is None:
        pair_distance = embedder.distance(*args.images)
        label = "same" if verdict(pair_distance, threshold) else "different"
        print(f"distance {pair_distance:.4f} threshold {threshold:.4f} {label}")
        return
    results = compare_pairs_csv(embedder, args, threshold)
    with atomic_write(args.output_csv, "w", newline="") as handle:
        results.to_csv(handle, index=False, float_format="%.6f")
    num_same = int(results["same"].sum())
    print(f"wrote {len(results)} pairs to {args.output_csv} ({num_same} same, threshold {threshold:.4f})")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return report_input_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
