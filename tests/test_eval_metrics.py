"""evaluate_lfw against plain brute-force references and scikit-learn."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import KFold

import eval_metrics
from eval_metrics import LFWMetrics, evaluate_lfw, format_metrics, metrics_summary

FAR_TARGETS = (1e-1, 1e-2, 1e-3)


def lfw_like_pairs(seed=0, num_folds=10, pairs_per_class=300):
    """Distances laid out like lfw_pairs.txt: per fold, 300 same pairs then 300 different pairs."""
    rng = np.random.default_rng(seed)
    fold_labels = np.r_[np.ones(pairs_per_class, bool), np.zeros(pairs_per_class, bool)]
    labels = np.tile(fold_labels, num_folds)
    distances = np.where(labels, rng.normal(0.9, 0.3, labels.size), rng.normal(1.4, 0.3, labels.size))
    return np.clip(distances, 0.0, 2.0), labels


def brute_force_folds(num_pairs, num_folds):
    """Official folds written out by hand: consecutive blocks, the first num_pairs % num_folds one longer."""
    base, extra = divmod(num_pairs, num_folds)
    start = 0
    for fold in range(num_folds):
        size = base + (1 if fold < extra else 0)
        test = np.arange(start, start + size)
        train = np.r_[np.arange(0, start), np.arange(start + size, num_pairs)]
        yield train, test
        start += size


def brute_force_accuracy(distances, labels, num_folds, folds=None):
    """Per fold: try every observed training distance, every midpoint, and one value above the maximum.

    Candidates are in increasing order and argmax keeps the first best training accuracy, so ties go to
    the smallest threshold, which for a given split of the training pairs is a midpoint. Each candidate is
    scored directly on every training pair (a broadcast comparison, in chunks to bound memory). ``folds``
    (a list of (train, test) index arrays) replaces the consecutive blocks.
    """
    accuracies, thresholds = [], []
    for train, test in folds if folds is not None else brute_force_folds(distances.size, num_folds):
        values = np.unique(distances[train])
        candidates = [values[0]]
        for low, high in zip(values[:-1], values[1:], strict=True):
            candidates += [0.5 * low + 0.5 * high, high]
        candidates.append(np.nextafter(values[-1], np.inf))
        candidates = np.array(candidates)

        train_accuracies = np.concatenate(
            [
                np.mean((distances[train] < chunk[:, None]) == labels[train], axis=1)
                for chunk in np.array_split(candidates, max(1, candidates.size // 500))
            ]
        )
        best_threshold = candidates[np.argmax(train_accuracies)]
        accuracies.append(np.mean((distances[test] < best_threshold) == labels[test]))
        thresholds.append(best_threshold)
    return np.array(accuracies), np.array(thresholds)


def brute_force_tar_far(distances, labels, num_folds, far_target):
    """Per fold: the largest candidate threshold (observed training distance or +inf) with FAR <= target."""
    tars, fars = [], []
    for train, test in brute_force_folds(distances.size, num_folds):
        train_negatives = distances[train][~labels[train]]
        candidates = np.r_[np.unique(distances[train]), np.inf]
        if train_negatives.size:
            train_fars = np.mean(train_negatives < candidates[:, None], axis=1)
        else:
            train_fars = np.zeros(candidates.size)
        chosen = candidates[train_fars <= far_target].max()
        test_positives, test_negatives = distances[test][labels[test]], distances[test][~labels[test]]
        tars.append(np.mean(test_positives < chosen) if test_positives.size else 0.0)
        fars.append(np.mean(test_negatives < chosen) if test_negatives.size else 0.0)
    return np.array(tars), np.array(fars)


def assert_matches_brute_force(distances, labels, num_folds=10):
    metrics = evaluate_lfw(distances, labels, num_folds=num_folds)
    accuracies, thresholds = brute_force_accuracy(distances, labels, num_folds)
    assert abs(metrics.accuracy.mean() - accuracies.mean()) < 0.0005
    np.testing.assert_allclose(metrics.accuracy, accuracies, rtol=0, atol=1e-12)
    np.testing.assert_allclose(metrics.best_distances, thresholds, rtol=1e-12)
    for target in FAR_TARGETS:
        tars, fars = brute_force_tar_far(distances, labels, num_folds, target)
        np.testing.assert_allclose(metrics.tar_at_far[target], tars, rtol=0, atol=1e-12)
        np.testing.assert_allclose(metrics.far_at_far[target], fars, rtol=0, atol=1e-12)
    return metrics


def test_accuracy_and_tar_match_brute_force_on_lfw_sized_data():
    distances, labels = lfw_like_pairs(seed=1)
    assert distances.size == 6000
    metrics = assert_matches_brute_force(distances, labels)
    assert 0.75 < metrics.accuracy.mean() < 0.9  # the synthetic classes overlap: far from trivial


def test_heavily_tied_distances_match_brute_force():
    distances, labels = lfw_like_pairs(seed=2)
    distances = np.round(distances, 1)
    assert np.unique(distances).size <= 21
    assert_matches_brute_force(distances, labels)


def test_unequal_fold_sizes_match_brute_force_and_kfold():
    distances, labels = lfw_like_pairs(seed=3, num_folds=1, pairs_per_class=503)  # 1006 pairs, 7 folds
    assert_matches_brute_force(distances, labels, num_folds=7)
    kfold = KFold(n_splits=7, shuffle=False).split(distances)
    for (train, test), (kfold_train, kfold_test) in zip(
        eval_metrics.lfw_fold_splits(1006, 7), kfold, strict=True
    ):
        np.testing.assert_array_equal(train, kfold_train)
        np.testing.assert_array_equal(test, kfold_test)


def test_tar_at_far_matches_brute_force_with_ties_at_the_cut():
    # many negatives share the distances right where a FAR of 0.1 / 0.01 falls
    rng = np.random.default_rng(4)
    labels = rng.random(2000) < 0.5
    distances = np.where(labels, rng.integers(0, 30, 2000), rng.integers(5, 60, 2000)) / 20.0
    for target in (0.0, 0.05, 0.1, 0.5, 1.0):
        tars, fars = brute_force_tar_far(distances, labels, 10, target)
        metrics = evaluate_lfw(distances, labels, far_target=target)
        np.testing.assert_allclose(metrics.tar, tars, rtol=0, atol=1e-12)
        np.testing.assert_allclose(metrics.far, fars, rtol=0, atol=1e-12)


def test_roc_matches_sklearn():
    distances, labels = lfw_like_pairs(seed=5)
    metrics = evaluate_lfw(distances, labels)
    assert isinstance(metrics.roc_auc, float)
    assert abs(metrics.roc_auc - roc_auc_score(labels, -distances)) < 1e-9
    fpr, tpr, score_thresholds = roc_curve(labels, -distances)
    np.testing.assert_array_equal(metrics.false_positive_rate, fpr)
    np.testing.assert_array_equal(metrics.true_positive_rate, tpr)
    np.testing.assert_array_equal(metrics.thresholds, -score_thresholds)
    assert metrics.roc_auc == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)


def test_perfectly_separable_distances_give_perfect_accuracy():
    rng = np.random.default_rng(6)
    labels = np.tile(np.r_[np.ones(300, bool), np.zeros(300, bool)], 10)
    distances = np.where(labels, rng.uniform(0.0, 1.0, labels.size), rng.uniform(1.5, 2.0, labels.size))
    metrics = evaluate_lfw(distances, labels)
    np.testing.assert_array_equal(metrics.accuracy, np.ones(10))
    np.testing.assert_array_equal(metrics.precision, np.ones(10))
    np.testing.assert_array_equal(metrics.recall, np.ones(10))
    assert metrics.roc_auc == 1.0
    assert np.all((metrics.best_distances > 1.0) & (metrics.best_distances < 1.5))
    for target in FAR_TARGETS:  # every same pair is closer than every different pair
        np.testing.assert_array_equal(metrics.tar_at_far[target], np.ones(10))


def test_scaling_distances_scales_thresholds_only():
    distances, labels = lfw_like_pairs(seed=7)
    metrics = evaluate_lfw(distances, labels)
    scaled = evaluate_lfw(distances * 10.0, labels)
    np.testing.assert_array_equal(scaled.accuracy, metrics.accuracy)
    np.testing.assert_array_equal(scaled.precision, metrics.precision)
    np.testing.assert_allclose(scaled.best_distances, metrics.best_distances * 10.0, rtol=1e-12)
    for target in FAR_TARGETS:
        np.testing.assert_array_equal(scaled.tar_at_far[target], metrics.tar_at_far[target])
    assert scaled.roc_auc == pytest.approx(metrics.roc_auc, abs=1e-12)
    # squared distances keep the order too, so the accuracies stay the same
    squared = evaluate_lfw(distances**2, labels)
    np.testing.assert_array_equal(squared.accuracy, metrics.accuracy)


def assert_all_finite(metrics):
    for field in (*metrics._fields, "thresholds", "tar_at_far", "far_at_far"):
        value = getattr(metrics, field)
        if field == "thresholds":
            value = value[1:]  # roc_curve's first threshold is "accept nothing": -inf as a distance
        if isinstance(value, dict):
            value = np.concatenate(list(value.values()))
        assert np.all(np.isfinite(value)), field


@pytest.mark.filterwarnings("error")
def test_folds_with_a_single_class_give_finite_results():
    # sorted labels: each test fold holds only same pairs or only different pairs
    distances, labels = lfw_like_pairs(seed=8, num_folds=1, pairs_per_class=1000)
    metrics = assert_matches_brute_force(distances, labels)
    assert_all_finite(metrics)
    np.testing.assert_array_equal(metrics.far[:5], np.zeros(5))  # no negatives in the first five folds
    np.testing.assert_array_equal(metrics.tar[5:], np.zeros(5))  # no positives in the last five


def test_summaries_leave_out_the_folds_where_a_rate_is_undefined():
    """A perfect model on sorted single-kind folds: the summary's precision, recall and TAR are 1 (the mean of
    the folds that have the rate's denominator), not 0.5 from averaging in the placeholder zeros."""
    labels = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
    distances = np.where(labels, 0.5, 1.5)
    metrics = evaluate_lfw(distances, labels)
    np.testing.assert_array_equal(metrics.recall, np.r_[np.ones(5), np.zeros(5)])  # per fold: placeholders
    np.testing.assert_array_equal(metrics.positives_per_fold, np.r_[np.full(5, 200), np.zeros(5)])
    summary = metrics_summary(metrics)
    # brute force: the rate over the folds that have positives (negatives, predicted-same pairs)
    with_positives = [f for f in range(10) if labels[f * 200 : (f + 1) * 200].any()]
    assert summary["recall_mean"] == np.mean(metrics.recall[with_positives]) == 1.0
    assert summary["precision_mean"] == 1.0 and summary["accuracy_mean"] == 1.0
    for target in FAR_TARGETS:
        assert summary[f"tar_at_far_{target:g}_mean"] == 1.0
        assert summary[f"far_at_far_{target:g}_mean"] == 0.0
    assert "Recall 1.0000+-0.0000" in format_metrics(metrics)


