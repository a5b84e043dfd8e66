"""Evaluate a face-embedding checkpoint on the LFW verification pairs, and on other verification sets.

The embedding and the ten-fold protocol are `verification.evaluate_model_on_lfw`, the same code the training
scripts validate with; this command evaluates a checkpoint of any layout `inference.load_checkpoint` reads:

    python validate_on_LFW.py --model_path model_resnet34_triplet.pt \\
        --lfw ../shared/data/lfw_112 --lfw_pairs ../shared/data/lfw_pairs.txt

    python validate_on_LFW.py --model_path model.pt --lfw lfw.bin --val_targets cfp_fp.bin agedb_30.bin

It prints each target's metrics (and, for several, one summary table) and writes ``<target>_metrics.json`` and
``<target>_roc.png`` (``lfw_metrics.json`` / ``lfw_roc.png`` for LFW) into ``--output_dir`` (default:
``<checkpoint stem>_lfw/`` next to the checkpoint). A ``.bin`` is insightface's format (pairs of consecutive
images, ten folds of consecutive pairs), read without unpickling arbitrary objects.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import eval_metrics
import plots
from datasets.lfw_dataset import LFWDataset, resolve_lfw_pairs
from datasets.verification_bin import VerificationBinDataset
from devices import AMP_CHOICES, amp_name, auto_amp, resolve_amp, resolve_device, usable_workers
from errors import InputError, report_input_errors
from fileio import write_json_atomic
from inference import PREPROCESS_PRESETS, LoadedModel, load_checkpoint, preset_help
from verification import check_pair_labels, evaluate_model_on_lfw


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a face-embedding checkpoint (this repository's or the original's) on LFW and "
        "other verification sets."
    )
    parser.add_argument("--model_path", required=True, type=Path, help="checkpoint (.pt) to evaluate")
    parser.add_argument(
        "--lfw",
        type=Path,
        help="folder of aligned LFW images, <Name>/<Name>_NNNN.jpg (with --lfw_pairs), or an lfw.bin",
    )
    parser.add_argument("--lfw_pairs", type=Path, help="the LFW pairs.txt file (for an --lfw folder)")
    parser.add_argument(
        "--val_targets",
        nargs="+",
        type=Path,
        default=[],
        metavar="BIN",
        help="verification sets in insightface's .bin format (cfp_fp.bin, agedb_30.bin, ...), evaluated "
        "like LFW; with several targets a summary table follows",
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--num_workers", type=int, default=4, help="data loader workers (capped at the CPU count)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default=None,
        help="autocast dtype; default: the one the training run validated in (its checkpoint says), so the "
        "numbers match its log, else auto (bf16 on GPUs with native bf16, fp16 on older ones, off on the CPU)",
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
        help="where each target's JSON and ROC plot go (lfw_metrics.json, <name>_metrics.json, ...); "
        "default: <checkpoint stem>_lfw/",
    )
    parser.add_argument("--preprocess", choices=tuple(PREPROCESS_PRESETS), default=None, help=preset_help())
    parser.add_argument(
        "--skip_missing", action="store_true", help="drop pairs whose images are missing instead of failing"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the metrics and plots an earlier run left in --output_dir",
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def output_paths(output_dir: Path, flip: bool, target: str = "lfw") -> tuple[Path, Path]:
    """(metrics JSON, ROC plot) of a target; flip runs get their own names so both can sit side by side."""
    suffix = "_flip" if flip else ""
    return output_dir / f"{target}_metrics{suffix}.json", output_dir / f"{target}_roc{suffix}.png"


def check_writable_folder(output_dir: Path) -> None:
    """--output_dir is a folder, or can be made as one, where this process may write (nothing is created)."""
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--output_dir {output_dir}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--output_dir {output_dir}: {existing} is not writable")


def check_overwrite(json_path: Path, plot_path: Path, checkpoint_path: Path, overwrite: bool = False) -> None:
    """Refuse to replace earlier results at these paths unless --overwrite is given: a re-run with other
    pairs, another --image_size or --skip_missing would otherwise replace the numbers of the first one
    without a word. The message says whose results they are (this checkpoint's, another's, unknown)."""
    if overwrite or not (json_path.exists() or plot_path.exists()):
        return
    if not json_path.exists():
        raise InputError(
            f"{plot_path} already exists and was not written for this checkpoint; choose another --output_dir "
            "or pass --overwrite"
        )
    try:
        previous = json.loads(json_path.read_text())["checkpoint"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        previous = None
    whose = (
        "this checkpoint's earlier results"
        if previous is not None and Path(previous).resolve() == checkpoint_path.resolve()
        else f"results of another checkpoint ({previous})"
    )
    raise InputError(
        f"{json_path} already holds {whose}; pass --overwrite to replace them or choose another --output_dir"
    )


def lfw_report(
    loaded: LoadedModel, args, metrics: eval_metrics.LFWMetrics, dataset, device, amp_dtype, source: dict
) -> dict:
    """Everything the JSON file records: which model, how it was evaluated (``source``: which files), and
    the metrics."""
    checkpoint = loaded.info()
    checkpoint["path"] = str(Path(args.model_path).resolve())
    return {
        "checkpoint": checkpoint,
        "evaluation": {
            **source,
            "num_pairs": int(len(dataset.issame)),
            # --skip_missing: pairs of the file left out because an image is missing (not the official protocol)
            "num_skipped_pairs": int(getattr(dataset, "num_skipped_pairs", 0)),
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


def check_args(args) -> list[tuple[str, Path]]:
    """Every cheap check, before any work; the targets as (name, path): ``lfw`` first when given."""
    targets = []
    if args.lfw is not None:
        # a file is a .bin, whatever its name says; a folder needs its pairs, found as training finds them
        if args.lfw.is_dir():
            args.lfw_pairs = Path(resolve_lfw_pairs(args.lfw, args.lfw_pairs))
        elif not args.lfw.is_file():
            kind = "file" if args.lfw.suffix.lower() == ".bin" else "folder"
            raise InputError(f"--lfw: {kind} not found: {args.lfw}")
        elif args.lfw_pairs is not None:
            raise InputError(
                f"--lfw_pairs goes with an --lfw folder; {args.lfw} is a file (a .bin holds its pairs)"
            )
        targets.append(("lfw", args.lfw))
    for path in args.val_targets:
        if not path.is_file():
            raise InputError(f"--val_targets: file not found: {path}")
        targets.append((path.stem, path))
    if not targets:
        raise InputError(
            "nothing to evaluate: give --lfw (a folder with --lfw_pairs, or a .bin) or --val_targets"
        )
    names = [name for name, _ in targets]
    if len(set(names)) != len(names):
        raise InputError(f"two targets share the name {max(names, key=names.count)!r}; rename one file")
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise InputError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if args.image_size is not None and args.image_size < 1:
        raise InputError(f"--image_size must be positive, got {args.image_size}")
    return targets


def open_target(name: str, path: Path, args, transform):
    """The pairs dataset of a target and what the JSON records about its files: a file is an insightface .bin
    (every --val_targets, and an --lfw file), a folder LFW images with --lfw_pairs."""
    if path.is_file():
        return VerificationBinDataset(path, transform=transform), {"target": name, "bin": str(path)}
    dataset = LFWDataset(path, args.lfw_pairs, transform=transform, skip_missing=args.skip_missing)
    return dataset, {"target": name, "lfw_dir": str(path), "lfw_pairs": str(args.lfw_pairs)}


def evaluate_target(name, opened, loaded, args, device, amp_dtype, paths) -> dict:
    """Evaluate one opened target, print its metrics, write its JSON and ROC plot; returns the JSON data."""
    dataset, source = opened
    label = "LFW" if name == "lfw" else name
    print(f"{label}: {len(dataset.issame)} pairs, {len(dataset)} images")
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
    for line in eval_metrics.format_metrics(metrics, label):
        print(line)
    report = lfw_report(loaded, args, metrics, dataset, device, amp_dtype, source)
    json_path, plot_path = paths
    title = f"ROC on {label}: {args.model_path.name}{' (flip)' if args.flip else ''}"
    plots.plot_roc_lfw(
        metrics.false_positive_rate, metrics.true_positive_rate, metrics.roc_auc, plot_path, title
    )
    write_json_atomic(report, json_path)
    print(f"wrote {json_path} and {plot_path}")
    return report


def summary_table(reports: dict[str, dict]) -> list[str]:
    """One line per target: accuracy, ROC AUC, threshold, TAR at FAR 1e-3."""
    lines = [f"{'target':<16} {'accuracy':>16} {'ROC AUC':>8} {'threshold':>9} {'TAR@FAR=1e-3':>13}"]
    for name, report in reports.items():
        m = report["metrics"]
        accuracy = f"{m['accuracy_mean']:.4f}+-{m['accuracy_std']:.4f}"
        lines.append(
            f"{name:<16} {accuracy:>16} {m['roc_auc']:>8.4f} {m['best_distance_threshold_mean']:>9.3f} "
            f"{m['tar_at_far_0.001_mean']:>13.4f}"
        )
    return lines


def evaluation_precision(choice: str | None, stored: str | None, device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype to embed in, and a few words on why: --amp when given; else the precision the
    training run validated in (so the numbers match its log) where this device has it natively (fp32
    anywhere, bf16 where --amp auto would train in it, fp16 on CUDA); else auto."""
    if choice is not None:
        dtype = resolve_amp(choice, device, training=False)
        return dtype, f"precision {amp_name(dtype)} (--amp {choice})"
    native = {"off", amp_name(auto_amp(device)[0])} | ({"fp16"} if device.type == "cuda" else set())
    if stored in native:
        dtype = resolve_amp(stored, device, training=False)
        return dtype, f"precision {stored}, as the training run validated"
    dtype = resolve_amp("auto", device, training=False)
    why = (
        f"the run validated in {stored}, not native here; --amp auto" if stored is not None else "--amp auto"
    )
    return dtype, f"precision {amp_name(dtype)} ({why})"


