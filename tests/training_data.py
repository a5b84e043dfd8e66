"""A tiny synthetic dataset shared by the training-script tests (made once per test session)."""

from pathlib import Path

import pytest

from demo.make_demo_dataset import make_demo_dataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_demo")
    return make_demo_dataset(
        root,
        seed=1,
        num_train_identities=6,
        images_per_identity=5,
        num_lfw_identities=20,
        max_images_per_lfw_identity=3,
        image_size=32,
        pairs_per_fold=2,
    )


def common_args(data, output_dir):
    """Arguments every training test shares: tiny model input, no worker processes, fixed seed."""
    return [
        "--dataroot", data.train_dir,
        "--lfw", data.lfw_dir,
        "--lfw_pairs", data.pairs_path,
        "--output_dir", output_dir,
        "--model", "resnet18",
        "--embedding_dim", "16",
        "--image_size", "32",
        "--num_workers", "0",
        "--optimizer", "adam",
        "--lr", "0.001",
        "--seed", "3",
        "--lfw_batch_size", "32",
    ]  # fmt: skip
