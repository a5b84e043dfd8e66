"""Write LFW-style verification pairs as an insightface `.bin` (the format of lfw.bin, cfp_fp.bin, agedb_30.bin).

    python datasets/make_verification_bin.py --lfw ../shared/data/lfw_112 \\
        --lfw_pairs ../shared/data/lfw_pairs.txt --output lfw.bin

The pairs keep the order of the pairs file, so insightface's ten consecutive folds are the official ones; the
images are stored as their original file bytes. See `datasets/verification_bin.py` for the format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.verification_bin import write_verification_bin
from errors import report_input_errors
from fileio import refuse_to_replace


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write LFW-style verification pairs as an insightface .bin.")
    parser.add_argument("--lfw", required=True, help="folder of aligned images, <Name>/<Name>_NNNN.jpg")
    parser.add_argument("--lfw_pairs", required=True, help="the pairs file (LFW pairs.txt format)")
    parser.add_argument("--output", "-o", required=True, help="the .bin to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        refuse_to_replace(args.output, args.overwrite, "--output")
        summary = write_verification_bin(args.lfw, args.lfw_pairs, args.output)
        print(
            f"wrote {args.output}: {summary.num_pairs} pairs, {summary.num_images} images, "
            f"{summary.num_bytes / 1e6:.1f} MB"
        )
        if summary.note:
            print(f"note: {summary.note}")
        return 0

    return report_input_errors(body)


if __name__ == "__main__":
    sys.exit(main())
