"""Triplet loss and triplet selection, kept apart: a selector says *which* triplets, the loss says *how much*.

Selectors take embeddings (and labels for in-batch mining) and return index tensors; they never build a graph.
The loss takes anchor/positive/negative embeddings and returns their mean hinge, or a zero that still has a
graph when it is given no triplets, so ``loss.backward()`` needs no special case.

References: FaceNet (Schroff et al. 2015, https://arxiv.org/abs/1503.03832) for the semi-hard rule;
"In Defense of the Triplet Loss" (Hermans et al. 2017, https://arxiv.org/abs/1703.07737) for batch-hard and
batch-all mining over batches of P identities x K images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SELECTION_RULES = ("hard", "semihard", "all")
# F.pairwise_distance adds this to the difference before the norm; the original used nn.PairwiseDistance,
# which does the same, so distances here match the original's and F.triplet_margin_loss exactly.
PAIRWISE_EPS = 1e-6


def paired_distances(x: torch.Tensor, y: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Row-wise distances between x[i] and y[i]."""
    distances = F.pairwise_distance(x, y, p=2.0, eps=PAIRWISE_EPS)
    return distances.pow(2) if squared else distances


def with_nonfinite_of(loss: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``loss``, made non-finite when any of ``values`` is (a zero-weighted sum: gradients are unchanged).

    An embedding that is NaN or inf but in no chosen triplet leaves the loss finite, yet its NaN still
    reaches the gradients of finite embeddings through the backward of the masked-out or unused entries; a
    non-finite loss makes the engine skip the step instead of stepping on those gradients."""
    return loss + values.sum() * 0.0


def distance_matrix(embeddings: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """All pairwise Euclidean distances of a batch, (N, N), in fp32, also under autocast (which would run the
    Gram product in bf16 / fp16 and let rounding change which triplets are mined)."""
    embeddings = embeddings.float()
    squared_norms = embeddings.pow(2).sum(dim=1)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        gram = embeddings @ embeddings.t()
    squared_distances = (squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram).clamp_min(0.0)
    squared_distances.fill_diagonal_(0.0)
    return squared_distances if squared else squared_distances.sqrt()


class TripletLoss(nn.Module):
    """mean(max(d(a, p) - d(a, n) + margin, 0)) over the triplets given (Euclidean, or squared Euclidean)."""

    def __init__(self, margin: float = 0.2, squared: bool = False):
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be positive, got {margin}")
        self.margin = margin
        self.squared = squared

    def forward(
        self,
        anchor: torch.Tensor,
        positive: torch.Tensor,
        negative: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean loss over the triplets given, or over those where ``mask`` is true.

        The mask form lets a training step select triplets without the device sync that indexing by a
        data-dependent number of rows costs on a GPU.
        """
        if mask is None and anchor.shape[0] == 0:
            # a zero connected to the inputs: backward works and produces zero gradients
            return (anchor.sum() + positive.sum() + negative.sum()) * 0.0
        positive_distances = paired_distances(anchor, positive, self.squared)
        negative_distances = paired_distances(anchor, negative, self.squared)
        losses = F.relu(positive_distances - negative_distances + self.margin)
        if mask is None:
            return losses.mean()
        return with_nonfinite_of(torch.where(mask, losses, 0.0).sum() / mask.sum().clamp_min(1), losses)

    def over_batch(
        self,
        embeddings: torch.Tensor,
        anchors: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor,
    ) -> torch.Tensor:
        """The same mean over triplets given as row indices into one batch's ``embeddings``.

        Each pair's distance is computed once, as F.pairwise_distance computes it, in an (N, N) matrix that
        the triplets index, instead of three (T, D) gathers: batch-all over P x K images has about N^2 K
        triplets, so the gathers' memory and time outgrew the network's at 256 images (2.6 GB and 24 s on a
        CPU for 32 x 8 at 512-d; the matrix is 134 MB).
        """
        if anchors.numel() == 0:
            return embeddings.sum() * 0.0
        difference = embeddings[:, None, :] - embeddings[None, :, :] + PAIRWISE_EPS
        distances = difference.pow(2).sum(dim=2).flatten()
        if not self.squared:
            distances = distances.sqrt()
        size = embeddings.shape[0]
        # index_select: its backward on the CPU sums each pair's many triplets in a fixed order, so a seeded
        # run repeats exactly (indexing's backward accumulates them in parallel)
        positive_distances = distances.index_select(0, anchors * size + positives)
        negative_distances = distances.index_select(0, anchors * size + negatives)
        return with_nonfinite_of(
            F.relu(positive_distances - negative_distances + self.margin).mean(), distances
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, squared={self.squared}"


@torch.no_grad()
def triplet_selection_mask(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float,
    rule: str = "hard",
    squared: bool = False,
) -> torch.Tensor:
    """Which pre-generated triplets are worth training on, as a boolean mask (no device sync).

    - ``hard``: the original repository's rule, ``d(a, n) - d(a, p) < margin`` (every triplet with a
      non-zero loss, the too-hard ones with d(a, n) < d(a, p) included);
    - ``semihard``: FaceNet's rule, ``d(a, p) < d(a, n) < d(a, p) + margin``;
    - ``all``: every triplet.
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown triplet selection rule {rule!r}; choose one of {SELECTION_RULES}")
    positive_distances = paired_distances(anchor, positive, squared)
    negative_distances = paired_distances(anchor, negative, squared)
    if rule == "hard":
        return negative_distances - positive_distances < margin
    if rule == "semihard":
        return (positive_distances < negative_distances) & (negative_distances < positive_distances + margin)
    return torch.ones_like(positive_distances, dtype=torch.bool)


def select_triplets(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float,
    rule: str = "hard",
    squared: bool = False,
) -> torch.Tensor:
    """Indices of the triplets ``triplet_selection_mask`` keeps, as a 1-D long tensor."""
    return triplet_selection_mask(anchor, positive, negative, margin, rule, squared).nonzero().flatten()


def _label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels[:, None] == labels[None, :]
    positive_mask = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return positive_mask, ~same


@torch.no_grad()
def batch_hard_triplets(
    embeddings: torch.Tensor, labels: torch.Tensor, squared: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every anchor with a positive and a negative in the batch: its farthest positive and closest negative.

    Returns ``(anchor_idx, positive_idx, negative_idx)``; ties go to the lowest index.
    """
    distances = distance_matrix(embeddings, squared)
    positive_mask, negative_mask = _label_masks(labels)
    valid = positive_mask.any(dim=1) & negative_mask.any(dim=1)
    hardest_positive = distances.masked_fill(~positive_mask, float("-inf")).argmax(dim=1)
    hardest_negative = distances.masked_fill(~negative_mask, float("inf")).argmin(dim=1)
    anchors = valid.nonzero().flatten()
    return anchors, hardest_positive[anchors], hardest_negative[anchors]


@torch.no_grad()
def batch_all_triplets(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float, squared: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every valid in-batch triplet (a, p, n) whose loss is positive: d(a, p) - d(a, n) + margin > 0.

    Averaging the loss over these only (not over all valid triplets) is Hermans et al.'s "batch all"; it keeps
    the easy majority from diluting the gradient.
    """
    distances = distance_matrix(embeddings, squared)
    positive_mask, negative_mask = _label_masks(labels)
    hinge = distances[:, :, None] - distances[:, None, :] + margin  # [a, p, n]
    active = positive_mask[:, :, None] & negative_mask[:, None, :] & (hinge > 0)
    anchor_idx, positive_idx, negative_idx = active.nonzero(as_tuple=True)
    return anchor_idx, positive_idx, negative_idx
