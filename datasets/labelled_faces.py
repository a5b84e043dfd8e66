"""(image, identity) pairs for cross-entropy + center-loss training, read from the same CSV as the triplets."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from datasets.face_table import FaceImageLoader, FaceTable, read_face_csv


class LabelledFaceDataset(Dataset):
    """Every CSV row once, as (transformed image, class index in 0..num_classes-1).

    Unreadable images are replaced by another image of the same identity (see `FaceImageLoader`), so the
    label returned is always right for the image returned.
    """

    def __init__(self, root_dir, csv_name, transform=None):
        self.table: FaceTable = read_face_csv(root_dir, csv_name)
        self.labels: np.ndarray = self.table.labels
        self.num_classes: int = self.table.num_classes
        self.loader = FaceImageLoader(self.table, transform)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.loader(index), int(self.labels[index])
