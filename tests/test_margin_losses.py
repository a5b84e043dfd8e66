"""Margin softmax (ArcFace, CosFace, combined) and the sharded, sampled cosine classifier (PartialFC).

The multi-process tests start 2 gloo processes on 127.0.0.1 (spawn); each worker writes its results to
tmp_path and the test compares them with a single-process float64 reference built here from
F.cross_entropy over margin_logits of the whole batch with the whole normalised weight.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losses.margin_softmax import LOSS_MARGINS, MarginLogits, fallback_threshold, margin_logits
from losses.partial_fc import CosineClassifier, PartialSGD, initial_weight, shard_range
from tests.gloo_processes import run_on_gloo

ARCFACE = LOSS_MARGINS["arcface"]
COSFACE = LOSS_MARGINS["cosface"]
COMBINED = (1.0, 0.3, 0.2)  # insightface's combined-margin setting
SCALE = 64.0


def brute_target(cosine: float, scale: float, m1: float, m2: float, m3: float) -> float:
    return scale * (math.cos(m1 * math.acos(cosine) + m2) - m3)


def cosine_batch(target_cosines, num_columns=5, seed=0):
    """(N, C) cosines whose row i has target column labels[i] holding target_cosines[i]; one row unlabelled."""
    generator = torch.Generator().manual_seed(seed)
    target_cosines = torch.as_tensor(target_cosines, dtype=torch.float64)
    cosine = torch.rand(len(target_cosines), num_columns, generator=generator, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, num_columns, (len(target_cosines),), generator=generator)
    cosine[torch.arange(len(labels)), labels] = target_cosines
    labels[0] = -1  # a row whose target is in another shard: no margin anywhere
    return cosine, labels


def check_logits(logits, cosine, labels, expected_target):
    """Non-target entries (and every entry of an unlabelled row) are s * cos; targets are expected_target(c)."""
    for i in range(cosine.shape[0]):
        for j in range(cosine.shape[1]):
            c = float(cosine[i, j])
            expected = expected_target(c) if j == int(labels[i]) else SCALE * c
            assert float(logits[i, j]) == pytest.approx(expected, rel=1e-12, abs=1e-12), (i, j)


# --------------------------------------------------------------------------------------------- margins


def test_fallback_constants_are_the_arcface_reference_ones():
    th, mm = fallback_threshold(1.0, 0.5)
    assert th == pytest.approx(math.cos(math.pi - 0.5), abs=1e-15)
    assert mm == pytest.approx(math.sin(math.pi - 0.5) * 0.5, abs=1e-15)
    assert fallback_threshold(*COSFACE[:2]) is None and fallback_threshold(1.0, 0.0) is None


def test_arcface_matches_brute_force_before_the_edge():
    th, _ = fallback_threshold(*ARCFACE[:2])
    targets = torch.linspace(th + 1e-3, 0.999, 40)
    cosine, labels = cosine_batch(targets)
    logits = margin_logits(cosine, labels, SCALE, *ARCFACE)
    check_logits(logits, cosine, labels, lambda c: SCALE * math.cos(math.acos(c) + 0.5))


def test_arcface_follows_the_reference_rule_at_and_past_the_edge():
    th, mm = fallback_threshold(*ARCFACE[:2])
    targets = torch.cat([torch.tensor([th]), torch.linspace(-0.999, th - 1e-6, 30)])
    cosine, labels = cosine_batch(targets, seed=1)
    labels[0] = 0  # the row at exactly th is a target row too
    cosine[0, 0] = th
    logits = margin_logits(cosine, labels, SCALE, *ARCFACE)
    check_logits(logits, cosine, labels, lambda c: SCALE * (c - mm))
    # without the rule: the paper's formula, cos(theta + m), everywhere
    raw = margin_logits(cosine, labels, SCALE, *ARCFACE, monotonic=False)
    check_logits(raw, cosine, labels, lambda c: brute_target(c, SCALE, *ARCFACE))


def test_arcface_target_logit_never_increases_with_the_angle():
    theta = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)
    cosine = torch.cos(theta)[:, None]
    labels = torch.zeros(len(theta), dtype=torch.long)
    ruled = margin_logits(cosine, labels, SCALE, *ARCFACE).squeeze(1)
    raw = margin_logits(cosine, labels, SCALE, *ARCFACE, monotonic=False).squeeze(1)
    assert (ruled.diff() <= 1e-9).all()
    assert (raw.diff() > 1e-3).any()  # the edge the rule exists for
    assert (ruled <= SCALE * cosine.squeeze(1) + 1e-9).all()  # a margin never helps the target


def test_cosface_is_cos_minus_m_on_targets_only():
    cosine, labels = cosine_batch(torch.linspace(-1.0, 1.0, 25), seed=2)
    logits = margin_logits(cosine, labels, SCALE, *COSFACE)
    check_logits(logits, cosine, labels, lambda c: SCALE * (c - 0.35))


@pytest.mark.parametrize("margin", [COMBINED, (0.9, 0.4, 0.15), (1.2, 0.2, 0.1)])
def test_combined_margin_matches_the_formula_and_the_generalised_rule(margin):
    m1, m2, m3 = margin
    fallback = fallback_threshold(m1, m2)
    targets = torch.linspace(-0.999, 0.999, 60)
    cosine, labels = cosine_batch(targets, seed=3)

    def expected(c):
        if fallback is not None and c <= fallback[0]:
            return SCALE * (c - fallback[1] - m3)
        return brute_target(c, SCALE, m1, m2, m3)

    check_logits(margin_logits(cosine, labels, SCALE, *margin), cosine, labels, expected)
    if m1 != 1.0:  # theta_max = (pi - m2) / m1; past it the extra angle at the threshold is pi - theta_max
        theta_max = (math.pi - m2) / m1
        if theta_max < math.pi:
            assert fallback == pytest.approx(
                (math.cos(theta_max), math.sin(theta_max) * (math.pi - theta_max))
            )
        else:
            assert fallback is None


def test_margin_logits_module_matches_the_function():
    cosine, labels = cosine_batch(torch.linspace(-0.9, 0.9, 10))
    module = MarginLogits(scale=30.0, margin=COMBINED)
    assert torch.equal(module(cosine, labels), margin_logits(cosine, labels, 30.0, *COMBINED))


def test_margin_logits_are_float32_under_autocast_and_have_finite_gradients_at_the_poles():
    cosine = torch.tensor([[1.0, 0.2], [-1.0, 0.3], [0.5, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = margin_logits(cosine.bfloat16(), labels, SCALE, *ARCFACE)
    assert logits.dtype == torch.float32
    logits = margin_logits(cosine, labels, SCALE, *COMBINED)
    logits.sum().backward()
    assert torch.isfinite(cosine.grad).all()


# --------------------------------------------------------------------------------------------- classifier, one process


def reference_loss(embeddings, weight, labels, margin, scale=SCALE, columns=None):
    """F.cross_entropy over margin_logits of the whole batch and (the kept columns of) the normalised weight."""
    if columns is not None:
        weight = weight[columns]
        position = torch.full((int(columns.max()) + 1,), -1, dtype=torch.long)
        position[columns] = torch.arange(len(columns))
        labels = position[labels]
    cosine = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).t()
    return F.cross_entropy(margin_logits(cosine, labels, scale, *margin), labels)


def batch(num_classes, size, dim=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(size, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (size,), generator=generator)
    return embeddings, labels


def make_classifier(num_classes, dim=5, seed=0, **kwargs):
    return CosineClassifier(num_classes, dim, seed=seed, **kwargs).double()


@pytest.mark.parametrize("margin", [ARCFACE, COSFACE, COMBINED])
def test_classifier_matches_cross_entropy_reference(margin):
    classifier = make_classifier(9, margin=margin)
    embeddings, labels = batch(9, 12)
    embeddings.requires_grad_()
    loss = classifier(embeddings, labels)
    loss.backward()
    ref_embeddings = embeddings.detach().clone().requires_grad_()
    ref_weight = classifier.weight.detach().clone().requires_grad_()
    expected = reference_loss(ref_embeddings, ref_weight, labels, margin)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(embeddings.grad, ref_embeddings.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(classifier.weight.grad, ref_weight.grad, rtol=1e-10, atol=1e-10)


def brute_force_moved_centers(weight, embeddings, labels, momentum):
    """Each class of the batch: normalize(m * its unit center + (1 - m) * its embeddings' mean direction)."""
    moved = weight.clone()
    for label in sorted(set(labels.tolist())):
        members = [F.normalize(embeddings[i], dim=0) for i in range(len(labels)) if labels[i] == label]
        direction = F.normalize(sum(members), dim=0)
        center = F.normalize(weight[label], dim=0)
        moved[label] = F.normalize(momentum * center + (1 - momentum) * direction, dim=0)
    return moved


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_moving_average_centers_match_a_brute_force_update_and_take_no_gradient(sample_rate):
    """The loss and the embeddings' gradient are those of the centers before the move; then each center of the
    batch moves as the formula says, the others stay, and the weight has no gradient."""
    classifier = make_classifier(9, margin=COSFACE, center_momentum=0.5, sample_rate=sample_rate)
    embeddings, labels = batch(9, 12)
    before = classifier.weight.detach().clone()
    embeddings.requires_grad_()
    loss = classifier(embeddings, labels)
    loss.backward()
    reference_embeddings = embeddings.detach().clone().requires_grad_()
    if sample_rate == 1.0:  # (sampled, the loss is over a random subset: test_sampled_loss_... checks that)
        expected = reference_loss(reference_embeddings, before, labels, COSFACE)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(embeddings.grad, reference_embeddings.grad, rtol=1e-10, atol=1e-10)
    assert classifier.weight.grad is None and not classifier.weight.requires_grad
    expected_weight = brute_force_moved_centers(before, embeddings.detach(), labels, 0.5)
    torch.testing.assert_close(classifier.weight.detach(), expected_weight, rtol=1e-12, atol=1e-12)
    untouched = sorted(set(range(9)) - set(labels.tolist()))
    assert untouched and torch.equal(classifier.weight[untouched], before[untouched])
    # validation (no_grad, eval) moves nothing
    moved = classifier.weight.detach().clone()
    with torch.no_grad():
        classifier.eval()(embeddings.detach(), labels)
    assert torch.equal(classifier.weight, moved)


def test_classifier_rejects_labels_out_of_range():
    classifier = make_classifier(4)
    with pytest.raises(ValueError, match="labels"):
        classifier(torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 4]))


