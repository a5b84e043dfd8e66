"""P x K batches (P identities, K images each) for online triplet mining.

Batch-hard and batch-all mining (Hermans et al. 2017, https://arxiv.org/abs/1703.07737) need several images of
each identity in every batch; a uniformly shuffled VGGFace2 batch of 256 images almost never holds two images of
the same person. This sampler builds such batches from a `LabelledFaceDataset`'s labels.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler

from datasets.face_table import group_rows_by_class
from errors import InputError, require_int


class PKBatchSampler(Sampler[list[int]]):
    """Yields `num_batches` lists of P*K dataset indices: K images from each of P distinct identities.

    Only identities with two or more images are used. An identity with fewer than K images gives all of them
    once and fills the rest by drawing again, so every identity in a batch has at least two distinct images.
    Batches are deterministic given (seed, epoch); call `set_epoch` each epoch. With `world_size > 1` the
    batches of all ranks come from one global sequence that rank r reads at positions r, r + world_size, ...,
    so ranks never yield the same batch; `num_batches` counts the batches of one rank.
    """

    def __init__(
        self, labels, identities_per_batch, images_per_identity, num_batches, seed=0, rank=0, world_size=1
    ):
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError("labels must be a 1-D integer array")
        self.identities_per_batch = require_int(identities_per_batch, "identities_per_batch (P)", minimum=2)
        self.images_per_identity = require_int(images_per_identity, "images_per_identity (K)", minimum=2)
        self.num_batches = require_int(num_batches, "num_batches")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.seed, self.rank, self.world_size, self.epoch = int(seed), int(rank), int(world_size), 0

        groups = group_rows_by_class(labels)
        self._order, self._starts = groups.order, groups.starts
        self._classes = np.flatnonzero(groups.counts >= 2)
        if len(self._classes) < self.identities_per_batch:
            raise InputError(
                f"identities_per_batch={self.identities_per_batch} but only {len(self._classes)} identities "
                "have two or more images"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for local_index in range(self.num_batches):
            global_index = local_index * self.world_size + self.rank
            yield self.batch(global_index).tolist()

    def batch(self, global_index: int) -> np.ndarray:
        """The P*K indices of batch `global_index` of the current epoch (its own generator: random access)."""
        rng = np.random.default_rng([self.seed, self.epoch, global_index])
        classes = rng.choice(self._classes, self.identities_per_batch, replace=False)
        counts = self._starts[classes + 1] - self._starts[classes]
        offsets = _k_offsets(counts, self.images_per_identity, rng)
        return self._order[self._starts[classes][:, None] + offsets].ravel()


def _k_offsets(counts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(P, k) offsets into groups of `counts` images: distinct where count >= k, else all once then repeats.

    Distinct draws use Floyd's algorithm (Bentley & Floyd, "Programming Pearls: a sample of brilliance", 1987),
    vectorised over the P rows: k steps, each a draw in [0, n - k + step] that falls back to n - k + step if
    already taken, giving a uniform k-subset without a per-identity permutation.
    """
    num = len(counts)
    offsets = np.empty((num, k), dtype=np.int64)
    n = np.maximum(counts, k)  # rows with fewer than k images are overwritten below
    for step in range(k):
        top = n - k + step
        draw = rng.integers(top + 1)
        taken = (offsets[:, :step] == draw[:, None]).any(axis=1)
        offsets[:, step] = np.where(taken, top, draw)
    small = counts < k
    if small.any():
        columns = np.arange(k)
        refill = rng.integers(counts[small][:, None], size=(int(small.sum()), k))
        offsets[small] = np.where(columns < counts[small][:, None], columns, refill)
    return offsets
