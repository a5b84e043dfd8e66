"""Center loss (Wen et al. 2016, "A Discriminative Feature Learning Approach for Deep Face Recognition",
https://ydwen.github.io/papers/WenECCV16.pdf).

L_C = mean_i ||x_i - c_{y_i}||^2, with one learnable center per class. The centers are an ordinary parameter,
so they follow the module to any device and dtype; their optimizer lives in the training script, which divides
their gradient by the loss weight before stepping so that ``center_loss_lr`` alone sets how fast they move.

That step moves center j by ``lr * 2 / N * sum_{i: y_i = j} (c_j - x_i)`` over a batch of N (the gradient
of the mean), as KaiyangZhou's widely used PyTorch center loss does; Wen et al.'s own rule is
``alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)``, so the two differ per class by ``2 (1 + n_j) / N``:
one lr here is not the paper's alpha.
"""

from __future__ import annotations

import torch
from torch import nn


class CenterLoss(nn.Module):
    def __init__(self, num_classes: int, feat_dim: int):
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(f"num_classes and feat_dim must be positive, got {num_classes} and {feat_dim}")
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the squared distance of each feature to its class center."""
        # index_select, not indexing: its backward adds the repeated labels' gradients in a fixed order on
        # the CPU, so a seeded run repeats exactly (indexing's backward accumulates them in parallel)
        centers = self.centers.index_select(0, labels).to(features.dtype)
        return (features - centers).pow(2).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feat_dim={self.feat_dim}"
