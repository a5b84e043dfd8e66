"""Random (anchor, positive, negative) triplets of face images for triplet-loss training.

Triplets are drawn all at once with numpy from the per-class row groups: a million of them take a fraction of a
second (the original scanned a pandas frame per triplet, hours for VGGFace2). They are stored as CSV row indices
in a `.npy` file, with a JSON sidecar that records the CSV's fingerprint, so a triplets file can be reused with
`training_triplets_path` and is refused when it belongs to another CSV.

Sampling follows the original: the anchor identity is uniform over identities that have at least two images,
anchor and positive are two different images of it, the negative identity is uniform over the others.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
from torch.utils.data import Dataset

from datasets.face_source import open_face_table
from datasets.face_table import FaceImageLoader, FaceTable, group_rows_by_class
from errors import InputError, first_line, require_int
from fileio import atomic_write, write_json_atomic

logger = logging.getLogger(__name__)

TRIPLETS_FORMAT = "facenet-triplets-v1"


def generate_triplets(
    labels: np.ndarray,
    num_triplets: int,
    rng: np.random.Generator,
    num_human_identities_per_batch: int | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """(num_triplets, 3) int64 row indices (anchor, positive, negative) into `labels`.

    With `num_human_identities_per_batch` (and `batch_size`), every consecutive block of `batch_size` triplets
    takes its anchors and negatives from the same few identities (drawn per block among identities with two or
    more images), as the original's later option did, so an online miner finds harder negatives in a batch.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) == 0:
        raise ValueError("labels must be a non-empty 1-D integer array")
    if labels.min() < 0:
        raise ValueError("labels must be >= 0")
    num_triplets = require_int(num_triplets, "num_triplets")
    groups = group_rows_by_class(labels)
    counts = groups.counts
    anchor_classes = np.flatnonzero(counts >= 2)
    if len(anchor_classes) == 0:
        raise InputError("no identity has two or more images, so no (anchor, positive) pair exists")
    if np.count_nonzero(counts) < 2:
        raise InputError("triplets need at least two identities (the negative must be someone else)")

    if num_human_identities_per_batch is None:
        anchor = anchor_classes[rng.integers(len(anchor_classes), size=num_triplets)]
        negative = _other_class(anchor, counts, rng)
    else:
        anchor, negative = _classes_per_block(
            anchor_classes, num_triplets, num_human_identities_per_batch, batch_size, rng
        )

    # two different images of the anchor identity: draw the second among the count-1 others
    anchor_count = counts[anchor]
    anchor_offset = rng.integers(anchor_count)
    positive_offset = rng.integers(anchor_count - 1)
    positive_offset += positive_offset >= anchor_offset
    negative_offset = rng.integers(counts[negative])

    starts, order = groups.starts, groups.order
    triplets = np.empty((num_triplets, 3), dtype=np.int64)
    triplets[:, 0] = order[starts[anchor] + anchor_offset]
    triplets[:, 1] = order[starts[anchor] + positive_offset]
    triplets[:, 2] = order[starts[negative] + negative_offset]
    return triplets


