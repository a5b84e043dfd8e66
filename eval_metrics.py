"""LFW verification metrics from pair distances: cross-validated accuracy, ROC, and TAR at fixed FAR.

Pure numpy / scikit-learn, no torch and no file I/O: callers embed the pairs, compute one distance per pair
and pass the distances with the same/different labels. A pair is predicted "same" when its distance is
strictly below the threshold.

The protocol follows the LFW "unrestricted" evaluation used by FaceNet
(https://github.com/davidsandberg/facenet/blob/master/src/lfw.py): the pairs are split into the official
folds (consecutive blocks, never shuffled); for each fold the threshold is chosen on the other folds and
the metrics are measured on the held-out one. Unlike the grid search of the original repository, the
thresholds here are exact optima over the observed distances, so any distance scale works.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from errors import InputError


class _OriginalFields(NamedTuple):
    true_positive_rate: np.ndarray  # ROC over all pairs (sklearn.metrics.roc_curve)
    false_positive_rate: np.ndarray
    precision: np.ndarray  # per fold, at that fold's best-accuracy threshold
    recall: np.ndarray
    accuracy: np.ndarray
    roc_auc: float
    best_distances: np.ndarray  # per fold: the distance threshold chosen on the training folds
    tar: np.ndarray  # per fold TAR at `far_target`
    far: np.ndarray  # per fold measured FAR at `far_target`


class LFWMetrics(_OriginalFields):
    """Everything `evaluate_lfw` measures.

    As a tuple it is exactly the original `evaluate_lfw`'s nine values in the original order, so
    `tpr, fpr, precision, recall, accuracy, roc_auc, best_distances, tar, far = evaluate_lfw(...)` keeps
    working; the newer results are attributes only. Per-fold arrays have one entry per fold; the ROC arrays
    cover all pairs at once.
    """

    thresholds: np.ndarray  # ROC thresholds as distances (a pair counts as same when distance <= threshold)
    far_targets: tuple[float, ...]
    tar_at_far: dict[float, np.ndarray]  # far target -> per-fold TAR
    far_at_far: dict[float, np.ndarray]  # far target -> per-fold measured FAR
    # per fold: the denominators of the rates above, so that summaries can leave out the folds where a rate is
    # undefined (a fold without same pairs has no recall or TAR; its 0 in the arrays is a placeholder)
    positives_per_fold: np.ndarray
    negatives_per_fold: np.ndarray
    predicted_same_per_fold: np.ndarray  # at the fold's best-accuracy threshold: precision's denominator

    _EXTRAS = ("thresholds", "far_targets", "tar_at_far", "far_at_far", "positives_per_fold",
               "negatives_per_fold", "predicted_same_per_fold")  # fmt: skip

    def __new__(cls, *fields, **named_fields):
        extras = {name: named_fields.pop(name) for name in cls._EXTRAS}
        metrics = super().__new__(cls, *fields, **named_fields)
        for name, value in extras.items():
            setattr(metrics, name, value)
        return metrics

    def __reduce__(self):  # pickle and copy.deepcopy: the tuple's fields and the attributes
        return _rebuild_metrics, (tuple(self), {name: getattr(self, name) for name in self._EXTRAS})


def _rebuild_metrics(fields: tuple, extras: dict) -> LFWMetrics:
    return LFWMetrics(*fields, **extras)


class FoldRates(NamedTuple):
    """Counts turned into rates on one fold at one threshold; empty denominators give 0, not NaN (the
    denominators come along, so that a summary can tell such a placeholder from a measured 0)."""

    accuracy: float
    precision: float
    recall: float  # also the true accept rate (TAR)
    false_accept_rate: float
    positives: int  # recall's denominator
    negatives: int  # the false accept rate's
    predicted_same: int  # precision's


def evaluate_lfw(
    distances,
    labels,
    num_folds: int = 10,
    far_target: float = 1e-3,
    far_targets=(1e-1, 1e-2, 1e-3),
    fold_ids=None,
) -> LFWMetrics:
    """Evaluate pair distances against same/different labels with the LFW ten-fold protocol.

    `distances` holds one distance per pair and `labels` 1 (or True) for a same-person pair, in the order of
    the pairs file, so that consecutive blocks are the official folds. When some pairs were dropped (missing
    images), pass `fold_ids` (the official fold of each remaining pair) so the folds stay the official ones
    instead of shifting; `num_folds` is then the number of distinct ids. `far_target` is the target reported
    in `tar`/`far`; it is added to `far_targets` if missing. In the per-fold arrays, a fold without positives
    (or negatives) has a recall/TAR (or FAR) of 0 and a fold with nothing predicted same a precision of 0,
    never NaN; `format_metrics` and `metrics_summary` leave such folds out of the rate's mean and std (see
    `fold_mean_std`). Raises `InputError` (a ValueError) for mismatched or malformed inputs.
    """
    if fold_ids is not None:
        fold_ids = np.asarray(fold_ids)
        if fold_ids.shape != np.shape(distances):
            raise InputError(f"fold_ids has shape {fold_ids.shape}, distances {np.shape(distances)}")
        num_folds = len(np.unique(fold_ids))
    distances, labels = _validate_pairs(distances, labels, num_folds)
    far_targets = _merge_far_targets(far_target, far_targets)
    reported = next(t for t in far_targets if math.isclose(t, float(far_target), rel_tol=1e-6))

    per_fold = _per_fold_metrics(
        distances, labels, lfw_fold_splits(distances.size, num_folds, fold_ids), far_targets
    )
    # roc_curve ranks by score, so negate: a smaller distance means "more likely the same person".
    false_positive_rate, true_positive_rate, score_thresholds = roc_curve(labels, -distances)
    return LFWMetrics(
        true_positive_rate=true_positive_rate,
        false_positive_rate=false_positive_rate,
        roc_auc=float(roc_auc_score(labels, -distances)),
        tar=per_fold["tar_at_far"][reported],
        far=per_fold["far_at_far"][reported],
        thresholds=-score_thresholds,
        far_targets=far_targets,
        **per_fold,
    )


def _per_fold_metrics(distances, labels, splits, far_targets) -> dict:
    """For each (train, test) split: the best-accuracy threshold chosen on the training pairs, the rates it
    gives on the test pairs with their denominators, and TAR and FAR at each target's threshold; keyed by the
    names of LFWMetrics' fields."""
    num_folds = len(splits)
    per_fold = {name: np.zeros(num_folds) for name in ("accuracy", "precision", "recall", "best_distances")}
    for name in ("positives", "negatives", "predicted_same"):
        per_fold[f"{name}_per_fold"] = np.zeros(num_folds, dtype=np.int64)
    tar_at_far = {target: np.zeros(num_folds) for target in far_targets}
    far_at_far = {target: np.zeros(num_folds) for target in far_targets}
    for fold, (train, test) in enumerate(splits):
        threshold = best_accuracy_threshold(distances[train], labels[train])
        rates = rates_at_threshold(distances[test], labels[test], threshold)
        per_fold["best_distances"][fold] = threshold
        for name in ("accuracy", "precision", "recall"):
            per_fold[name][fold] = getattr(rates, name)
        for name in ("positives", "negatives", "predicted_same"):
            per_fold[f"{name}_per_fold"][fold] = getattr(rates, name)
        for target in far_targets:
            far_threshold = threshold_at_far(distances[train], labels[train], target)
            far_rates = rates_at_threshold(distances[test], labels[test], far_threshold)
            tar_at_far[target][fold] = far_rates.recall
            far_at_far[target][fold] = far_rates.false_accept_rate
    return {**per_fold, "tar_at_far": tar_at_far, "far_at_far": far_at_far}


