import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import models
from models import MODEL_NAMES, build_model

REPO = Path(__file__).resolve().parent.parent


def original_resnet_layout(depth: int, embedding_dim: int, num_classes: int | None = None) -> dict:
    """Key -> shape of the original repository's ResNet models, rebuilt here from torchvision directly."""
    backbone = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    in_features = backbone.fc.in_features
    backbone.fc = nn.Sequential(
        nn.Linear(in_features, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embedding_dim)
    )
    if num_classes is not None:
        backbone.classifier = nn.Linear(embedding_dim, num_classes)
    return {f"model.{key}": tuple(value.shape) for key, value in backbone.state_dict().items()}


def test_resnet_py_works_copied_alone(tmp_path):
    (tmp_path / "resnet.py").write_text((REPO / "models" / "resnet.py").read_text())
    code = (
        "import torch\n"
        "from resnet import Resnet34Triplet\n"
        "model = Resnet34Triplet(embedding_dimension=128).eval()\n"
        "out = model(torch.randn(3, 3, 64, 64))\n"
        "assert out.shape == (3, 128), out.shape\n"
        "assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)\n"
        "print('ok')\n"
    )
    (tmp_path / "use_it.py").write_text(code)
    # -E ignores PYTHONPATH, so only the script's own folder (holding the copy) is importable
    result = subprocess.run(
        [sys.executable, "-E", "use_it.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_resnet_state_dict_matches_original_layout(depth):
    model = getattr(models, f"Resnet{depth}Triplet")(embedding_dimension=96)
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert ours == original_resnet_layout(depth, 96)
    center = getattr(models, f"Resnet{depth}Center")(num_classes=7, embedding_dimension=96)
    ours = {key: tuple(value.shape) for key, value in center.state_dict().items()}
    assert ours == original_resnet_layout(depth, 96, num_classes=7)
    assert {"model.fc.0.weight", "model.fc.1.running_mean", "model.fc.3.weight"} <= set(ours)


def test_weights_load_across_triplet_and_registry():
    trained = models.Resnet18Triplet(embedding_dimension=32)
    rebuilt = build_model("resnet18", embedding_dim=32)
    rebuilt.load_state_dict(trained.state_dict())  # strict
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(trained.eval()(images), rebuilt.eval()(images))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_architecture_builds_as_triplet_and_center(name):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 96, 96)
    triplet = build_model(name, embedding_dim=64).eval()
    with torch.no_grad():
        embeddings = triplet(images)
    assert embeddings.shape == (2, 64)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))
    with pytest.raises(RuntimeError, match="no classifier"):
        triplet.forward_training(images)

    center = build_model(name, embedding_dim=64, num_classes=5).eval()
    with torch.no_grad():
        embeddings, logits = center.forward_training(images, logit_scale=3.0)
    assert embeddings.shape == (2, 64) and logits.shape == (2, 5)
    classifier = center.model.classifier
    torch.testing.assert_close(logits, classifier(3.0 * embeddings))


def test_inception_aliases_have_original_signatures():
    from models.inceptionresnetv2 import InceptionResnetV2Center, InceptionResnetV2Triplet

    assert InceptionResnetV2Triplet(embedding_dimension=16).embedding_dim == 16
    center = InceptionResnetV2Center(num_classes=3, embedding_dimension=16)
    assert center.model.classifier.out_features == 3
    assert models.InceptionResnetV2Triplet is InceptionResnetV2Triplet


def test_channels_last_and_autocast_match_fp32():
    torch.manual_seed(0)
    model = models.Resnet18Triplet(embedding_dimension=128).eval()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        reference = model(images)
        model_cl = model.to(memory_format=torch.channels_last)
        channels_last = model_cl(images.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model_cl(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, reference, atol=1e-4, rtol=1e-4)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed.norm(dim=1), torch.ones(4))
    assert torch.nn.functional.cosine_similarity(mixed, reference).min() > 0.98


def test_unknown_model_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown model 'resnet35'"):
        build_model("resnet35")
    with pytest.raises(ValueError, match="embedding_dim"):
        build_model("resnet18", embedding_dim=0)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", num_classes=1)


def test_pretrained_without_network_is_one_clear_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError) as raised:
        models.Resnet18Triplet(pretrained=True)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("could not load torchvision's ImageNet weights for resnet18")
    assert "--no-pretrained" in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
