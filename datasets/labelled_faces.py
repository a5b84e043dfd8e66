"""(image, identity) pairs for cross-entropy + center-loss training, read from the same CSV as the triplets."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from datasets.face_source import open_face_table
from datasets.face_table import FaceImageLoader, FaceTable


class LabelledFaceDataset(Dataset):
    """Every CSV row once, as (transformed image, class index in 0..num_classes-1).

    Unreadable images are replaced by another image of the same identity (see `FaceImageLoader`), so the
    label returned is always right for the image returned.
    """

    def __init__(self, root_dir, csv_name=None, transform=None):
        """``root_dir`` with its CSV ``csv_name``, or a RecordIO ``.rec`` (no CSV)."""
        self.table: FaceTable
        self.table, decode = open_face_table(root_dir, csv_name)
        self.labels: np.ndarray = self.table.labels
        self.num_classes: int = self.table.num_classes
        self.loader = FaceImageLoader(self.table, transform, decode=decode)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.loader(index), int(self.labels[index])