def test_sampled_set_holds_every_positive_and_the_right_count():
    generator = torch.Generator().manual_seed(0)
    more_positives_than_rate = 0
    for trial in range(300):
        shard_size = int(torch.randint(1, 80, (1,), generator=generator))
        rate = float(torch.rand(1, generator=generator)) * 0.99 + 0.005
        classifier = make_classifier(shard_size, sample_rate=rate, seed=trial)
        classifier.sample_step = trial
        batch_size = int(torch.randint(1, 60, (1,), generator=generator))
        local_labels = torch.randint(-1, shard_size, (batch_size,), generator=generator)  # -1: other shards
        rows = classifier.sample_rows(local_labels)
        positives = set(local_labels[local_labels >= 0].tolist())
        expected_count = min(shard_size, max(1, len(positives), round(rate * shard_size)))
        assert rows.tolist() == sorted(set(rows.tolist())) and len(rows) == expected_count
        assert positives <= set(rows.tolist())
        more_positives_than_rate += len(positives) > round(rate * shard_size)
        assert torch.equal(rows, classifier.sample_rows(local_labels))  # (seed, step) fixes the draw
    assert more_positives_than_rate > 20
    classifier = make_classifier(1000, sample_rate=0.1)
    first = classifier.sample_rows(torch.tensor([3]))
    classifier.sample_step += 1
    assert not torch.equal(first, classifier.sample_rows(torch.tensor([3])))