def stratified_fold_ids(labels, num_folds: int = 10) -> np.ndarray:
    """Fold ids for pairs that come without folds (a pairs file without a header, LFW's one-fold View 1).

    Consecutive blocks of such a file, often sorted by kind, would test on one kind per fold. Here the pairs
    are ordered as LFW's folds are laid out: the first tenth of the same pairs with the first tenth of the
    different ones, then the second tenths, ... (file order within each); the folds are then `num_folds`
    consecutive, equal blocks of that order (``np.array_split``). A `.bin` written in that order (insightface
    evaluates a .bin in ten such blocks) is thus evaluated in exactly these folds. Each fold holds both kinds
    whenever each kind has a few pairs per fold; with fewer, some folds may hold one kind.
    """
    labels = np.asarray(labels).astype(bool)
    num_folds = max(1, min(num_folds, labels.size))
    tenth = np.empty(labels.size, dtype=np.int64)
    for kind in (True, False):
        members = np.flatnonzero(labels == kind)
        tenth[members] = np.arange(members.size) * num_folds // max(1, members.size)
    order = np.argsort(tenth, kind="stable")
    fold_ids = np.empty(labels.size, dtype=np.int64)
    for fold, block in enumerate(np.array_split(order, num_folds)):
        fold_ids[block] = fold
    return fold_ids


def stratified_order(labels, num_folds: int = 10) -> np.ndarray:
    """The pairs' positions fold by fold (`stratified_fold_ids`), each fold in file order."""
    return np.argsort(stratified_fold_ids(labels, num_folds), kind="stable")