def run(args) -> dict:
    """Evaluate ``args.model_path`` on every target, print, write JSON and plots; returns the first target's
    JSON data (with several targets, all of them under ``"targets"``)."""
    targets = check_args(args)
    device = resolve_device(args.device)
    if args.amp is not None:
        resolve_amp(args.amp, device, training=False)  # --amp fp16 on the CPU fails here, before any work
    output_dir = args.output_dir or args.model_path.parent / f"{args.model_path.stem}_lfw"
    paths = {name: output_paths(output_dir, args.flip, name) for name, _ in targets}
    for json_path, plot_path in paths.values():
        check_overwrite(json_path, plot_path, args.model_path, args.overwrite)
    check_writable_folder(Path(output_dir))  # before minutes of embedding, not after them

    loaded = load_checkpoint(args.model_path, device, image_size=args.image_size, preprocess=args.preprocess)
    if device.type == "cuda":
        # NHWC weights let cuDNN use its channels-last (tensor core) kernels; the inputs follow suit
        loaded.model.to(memory_format=torch.channels_last)
    amp_dtype, precision = evaluation_precision(args.amp, loaded.validation_precision, device)
    print(
        f"{args.model_path}: {loaded.architecture} ({loaded.layout} layout), epoch {loaded.epoch}, "
        f"{loaded.image_size} px, on {device}, {precision}"
    )
    # every target's files are read and checked before the first is embedded: a bad one fails in seconds
    opened = {name: open_target(name, path, args, loaded.transform()) for name, path in targets}
    for name, path in targets:
        check_pair_labels(
            opened[name][0].issame, f"--lfw {path}" if name == "lfw" else f"--val_targets {path}"
        )
    reports = {
        name: evaluate_target(name, opened[name], loaded, args, device, amp_dtype, paths[name])
        for name, _ in targets
    }
    first = next(iter(reports.values()))
    if len(reports) > 1:
        print("\n".join(summary_table(reports)))
        return {**first, "targets": reports}
    return first


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return report_input_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
