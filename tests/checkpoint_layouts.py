"""Face checkpoints of every layout, written in the test the way their authors wrote them.

The original repository's 2019, 2020 and 2021 (Glint360K) layouts and this repository's,
built from torchvision ResNets with the original's heads and saved as plain dicts (the threshold a numpy
float64, pickled under numpy 1.x names for the original's files). Shared by tests/test_inference.py and
tests/test_finetune.py.
"""

import zipfile

import numpy as np
import torch
import torchvision
from torch import nn

EMBEDDING_DIM = 16


# ------------------------------------------------------------------------------------------ reference models


def randomize_batch_norm(model: nn.Module, seed: int) -> nn.Module:
    """Random running statistics, so an eval-mode model that failed to load them would differ."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
    return model


def reference_resnet(depth: int, head: str, num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """torchvision ResNet with the original's head: "linear" (2019), "sequential" (2020), "linear_no_bias" (2021)."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    if head == "linear_no_bias":  # 2021: one Linear without bias, plain unit embeddings
        net.fc = nn.Linear(net.fc.in_features, EMBEDDING_DIM, bias=False)
    elif head == "sequential":
        net.fc = nn.Sequential(
            nn.Linear(net.fc.in_features, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, EMBEDDING_DIM)
        )
    else:
        net.fc = nn.Linear(net.fc.in_features, EMBEDDING_DIM)
    if num_classes is not None:
        net.classifier = nn.Linear(EMBEDDING_DIM, num_classes)
    return randomize_batch_norm(net, seed).eval()


def state_dict_of(net: nn.Module) -> dict:
    """The original's key layout: the torchvision network sat at ``self.model``."""
    return {f"model.{key}": value for key, value in net.state_dict().items()}


# ----------------------------------------------------------------------------------------- checkpoint writers


NUMPY2_SCALAR, NUMPY1_SCALAR = b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"


def save_like_numpy1(obj, path, legacy_format: bool = False) -> None:
    """torch.save, then rename numpy 2's scalar reconstructor to numpy 1.x's path, as in the original's files.

    Protocol-2 pickles name globals as text lines and end at their STOP opcode, so the rename is a plain
    byte replacement. `legacy_format` writes torch's pre-1.6 (non-zip) format, as the 2019 model was saved.
    """
    if legacy_format:
        torch.save(obj, path, _use_new_zipfile_serialization=False)
        data = path.read_bytes()
        assert data.count(NUMPY2_SCALAR) == 1
        path.write_bytes(data.replace(NUMPY2_SCALAR, NUMPY1_SCALAR))
        return
    torch.save(obj, path)
    with zipfile.ZipFile(path) as source:
        members = [(info, source.read(info.filename)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for info, data in members:
            if info.filename.endswith("data.pkl"):
                assert NUMPY2_SCALAR in data
                data = data.replace(NUMPY2_SCALAR, NUMPY1_SCALAR)
            target.writestr(info, data)


def original_2020_checkpoint(net: nn.Module, architecture: str = "resnet18", num_classes=None) -> dict:
    checkpoint = {
        "epoch": 7,
        "embedding_dimension": EMBEDDING_DIM,
        "batch_size_training": 320,
        "model_state_dict": state_dict_of(net),
        "model_architecture": architecture,
        "optimizer_model_state_dict": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "best_distance_threshold": np.float64(1.13),
    }
    if num_classes is not None:
        checkpoint["num_classes"] = num_classes
    return checkpoint


def original_2019_checkpoint(net: nn.Module, architecture: str | None) -> dict:
    checkpoint = {
        "epoch": 28,
        "embedding_dimension": EMBEDDING_DIM,
        "model_state_dict": state_dict_of(net),
        "best_distance_threshold": np.float64(11.9),
    }
    if architecture is not None:
        checkpoint["model_architecture"] = architecture
    return checkpoint


THIS_REPO_MEAN = (0.6, 0.45, 0.4)
THIS_REPO_STD = (0.25, 0.2, 0.22)


def this_repository_checkpoint(net: nn.Module, image_size: int, num_classes=None) -> dict:
    checkpoint = original_2020_checkpoint(net, "resnet18", num_classes)
    checkpoint.update(
        best_distance_threshold=0.97,
        image_size=image_size,
        normalization={"mean": list(THIS_REPO_MEAN), "std": list(THIS_REPO_STD)},
        args={"model": "resnet18", "lr": 0.1},
        format_version=1,
        task="center" if num_classes else "triplet",
    )
    return checkpoint
