"""models/inception_resnet_v1.py: facenet-pytorch's network under our conventions, its weights from the cache.

The oracle is facenet-pytorch's own ``InceptionResnetV1``: same weights, same embeddings; its published
weights are replaced by a state dict made here and placed where facenet-pytorch's ``load_weights`` looks
(``$TORCH_HOME/checkpoints``), with downloading made impossible.
"""

import numpy as np
import pytest
import torch
from facenet_pytorch import InceptionResnetV1, fixed_image_standardization
from facenet_pytorch.models import inception_resnet_v1 as facenet_module
from PIL import Image

import models
from datasets.transforms import ToNormalizedTensor
from models import MODEL_NAMES, build_model, default_preprocessing, pretrained_weights
from models.inception_resnet_v1 import InceptionResnetV1Embedding

VGGFACE2_FILE = "20180402-114759-vggface2.pt"  # the name facenet-pytorch's load_weights caches it under
VGGFACE2_CLASSES = 8631


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights and batch-norm statistics, so that nothing could match by default initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator) * 0.05
                tensor.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise)
    return model


def facenet_state_dict(seed: int = 0) -> dict:
    """A state dict shaped like facenet-pytorch's published VGGFace2 file (logits over 8631 identities)."""
    facenet = InceptionResnetV1(classify=True, num_classes=VGGFACE2_CLASSES)
    return randomized(facenet, seed).state_dict()


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """TORCH_HOME in tmp_path, and any download attempt an error the test sees."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    downloads = []

    def no_download(url, destination, *args, **kwargs):
        downloads.append(url)
        raise OSError(f"downloads are disabled in tests ({url})")

    monkeypatch.setattr(facenet_module, "download_url_to_file", no_download)
    return tmp_path / "torch_home", downloads


def test_registered_with_facenet_state_dict_layout():
    assert "inception_resnet_v1" in MODEL_NAMES
    ours = build_model("inception_resnet_v1", embedding_dim=512, num_classes=5)
    assert isinstance(ours, InceptionResnetV1Embedding) and models.InceptionResnetV1Embedding is type(ours)
    facenet = InceptionResnetV1()
    expected = {f"model.{key}": tuple(value.shape) for key, value in facenet.state_dict().items()}
    expected |= {"model.classifier.weight": (5, 512), "model.classifier.bias": (5,)}
    assert {key: tuple(value.shape) for key, value in ours.state_dict().items()} == expected


def test_embeddings_equal_facenet_pytorch_forward():
    facenet = randomized(InceptionResnetV1(), seed=1).eval()
    ours = build_model("inception_resnet_v1", embedding_dim=512).eval()
    ours.model.load_state_dict(facenet.state_dict())
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        expected = facenet(images)
        embeddings = ours(images)
    assert embeddings.dtype == torch.float32 and embeddings.shape == (2, 512)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))


def test_other_embedding_dims_replace_the_projection():
    model = build_model("inception_resnet_v1", embedding_dim=64, num_classes=3)
    assert tuple(model.model.last_linear.weight.shape) == (64, 1792) and model.model.last_linear.bias is None
    assert model.model.last_bn.num_features == 64 and model.model.last_bn.eps == 0.001
    assert not hasattr(model.model, "logits")
    model.eval()
    with torch.no_grad():
        embeddings, logits = model.forward_training(torch.randn(2, 3, 160, 160), logit_scale=4.0)
    assert embeddings.shape == (2, 64) and logits.shape == (2, 3)
    torch.testing.assert_close(logits, model.model.classifier(4.0 * embeddings))


def test_default_preprocessing_is_facenet_fixed_image_standardization():
    preprocessing = default_preprocessing("inception_resnet_v1")
    assert preprocessing.image_size == 160
    assert InceptionResnetV1Embedding.preprocessing == preprocessing
    assert default_preprocessing("resnet34") is None
    pixels = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    ours = ToNormalizedTensor(preprocessing.mean, preprocessing.std)(Image.fromarray(pixels))
    theirs = fixed_image_standardization(torch.from_numpy(pixels).permute(2, 0, 1).float())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("embedding_dim", [512, 128])
def test_pretrained_weights_come_from_the_torch_hub_cache(torch_home, embedding_dim):
    home, downloads = torch_home
    (home / "checkpoints").mkdir(parents=True)
    published = facenet_state_dict(seed=2)
    torch.save(published, home / "checkpoints" / VGGFACE2_FILE)

    model = build_model("inception_resnet_v1", embedding_dim=embedding_dim, pretrained="vggface2")
    assert downloads == []
    loaded = model.state_dict()
    projection = ("model.last_linear.", "model.last_bn.")
    compared = 0
    for key, value in published.items():
        ours = f"model.{key}"
        if key.startswith("logits."):  # facenet-pytorch's classifier over its training identities: dropped
            assert ours not in loaded
        elif embedding_dim != 512 and ours.startswith(projection):  # a new projection of another size
            assert loaded[ours].ndim == 0 or loaded[ours].shape[0] == embedding_dim
        else:
            assert torch.equal(loaded[ours], value), key
            compared += 1
    assert compared == len(published) - 2 - (0 if embedding_dim == 512 else 6)
    assert set(loaded) == {f"model.{key}" for key in published if not key.startswith("logits.")}


def test_missing_weights_without_network_are_one_clear_sentence(torch_home):
    _, downloads = torch_home
    with pytest.raises(RuntimeError) as raised:
        build_model("inception_resnet_v1", pretrained="casia-webface")
    message = str(raised.value)
    assert downloads and downloads[0].endswith("20180408-102900-casia-webface.pt")
    assert "\n" not in message and raised.value.__suppress_context__
    assert message.startswith(
        "could not load facenet-pytorch's casia-webface weights for inception_resnet_v1"
    )
    assert "TORCH_HOME" in message


def test_unsupported_pretrained_combinations():
    assert pretrained_weights("inception_resnet_v1") == ("vggface2", "casia-webface")
    assert pretrained_weights("resnet18") == ("imagenet",)
    cases = [
        (
            "resnet18",
            "vggface2",
            "resnet18 has no 'vggface2' weights; pretrained may be False, True or 'imagenet'",
        ),
        ("inception_resnet_v1", True, "no 'imagenet' weights; pretrained may be False, 'vggface2' or"),
        ("inception_resnet_v1", "imagenet", "no 'imagenet' weights"),
        ("inceptionresnetv2", "casia-webface", "inceptionresnetv2 has no 'casia-webface' weights"),
    ]
    for name, pretrained, message in cases:
        with pytest.raises(ValueError, match=message):
            build_model(name, pretrained=pretrained)
    with pytest.raises(ValueError, match="unknown model"):
        pretrained_weights("resnet35")