@pytest.mark.parametrize("num_same, num_different", [(300, 300), (23, 37), (101, 99), (40, 5)])
def test_stratified_folds_are_equal_blocks_of_the_tenths_of_each_kind(num_same, num_different):
    labels = np.r_[np.ones(num_same, bool), np.zeros(num_different, bool)]  # sorted by kind, as View 1 is
    fold_ids = eval_metrics.stratified_fold_ids(labels)
    # brute force: order the pairs by (tenth of their kind, position), then cut ten equal blocks
    tenths = [i * 10 // num_same for i in range(num_same)] + [
        i * 10 // num_different for i in range(num_different)
    ]
    order = sorted(range(labels.size), key=lambda i: (tenths[i], i))
    expected = np.empty(labels.size, dtype=np.int64)
    for fold, block in enumerate(np.array_split(np.array(order), 10)):
        expected[block] = fold
    np.testing.assert_array_equal(fold_ids, expected)
    # fold by fold, file order within each: ten array_split blocks of it are the folds again
    stratified = eval_metrics.stratified_order(labels)
    np.testing.assert_array_equal(stratified, np.argsort(expected, kind="stable"))
    for fold, block in enumerate(np.array_split(stratified, 10)):
        assert (expected[block] == fold).all()
    if min(num_same, num_different) >= 30:  # a few of each kind per fold: every fold holds both
        for fold in range(10):
            assert labels[fold_ids == fold].any() and not labels[fold_ids == fold].all()


