"""Training and LFW plots: arrays in, one PNG out.

Plots are dumb on purpose: callers compute the numbers (see eval_metrics.py) and pass them with an output
path. The Agg backend renders without a display, so this works on headless training machines; every
figure is closed, even when drawing or saving fails, so long runs do not accumulate open figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)
import numpy as np  # noqa: E402


def plot_roc_lfw(
    false_positive_rate, true_positive_rate, roc_auc: float, path, title: str | None = None
) -> None:
    """ROC curve on LFW with the area under it in the legend, against the chance diagonal."""
    false_positive_rate, true_positive_rate = _paired_1d(
        false_positive_rate, true_positive_rate, "false_positive_rate", "true_positive_rate"
    )
    with _saved_figure(path) as ax:
        ax.plot(
            false_positive_rate,
            true_positive_rate,
            color="red",
            lw=2,
            label=f"ROC curve (area = {roc_auc:.4f})",
        )
        ax.plot([0, 1], [0, 1], color="blue", lw=2, linestyle="--", label="Random")
        ax.set(xlim=(0.0, 1.0), ylim=(0.0, 1.05), xlabel="False Positive Rate", ylabel="True Positive Rate")
        ax.set_title(title or "Receiver Operating Characteristic (ROC) curve on LFW")
        ax.legend(loc="lower right")


def plot_accuracy_lfw(epochs, accuracies, path, stds=None, others=None, name="LFW") -> None:
    """Accuracy per epoch on ``name``; `stds` (across folds) are drawn as a shaded band around the mean.

    ``others`` maps more verification targets to their (epochs, accuracies), drawn as further lines.
    """
    epochs, accuracies = _paired_1d(epochs, accuracies, "epochs", "accuracies")
    if stds is not None:
        _, stds = _paired_1d(epochs, stds, "epochs", "stds")
    with _saved_figure(path) as ax:
        ax.plot(epochs, accuracies, color="red", marker="o", label=f"{name} accuracy")
        if stds is not None:
            ax.fill_between(
                epochs, accuracies - stds, accuracies + stds, color="red", alpha=0.2, label="+-1 std"
            )
        for other, (other_epochs, other_accuracies) in (others or {}).items():
            other_epochs, other_accuracies = _paired_1d(
                other_epochs, other_accuracies, "epochs", "accuracies"
            )
            ax.plot(other_epochs, other_accuracies, marker="s", label=f"{other} accuracy")
        title = f"{name} accuracy per epoch" if not others else "Verification accuracy per epoch"
        ax.set(xlabel="Epoch", ylabel="Accuracy", title=title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")


def plot_training_loss(epochs, losses, path) -> None:
    """Mean training loss per epoch."""
    epochs, losses = _paired_1d(epochs, losses, "epochs", "losses")
    with _saved_figure(path) as ax:
        ax.plot(epochs, losses, color="blue", marker="o", label="Training loss")
        ax.set(xlabel="Epoch", ylabel="Loss", title="Training loss per epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right")


@contextmanager
def _saved_figure(path) -> Iterator[plt.Axes]:
    """Give the caller fresh axes, then save the figure to `path` (creating its folder) and close it.

    The figure is closed whatever happens; errors still propagate, so a failed plot is never silent.
    """
    fig, ax = plt.subplots()
    try:
        yield ax
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    finally:
        plt.close(fig)


def _paired_1d(x, y, x_name: str, y_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Two 1-D float arrays of equal length, or a ValueError naming the culprits."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"{x_name} and {y_name} must be 1-D, got shapes {x.shape} and {y.shape}")
    if x.size != y.size:
        raise ValueError(f"{x_name} and {y_name} must have the same length, got {x.size} and {y.size}")
    return x, y