def lfw_fold_splits(num_pairs: int, num_folds: int, fold_ids=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_indices, test_indices) per fold: consecutive blocks in file order, as the LFW folds are.

    Same blocks as sklearn's KFold(n_splits=num_folds, shuffle=False); with `fold_ids`, the pairs of each
    distinct id (in sorted id order) instead.
    """
    indices = np.arange(num_pairs)
    if fold_ids is None:
        test_blocks = np.array_split(indices, num_folds)
    else:
        test_blocks = [indices[fold_ids == fold] for fold in np.unique(fold_ids)]
    return [(np.setdiff1d(indices, test, assume_unique=True), test) for test in test_blocks]


def best_accuracy_threshold(distances: np.ndarray, labels: np.ndarray) -> float:
    """The distance threshold with the highest accuracy on these pairs (smallest one on ties).

    Sorting the distances turns every possible decision into "predict same for the k smallest"; a running
    sum of the labels gives the true positives of every k at once. Only cuts between distinct values are
    allowed, so tied distances always fall on the same side. The threshold reported for a cut is the midpoint
    between the last included distance and the next one, which generalises better to the held-out fold than
    either end.
    """
    order = np.argsort(distances, kind="stable")
    sorted_distances, sorted_labels = distances[order], labels[order]
    num_pairs = sorted_distances.size
    num_negatives = num_pairs - int(sorted_labels.sum())

    true_positives = np.concatenate(([0], np.cumsum(sorted_labels, dtype=np.int64)))
    num_included = np.arange(num_pairs + 1)
    false_positives = num_included - true_positives
    num_correct = true_positives + (num_negatives - false_positives)

    allowed_cut = np.ones(num_pairs + 1, dtype=bool)
    allowed_cut[1:num_pairs] = sorted_distances[1:] > sorted_distances[:-1]
    best_cut = int(np.argmax(np.where(allowed_cut, num_correct, -1)))

    if best_cut == 0:  # nothing is "same": the smallest distance itself fails the strict test
        return float(sorted_distances[0])
    if best_cut == num_pairs:  # everything is "same": the smallest threshold above the largest distance
        return float(np.nextafter(sorted_distances[-1], np.inf))
    return _threshold_between(sorted_distances[best_cut - 1], sorted_distances[best_cut])


def threshold_at_far(distances: np.ndarray, labels: np.ndarray, far_target: float) -> float:
    """The largest threshold whose false accept rate on these pairs is at most `far_target`.

    With a strict "distance < threshold" test, accepting at most m negatives allows any threshold up to the
    (m+1)-th smallest negative distance, so that distance is the answer; ties at it are all rejected. It is
    exact, unlike the interpolation over a threshold grid in the original code. Returns +inf when every
    negative may be accepted (including when there are no negatives, whose FAR counts as 0).
    """
    negatives = np.sort(distances[~labels])
    num_negatives = negatives.size
    if num_negatives == 0:
        return float("inf")
    # The largest count m with m / num_negatives <= target, computed the way a FAR is compared, so
    # float rounding of target * num_negatives cannot shift it.
    rates = np.arange(num_negatives + 1) / num_negatives
    max_false_accepts = int(np.flatnonzero(rates <= far_target)[-1])
    if max_false_accepts == num_negatives:
        return float("inf")
    return float(negatives[max_false_accepts])


def rates_at_threshold(distances: np.ndarray, labels: np.ndarray, threshold: float) -> FoldRates:
    """Accuracy, precision, recall (TAR) and FAR when pairs closer than `threshold` are called same."""
    predicted_same = distances < threshold
    true_positives = int(np.sum(predicted_same & labels))
    false_positives = int(np.sum(predicted_same & ~labels))
    num_positives = int(np.sum(labels))
    num_negatives = labels.size - num_positives
    true_negatives = num_negatives - false_positives
    return FoldRates(
        accuracy=(true_positives + true_negatives) / labels.size,
        precision=_ratio(true_positives, true_positives + false_positives),
        recall=_ratio(true_positives, num_positives),
        false_accept_rate=_ratio(false_positives, num_negatives),
        positives=num_positives,
        negatives=num_negatives,
        predicted_same=true_positives + false_positives,
    )


def fold_mean_std(per_fold: np.ndarray, denominators: np.ndarray | None = None) -> tuple[float, float]:
    """Mean and standard deviation over the folds, leaving out those where the rate's denominator is 0 (its
    value there is a placeholder, not a measurement); (0, 0) when no fold has one."""
    per_fold = np.asarray(per_fold, dtype=np.float64)
    if denominators is not None:
        per_fold = per_fold[np.asarray(denominators) > 0]
    if per_fold.size == 0:
        return 0.0, 0.0
    return float(np.mean(per_fold)), float(np.std(per_fold))


def _summary_rates(metrics: LFWMetrics) -> dict[str, tuple[float, float]]:
    """(mean, std) of every per-fold rate, by the names `metrics_summary` gives them."""
    rates = {
        "accuracy": fold_mean_std(metrics.accuracy),
        "precision": fold_mean_std(metrics.precision, metrics.predicted_same_per_fold),
        "recall": fold_mean_std(metrics.recall, metrics.positives_per_fold),
        "best_distance_threshold": fold_mean_std(metrics.best_distances),
    }
    for target in metrics.far_targets:
        rates[f"tar_at_far_{target:g}"] = fold_mean_std(
            metrics.tar_at_far[target], metrics.positives_per_fold
        )
        rates[f"far_at_far_{target:g}"] = fold_mean_std(
            metrics.far_at_far[target], metrics.negatives_per_fold
        )
    return rates


def format_metrics(metrics: LFWMetrics, target: str = "LFW") -> list[str]:
    """The lines the training and validation scripts print after evaluating on ``target`` (LFW, cfp_fp...)."""
    rates = _summary_rates(metrics)

    def mean_std(name: str, digits: int = 4) -> str:
        mean, std = rates[name]
        return f"{mean:.{digits}f}+-{std:.{digits}f}"

    lines = [
        f"Accuracy on {target}: {mean_std('accuracy')}",
        f"Precision {mean_std('precision')}",
        f"Recall {mean_std('recall')}",
        f"ROC Area Under Curve: {metrics.roc_auc:.4f}",
        f"Best distance threshold: {mean_std('best_distance_threshold', 2)}",
    ]
    for target in metrics.far_targets:
        lines.append(f"TAR: {mean_std(f'tar_at_far_{target:g}')} @ FAR: {target:g}")
    return lines


def metrics_summary(metrics: LFWMetrics) -> dict[str, float]:
    """Scalar summary for CSV logs and JSON: plain Python floats only.

    Keys: accuracy/precision/recall/best_distance_threshold `_mean` and `_std`, `roc_auc`, and for every
    FAR target t (formatted with `{t:g}`, e.g. 0.001) `tar_at_far_{t}_mean/_std` and `far_at_far_{t}_mean/_std`
    (the FAR actually measured on the test folds). A rate's mean and std are over the folds where it is
    defined (`fold_mean_std`).
    """
    summary: dict[str, float] = {}
    for name, (mean, std) in _summary_rates(metrics).items():
        summary[f"{name}_mean"], summary[f"{name}_std"] = mean, std
        if name == "recall":
            summary["roc_auc"] = float(metrics.roc_auc)
    return summary


def _validate_pairs(distances, labels, num_folds) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes and values once, so the fold loop can assume clean float64 / bool arrays."""
    distances = np.asarray(distances, dtype=np.float64)
    labels_array = np.asarray(labels)
    if distances.ndim != 1 or labels_array.ndim != 1:
        raise InputError(
            f"distances and labels must be 1-D arrays, got shapes {distances.shape} and {labels_array.shape}"
        )
    if distances.size != labels_array.size:
        raise InputError(
            f"got {distances.size} distances but {labels_array.size} labels; need one label per pair"
        )
    if not np.all(np.isfinite(distances)):
        raise InputError("distances must all be finite (found NaN or inf)")
    if not np.all((labels_array == 0) | (labels_array == 1)):
        raise InputError("labels must be 0/1 or booleans (1 = same person)")
    labels_array = labels_array.astype(bool)
    if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
        raise InputError(f"num_folds must be an integer >= 2, got {num_folds!r}")
    if distances.size < num_folds:
        raise InputError(f"need at least one pair per fold: {distances.size} pairs for {num_folds} folds")
    if labels_array.all() or not labels_array.any():
        raise InputError("labels must contain both same (1) and different (0) pairs")
    return distances, labels_array


def _merge_far_targets(far_target, far_targets) -> tuple[float, ...]:
    """The FAR targets in the given order, with the reported `far_target` appended if it is missing."""
    merged: list[float] = []
    for target in (*far_targets, far_target):
        target = float(target)
        if not 0.0 <= target <= 1.0:
            raise InputError(f"FAR targets must lie in [0, 1], got {target}")
        # a float32 1e-3 is 0.0010000000474974513: the same target, not a second one
        if not any(math.isclose(target, seen, rel_tol=1e-6) for seen in merged):
            merged.append(target)
    return tuple(merged)


def _threshold_between(included: float, excluded: float) -> float:
    """A threshold t with included < t <= excluded, as close to their midpoint as floats allow."""
    midpoint = 0.5 * included + 0.5 * excluded
    # adjacent floats have no midpoint strictly above `included`; the next float up then still excludes
    # `excluded` under the strict test, because it *is* `excluded`.
    return float(max(midpoint, np.nextafter(included, np.inf)))


def _ratio(numerator: int, denominator: int) -> float:
    """numerator / denominator, with 0 for an empty denominator (a fold without positives or negatives)."""
    return numerator / denominator if denominator else 0.0