def test_metrics_survive_pickle_and_deepcopy():
    import copy
    import pickle

    metrics = evaluate_lfw(*lfw_like_pairs(seed=4))
    for clone in (pickle.loads(pickle.dumps(metrics)), copy.deepcopy(metrics)):
        assert metrics_summary(clone) == metrics_summary(metrics)
        assert format_metrics(clone) == format_metrics(metrics)


def test_a_float32_far_target_is_the_same_target_not_a_second_one():
    distances, labels = lfw_like_pairs(seed=5)
    metrics = evaluate_lfw(distances, labels, far_target=np.float32(1e-3))
    assert metrics.far_targets == FAR_TARGETS
    np.testing.assert_array_equal(metrics.tar, metrics.tar_at_far[1e-3])
    assert sum("@ FAR: 0.001" in line for line in format_metrics(metrics)) == 1


@pytest.mark.filterwarnings("error")
def test_training_split_without_negatives_gives_finite_results():
    # all 10 negatives sit in the last fold, so that fold's training split has none
    labels = np.r_[np.ones(90, bool), np.zeros(10, bool)]
    distances = np.random.default_rng(9).uniform(0, 2, 100)
    metrics = assert_matches_brute_force(distances, labels)
    assert_all_finite(metrics)
    assert metrics.accuracy[-1] == 0.0  # trained on positives only, it calls every test pair "same"
    assert metrics.far[-1] == 1.0


