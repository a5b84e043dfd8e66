"""Losses and triplet selection; device-agnostic (everything follows its inputs)."""

from .center_loss import CenterLoss
from .triplet_loss import (
    SELECTION_RULES,
    TripletLoss,
    batch_all_triplets,
    batch_hard_triplets,
    distance_matrix,
    paired_distances,
    select_triplets,
    triplet_selection_mask,
)

__all__ = [
    "SELECTION_RULES",
    "CenterLoss",
    "TripletLoss",
    "batch_all_triplets",
    "batch_hard_triplets",
    "distance_matrix",
    "paired_distances",
    "select_triplets",
    "triplet_selection_mask",
]
