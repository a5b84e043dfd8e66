import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from losses import (
    CenterLoss,
    TripletLoss,
    batch_all_triplets,
    batch_hard_triplets,
    distance_matrix,
    select_triplets,
    triplet_selection_mask,
)


def euclid(x, y, squared=False):
    d = math.sqrt(sum((float(a) - float(b) + 1e-6) ** 2 for a, b in zip(x, y, strict=True)))
    return d * d if squared else d


def random_triplets(n=50, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1) for _ in range(3)
    ]


@pytest.mark.parametrize("squared", [False, True])
def test_triplet_loss_matches_brute_force(squared):
    anchor, positive, negative = random_triplets()
    loss = TripletLoss(margin=0.3, squared=squared)(anchor, positive, negative)
    expected = sum(
        max(euclid(a, p, squared) - euclid(a, n, squared) + 0.3, 0.0)
        for a, p, n in zip(anchor, positive, negative, strict=True)
    ) / len(anchor)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_triplet_loss_matches_torch_oracle_and_gradients():
    anchor, positive, negative = (t.clone().requires_grad_() for t in random_triplets(seed=1))
    ours = TripletLoss(margin=0.2)(anchor, positive, negative)
    oracle = F.triplet_margin_loss(anchor, positive, negative, margin=0.2, p=2)
    torch.testing.assert_close(ours, oracle)
    ours_grads = torch.autograd.grad(ours, (anchor, positive, negative))
    oracle_grads = torch.autograd.grad(
        F.triplet_margin_loss(anchor, positive, negative, margin=0.2, p=2), (anchor, positive, negative)
    )
    for a, b in zip(ours_grads, oracle_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("squared", [False, True])
def test_loss_over_batch_indices_matches_the_loss_of_the_gathered_triplets(squared):
    """over_batch's (N, N) distance matrix gives F.triplet_margin_loss's value and gradients for the triplets
    it indexes (float64), duplicate images in the batch included (distance 0: no NaN)."""
    generator = torch.Generator().manual_seed(4)
    embeddings = F.normalize(torch.randn(24, 16, generator=generator, dtype=torch.float64), dim=1)
    embeddings[5] = embeddings[4]  # an image and its duplicate
    labels = torch.arange(6).repeat_interleave(4)
    anchors, positives, negatives = batch_all_triplets(embeddings, labels, margin=0.5, squared=squared)
    anchors = torch.cat([anchors, torch.tensor([4])])  # the duplicate pair as anchor and positive
    positives, negatives = (
        torch.cat([positives, torch.tensor([5])]),
        torch.cat([negatives, torch.tensor([9])]),
    )
    assert anchors.numel() > 500
    loss_fn = TripletLoss(margin=0.5, squared=squared)
    leaf = embeddings.clone().requires_grad_(True)
    ours = loss_fn.over_batch(leaf, anchors, positives, negatives)
    (ours_grad,) = torch.autograd.grad(ours, leaf)
    leaf = embeddings.clone().requires_grad_(True)
    picked = [leaf[indices] for indices in (anchors, positives, negatives)]
    expected = loss_fn(*picked)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    if not squared:
        torch.testing.assert_close(expected, F.triplet_margin_loss(*picked, margin=0.5, p=2))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(ours_grad).all()
    empty = torch.empty(0, dtype=torch.int64)
    zero = loss_fn.over_batch(embeddings.clone().requires_grad_(True), empty, empty, empty)
    assert zero.item() == 0.0 and zero.requires_grad


def test_a_nonfinite_embedding_outside_the_chosen_triplets_makes_the_loss_nonfinite():
    """Its NaN reaches the gradients of finite embeddings all the same; a finite loss would let the engine
    step on them. A non-finite loss makes it skip the step."""
    anchor, positive, negative = (t.clone() for t in random_triplets(n=6))
    negative[5] = float("nan")
    mask = torch.tensor([True, True, False, False, False, False])
    leaf = anchor.clone().requires_grad_(True)
    loss = TripletLoss(margin=0.2)(leaf, positive, negative, mask=mask)
    (gradient,) = torch.autograd.grad(loss, leaf)
    assert not torch.isfinite(loss) and not torch.isfinite(gradient).all()  # the NaN reaches the gradients
    embeddings = F.normalize(torch.randn(8, 4, dtype=torch.float64), dim=1)
    embeddings[7] = float("nan")
    triplet = torch.tensor([0]), torch.tensor([1]), torch.tensor([2])  # none uses embedding 7
    assert not torch.isfinite(TripletLoss(margin=0.2).over_batch(embeddings, *triplet))
    embeddings[7] = 0.5
    assert torch.isfinite(TripletLoss(margin=0.2).over_batch(embeddings, *triplet))
    import train_triplet

    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    embeddings[7] = float("nan")
    for rule in ("batch_all", "batch_hard"):
        loss, _ = train_triplet.online_triplet_loss(embeddings, labels, rule, 0.2, TripletLoss(margin=0.2))
        assert not torch.isfinite(loss), rule


def test_triplet_loss_of_no_triplets_is_a_zero_with_a_graph():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    empty = x[:0]
    loss = TripletLoss(margin=0.2)(empty, empty, empty)
    assert loss.item() == 0.0 and loss.dtype == torch.float64 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_triplet_loss_rejects_non_positive_margin():
    with pytest.raises(ValueError, match="margin"):
        TripletLoss(margin=0.0)


@pytest.mark.parametrize("rule", ["hard", "semihard", "all"])
def test_select_triplets_matches_brute_force(rule):
    anchor, positive, negative = random_triplets(n=200, seed=2)
    margin = 0.4
    kept = select_triplets(anchor, positive, negative, margin, rule=rule).tolist()
    expected = []
    for i, (a, p, n) in enumerate(zip(anchor, positive, negative, strict=True)):
        dp, dn = euclid(a, p), euclid(a, n)
        if rule == "hard":
            keep = dn - dp < margin
        elif rule == "semihard":
            keep = dp < dn < dp + margin
        else:
            keep = True
        if keep:
            expected.append(i)
    assert kept == expected
    assert 0 < len(kept) <= 200


def test_select_triplets_unknown_rule():
    anchor, positive, negative = random_triplets(n=3)
    with pytest.raises(ValueError, match="unknown triplet selection rule"):
        select_triplets(anchor, positive, negative, 0.2, rule="easy")


def pk_batch(p=4, k=3, dim=6, seed=3):
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(p * k, dim, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.arange(p).repeat_interleave(k)
    return embeddings, labels


@pytest.mark.parametrize("squared", [False, True])
def test_distance_matrix_matches_cdist(squared):
    embeddings, _ = pk_batch()
    expected = torch.cdist(embeddings, embeddings)
    expected = expected.pow(2) if squared else expected
    torch.testing.assert_close(distance_matrix(embeddings, squared).double(), expected, atol=1e-6, rtol=1e-6)


def test_distance_matrix_and_mining_stay_fp32_under_autocast():
    # the trainers mine inside torch.autocast; a bf16 Gram product would move distances by ~1e-3 and
    # change which pairs batch-hard picks and which triplets batch-all keeps
    embeddings = F.normalize(torch.randn(128, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.arange(32).repeat_interleave(4)
    expected = distance_matrix(embeddings)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = distance_matrix(embeddings)
        hard = batch_hard_triplets(embeddings, labels)
        every = batch_all_triplets(embeddings, labels, 0.2)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, expected, atol=1e-6, rtol=1e-6)
    for mined, reference in (
        (hard, batch_hard_triplets(embeddings, labels)),
        (every, batch_all_triplets(embeddings, labels, 0.2)),
    ):
        assert all(torch.equal(a, b) for a, b in zip(mined, reference, strict=True))


def test_batch_hard_matches_brute_force():
    embeddings, labels = pk_batch()
    labels[-1] = 99  # a singleton identity: never an anchor, but a negative for everyone else
    anchors, positives, negatives = batch_hard_triplets(embeddings, labels)
    n = len(labels)
    dist = [[euclid(embeddings[i], embeddings[j]) for j in range(n)] for i in range(n)]
    expected = []
    for a in range(n):
        pos = [j for j in range(n) if j != a and labels[j] == labels[a]]
        neg = [j for j in range(n) if labels[j] != labels[a]]
        if pos and neg:
            expected.append((a, max(pos, key=lambda j: dist[a][j]), min(neg, key=lambda j: dist[a][j])))
    assert list(zip(anchors.tolist(), positives.tolist(), negatives.tolist(), strict=True)) == expected
    assert n - 1 not in anchors.tolist()


def test_batch_all_matches_brute_force():
    embeddings, labels = pk_batch(p=3, k=4)
    margin = 0.5
    got = set(zip(*(t.tolist() for t in batch_all_triplets(embeddings, labels, margin)), strict=True))
    n = len(labels)
    expected = {
        (a, p, q)
        for a, p, q in itertools.product(range(n), repeat=3)
        if a != p
        and labels[a] == labels[p]
        and labels[q] != labels[a]
        and euclid(embeddings[a], embeddings[p]) - euclid(embeddings[a], embeddings[q]) + margin > 1e-9
    }
    assert got == expected and len(got) > 0


def test_mining_without_positives_returns_nothing():
    embeddings = torch.randn(5, 4)
    labels = torch.arange(5)
    assert batch_hard_triplets(embeddings, labels)[0].numel() == 0
    assert batch_all_triplets(embeddings, labels, 0.2)[0].numel() == 0


def test_center_loss_matches_brute_force_and_follows_dtype():
    torch.manual_seed(0)
    loss_fn = CenterLoss(num_classes=5, feat_dim=4).double()
    features = torch.randn(9, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 2])
    expected = (
        sum(
            sum(
                (float(f) - float(c)) ** 2
                for f, c in zip(features[i], loss_fn.centers.detach()[labels[i]], strict=True)
            )
            for i in range(9)
        )
        / 9
    )
    loss = loss_fn(features, labels)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_center_loss_gradient_step_moves_centers_by_the_formula():
    torch.manual_seed(1)
    num_classes, dim, weight, lr = 4, 3, 0.007, 0.5
    loss_fn = CenterLoss(num_classes, dim).double()
    features = torch.randn(6, dim, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    before = loss_fn.centers.detach().clone()
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=lr)
    (weight * loss_fn(features, labels)).backward()
    for (
        parameter
    ) in loss_fn.parameters():  # undo the loss weight before the step, as the training script does
        parameter.grad /= weight
    optimizer.step()
    batch = len(labels)
    for j in range(num_classes):
        members = features[labels == j]
        # d/dc_j of mean_i ||x_i - c_{y_i}||^2 = (2 / B) * sum_{i: y_i = j} (c_j - x_i)
        expected = before[j] - lr * 2.0 / batch * (len(members) * before[j] - members.sum(dim=0))
        torch.testing.assert_close(loss_fn.centers[j].detach(), expected)
    assert torch.equal(loss_fn.centers[3].detach(), before[3])  # a class absent from the batch stays put


@pytest.mark.parametrize("rule", ["hard", "semihard"])
def test_masked_loss_equals_loss_of_selected_triplets(rule):
    anchor, positive, negative = (t.clone().requires_grad_() for t in random_triplets(n=64, seed=4))
    loss_fn = TripletLoss(margin=0.3)
    mask = triplet_selection_mask(anchor, positive, negative, 0.3, rule)
    keep = select_triplets(anchor, positive, negative, 0.3, rule)
    masked = loss_fn(anchor, positive, negative, mask=mask)
    indexed = loss_fn(anchor[keep], positive[keep], negative[keep])
    torch.testing.assert_close(masked, indexed)
    grads_masked = torch.autograd.grad(masked, anchor)[0]
    grads_indexed = torch.autograd.grad(loss_fn(anchor[keep], positive[keep], negative[keep]), anchor)[0]
    torch.testing.assert_close(grads_masked, grads_indexed)


def test_masked_loss_with_nothing_selected_is_zero_with_gradients():
    anchor, positive, negative = (t.clone().requires_grad_() for t in random_triplets(n=8))
    mask = torch.zeros(8, dtype=torch.bool)
    loss = TripletLoss(margin=0.2)(anchor, positive, negative, mask=mask)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(anchor.grad, torch.zeros_like(anchor))


def test_online_triplet_loss_and_center_loss_gradients_repeat_bit_for_bit():
    """A seeded run repeats exactly only if each backward does: the many triplets (and repeated labels) that
    share an embedding (a center) must have their gradients added in a fixed order, on any thread count."""
    import train_triplet

    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(128, 64), dim=1)
    labels = torch.arange(32).repeat_interleave(4)
    centers = CenterLoss(32, 64)

    def gradients():
        leaf = embeddings.clone().requires_grad_(True)
        centers.zero_grad()
        loss, count = train_triplet.online_triplet_loss(leaf, labels, "batch_all", 0.5, TripletLoss(0.5))
        (loss + centers(leaf, labels)).backward()
        assert count > 1000  # each embedding takes part in dozens of triplets
        return leaf.grad.clone(), centers.centers.grad.clone()

    first = gradients()
    for _ in range(5):
        again = gradients()
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
