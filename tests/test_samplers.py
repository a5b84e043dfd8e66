from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets.labelled_faces import LabelledFaceDataset
from datasets.samplers import PKBatchSampler, _k_offsets
from datasets.transforms import eval_transform
from errors import InputError


def uneven_labels(seed=0):
    """Shuffled labels: class sizes 1..12 (so some classes have fewer than K images, some only one)."""
    rng = np.random.default_rng(seed)
    sizes = np.arange(200) % 12 + 1
    return rng.permutation(np.repeat(np.arange(200), sizes))


def test_every_batch_has_p_identities_with_k_images():
    labels = uneven_labels()
    counts = np.bincount(labels)
    p, k = 16, 4
    sampler = PKBatchSampler(labels, p, k, num_batches=30, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 30
    for batch in batches:
        assert isinstance(batch, list) and len(batch) == p * k
        assert all(isinstance(i, int) for i in batch)
        per_identity = Counter(labels[batch].tolist())
        assert len(per_identity) == p and set(per_identity.values()) == {k}
        for identity in per_identity:
            images = [i for i in batch if labels[i] == identity]
            assert counts[identity] >= 2  # one-image identities never appear
            # as many distinct images as the identity has, up to K
            assert len(set(images)) == min(k, counts[identity])


def test_small_identities_give_all_their_images():
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3])  # sizes 2, 3, 5, 1
    sampler = PKBatchSampler(labels, identities_per_batch=3, images_per_identity=4, num_batches=20)
    for batch in sampler:
        batch = np.array(batch)
        assert set(batch[labels[batch] == 0]) == {0, 1}
        assert set(batch[labels[batch] == 1]) == {2, 3, 4}
        assert len(set(batch[labels[batch] == 2])) == 4
        assert 10 not in batch


def test_deterministic_per_seed_and_epoch():
    labels = uneven_labels()

    def batches(seed, epoch):
        sampler = PKBatchSampler(labels, 8, 3, num_batches=10, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(0, 0) == batches(0, 0)
    assert batches(0, 0) != batches(0, 1)
    assert batches(0, 0) != batches(1, 0)


def test_ranks_read_disjoint_shares_of_one_sequence():
    labels = uneven_labels()
    single = list(PKBatchSampler(labels, 8, 3, num_batches=12, seed=5))
    ranks = [
        list(PKBatchSampler(labels, 8, 3, num_batches=6, seed=5, rank=r, world_size=2)) for r in range(2)
    ]
    assert ranks[0] == single[0::2] and ranks[1] == single[1::2]
    assert not {tuple(b) for b in ranks[0]} & {tuple(b) for b in ranks[1]}


def test_floyd_offsets_are_uniform_k_subsets():
    rng = np.random.default_rng(0)
    n, k, trials = 6, 3, 40_000
    offsets = _k_offsets(np.full(trials, n), k, rng)
    subsets = Counter(tuple(sorted(row)) for row in offsets.tolist())
    all_subsets = list(combinations(range(n), k))
    assert set(subsets) == set(all_subsets)  # always k distinct offsets in range
    expected = trials / len(all_subsets)
    assert all(abs(count - expected) < 5 * np.sqrt(expected) for count in subsets.values())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"identities_per_batch": 1}, r"identities_per_batch \(P\)"),
        ({"images_per_identity": 1}, r"images_per_identity \(K\)"),
        ({"num_batches": 0}, "num_batches"),
        ({"identities_per_batch": 200}, "only 183 identities have two or more images"),
    ],
)
def test_bad_settings_are_input_errors(kwargs, message):
    settings = {"identities_per_batch": 4, "images_per_identity": 2, "num_batches": 3, **kwargs}
    with pytest.raises(InputError, match=message):
        PKBatchSampler(uneven_labels(), **settings)


def test_rank_outside_world_is_a_bug():
    with pytest.raises(ValueError, match="rank 2"):
        PKBatchSampler(uneven_labels(), 4, 2, 3, rank=2, world_size=2)


def test_drives_a_dataloader_over_labelled_faces(tiny_face_csv):
    root, csv_path = tiny_face_csv
    dataset = LabelledFaceDataset(root, csv_path, transform=eval_transform(16))
    sampler = PKBatchSampler(dataset.labels, identities_per_batch=2, images_per_identity=2, num_batches=3)
    batches = list(DataLoader(dataset, batch_sampler=sampler))
    assert len(batches) == 3
    for images, labels in batches:
        assert images.shape == (4, 3, 16, 16)
        assert sorted(Counter(labels.tolist()).values()) == [2, 2]
    assert isinstance(batches[0][1], torch.Tensor)