@pytest.mark.filterwarnings("error")
def test_all_equal_distances_give_finite_results():
    labels = np.tile(np.r_[np.ones(30, bool), np.zeros(30, bool)], 10)
    distances = np.full(labels.size, 1.0)
    metrics = assert_matches_brute_force(distances, labels)
    assert_all_finite(metrics)
    np.testing.assert_array_equal(metrics.accuracy, np.full(10, 0.5))
    assert metrics.roc_auc == 0.5
    for target in FAR_TARGETS:
        np.testing.assert_array_equal(metrics.tar_at_far[target], np.zeros(10))


def test_adjacent_float_distances_are_split_correctly():
    # no float lies strictly between the two values, so the threshold must be the larger one itself
    low = 1.0
    high = np.nextafter(low, 2.0)
    distances = np.array([low] * 10 + [high] * 10)
    labels = np.r_[np.ones(10, bool), np.zeros(10, bool)]
    threshold = eval_metrics.best_accuracy_threshold(distances, labels)
    assert low < threshold <= high
    assert eval_metrics.rates_at_threshold(distances, labels, threshold).accuracy == 1.0


def test_first_nine_fields_unpack_in_the_original_order():
    distances, labels = lfw_like_pairs(seed=10)
    metrics = evaluate_lfw(distances, labels)
    tpr, fpr, precision, recall, accuracy, roc_auc, best_distances, tar, far = metrics  # exactly nine
    assert LFWMetrics._fields == (
        "true_positive_rate",
        "false_positive_rate",
        "precision",
        "recall",
        "accuracy",
        "roc_auc",
        "best_distances",
        "tar",
        "far",
    )
    assert tpr is metrics.true_positive_rate and fpr is metrics.false_positive_rate
    assert accuracy is metrics.accuracy and roc_auc == metrics.roc_auc
    assert tar is metrics.tar_at_far[1e-3] and far is metrics.far_at_far[1e-3]
    assert len(metrics) == 9
    assert metrics.thresholds is not None and 1e-1 in metrics.tar_at_far
    assert precision.shape == recall.shape == best_distances.shape == (10,)


def test_reported_far_target_is_added_to_the_targets():
    distances, labels = lfw_like_pairs(seed=11)
    metrics = evaluate_lfw(distances, labels, far_target=0.05)
    assert metrics.far_targets == (0.1, 0.01, 0.001, 0.05)
    assert metrics.tar is metrics.tar_at_far[0.05]
    tars, fars = brute_force_tar_far(distances, labels, 10, 0.05)
    np.testing.assert_allclose(metrics.tar, tars, rtol=0, atol=1e-12)


def test_format_metrics_lines():
    distances, labels = lfw_like_pairs(seed=12)
    metrics = evaluate_lfw(distances, labels)
    lines = format_metrics(metrics)
    assert lines[0] == f"Accuracy on LFW: {metrics.accuracy.mean():.4f}+-{metrics.accuracy.std():.4f}"
    assert lines[1].startswith("Precision 0.")
    assert lines[2].startswith("Recall 0.")
    assert lines[3] == f"ROC Area Under Curve: {metrics.roc_auc:.4f}"
    assert lines[4].startswith("Best distance threshold: 1.")
    assert [line.split(" @ ")[1] for line in lines[5:]] == ["FAR: 0.1", "FAR: 0.01", "FAR: 0.001"]
    tar = metrics.tar_at_far[0.01]
    assert lines[6] == f"TAR: {tar.mean():.4f}+-{tar.std():.4f} @ FAR: 0.01"


