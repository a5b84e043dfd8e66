"""Evaluate a face-embedding checkpoint on the LFW verification pairs.

The embedding and the ten-fold protocol are `verification.evaluate_model_on_lfw`, the same code the training
scripts validate with; this command evaluates a checkpoint of any layout `inference.load_checkpoint` reads:

    python validate_on_LFW.py --model_path model_resnet34_triplet.pt \\
        --lfw ../shared/data/lfw_112 --lfw_pairs ../shared/data/lfw_pairs.txt

It prints the metrics table and writes ``lfw_metrics.json`` and ``lfw_roc.png`` into ``--output_dir``
(default: ``<checkpoint stem>_lfw/`` next to the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import eval_metrics
import plots
from datasets.lfw_dataset import LFWDataset
from devices import AMP_CHOICES, resolve_amp, resolve_device, usable_workers
from errors import InputError, report_input_errors
from fileio import write_json_atomic
from inference import LoadedModel, load_checkpoint
from verification import evaluate_model_on_lfw


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a face-embedding checkpoint (this repository's or the original's) on LFW."
    )
    parser.add_argument("--model_path", required=True, type=Path, help="checkpoint (.pt) to evaluate")
    parser.add_argument(
        "--lfw", required=True, type=Path, help="folder of aligned LFW images, <Name>/<Name>_NNNN.jpg"
    )
    parser.add_argument("--lfw_pairs", required=True, type=Path, help="the LFW pairs.txt file")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--num_workers", type=int, default=4, help="data loader workers (capped at the CPU count)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--amp", choices=AMP_CHOICES, default="auto", help="autocast dtype; auto: bf16 on CUDA, off on CPU"
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="input size; default: the checkpoint's (224 for the original's)",
    )
    parser.add_argument(
        "--flip",
        action="store_true",
        help="also embed mirrored images and average (off: numbers match the original)",
    )
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=None,
        help="where the JSON and ROC plot go; default: <checkpoint stem>_lfw/",
    )
    parser.add_argument(
        "--skip_missing", action="store_true", help="drop pairs whose images are missing instead of failing"
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def output_paths(output_dir: Path, flip: bool) -> tuple[Path, Path]:
    """(metrics JSON, ROC plot); flip runs get their own names so both results can sit side by side."""
    suffix = "_flip" if flip else ""
    return output_dir / f"lfw_metrics{suffix}.json", output_dir / f"lfw_roc{suffix}.png"


def check_overwrite(json_path: Path, plot_path: Path, checkpoint_path: Path) -> None:
    """Refuse to replace results that another checkpoint (or someone else) wrote at these paths.

    Re-running on the same checkpoint replaces its own previous JSON and plot; anything we cannot prove
    is ours (a JSON for another checkpoint, an unreadable one, a plot without its JSON) stays untouched.
    """
    if json_path.exists():
        try:
            previous = json.loads(json_path.read_text())["checkpoint"]["path"]
        except (OSError, ValueError, KeyError, TypeError):
            previous = None
        if previous is None or Path(previous).resolve() != checkpoint_path.resolve():
            raise InputError(
                f"{json_path} already exists and holds results of another checkpoint ({previous}); "
                "choose another --output_dir"
            )
    elif plot_path.exists():
        raise InputError(
            f"{plot_path} already exists and was not written for this checkpoint; choose another --output_dir"
        )


def lfw_report(
    loaded: LoadedModel, args, metrics: eval_metrics.LFWMetrics, dataset, device, amp_dtype
) -> dict:
    """Everything the JSON file records: which model, how it was evaluated, and the metrics."""
    checkpoint = loaded.info()
    checkpoint["path"] = str(Path(args.model_path).resolve())
    return {
        "checkpoint": checkpoint,
        "evaluation": {
            "lfw_dir": str(args.lfw),
            "lfw_pairs": str(args.lfw_pairs),
            "num_pairs": int(len(dataset.issame)),
            "num_images": int(len(dataset)),
            "image_size": loaded.image_size,
            "flip": bool(args.flip),
            "device": str(device),
            "amp_dtype": None if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
        },
        "metrics": eval_metrics.metrics_summary(metrics),
        "per_fold": {
            "accuracy": metrics.accuracy.tolist(),
            "best_distance_threshold": metrics.best_distances.tolist(),
        },
    }


def run(args) -> dict:
    """Evaluate `args.model_path` on LFW, print the table, write JSON and plot; returns the JSON data."""
    for flag, path, kind in (("--lfw", args.lfw, "folder"), ("--lfw_pairs", args.lfw_pairs, "file")):
        if not (path.is_dir() if kind == "folder" else path.is_file()):
            raise InputError(f"{flag}: {kind} not found: {path}")
    if args.batch_size < 1 or args.num_workers < 0:
        raise InputError("--batch_size must be at least 1 and --num_workers at least 0")
    if args.image_size is not None and args.image_size < 1:
        raise InputError(f"--image_size must be positive, got {args.image_size}")

    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    output_dir = args.output_dir or args.model_path.parent / f"{args.model_path.stem}_lfw"
    json_path, plot_path = output_paths(output_dir, args.flip)
    check_overwrite(json_path, plot_path, args.model_path)

    loaded = load_checkpoint(args.model_path, device, image_size=args.image_size)
    if device.type == "cuda":
        # NHWC weights let cuDNN use its channels-last (tensor core) kernels; the inputs follow suit
        loaded.model.to(memory_format=torch.channels_last)
    dataset = LFWDataset(
        args.lfw, args.lfw_pairs, transform=loaded.transform(), skip_missing=args.skip_missing
    )
    print(
        f"{args.model_path}: {loaded.architecture} ({loaded.layout} layout), epoch {loaded.epoch}, "
        f"{loaded.image_size} px; {len(dataset.issame)} pairs, {len(dataset)} images on {device}"
    )
    metrics, _ = evaluate_model_on_lfw(
        loaded.model,
        dataset,
        device,
        batch_size=args.batch_size,
        num_workers=usable_workers(args.num_workers),
        amp_dtype=amp_dtype,
        flip=args.flip,
        progress=not args.no_progress,
    )
    for line in eval_metrics.format_metrics(metrics):
        print(line)

    report = lfw_report(loaded, args, metrics, dataset, device, amp_dtype)
    title = f"ROC on LFW: {args.model_path.name}{' (flip)' if args.flip else ''}"
    plots.plot_roc_lfw(
        metrics.false_positive_rate, metrics.true_positive_rate, metrics.roc_auc, plot_path, title
    )
    write_json_atomic(report, json_path)
    print(f"wrote {json_path} and {plot_path}")
    return report


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return report_input_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
