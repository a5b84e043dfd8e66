"""Pack a folder of face images, one sub-folder per identity, into an insightface-style RecordIO training set.

    python datasets/pack_recordio.py --dataroot datasets/vggface2_train --output datasets/vggface2.rec

Writes `vggface2.rec` and `vggface2.idx` (see `datasets/recordio.py`): labels are the identities' indices in
sorted folder order, as in the CSV of `generate_csv_files.py`; images are stored as their original file bytes.
An interrupted run continues where it stopped when the same command is run again. `--verify` decodes every
image first and leaves the unreadable ones out (a .rec has no fallback for an image that does not decode).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.generate_csv_files import default_num_workers, print_bad_images
from datasets.recordio_writer import write_recordio
from errors import InputError, report_input_errors


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Pack a folder of face images into a RecordIO .rec + .idx.")
    parser.add_argument(
        "--dataroot", "-d", required=True, help="folder with one sub-folder of images per identity"
    )
    parser.add_argument("--output", "-o", required=True, help="the .rec to write (its .idx goes next to it)")
    parser.add_argument(
        "--verify", action="store_true", help="decode every image first; leave unreadable ones out"
    )
    parser.add_argument(
        "--num_workers", type=int, default=default_num_workers(), help="threads listing/decoding folders"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=sys.stderr.isatty(),
        help="show a progress bar (default: when stderr is a terminal)",
    )
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        if not str(args.output).endswith(".rec") or os.path.isdir(args.output):
            raise InputError(f"--output {args.output}: name the .rec file to write, e.g. train.rec")
        summary = write_recordio(
            args.dataroot,
            args.output,
            verify=args.verify,
            num_workers=args.num_workers,
            progress=args.progress,
        )
        # records: the header, then the images, then one per identity
        if summary.num_resumed >= 1 + summary.num_images + summary.num_identities:
            resumed = "; it was already complete"
        elif summary.num_resumed:
            images_done = min(summary.num_resumed - 1, summary.num_images)
            resumed = f"; {images_done} of the images were already packed"
        else:
            resumed = ""
        print(
            f"wrote {summary.rec_path} and {summary.idx_path}: {summary.num_images} images of "
            f"{summary.num_identities} identities{resumed}"
        )
        print_bad_images(summary.bad_images)
        return 0

    return report_input_errors(body)


if __name__ == "__main__":
    sys.exit(main())