def test_sampled_loss_is_the_loss_over_the_kept_classes_and_only_they_get_gradients():
    classifier = make_classifier(30, sample_rate=0.2, margin=COMBINED)
    embeddings, labels = batch(30, 8, seed=1)
    embeddings.requires_grad_()
    loss = classifier(embeddings, labels)
    loss.backward()
    kept = classifier.updated_rows
    assert set(labels.tolist()) <= set(kept.tolist()) and len(kept) == max(len(set(labels.tolist())), 6)
    ref_embeddings = embeddings.detach().clone().requires_grad_()
    ref_weight = classifier.weight.detach().clone().requires_grad_()
    expected = reference_loss(ref_embeddings, ref_weight, labels, COMBINED, columns=kept)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(embeddings.grad, ref_embeddings.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(classifier.weight.grad, ref_weight.grad, rtol=1e-10, atol=1e-10)
    not_kept = torch.ones(30, dtype=torch.bool)
    not_kept[kept] = False
    assert (classifier.weight.grad[not_kept] == 0).all() and (classifier.weight.grad[kept] != 0).any()
    assert classifier.sample_step == 1
    classifier.eval()  # evaluation sees every class
    with torch.no_grad():
        torch.testing.assert_close(
            classifier(embeddings, labels), reference_loss(embeddings, classifier.weight, labels, COMBINED)
        )


def test_sampling_every_row_equals_no_sampling():
    embeddings, labels = batch(10, 6, seed=2)
    results = []
    for rate in (1.0, 0.99):  # round(0.99 * 10) = 10: the sampling path, keeping every row
        classifier = make_classifier(10, sample_rate=rate)
        x = embeddings.clone().requires_grad_()
        loss = classifier(x, labels)
        loss.backward()
        results.append((loss, x.grad, classifier.weight.grad, classifier.sample_step))
    (loss_a, x_a, w_a, step_a), (loss_b, x_b, w_b, step_b) = results
    assert (step_a, step_b) == (0, 1)
    assert torch.equal(loss_a, loss_b) and torch.equal(x_a, x_b) and torch.equal(w_a, w_b)


def forward_backward(classifier, seed, forwards=1):
    """Gradients of ``forwards`` batches accumulated; returns the rows each forward sampled."""
    sampled = []
    for k in range(forwards):
        before = set(classifier.updated_rows.tolist())
        embeddings, labels = batch(classifier.num_classes, 6, seed=10 * seed + k)
        classifier(embeddings, labels).backward()
        sampled.append(set(classifier.updated_rows.tolist()) - before)
    return sampled


@pytest.mark.parametrize("nesterov", [False, True])
def test_partial_sgd_without_sampling_is_torch_sgd(nesterov):
    hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": nesterov}
    classifier = make_classifier(12)
    optimizer = PartialSGD(classifier, **hyper)
    reference = nn.Parameter(classifier.weight.detach().clone())
    reference_optimizer = torch.optim.SGD([reference], **hyper)
    for step in range(3):
        forward_backward(classifier, step)
        assert torch.equal(classifier.updated_rows, torch.arange(12))
        reference.grad = classifier.weight.grad.clone()
        reference_optimizer.step()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(classifier.weight.detach(), reference.detach())
    assert torch.equal(optimizer.momentum_buffer(), reference_optimizer.state[reference]["momentum_buffer"])


def test_partial_sgd_steps_only_sampled_rows_with_their_own_momentum():
    hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    classifier = make_classifier(50, sample_rate=0.2)
    optimizer = PartialSGD(classifier, **hyper)
    for step in range(3):
        weight_before = classifier.weight.detach().clone()
        buffer = optimizer.momentum_buffer()
        buffer_before = torch.zeros_like(weight_before) if buffer is None else buffer.clone()
        # the last step accumulates two forwards: it updates the union of their samples
        sampled = forward_backward(classifier, step, forwards=2 if step == 2 else 1)
        rows = classifier.updated_rows.clone()
        assert set(rows.tolist()) == set().union(*sampled) and len(rows) < 50
        # a step of torch.optim.SGD on the sampled rows alone, with their momentum so far
        sub_matrix = nn.Parameter(weight_before[rows].clone())
        sub_optimizer = torch.optim.SGD([sub_matrix], **hyper)
        sub_optimizer.state[sub_matrix]["momentum_buffer"] = buffer_before[rows].clone()
        sub_matrix.grad = classifier.weight.grad[rows].clone()
        sub_optimizer.step()
        optimizer.step()
        optimizer.zero_grad()
        untouched = torch.ones(50, dtype=torch.bool)
        untouched[rows] = False
        weight = classifier.weight.detach()
        assert torch.equal(weight[untouched], weight_before[untouched])
        assert torch.equal(optimizer.momentum_buffer()[untouched], buffer_before[untouched])
        assert torch.equal(weight[rows], sub_matrix.detach())
        assert torch.equal(
            optimizer.momentum_buffer()[rows], sub_optimizer.state[sub_matrix]["momentum_buffer"]
        )
    # after the first step some rows not sampled now have momentum: torch.optim.SGD would have moved them
    assert (optimizer.momentum_buffer()[untouched] != 0).any()


def test_partial_sgd_zero_grad_forgets_the_sampled_rows():
    classifier = make_classifier(20, sample_rate=0.3)
    optimizer = PartialSGD(classifier, lr=0.1, momentum=0.9, weight_decay=0.1)
    embeddings, labels = batch(20, 4)
    classifier(embeddings, labels).backward()
    before = classifier.weight.detach().clone()
    optimizer.zero_grad(set_to_none=False)  # as after a step GradScaler skipped
    optimizer.step()
    assert torch.equal(classifier.weight.detach(), before)


def test_sample_step_is_saved_so_a_resumed_run_draws_the_same_samples():
    classifier = make_classifier(40, sample_rate=0.1)
    optimizer = PartialSGD(classifier, lr=0.1, momentum=0.9)
    for step in range(3):
        forward_backward(classifier, step)
        optimizer.step()
        optimizer.zero_grad()
    resumed = make_classifier(40, sample_rate=0.1)
    assert not torch.equal(resumed.weight, classifier.weight)
    resumed.load_state_dict(classifier.state_dict())
    assert resumed.sample_step == 3 and torch.equal(resumed.weight, classifier.weight)
    local_labels = torch.tensor([1, 2])
    assert torch.equal(resumed.sample_rows(local_labels), classifier.sample_rows(local_labels))


def test_initial_weight_does_not_depend_on_the_sharding():
    full = initial_weight(seed=3, start=0, stop=10_000, embedding_dim=4)
    assert full.std().item() == pytest.approx(0.01, rel=0.05)
    for world_size in (2, 3, 7):
        shards = [initial_weight(3, *shard_range(10_000, world_size, r), 4) for r in range(world_size)]
        assert torch.equal(torch.cat(shards), full)
    assert not torch.equal(initial_weight(4, 0, 10_000, 4), full)
    assert not torch.equal(full[:4096], full[4096:8192])  # each block of classes has its own stream


def test_shard_range_splits_as_evenly_as_possible():
    for num_classes, world_size in [(7, 2), (10, 3), (3, 3), (360_000, 8)]:
        ranges = [shard_range(num_classes, world_size, r) for r in range(world_size)]
        sizes = [stop - start for start, stop in ranges]
        assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


# --------------------------------------------------------------------------------------------- two gloo processes


# 7 classes on 2 ranks (4 + 3); uneven batches (5 + 3); each rank's labels reach into the other's shard
EXACT_LABELS = ([0, 6, 3, 4, 6], [5, 1, 1])
# 40 classes (20 + 20); rate 0.25 keeps 5 of 20, rate 0.1 keeps 2 unless more are positives (4 here)
SAMPLED_LABELS = ([0, 1, 2, 25, 30], [21, 22, 5])


def problem(num_classes, labels_per_rank, dim=5, in_dim=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([label for labels in labels_per_rank for label in labels])
    return {
        "inputs": torch.randn(len(labels), in_dim, generator=generator, dtype=torch.float64),
        "labels": labels,
        "sizes": [len(labels) for labels in labels_per_rank],
        "weight": torch.randn(num_classes, dim, generator=generator, dtype=torch.float64),
        "backbone": {
            "weight": torch.randn(dim, in_dim, generator=generator, dtype=torch.float64),
            "bias": torch.randn(dim, generator=generator, dtype=torch.float64),
        },
    }


def backbone_from(data):
    backbone = nn.Linear(*data["backbone"]["weight"].shape[::-1]).double()
    backbone.load_state_dict(data["backbone"])
    return backbone


def full_state(data):
    num_classes, dim = data["weight"].shape
    return {"num_classes": num_classes, "embedding_dim": dim, "sample_step": 0, "weight": data["weight"]}


def _exactness_worker(rank, out_dir):
    results = {}
    cases = [("arcface", 7, EXACT_LABELS, ARCFACE, 1.0), ("cosface", 7, EXACT_LABELS, COSFACE, 1.0)]
    cases += [
        ("sampled_25", 40, SAMPLED_LABELS, COMBINED, 0.25),
        ("sampled_10", 40, SAMPLED_LABELS, ARCFACE, 0.1),
    ]
    for name, num_classes, labels_per_rank, margin, rate in cases:
        data = problem(num_classes, labels_per_rank)
        start = sum(data["sizes"][:rank])
        local = slice(start, start + data["sizes"][rank])
        classifier = CosineClassifier(num_classes, 5, sample_rate=rate, margin=margin, seed=7).double()
        classifier.load_full_state_dict(full_state(data))
        backbone = nn.parallel.DistributedDataParallel(backbone_from(data))
        embeddings = backbone(data["inputs"][local])
        embeddings.retain_grad()
        loss = classifier(embeddings, data["labels"][local])
        loss.backward()
        results[name] = {
            "loss": loss.detach(),
            "embeddings_grad": embeddings.grad,
            "weight_grad": classifier.weight.grad,
            "kept": classifier.updated_rows + classifier.class_start,
            "shard": (classifier.class_start, classifier.class_stop),
            "backbone_grads": [p.grad for p in backbone.module.parameters()],
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_shards_on_gloo_match_the_single_process_classifier(tmp_path):
    run_on_gloo(_exactness_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [ranks[r]["arcface"]["shard"] for r in range(2)] == [(0, 4), (4, 7)]
    for name, num_classes, labels_per_rank, margin in [
        ("arcface", 7, EXACT_LABELS, ARCFACE),
        ("cosface", 7, EXACT_LABELS, COSFACE),
        ("sampled_25", 40, SAMPLED_LABELS, COMBINED),
        ("sampled_10", 40, SAMPLED_LABELS, ARCFACE),
    ]:
        data = problem(num_classes, labels_per_rank)
        kept = torch.cat([ranks[r][name]["kept"] for r in range(2)])
        if name.startswith("sampled"):
            # every positive of the GLOBAL batch is kept by the rank owning it, and the count per shard is right
            for r in range(2):
                start, stop = ranks[r][name]["shard"]
                positives = {c for c in data["labels"].tolist() if start <= c < stop}
                rate = 0.25 if name == "sampled_25" else 0.1
                kept_here = set(ranks[r][name]["kept"].tolist())
                assert positives <= kept_here and len(kept_here) == max(len(positives), round(rate * 20))
        backbone = backbone_from(data)
        embeddings = backbone(data["inputs"])
        embeddings.retain_grad()
        weight = data["weight"].clone().requires_grad_()
        columns = kept if name.startswith("sampled") else None
        expected = reference_loss(embeddings, weight, data["labels"], margin, columns=columns)
        expected.backward()
        close = {"rtol": 1e-10, "atol": 1e-10}
        for r in range(2):
            result = ranks[r][name]
            # the global mean, on every rank
            torch.testing.assert_close(result["loss"], expected.detach(), **close)
            start, stop = result["shard"]
            torch.testing.assert_close(result["weight_grad"], weight.grad[start:stop], **close)
            # DDP averages the backbone's gradients over the 2 ranks: the embeddings carry 2x d(mean)/dx
            offset = sum(data["sizes"][:r])
            rows = slice(offset, offset + data["sizes"][r])
            torch.testing.assert_close(result["embeddings_grad"] / 2, embeddings.grad[rows], **close)
            for got, want in zip(result["backbone_grads"], backbone.parameters(), strict=True):
                torch.testing.assert_close(got, want.grad, **close)


def _moving_centers_worker(rank, out_dir):
    data = problem(7, EXACT_LABELS)
    start = sum(data["sizes"][:rank])
    local = slice(start, start + data["sizes"][rank])
    classifier = CosineClassifier(7, 5, margin=COSFACE, center_momentum=0.3).double()
    classifier.load_full_state_dict(full_state(data))
    embeddings = backbone_from(data)(data["inputs"][local])
    classifier(embeddings, data["labels"][local]).backward()
    torch.save(
        {"weight": classifier.weight.detach(), "shard": (classifier.class_start, classifier.class_stop)},
        os.path.join(out_dir, f"moving{rank}.pt"),
    )


def test_two_shards_move_their_centers_as_one_process_over_the_global_batch(tmp_path):
    run_on_gloo(_moving_centers_worker, str(tmp_path))
    data = problem(7, EXACT_LABELS)
    with torch.no_grad():
        embeddings = backbone_from(data)(data["inputs"])
    expected = brute_force_moved_centers(data["weight"], embeddings, data["labels"], 0.3)
    for rank in range(2):
        result = torch.load(tmp_path / f"moving{rank}.pt", weights_only=True)
        start, stop = result["shard"]
        torch.testing.assert_close(result["weight"], expected[start:stop], rtol=1e-10, atol=1e-10)


CHECKPOINT_HYPER = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


def _checkpoint_worker(rank, out_dir):
    """Load a checkpoint written by one process, train a step on the global batch, gather a checkpoint."""
    state = torch.load(os.path.join(out_dir, "one_process.pt"), weights_only=True)
    classifier = CosineClassifier(7, 5, margin=ARCFACE).double()
    optimizer = PartialSGD(classifier, **CHECKPOINT_HYPER)  # built from the same flags, as a resumed run is
    classifier.load_full_state_dict(state, optimizer)
    loaded = (
        classifier.weight.detach().clone(),
        optimizer.momentum_buffer().clone(),
        optimizer.param_groups[0]["lr"],
    )
    data = problem(7, EXACT_LABELS, seed=1)
    start = sum(data["sizes"][:rank])
    local = slice(start, start + data["sizes"][rank])
    embeddings = data["inputs"][local, :5]
    classifier(embeddings, data["labels"][local]).backward()
    optimizer.step()
    gathered = classifier.full_state_dict(optimizer)
    assert (gathered is None) == (rank != 0)
    if rank == 0:
        torch.save(gathered, os.path.join(out_dir, "two_processes.pt"))
    torch.save(
        {"loaded": loaded, "shard": (classifier.class_start, classifier.class_stop)},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def test_checkpoint_moves_between_world_sizes(tmp_path):
    # one process: a step, then the full state
    classifier = make_classifier(7)
    optimizer = PartialSGD(classifier, **CHECKPOINT_HYPER)
    classifier(*batch(7, 4)).backward()
    optimizer.step()
    optimizer.zero_grad()
    state = classifier.full_state_dict(optimizer)
    torch.save(state, tmp_path / "one_process.pt")
    run_on_gloo(_checkpoint_worker, str(tmp_path))
    # each rank loaded its rows of the full weight and momentum, and kept its learning rate
    for r in range(2):
        saved = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        start, stop = saved["shard"]
        weight, buffer, lr = saved["loaded"]
        assert torch.equal(weight, state["weight"][start:stop])
        assert torch.equal(buffer, state["optimizer"]["momentum_buffer"][start:stop])
        assert lr == CHECKPOINT_HYPER["lr"]
    # the two processes' step on the global batch equals this process's step on the whole batch
    data = problem(7, EXACT_LABELS, seed=1)
    classifier(data["inputs"][:, :5], data["labels"]).backward()
    optimizer.step()
    two = torch.load(tmp_path / "two_processes.pt", weights_only=True)
    one = classifier.full_state_dict(optimizer)
    assert (
        two["sample_step"] == one["sample_step"]
        and two["optimizer"]["param_groups"] == one["optimizer"]["param_groups"]
    )
    torch.testing.assert_close(two["weight"], one["weight"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        two["optimizer"]["momentum_buffer"], one["optimizer"]["momentum_buffer"], rtol=1e-12, atol=1e-14
    )
    # and the gathered checkpoint loads back into one process
    resumed = make_classifier(7, seed=5)
    resumed_optimizer = PartialSGD(resumed, lr=1.0, momentum=0.9)  # a new --lr on resume
    resumed.load_full_state_dict(two, resumed_optimizer)
    assert torch.equal(resumed.weight.detach(), two["weight"])
    assert torch.equal(resumed_optimizer.momentum_buffer(), two["optimizer"]["momentum_buffer"])
    assert resumed_optimizer.param_groups[0]["lr"] == 1.0  # the options stay as built
