"""Shared fixtures: tiny image folders written to tmp_path, so every test runs on the CPU in seconds.

- `make_face_tree(...)`: factory writing `<root>/<identity>/<image>` folders of random images.
- `tiny_face_tree`: 4 identities x 3 random 32x32 images, JPEG and PNG mixed.
- `tiny_face_csv`: `tiny_face_tree` plus its `id,name,class,ext` CSV -> (root, csv_path).
- `make_lfw_tree(...)` / `tiny_lfw`: an LFW-shaped folder (`Name/Name_0001.jpg`) and a pairs file with a
  `num_folds pairs_per_kind` header -> (root, pairs_path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_random_image(path: Path, size: int = 32, seed: int = 0) -> Path:
    """A random RGB image; the format follows the suffix (.jpg, .jpeg, .png)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def make_face_tree(tmp_path):
    """Factory: `make(counts=(3, 3, 2), root=None, size=32, exts=(".jpg", ".png"))` -> root Path.

    Identity i is the folder `id_{i:03d}` with `counts[i]` images `img_{k:02d}<ext>`, the extension cycling
    through `exts`. Pixel values depend only on (identity, image), so two trees made alike are identical.
    """

    def make(counts=(3, 3, 3, 3), root=None, size=32, exts=(".jpg", ".png")) -> Path:
        root = Path(root) if root is not None else tmp_path / "faces"
        for identity, count in enumerate(counts):
            for k in range(count):
                name = f"img_{k:02d}{exts[k % len(exts)]}"
                write_random_image(root / f"id_{identity:03d}" / name, size=size, seed=identity * 1000 + k)
        root.mkdir(parents=True, exist_ok=True)
        return root

    return make


@pytest.fixture
def tiny_face_tree(make_face_tree) -> Path:
    return make_face_tree()


@pytest.fixture
def tiny_face_csv(tiny_face_tree, tmp_path) -> tuple[Path, Path]:
    from datasets.generate_csv_files import generate_csv

    csv_path = tmp_path / "faces.csv"
    generate_csv(tiny_face_tree, csv_path, num_workers=2)
    return tiny_face_tree, csv_path


@pytest.fixture
def make_lfw_tree(tmp_path):
    """Factory: `make(num_folds=2, pairs_per_kind=2, images_per_name=2, ext=".jpg", root=None)` -> (root, pairs_path).

    Each fold has its own names `P{fold}_{i}` with `images_per_name` images; its matched pairs are
    `Name 1 2`, its mismatched pairs join neighbouring names. `header=False` leaves the header line out.
    """

    def make(num_folds=2, pairs_per_kind=2, images_per_name=2, ext=".jpg", header=True, size=32, root=None):
        root = Path(root) if root is not None else tmp_path / "lfw"
        lines = [f"{num_folds}\t{pairs_per_kind}"] if header else []
        for fold in range(num_folds):
            names = [f"P{fold}_{i}" for i in range(pairs_per_kind + 1)]
            for n, name in enumerate(names):
                for k in range(1, images_per_name + 1):
                    write_random_image(
                        root / name / f"{name}_{k:04d}{ext}", size=size, seed=fold * 100 + n * 10 + k
                    )
            lines += [f"{names[i]}\t1\t2" for i in range(pairs_per_kind)]
            lines += [f"{names[i]}\t1\t{names[i + 1]}\t2" for i in range(pairs_per_kind)]
        pairs_path = root.with_name(f"{root.name}_pairs.txt")
        pairs_path.write_text("\n".join(lines) + "\n")
        return root, pairs_path

    return make


@pytest.fixture
def tiny_lfw(make_lfw_tree) -> tuple[Path, Path]:
    return make_lfw_tree()


# the small synthetic dataset the training-script tests share, made once per session
from tests.training_data import tiny_demo_data  # noqa: E402, F401
