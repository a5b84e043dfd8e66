"""What a run remembers between epochs: loss and accuracy history, the CSV log, and the plots."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import plots
from fileio import atomic_write


@dataclass
class EpochTotals:
    """Running totals of an epoch: the average loss is ``loss_sum / count`` (a sum weighted by counts)."""

    loss_sum: float = 0.0
    count: float = 0.0  # triplets or images the loss was a mean over, summed over steps and processes
    skipped_steps: int = 0

    @property
    def average_loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")


@dataclass
class History:
    """Per-epoch results, kept in the checkpoint so plots and logs survive a resume."""

    epochs: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    validated_epochs: list[int] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    accuracy_stds: list[float] = field(default_factory=list)
    # every verification target's accuracy per validated epoch (the primary one included), by name
    target_accuracies: dict[str, list[float]] = field(default_factory=dict)


def append_csv_row(path: Path, row: dict) -> None:
    """Append ``row`` to a CSV log, writing the header first; a later row with new columns rewrites the header.

    Rows of the same or a later epoch than ``row`` come from a branch of the run that was abandoned (resumed
    from an earlier checkpoint, or killed after its log row but before its checkpoint): they move to
    ``<name>_superseded.csv`` next to it, so the log reads as the run that continues and nothing is lost.
    """
    rows = _read_rows(path)
    superseded = [old for old in rows if int(old["epoch"]) >= int(row["epoch"])]
    if superseded:
        superseded_path = path.with_name(f"{path.stem}_superseded{path.suffix}")
        _write_rows(superseded_path, _read_rows(superseded_path) + superseded)
        rows = [old for old in rows if int(old["epoch"]) < int(row["epoch"])]
    _write_rows(path, [*rows, row])


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write_rows(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for existing in rows:
        columns.extend(key for key in existing if key not in columns)
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_history(history: History, plots_dir: Path) -> None:
    """The training-loss plot and, once an epoch was validated, the accuracy plot (the primary target with
    its spread over folds, the other verification targets as further lines)."""
    plots.plot_training_loss(history.epochs, history.losses, plots_dir / "training_loss.png")
    if history.validated_epochs:
        names = list(history.target_accuracies) or ["lfw"]
        # targets validated from a resumed run's first validation on line up with the last epochs
        others = {
            name: (history.validated_epochs[-len(values) :], values)
            for name, values in history.target_accuracies.items()
            if name != names[0]
        }
        plots.plot_accuracy_lfw(
            history.validated_epochs,
            history.accuracies,
            plots_dir / "lfw_accuracies.png",
            stds=history.accuracy_stds,
            others=others,
            name="LFW" if names[0] == "lfw" else names[0],
        )