def _other_class(anchor: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniform class with images, different from each anchor class (skip-the-anchor trick, no rejection loop)."""
    present = np.flatnonzero(counts > 0)  # labels may have gaps
    anchor_position = np.searchsorted(present, anchor)
    position = rng.integers(len(present) - 1, size=len(anchor))
    position += position >= anchor_position
    return present[position]


def _classes_per_block(anchor_classes, num_triplets, identities_per_block, batch_size, rng):
    """Anchor and negative classes when each block of `batch_size` triplets uses `identities_per_block` identities."""
    identities_per_block = require_int(identities_per_block, "num_human_identities_per_batch")
    if batch_size is None:
        raise InputError(
            "num_human_identities_per_batch needs batch_size (the size of each block of triplets)"
        )
    batch_size = require_int(batch_size, "batch_size")
    if identities_per_block < 2:
        raise InputError("num_human_identities_per_batch must be at least 2 (anchor and negative identities)")
    if identities_per_block > len(anchor_classes):
        raise InputError(
            f"num_human_identities_per_batch={identities_per_block} is more than the {len(anchor_classes)} "
            "identities with two or more images"
        )
    num_blocks = -(-num_triplets // batch_size)
    # a few thousand small draws without replacement; everything per triplet below is vectorised
    block_classes = np.stack(
        [rng.choice(anchor_classes, identities_per_block, replace=False) for _ in range(num_blocks)]
    )
    block = np.arange(num_triplets) // batch_size
    anchor_slot = rng.integers(identities_per_block, size=num_triplets)
    negative_slot = rng.integers(identities_per_block - 1, size=num_triplets)
    negative_slot += negative_slot >= anchor_slot
    return block_classes[block, anchor_slot], block_classes[block, negative_slot]


def triplets_filename(num_triplets: int, seed: int, epoch: int) -> str:
    return f"training_triplets_{num_triplets}_seed{seed}_epoch{epoch}.npy"


def save_triplets(path: str, triplets: np.ndarray, table: FaceTable, csv_path: str) -> None:
    """Write the triplets .npy and its JSON sidecar atomically (temp file in the same folder, then os.replace)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    sidecar = {
        "format": TRIPLETS_FORMAT,
        "csv_fingerprint": table.fingerprint,
        "csv_path": os.path.abspath(csv_path),
        "num_rows": len(table.paths),
        "num_triplets": len(triplets),
    }
    # int32 halves the file; row indices of any real data set fit (VGGFace2 has 3.3 million rows)
    stored = triplets.astype(np.int32) if len(table.paths) <= np.iinfo(np.int32).max else triplets
    with atomic_write(path, "wb") as handle:
        np.save(handle, stored, allow_pickle=False)
    write_json_atomic(sidecar, _sidecar_path(path), indent=1)


def load_triplets(path: str, table: FaceTable) -> np.ndarray:
    """Load a triplets file and check that it belongs to `table`'s CSV and is a valid set of triplets."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"triplets file not found: {path}")
    sidecar_path = _sidecar_path(path)
    try:
        with open(sidecar_path, encoding="utf-8") as f:
            sidecar = json.load(f)
    except FileNotFoundError:
        raise InputError(
            f"{path}: its sidecar {sidecar_path} is missing, so its csv cannot be checked"
        ) from None
    except (OSError, ValueError) as error:
        raise InputError(f"{sidecar_path}: unreadable ({first_line(error)})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != TRIPLETS_FORMAT:
        raise InputError(f"{sidecar_path}: not a triplets sidecar written by this code")
    if sidecar.get("csv_fingerprint") != table.fingerprint or sidecar.get("num_rows") != len(table.paths):
        raise InputError(
            f"{path} was generated for another csv ({sidecar.get('csv_path')}, {sidecar.get('num_rows')} rows), "
            f"not for this one ({len(table.paths)} rows); regenerate it or pass the matching csv"
        )
    try:
        triplets = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"{path}: not a readable .npy file ({first_line(error)})") from None
    _check_triplets(triplets, table, path)
    return triplets.astype(np.int64, copy=False)


def _check_triplets(triplets: np.ndarray, table: FaceTable, path: str) -> None:
    if triplets.ndim != 2 or triplets.shape[1] != 3 or not np.issubdtype(triplets.dtype, np.integer):
        raise InputError(f"{path}: expected an (N, 3) integer array, got {triplets.dtype} {triplets.shape}")
    if len(triplets) == 0:
        raise InputError(f"{path}: holds no triplets")
    if triplets.min() < 0 or triplets.max() >= len(table.paths):
        raise InputError(f"{path}: row indices outside 0..{len(table.paths) - 1} of the csv")
    labels = table.labels[triplets]
    if not (np.all(labels[:, 0] == labels[:, 1]) and np.all(labels[:, 0] != labels[:, 2])):
        raise InputError(
            f"{path}: some triplets do not pair an anchor with its own identity and another identity"
        )


def _sidecar_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


class TripletFaceDataset(Dataset):
    """Yields (anchor, positive, negative) image tensors for `num_triplets` random triplets.

    `seed` and `epoch` both feed the generator, so each epoch gets new, reproducible triplets; `set_epoch`
    draws the next epoch's without reading the CSV again. With `output_dir` the triplets are saved there (see
    `triplets_path`); `training_triplets_path` reuses a saved file instead of generating.
    """

    def __init__(
        self,
        root_dir,
        csv_name,
        num_triplets,
        training_triplets_path=None,
        transform=None,
        output_dir=None,
        seed=0,
        num_human_identities_per_batch=None,
        batch_size=None,
        epoch=0,
    ):
        self.table: FaceTable
        self.table, decode = open_face_table(root_dir, csv_name)  # csv_name None: root_dir is a .rec
        self.csv_path = os.fspath(csv_name if csv_name is not None else root_dir)
        self.num_triplets = require_int(num_triplets, "num_triplets")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.num_human_identities_per_batch = num_human_identities_per_batch
        self.batch_size = batch_size
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.transform = transform
        self.loader = FaceImageLoader(self.table, transform, decode=decode)
        self.triplets: np.ndarray
        self.triplets_path: str | None
        if training_triplets_path is not None:
            self.triplets = load_triplets(training_triplets_path, self.table)
            self.triplets_path = os.fspath(training_triplets_path)
            if len(self.triplets) != self.num_triplets:
                logger.info(
                    "%s holds %d triplets (num_triplets=%d ignored)",
                    self.triplets_path,
                    len(self.triplets),
                    self.num_triplets,
                )
        else:
            self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw (and save, with output_dir) the triplets of `epoch`. Call it before the epoch's DataLoader
        iterator starts, since workers hold a copy of the dataset."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        try:
            self.triplets = generate_triplets(
                self.table.labels,
                self.num_triplets,
                rng,
                self.num_human_identities_per_batch,
                self.batch_size,
            )
        except InputError as error:
            raise InputError(f"{self.csv_path}: {error}") from None
        self.triplets_path = None
        if self.output_dir is not None:
            name = triplets_filename(self.num_triplets, self.seed, int(epoch))
            self.triplets_path = os.path.join(self.output_dir, name)
            save_triplets(self.triplets_path, self.triplets, self.table, self.csv_path)

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, index):
        anchor, positive, negative = (int(row) for row in self.triplets[index])
        # a replacement for a bad anchor should not be the positive itself (and vice versa)
        return (
            self.loader(anchor, avoid=(positive,)),
            self.loader(positive, avoid=(anchor,)),
            self.loader(negative),
        )
