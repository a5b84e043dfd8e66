"""Name the people in photos by their nearest match in a gallery of known people.

    python identify.py --model_path model.pt --gallery people/ --align query.jpg more_queries/
    query,identity,distance,nearest_identity
    query.jpg,alice,0.6412,alice
    more_queries/x.jpg,unknown,1.3377,bob

The gallery is a folder with one folder per person (``people/alice/*.jpg``, ``people/bob/*.png``, photos at
any depth inside a person's folder); each QUERY is a photo or a folder of photos. With ``--align`` the photos
are raw and each face is detected and aligned like the checkpoint's training crops (the largest face of a
photo; see inference.py); without it they must be aligned crops already.

Matching: a query's distance to a person is its distance to that person's *nearest* gallery photo, and the
query is named after the nearest person, or "unknown" when that distance is not below the threshold
(``--threshold``, default the checkpoint's ``best_distance_threshold``). The nearest photo rather than the
person's mean embedding, because the threshold was chosen for photo-to-photo distances (LFW pairs): with the
minimum, "unknown" means exactly that compare_faces.py would call no photo of anyone the same person, and a
person photographed in several different conditions keeps each of them instead of an average that may sit
between them. ``--top_k K`` writes the K nearest distinct people per query, nearest first; each row's
``identity`` is the person's name or "unknown" by the same rule, and ``nearest_identity`` always names the
person of that row.

Gallery embeddings are cached in one file per model and setting inside the gallery,
``.gallery_embeddings_<key>.pt``, where the key hashes the checkpoint's contents, its preprocessing and
alignment, --align and --flip. A later run embeds only the photos that were added or changed (a changed size
or modification time, from ``os.stat``) and drops the removed ones; the file is rewritten atomically when
anything changed. A gallery photo that cannot be read or (with --align) shows no face is skipped with a
one-line note, and remembered as such until it changes; a query photo like that gets one row whose identity
is "skipped" (and a note), and is an error only when no query photo can be used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from datasets.image_files import IMAGE_EXTENSIONS
from devices import resolve_device
from errors import InputError, report_input_errors
from fileio import atomic_write, refuse_to_replace, save_torch_atomic
from inference import (
    PREPROCESS_PRESETS,
    FaceEmbedder,
    LoadedModel,
    add_alignment_flags,
    check_threshold,
    decision_threshold,
    load_checkpoint,
    preset_help,
    resolve_alignment,
)

CACHE_PREFIX = ".gallery_embeddings_"
CACHE_FORMAT = 2  # 2: a photo is known by size, mtime and ctime (1: size and mtime)
UNKNOWN = "unknown"
SKIPPED = "skipped"  # the identity of a query photo that could not be read or (with --align) showed no face
OUTPUT_COLUMNS = ("query", "identity", "distance", "nearest_identity")

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Name the people in photos by their nearest match in a gallery of known people."
    )
    parser.add_argument(
        "queries", nargs="+", type=Path, metavar="QUERY", help="a photo, or a folder of photos, to identify"
    )
    parser.add_argument(
        "--model_path", required=True, type=Path, help="checkpoint (.pt), any supported layout"
    )
    parser.add_argument(
        "--gallery",
        required=True,
        type=Path,
        help="folder with one folder of photos per known person; its embeddings are cached there, in a hidden "
        f"{CACHE_PREFIX}<key>.pt per model and settings (skipped when the folder is read-only)",
    )
    parser.add_argument(
        "--align",
        action="store_true",
        help="the photos are raw: detect the face (MTCNN; the largest if several) and align it the way "
        "the checkpoint's training crops were",
    )
    parser.add_argument(
        "--top_k", type=int, default=1, help="rows per query: the K nearest people (default: %(default)s)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="distance below which a query is that person; default: the checkpoint's best_distance_threshold",
    )
    parser.add_argument("--output", type=Path, default=None, help="CSV file to write; default: stdout")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--preprocess", choices=tuple(PREPROCESS_PRESETS), default=None, help=preset_help())
    add_alignment_flags(parser)
    parser.add_argument("--flip", action="store_true", help="also embed the mirrored photos and average")
    parser.add_argument("--batch_size", type=int, default=64)
    return parser


def check_args(args) -> None:
    if not args.gallery.is_dir():
        raise InputError(f"--gallery {args.gallery} is not a folder")
    if args.top_k < 1:
        raise InputError(f"--top_k must be at least 1, got {args.top_k}")
    check_threshold(args.threshold)
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, got {args.batch_size}")
    for query in args.queries:
        if not query.exists():
            raise InputError(f"query not found: {query}")
    if args.output is not None and args.output.is_dir():
        raise InputError(f"--output {args.output} is a folder; give a CSV file name")
    if args.output is not None:
        refuse_to_replace(args.output, args.overwrite, "--output")


# --------------------------------------------------------------------------------------------- photos


def is_photo(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def photos_under(folder: Path) -> list[Path]:
    """The photos at any depth under `folder`, sorted; hidden files and folders are skipped. Symbolic links
    to folders are followed (a gallery of linked person folders), each real folder once, so a link loop ends."""
    photos, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        photos += [
            Path(root, name) for name in files if not name.startswith(".") and is_photo(Path(root, name))
        ]
    return sorted(photos)


def query_photos(queries: list[Path]) -> list[Path]:
    """Each QUERY photo, and the photos inside each QUERY folder, in order (duplicates kept once)."""
    photos = []
    for query in queries:
        if query.is_dir():
            found = photos_under(query)
            if not found:
                raise InputError(f"query folder {query} holds no photos ({', '.join(IMAGE_EXTENSIONS)})")
            photos += found
        elif is_photo(query):
            photos.append(query)
        else:
            raise InputError(f"query {query} is not a photo ({', '.join(IMAGE_EXTENSIONS)}) or a folder")
    return list(dict.fromkeys(photos))


def gallery_photos(gallery: Path) -> dict[str, str]:
    """Relative POSIX path -> identity (its top folder) of every photo in the gallery's person folders."""
    photos = {}
    loose = 0
    for path in photos_under(gallery):
        relative = path.relative_to(gallery)
        if len(relative.parts) == 1:
            loose += 1
            continue
        photos[relative.as_posix()] = relative.parts[0]
    if loose:
        logger.warning(
            "%s: ignored %d photos outside a person's folder (put each person's photos in a folder "
            "named after them)",
            gallery,
            loose,
        )
    if not photos:
        raise InputError(
            f"--gallery {gallery} has no person folders with photos ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return photos


# --------------------------------------------------------------------------------------------- gallery cache


@dataclass
class Gallery:
    """Embeddings of the usable gallery photos and the identity of each row."""

    paths: list[str]
    identities: list[str]
    embeddings: torch.Tensor  # (N, embedding_dim) float32


def cache_settings(loaded: LoadedModel, args) -> dict:
    """Everything that changes a gallery photo's embedding (plain data, stored in the cache file)."""
    return {
        "checkpoint_sha256": file_sha256(args.model_path),
        "image_size": loaded.image_size,
        "mean": [float(value) for value in loaded.mean],
        "std": [float(value) for value in loaded.std],
        "align": bool(args.align),
        "alignment": loaded.alignment.as_dict() if args.align else None,
        "flip": bool(args.flip),
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_path(gallery: Path, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return gallery / f"{CACHE_PREFIX}{key}.pt"


def file_stamp(path: Path) -> list[int]:
    """What says a gallery photo is unchanged: size, mtime and ctime. Size and mtime alone miss a photo
    replaced by another of the same size with its timestamp kept (`cp -p`, unpacking an archive, `mv`); the
    ctime cannot be set that way. (Not the inode: network file systems may not keep it stable.)"""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def read_cache(path: Path, settings: dict) -> dict[str, dict]:
    """Relative path -> {"stamp", "embedding" or "error"} from an earlier run, or {} (no cache)."""
    if not path.is_file():
        return {}
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
        if cache["format"] != CACHE_FORMAT or cache["settings"] != settings:
            raise ValueError("written for other settings or by an older version")
        entries = {}
        for row, (name, stamp) in enumerate(zip(cache["paths"], cache["stamps"], strict=True)):
            entries[name] = {"stamp": list(stamp), "embedding": cache["embeddings"][row]}
        for name, (stamp, error) in cache["failed"].items():
            entries[name] = {"stamp": list(stamp), "error": error}
        return entries
    except Exception as error:  # noqa: BLE001 - a cache is only a cache: any problem means start over
        logger.warning("ignoring the gallery cache %s (%s); embedding the gallery again", path, error)
        return {}


def write_cache(path: Path, settings: dict, entries: dict[str, dict], embedding_dim: int) -> None:
    good = sorted(name for name, entry in entries.items() if "embedding" in entry)
    cache = {
        "format": CACHE_FORMAT,
        "settings": settings,
        "paths": good,
        "stamps": [entries[name]["stamp"] for name in good],
        "embeddings": (
            torch.stack([entries[name]["embedding"] for name in good])
            if good
            else torch.empty(0, embedding_dim)
        ),
        "failed": {
            name: (entry["stamp"], entry["error"])
            for name, entry in sorted(entries.items())
            if "error" in entry
        },
    }
    try:
        save_torch_atomic(cache, path)
    except OSError as error:  # a read-only gallery: identify all the same, just without a cache
        logger.warning("could not write the gallery cache %s (%s)", path, error.strerror or error)


def load_gallery(embedder: FaceEmbedder, args) -> Gallery:
    """The gallery's embeddings, from the cache where the photos are unchanged, embedding the rest."""
    photos = gallery_photos(args.gallery)
    settings = cache_settings(embedder.loaded, args)
    path = cache_path(args.gallery, settings)
    cached = read_cache(path, settings)
    entries, todo = {}, []
    for name in photos:
        stamp = file_stamp(args.gallery / name)
        entry = cached.get(name)
        if entry is not None and entry["stamp"] == stamp:
            entries[name] = entry
        else:
            entries[name] = {"stamp": stamp}
            todo.append(name)
    if todo:
        embeddings, errors = embedder.try_embed([args.gallery / name for name in todo])
        for row, (name, error) in enumerate(zip(todo, errors, strict=True)):
            if error is None:
                entries[name]["embedding"] = embeddings[row].clone()
            else:
                entries[name]["error"] = error
    if todo or set(cached) != set(entries):
        write_cache(path, settings, entries, embedder.loaded.embedding_dim)

    for entry in entries.values():
        if "error" in entry:
            logger.warning("skipped gallery photo: %s", entry["error"])
    usable = [name for name in photos if "embedding" in entries[name]]
    without = sorted(set(photos.values()) - {photos[name] for name in usable})
    if without:
        logger.warning("no usable gallery photo for %d people: %s", len(without), ", ".join(without))
    if not usable:
        raise InputError(f"--gallery {args.gallery}: no usable photo (none could be read or showed a face)")
    return Gallery(
        paths=usable,
        identities=[photos[name] for name in usable],
        embeddings=torch.stack([entries[name]["embedding"] for name in usable]),
    )


# --------------------------------------------------------------------------------------------- matching


def rank_identities(
    queries: torch.Tensor, gallery: Gallery, top_k: int
) -> tuple[list[list[str]], np.ndarray]:
    """Per query, the `top_k` nearest people (distance to their nearest photo), nearest first, and distances."""
    names = sorted(set(gallery.identities))
    column = {name: index for index, name in enumerate(names)}
    photo_distances = torch.cdist(queries.double(), gallery.embeddings.double())  # (Q, N)
    per_identity = torch.full((len(queries), len(names)), float("inf"), dtype=torch.float64)
    index = torch.tensor([column[name] for name in gallery.identities]).expand(len(queries), -1)
    per_identity = per_identity.scatter_reduce(1, index, photo_distances, reduce="amin")
    k = min(top_k, len(names))
    # stable sort: equal distances keep the identities' alphabetical order
    order = torch.sort(per_identity, dim=1, stable=True).indices[:, :k]
    ranked = [[names[i] for i in row] for row in order.tolist()]
    return ranked, torch.gather(per_identity, 1, order).numpy()


def identify_table(
    query_names: list[str], ranked, distances, threshold: float, skipped: list[str] = ()
) -> pd.DataFrame:
    """The output rows of the ranked queries, then one row per skipped query (no distance, no person)."""
    rows = []
    for query, people, person_distances in zip(query_names, ranked, distances, strict=True):
        for person, value in zip(people, person_distances, strict=True):
            rows.append((query, person if value < threshold else UNKNOWN, float(value), person))
    rows.extend((query, SKIPPED, float("nan"), "") for query in skipped)
    return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def run(args) -> None:
    check_args(args)
    queries = query_photos(args.queries)
    device = resolve_device(args.device)
    loaded = load_checkpoint(args.model_path, device, preprocess=args.preprocess)
    resolve_alignment(loaded, args.template, args.crop_margin, args.align)
    threshold = decision_threshold(
        args.threshold, loaded.best_distance_threshold, args.model_path, args.flip, loaded.threshold_note
    )
    embedder = FaceEmbedder(loaded, flip=args.flip, batch_size=args.batch_size, align=args.align)
    gallery = load_gallery(embedder, args)
    query_embeddings, errors = embedder.try_embed(queries)
    usable = [row for row, error in enumerate(errors) if error is None]
    failed = [(str(query), error) for query, error in zip(queries, errors, strict=True) if error is not None]
    if not usable:  # nothing to answer: the (first) reason is the error
        reason = failed[0][1]
        raise InputError(reason if len(failed) == 1 else f"no query photo could be used, e.g. {reason}")
    for _, error in failed:
        logger.warning("skipped query photo: %s", error)
    ranked, distances = rank_identities(query_embeddings[usable], gallery, args.top_k)
    skipped = [query for query, _ in failed]
    table = identify_table([str(queries[row]) for row in usable], ranked, distances, threshold, skipped)
    if args.output is None:
        table.to_csv(sys.stdout, index=False, float_format="%.4f")
        return
    with atomic_write(args.output, "w", newline="") as handle:
        table.to_csv(handle, index=False, float_format="%.6f")
    named = int((~table.groupby("query", sort=False)["identity"].first().isin([UNKNOWN, SKIPPED])).sum())
    print(
        f"wrote {len(table)} rows to {args.output}: {named} of {len(queries)} queries named"
        f"{f', {len(skipped)} skipped' if skipped else ''} "
        f"(threshold {threshold:.4f}, {len(set(gallery.identities))} people, {len(gallery.paths)} photos)"
    )


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return report_input_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
