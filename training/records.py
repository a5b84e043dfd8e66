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
    # those of the skipped steps whose loss was not finite (the rest: fp16 overflows)
    nonfinite_steps: int = 0

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
    # the epochs each target was validated at, and its std over folds; the primary target of the latest
    # validation (a resumed run may change its targets; checkpoints from before these lack them)
    target_epochs: dict[str, list[int]] = field(default_factory=dict)
    target_stds: dict[str, list[float]] = field(default_factory=dict)
    primary_target: str | None = None

    def record_target(self, name: str, epoch: int, accuracy: float, std: float, primary: bool) -> None:
        for series, value in (
            (self.target_accuracies, accuracy),
            (self.target_epochs, epoch),
            (self.target_stds, std),
        ):
            series.setdefault(name, []).append(value)
        if primary:
            self.primary_target = name
            self.accuracies.append(accuracy)
            self.accuracy_stds.append(std)

    @property
    def primary(self) -> str | None:
        """The primary target of the latest validation (the first one ever, for checkpoints from before that
        was kept), or None when no target was recorded by name."""
        return self.primary_target or next(iter(self.target_accuracies), None)

    def target_series(self, name: str) -> tuple[list[int], list[float], list[float] | None]:
        """(epochs, accuracies, stds or None) of one target. Values recorded before targets kept their
        epochs are lined up with the last validated epochs before the first one that did."""
        values = self.target_accuracies[name]
        epochs = self.target_epochs.get(name, [])
        older = len(values) - len(epochs)
        if older:
            before = [epoch for epoch in self.validated_epochs if not epochs or epoch < epochs[0]]
            epochs = before[-older:] + epochs
        stds = self.target_stds.get(name)
        return epochs, values, stds if stds is not None and len(stds) == len(values) else None


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
        if not history.target_accuracies:  # a checkpoint from before targets were kept by name
            epochs, accuracies, stds, primary = (
                history.validated_epochs,
                history.accuracies,
                history.accuracy_stds,
                "lfw",
            )
        else:
            primary = history.primary
            epochs, accuracies, stds = history.target_series(primary)
        others = {}
        for name in history.target_accuracies:
            if name != primary:
                other_epochs, other_accuracies, _ = history.target_series(name)
                others[name] = (other_epochs, other_accuracies)
        plots.plot_accuracy_lfw(
            epochs,
            accuracies,
            plots_dir / "lfw_accuracies.png",
            stds=stds,
            others=others,
            name="LFW" if primary == "lfw" else primary,
        )
