"""The per-epoch validation of a training run (main process only): LFW and any ``.bin`` verification sets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn

import eval_metrics
import plots
from datasets.lfw_dataset import LFWDataset
from datasets.transforms import eval_transform, mean_and_std
from datasets.verification_bin import VerificationBinDataset
from devices import usable_workers
from training.runtime import Runtime, log
from verification import NonFiniteEmbeddings, check_pair_labels, evaluate_model_on_lfw


def verification_targets(args: argparse.Namespace) -> dict[str, object]:
    """Name -> pairs dataset: ``lfw`` for --lfw (a folder, or a .bin), then each --val_targets file by its stem."""
    transform = eval_transform(args.image_size, *mean_and_std(args.normalization))
    targets: dict[str, object] = {}
    if args.lfw is not None and Path(args.lfw).is_file():
        targets["lfw"] = VerificationBinDataset(args.lfw, transform=transform)
    elif args.lfw is not None:
        targets["lfw"] = LFWDataset(args.lfw, args.lfw_pairs, transform=transform)
    for path in args.val_targets:
        targets[Path(path).stem] = VerificationBinDataset(path, transform=transform)
    for name, dataset in targets.items():  # before training, not at the end of the first epoch
        check_pair_labels(dataset.issame, "--lfw" if name == "lfw" else f"--val_targets {name}")
    return targets


class Validator:
    """Reads the pairs once; each call embeds every target's images, evaluates, logs and plots ROC curves.

    The first target (LFW when --lfw is given) is the run's primary one: its threshold goes into the
    checkpoint and its full summary into training_log.csv.
    """

    def __init__(self, args: argparse.Namespace, runtime: Runtime, output_dir: Path):
        self.args = args
        self.runtime = runtime
        self.output_dir = output_dir
        self.targets = verification_targets(args)

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, eval_metrics.LFWMetrics]:
        results = {}
        for name, dataset in self.targets.items():
            label = "LFW" if name == "lfw" else name
            try:
                metrics, _ = evaluate_model_on_lfw(
                    model,
                    dataset,
                    self.runtime.device,
                    batch_size=self.args.lfw_batch_size,
                    num_workers=usable_workers(self.args.num_workers, self.runtime.local_world_size),
                    amp_dtype=self.runtime.eval_amp_dtype,
                    progress=sys.stderr.isatty(),
                )
            except NonFiniteEmbeddings as error:
                raise NonFiniteEmbeddings(f"{label}: {error}") from None
            for line in eval_metrics.format_metrics(metrics, label):
                log.info(line)
            prefix = "" if name == "lfw" else f"{name}_"
            plots.plot_roc_lfw(
                metrics.false_positive_rate,
                metrics.true_positive_rate,
                metrics.roc_auc,
                self.output_dir / "plots" / f"roc_{prefix}{self.args.model}_epoch_{epoch}.png",
                title=f"{label} ROC, epoch {epoch}",
            )
            results[name] = metrics
        return results
