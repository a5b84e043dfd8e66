"""The per-epoch LFW validation of a training run (main process only)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn

import eval_metrics
import plots
from datasets.lfw_dataset import LFWDataset
from datasets.transforms import eval_transform
from devices import usable_workers
from training.runtime import Runtime, log
from verification import evaluate_model_on_lfw


class LFWValidator:
    """Reads the pairs once; each call embeds the LFW images, evaluates, logs and plots the ROC curve."""

    def __init__(self, args: argparse.Namespace, runtime: Runtime, output_dir: Path):
        self.args = args
        self.runtime = runtime
        self.output_dir = output_dir
        self.dataset = LFWDataset(args.lfw, args.lfw_pairs, transform=eval_transform(args.image_size))

    def __call__(self, model: nn.Module, epoch: int) -> eval_metrics.LFWMetrics:
        metrics, _ = evaluate_model_on_lfw(
            model,
            self.dataset,
            self.runtime.device,
            batch_size=self.args.lfw_batch_size,
            num_workers=usable_workers(self.args.num_workers),
            amp_dtype=self.runtime.amp_dtype,
            progress=sys.stderr.isatty(),
        )
        for line in eval_metrics.format_metrics(metrics):
            log.info(line)
        plots.plot_roc_lfw(
            metrics.false_positive_rate,
            metrics.true_positive_rate,
            metrics.roc_auc,
            self.output_dir / "plots" / f"roc_{self.args.model}_epoch_{epoch}.png",
            title=f"LFW ROC, epoch {epoch}",
        )
        return metrics
