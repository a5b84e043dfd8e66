"""hubconf.py: torch.hub.load from this repository's folder (source="local") builds and loads our models."""

from pathlib import Path

import pytest
import torch

from inference import FaceEmbedder
from models import MODEL_NAMES, ResNetEmbedding, build_model

REPO = Path(__file__).resolve().parent.parent


def test_every_registry_name_is_an_entry():
    import hubconf

    for name in MODEL_NAMES:
        assert callable(getattr(hubconf, name)) and name in getattr(hubconf, name).__doc__
    assert {"torch", "torchvision"} <= set(hubconf.dependencies)


def test_hub_load_builds_a_registry_model(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("nothing may download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    model = torch.hub.load(str(REPO), "resnet34", source="local", embedding_dim=128)
    assert isinstance(model, ResNetEmbedding) and model.depth == 34 and model.embedding_dim == 128
    reference = build_model("resnet34", embedding_dim=128)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    center = torch.hub.load(str(REPO), "resnet18", source="local", embedding_dim=32, num_classes=4)
    assert center.model.classifier.out_features == 4


def test_hub_entries_default_to_the_models_own_embedding_size():
    """inception_resnet_v1 at 512, so pretrained="vggface2" keeps facenet-pytorch's head instead of a random
    128-d one."""
    model = torch.hub.load(str(REPO), "inception_resnet_v1", source="local")
    assert model.embedding_dim == 512
    assert torch.hub.load(str(REPO), "resnet18", source="local").embedding_dim == 128


@pytest.mark.parametrize("entry", ["from_checkpoint", "face_embedder"])
def test_hub_load_from_a_checkpoint(tmp_path, entry):
    torch.manual_seed(0)
    model = build_model("resnet18", embedding_dim=16).eval()
    path = tmp_path / "model.pt"
    checkpoint = {
        "model_state_dict": model.state_dict(),
        "model_architecture": "resnet18",
        "best_distance_threshold": 0.9,
        "image_size": 32,
        "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3},
        "format_version": 1,
    }
    torch.save(checkpoint, path)
    loaded = torch.hub.load(str(REPO), entry, source="local", path=str(path))
    images = torch.randn(2, 3, 32, 32)
    if entry == "face_embedder":
        assert isinstance(loaded, FaceEmbedder) and loaded.loaded.best_distance_threshold == 0.9
        loaded = loaded.loaded.model
    else:
        assert loaded.loaded_info["image_size"] == 32 and loaded.loaded_info["best_distance_threshold"] == 0.9
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