def test_metrics_summary_holds_plain_floats():
    distances, labels = lfw_like_pairs(seed=13)
    metrics = evaluate_lfw(distances, labels)
    summary = metrics_summary(metrics)
    assert all(type(value) is float for value in summary.values())
    assert json.loads(json.dumps(summary)) == summary
    assert summary["accuracy_mean"] == pytest.approx(metrics.accuracy.mean())
    assert summary["accuracy_std"] == pytest.approx(metrics.accuracy.std())
    assert summary["roc_auc"] == metrics.roc_auc
    assert summary["best_distance_threshold_mean"] == pytest.approx(metrics.best_distances.mean())
    assert summary["tar_at_far_0.1_mean"] == pytest.approx(metrics.tar_at_far[0.1].mean())
    assert summary["far_at_far_0.001_std"] == pytest.approx(metrics.far_at_far[0.001].std())
    assert {"precision_mean", "recall_std", "tar_at_far_0.01_std"} <= summary.keys()


@pytest.mark.parametrize(
    ("distances", "labels", "num_folds", "message"),
    [
        (np.zeros(20), np.ones(19), 10, "20 distances but 19 labels"),
        (np.zeros((10, 2)), np.ones(10), 2, "1-D"),
        (np.r_[np.nan, np.zeros(19)], np.r_[1, np.zeros(19)], 10, "finite"),
        (np.zeros(20), np.r_[2, np.zeros(19)], 10, "0/1"),
        (np.zeros(20), np.ones(20), 10, "both"),
        (np.zeros(5), np.r_[1, 0, 1, 0, 1], 10, "at least one pair per fold"),
        (np.zeros(20), np.r_[1, np.zeros(19)], 1, "num_folds"),
    ],
)
def test_bad_inputs_raise_value_error(distances, labels, num_folds, message):
    with pytest.raises(ValueError, match=message):
        evaluate_lfw(distances, labels, num_folds=num_folds)


def test_far_target_outside_unit_interval_raises():
    distances, labels = lfw_like_pairs(seed=14)
    with pytest.raises(ValueError, match="FAR targets"):
        evaluate_lfw(distances, labels, far_target=1.5)


def test_fold_ids_keep_the_official_folds_when_pairs_are_dropped():
    distances, labels = lfw_like_pairs(seed=12)
    full = evaluate_lfw(distances, labels)
    fold_ids = np.repeat(np.arange(10), len(distances) // 10)
    # the same result through explicit ids
    np.testing.assert_array_equal(evaluate_lfw(distances, labels, fold_ids=fold_ids).accuracy, full.accuracy)
    # drop 37 pairs from fold 0: folds 1-9 keep exactly their pairs, so their test accuracies only move
    # through the changed training split, while consecutive blocks would shift every fold boundary
    keep = np.ones(len(distances), bool)
    keep[:37] = False
    kept = evaluate_lfw(distances[keep], labels[keep], fold_ids=fold_ids[keep])
    assert len(kept.accuracy) == 10
    # the oracle: the brute-force threshold search over the official folds, built from the ids by hand
    official_folds = [
        (np.flatnonzero(fold_ids[keep] != fold), np.flatnonzero(fold_ids[keep] == fold)) for fold in range(10)
    ]
    accuracies, thresholds = brute_force_accuracy(distances[keep], labels[keep], 10, folds=official_folds)
    np.testing.assert_allclose(kept.accuracy, accuracies, rtol=0, atol=1e-12)
    np.testing.assert_allclose(kept.best_distances, thresholds, rtol=1e-12)
    # and consecutive blocks of the kept pairs would have given other folds (the bug this prevents)
    shifted = evaluate_lfw(distances[keep], labels[keep], num_folds=10)
    assert not np.array_equal(shifted.accuracy, kept.accuracy)
    with pytest.raises(ValueError, match="fold_ids"):
        evaluate_lfw(distances, labels, fold_ids=fold_ids[:-1])
