"""Index a folder of face images, one sub-folder per identity, into the CSV the training datasets read.

    python datasets/generate_csv_files.py --dataroot datasets/vggface2_train --csv_name datasets/vggface2.csv

Writes `id,name,class,ext`: the file stem, the identity folder, the identity's index among the identity folders
in sorted order, and the file extension. The first three columns are the original tool's, so its CSVs and
these are interchangeable; `ext` lets the datasets build paths without probing the disk.

Built for VGGFace2 (3.3 million files): folders are listed with `os.scandir` (no stat per file) by a thread
pool, rows go straight to the csv writer. Files that are not images are skipped and counted. `--verify`
decodes every image (threads again; Pillow releases the GIL while decoding), leaves the unreadable ones out of
the CSV and lists them.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image
from tqdm import tqdm

from datasets.image_files import DECODE_ERRORS, IMAGE_EXTENSIONS
from devices import available_cpus
from errors import InputError, report_input_errors
from fileio import atomic_write, refuse_to_replace

CSV_COLUMNS = ("id", "name", "class", "ext")


class CsvSummary(NamedTuple):
    num_images: int  # rows written
    num_identities: int  # classes written (identity folders with at least one usable image)
    num_skipped_files: int  # entries that are not images (and folders nested inside identity folders)
    bad_images: list[str]  # images that failed to decode (only with verify=True); left out of the CSV


class _Folder(NamedTuple):
    name: str
    images: list[tuple[str, str]]  # (stem, ext), sorted by file name
    num_skipped: int
    bad_images: list[str]


def default_num_workers() -> int:
    return min(32, available_cpus() + 4)  # as ThreadPoolExecutor's default: listing is mostly I/O


def generate_csv(
    dataroot, csv_path, verify: bool = False, num_workers: int | None = None, progress=None
) -> CsvSummary:
    """Write the CSV of every image under `dataroot/<identity>/` to `csv_path` (atomically) and summarise.

    `progress`, if given, wraps the iterator of scanned folders, e.g. `lambda it, total: tqdm(it, total=total)`.
    """
    dataroot, csv_path = os.fspath(dataroot), os.fspath(csv_path)
    num_workers = default_num_workers() if num_workers is None else num_workers
    if num_workers < 1:
        raise InputError(f"--num_workers must be at least 1, got {num_workers}")
    identity_names, num_skipped = _list_identity_folders(dataroot)

    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        scanned = pool.map(lambda name: _scan_folder(dataroot, name, verify), identity_names)
        folders = list(scanned if progress is None else progress(scanned, len(identity_names)))

    num_skipped += sum(folder.num_skipped for folder in folders)
    bad_images = sorted(path for folder in folders for path in folder.bad_images)
    folders = [folder for folder in folders if folder.images]  # classes only for folders with images
    if not folders:
        detail = f" ({len(bad_images)} unreadable)" if bad_images else ""
        raise InputError(
            f"no images found under {dataroot}/<identity>/{detail} (extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )

    _write_rows(csv_path, folders)
    return CsvSummary(
        num_images=sum(len(folder.images) for folder in folders),
        num_identities=len(folders),
        num_skipped_files=num_skipped,
        bad_images=bad_images,
    )


def _require_utf8(path: str) -> None:
    """The CSV is UTF-8: a name the file system holds in another encoding (surrogate-escaped by Python) cannot
    be written to it, nor found again by the datasets."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"{path.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')}: the name is not valid UTF-8; "
            "rename it (e.g. with convmv) so the CSV can hold it"
        ) from None


def _list_identity_folders(dataroot: str) -> tuple[list[str], int]:
    """Sorted identity folder names, and the number of other entries at the top level."""
    if not os.path.isdir(dataroot):
        raise InputError(f"dataset folder not found: {dataroot}")
    names, num_skipped = [], 0
    with os.scandir(dataroot) as entries:
        for entry in entries:
            if entry.is_dir() and not entry.name.startswith("."):
                _require_utf8(entry.path)
                names.append(entry.name)
            else:
                num_skipped += 1
    if not names:
        raise InputError(f"{dataroot} has no identity sub-folders (expected {dataroot}/<identity>/<image>)")
    return sorted(names), num_skipped


def print_bad_images(bad_images: list[str], shown: int = 20) -> None:
    """The images --verify left out, the first ``shown`` of them by name."""
    if bad_images:
        print(f"{len(bad_images)} unreadable images left out:", *bad_images[:shown], sep="\n  ")
        if len(bad_images) > shown:
            print(f"  ... and {len(bad_images) - shown} more")


def _scan_folder(dataroot: str, name: str, verify: bool) -> _Folder:
    folder = os.path.join(dataroot, name)
    images, num_skipped, bad = [], 0, []
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
    except OSError as error:
        raise InputError(f"cannot list {folder}: {error.strerror or error}") from None
    for entry in entries:
        stem, ext = os.path.splitext(entry.name)
        # hidden files (macOS's ._<name>.jpg metadata twins, .DS_Store) are not images, whatever their ending
        if ext.lower() not in IMAGE_EXTENSIONS or entry.name.startswith(".") or not entry.is_file():
            num_skipped += 1
        elif verify and not _decodes(entry.path):
            bad.append(entry.path)
        else:
            _require_utf8(entry.path)
            images.append((stem, ext))
    return _Folder(name, images, num_skipped, bad)


def _decodes(path: str) -> bool:
    try:
        with Image.open(path) as image:
            image.load()  # the full decode: a truncated JPEG fails only here
        return True
    except DECODE_ERRORS:
        return False


def _write_rows(csv_path: str, folders: list[_Folder]) -> None:
    with atomic_write(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for label, folder in enumerate(folders):
            writer.writerows((stem, folder.name, label, ext) for stem, ext in folder.images)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write the id,name,class,ext CSV of a folder of face images."
    )
    parser.add_argument(
        "--dataroot", "-d", required=True, help="folder with one sub-folder of images per identity"
    )
    parser.add_argument(
        "--csv_name", default="vggface2.csv", help="path of the CSV to write (default: vggface2.csv)"
    )
    parser.add_argument(
        "--verify", action="store_true", help="decode every image; leave unreadable ones out and list them"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --csv_name")
    parser.add_argument(
        "--num_workers", type=int, default=default_num_workers(), help="threads listing/decoding folders"
    )
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    def progress(folders, total):
        return tqdm(folders, total=total, unit=" folders", disable=not sys.stderr.isatty())

    def body() -> int:
        refuse_to_replace(args.csv_name, args.overwrite, "--csv_name")
        summary = generate_csv(
            args.dataroot, args.csv_name, verify=args.verify, num_workers=args.num_workers, progress=progress
        )
        print(
            f"wrote {args.csv_name}: {summary.num_images} images of {summary.num_identities} identities "
            f"({summary.num_skipped_files} non-image entries skipped)"
        )
        print_bad_images(summary.bad_images)
        return 0

    return report_input_errors(body)


if __name__ == "__main__":
    sys.exit(main())
