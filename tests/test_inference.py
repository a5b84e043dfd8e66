"""inference.py: the three checkpoint layouts, safe loading, and embeddings against reference models.

Checkpoints are written the way their authors wrote them (a plain dict through plain ``torch.save``, the
threshold as a numpy float64, pickled under numpy 1.x names for the original's files), and every loaded
model is checked against a reference implementation of its layout written here from torchvision directly.
"""

import logging
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

import checkpoint_loading
import export_onnx
import inference
from errors import InputError
from inference import (
    LAYOUT_ORIGINAL_2019,
    LAYOUT_ORIGINAL_2020,
    LAYOUT_THIS_REPOSITORY,
    SAFE_NUMPY_GLOBALS,
    FaceEmbedder,
    distance,
    embed_images,
    load_checkpoint,
)
from tests.checkpoint_layouts import (
    EMBEDDING_DIM,
    THIS_REPO_MEAN,
    THIS_REPO_STD,
    original_2019_checkpoint,
    original_2020_checkpoint,
    randomize_batch_norm,
    reference_resnet,
    save_like_numpy1,
    this_repository_checkpoint,
)

# ------------------------------------------------------------------------------------------ reference embeddings


def reference_embedding(net: nn.Module, images: torch.Tensor, head: str) -> torch.Tensor:
    with torch.no_grad():
        raw = net(images)
    if head == "linear":
        # the 2019 model's own l2_norm, then alpha = 10
        return 10.0 * raw / torch.sqrt(torch.sum(raw**2, dim=1, keepdim=True) + 1e-10)
    return raw / raw.norm(dim=1, keepdim=True)


def preprocess_reference(image: Image.Image, mean, std) -> torch.Tensor:
    """ToTensor + Normalize by hand, for images already at the model's input size (no resize involved)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    array = (array - np.asarray(mean)) / np.asarray(std)
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).float()


def random_images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


# ------------------------------------------------------------------------------------------ the three layouts


@pytest.mark.parametrize("numpy1_names, data_parallel", [(True, False), (False, False), (False, True)])
def test_original_2020_checkpoint_loads_and_embeds_like_reference(tmp_path, numpy1_names, data_parallel):
    net = reference_resnet(18, "sequential", seed=1)
    path = tmp_path / "model_resnet18_triplet_epoch_7.pt"
    checkpoint = original_2020_checkpoint(net)
    if data_parallel:  # saved from nn.DataParallel(model): every key prefixed "module."
        checkpoint["model_state_dict"] = {f"module.{k}": v for k, v in checkpoint["model_state_dict"].items()}
    (save_like_numpy1 if numpy1_names else torch.save)(checkpoint, path)

    loaded = load_checkpoint(path)
    assert loaded.layout == LAYOUT_ORIGINAL_2020
    assert (loaded.architecture, loaded.embedding_dim, loaded.epoch) == ("resnet18", EMBEDDING_DIM, 7)
    assert type(loaded.best_distance_threshold) is float and loaded.best_distance_threshold == 1.13
    assert (loaded.image_size, loaded.mean, loaded.std) == (224, (0.5,) * 3, (0.5,) * 3)
    assert loaded.distance_scale == 1.0 and not loaded.model.training

    images = random_images(3, 224, seed=2)
    expected = reference_embedding(
        net, torch.stack([preprocess_reference(i, [0.5] * 3, [0.5] * 3) for i in images]), "sequential"
    )
    torch.testing.assert_close(FaceEmbedder(loaded).embed(images), expected, atol=2e-5, rtol=1e-4)


def test_original_2021_checkpoint_loads_as_its_own_layout_with_its_preprocessing(tmp_path):
    """The Glint360K-era file: one Linear without bias, unit embeddings, 140 px with its mean and std."""
    net = reference_resnet(18, "linear_no_bias", seed=4)
    path = tmp_path / "model_resnet34_triplet.pt"
    save_like_numpy1({**original_2020_checkpoint(net), "best_distance_threshold": np.float64(0.98)}, path)

    loaded = load_checkpoint(path)
    assert loaded.layout == checkpoint_loading.LAYOUT_ORIGINAL_2021
    assert (loaded.architecture, loaded.embedding_dim, loaded.best_distance_threshold) == (
        "resnet18",
        16,
        0.98,
    )
    preset = checkpoint_loading.PREPROCESS_PRESETS["original-2021"]
    assert (loaded.image_size, loaded.mean, loaded.std) == (140, preset.mean, preset.std)
    assert loaded.distance_scale == 1.0 and loaded.preprocess == "original-2021"

    images = random_images(3, 140, seed=5)
    expected = reference_embedding(
        net, torch.stack([preprocess_reference(i, preset.mean, preset.std) for i in images]), "linear_no_bias"
    )
    torch.testing.assert_close(FaceEmbedder(loaded).embed(images), expected, atol=2e-5, rtol=1e-4)
    # fine-tuning: the backbone under a new head of ours, the old head's threshold dropped
    for_training = inference.load_for_training(path)
    assert for_training.new_head and for_training.best_distance_threshold is None
    backbone = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    for key, value in backbone.items():
        assert torch.equal(for_training.model.state_dict()[f"model.{key}"], value), key


@pytest.mark.parametrize(
    "depth, named, num_classes",
    [(34, False, None), (18, True, None), (18, True, 7)],  # the published model, and a center-loss one
)
def test_original_2019_checkpoint_keeps_its_x10_scale(tmp_path, depth, named, num_classes):
    net = reference_resnet(depth, "linear", num_classes=num_classes, seed=3)
    path = tmp_path / "model_resnet34_triplet.pt"
    checkpoint = original_2019_checkpoint(net, f"resnet{depth}" if named else None)
    save_like_numpy1(checkpoint, path, legacy_format=depth == 34)

    loaded = load_checkpoint(path, image_size=64)  # the depth comes from the keys when the name is absent
    assert loaded.layout == LAYOUT_ORIGINAL_2019
    assert isinstance(loaded.model, inference.LegacyResnetTriplet)
    assert (loaded.architecture, loaded.embedding_dim, loaded.image_size) == (
        f"resnet{depth}",
        EMBEDDING_DIM,
        64,
    )
    assert loaded.best_distance_threshold == 11.9 and loaded.distance_scale == 10.0

    images = random_images(3, 64, seed=4)
    batch = torch.stack([preprocess_reference(i, [0.5] * 3, [0.5] * 3) for i in images])
    expected = reference_embedding(net, batch, "linear")
    embeddings = FaceEmbedder(loaded).embed(images)
    torch.testing.assert_close(embeddings, expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.full((3,), 10.0))
    # distances on the stored threshold's scale: ten times the unit-sphere distance
    unit = F.normalize(expected, dim=1)
    assert distance(embeddings[0], embeddings[1]) == pytest.approx(
        10 * float((unit[0] - unit[1]).norm()), rel=1e-4
    )


@pytest.mark.parametrize("num_classes", [None, 5])
def test_this_repository_checkpoint_uses_its_stored_preprocessing(tmp_path, num_classes):
    net = reference_resnet(18, "sequential", num_classes=num_classes, seed=5)
    path = tmp_path / "model_resnet18.pt"
    torch.save(this_repository_checkpoint(net, image_size=40, num_classes=num_classes), path)

    loaded = load_checkpoint(path)
    assert loaded.layout == LAYOUT_THIS_REPOSITORY
    assert (loaded.image_size, loaded.mean, loaded.std) == (40, THIS_REPO_MEAN, THIS_REPO_STD)
    assert loaded.num_classes == num_classes and loaded.best_distance_threshold == 0.97
    if num_classes:
        torch.testing.assert_close(loaded.model.model.classifier.weight, net.classifier.weight)

    images = random_images(4, 40, seed=6)
    expected = reference_embedding(
        net,
        torch.stack([preprocess_reference(i, THIS_REPO_MEAN, THIS_REPO_STD) for i in images]),
        "sequential",
    )
    files = []
    for index, image in enumerate(images):
        files.append(tmp_path / f"face_{index}.png")  # lossless, so file and in-memory image agree exactly
        image.save(files[-1])
    embedder = FaceEmbedder(loaded, batch_size=3)  # two batches
    torch.testing.assert_close(embedder.embed(images), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(embedder.embed(files), expected, atol=2e-5, rtol=1e-4)
    assert FaceEmbedder(path).embed(files[0]).shape == (1, EMBEDDING_DIM)


def test_image_size_override_and_resize(tmp_path):
    net = reference_resnet(18, "sequential", seed=7)
    path = tmp_path / "ckpt.pt"
    torch.save(original_2020_checkpoint(net), path)
    embedder = FaceEmbedder(path, image_size=32)
    seen_shapes = []
    embedder.loaded.model.register_forward_hook(
        lambda module, args, output: seen_shapes.append(args[0].shape)
    )
    big = random_images(1, 96, seed=8)[0]
    # torchvision resizes PIL images with PIL's own bilinear filter
    small = big.resize((32, 32), Image.BILINEAR)
    torch.testing.assert_close(embedder.embed([big]), embedder.embed([small]), atol=1e-5, rtol=1e-4)
    assert seen_shapes == [(1, 3, 32, 32)] * 2


# ------------------------------------------------------------------------------------------ flip and distance


@pytest.mark.parametrize("head", ["sequential", "linear"])
def test_flip_embedding_is_the_normalised_sum_of_both_views(head):
    model = inference.LegacyResnetTriplet(18, EMBEDDING_DIM) if head == "linear" else None
    if model is None:
        from models import build_model

        model = build_model("resnet18", EMBEDDING_DIM)
    model = randomize_batch_norm(model, 9).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        flipped = embed_images(model, images, flip=True)
        mirrored_input = embed_images(model, images.flip(-1), flip=True)
        expected = F.normalize(model(images) + model(images.flip(-1)), dim=1) * (
            10.0 if head == "linear" else 1.0
        )
    torch.testing.assert_close(flipped, expected, atol=1e-5, rtol=1e-4)
    # a photo and its mirror image get the same flip embedding
    torch.testing.assert_close(flipped, mirrored_input, atol=1e-5, rtol=1e-4)


def test_distance_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    np.testing.assert_allclose(distance(torch.tensor(a), b), np.linalg.norm(a - b, axis=1))
    single = distance(torch.tensor(a[0]), torch.tensor(b[0]))
    assert isinstance(single, float) and single == pytest.approx(np.linalg.norm(a[0] - b[0]))
    with pytest.raises(InputError, match="shapes"):
        distance(a, b[:, :4])


# ------------------------------------------------------------------------------------------ safe loading


def load_with(globals_allowed, path):
    with torch.serialization.safe_globals(globals_allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("numpy1_names", [True, False])
def test_safe_numpy_globals_are_needed_and_enough(tmp_path, numpy1_names):
    path = tmp_path / "threshold.pt"
    (save_like_numpy1 if numpy1_names else torch.save)({"best_distance_threshold": np.float64(0.5)}, path)
    assert load_with(SAFE_NUMPY_GLOBALS, path)["best_distance_threshold"] == 0.5
    # minimal: without any one entry the load fails (entries 0 and 1 are the reconstructor under its numpy 2
    # and numpy 1.x names, so each file needs only the one for the numpy that wrote it)
    scalar_entry = 1 if numpy1_names else 0
    for removed in range(len(SAFE_NUMPY_GLOBALS)):
        if removed in (0, 1) and removed != scalar_entry:
            continue
        reduced = SAFE_NUMPY_GLOBALS[:removed] + SAFE_NUMPY_GLOBALS[removed + 1 :]
        with pytest.raises(pickle.UnpicklingError):
            load_with(reduced, path)
    assert len(SAFE_NUMPY_GLOBALS) == 4


class WritesAFileWhenUnpickled:
    """A pickle that runs code on load: what weights_only loading exists to stop."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(
    "payload, refused",
    [
        (np.arange(3), "_reconstruct"),  # a numpy array is not on the list
        (np.int64(3), "Int64DType"),  # nor another numpy scalar type
    ],
)
def test_other_numpy_types_are_refused(tmp_path, payload, refused):
    net = reference_resnet(18, "sequential")
    checkpoint = original_2020_checkpoint(net)
    checkpoint["extra"] = payload
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint, path)
    with pytest.raises(InputError, match=refused):
        load_checkpoint(path)


def test_code_in_a_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "payload": WritesAFileWhenUnpickled(marker)}, path)
    with pytest.raises(InputError, match="safe .weights-only. loading"):
        load_checkpoint(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ bad input


def test_bad_files_are_one_line_input_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], a_list)
    no_model = tmp_path / "no_model.pt"
    torch.save({"epoch": 3}, no_model)
    unknown = tmp_path / "unknown.pt"
    torch.save({"model_state_dict": {"encoder.weight": torch.zeros(2)}}, unknown)
    inception = tmp_path / "inception.pt"
    torch.save({"model_state_dict": {"model.last_linear.weight": torch.zeros(2, 3)}}, inception)
    cases = [
        (tmp_path / "missing.pt", "missing.pt: no such file"),
        (tmp_path, "a folder, not a file"),
        (text, "could not read checkpoint"),
        (empty, "empty or truncated"),
        (a_list, "holds a list, not a dict"),
        (no_model, "no 'model_state_dict'"),
        (unknown, "unknown checkpoint layout"),
        (inception, "Inception-ResNet-v2 checkpoints are not supported"),
    ]
    for path, message in cases:
        with pytest.raises(InputError, match=message) as caught:
            load_checkpoint(path)
        assert "\n" not in str(caught.value)


def test_checkpoints_that_do_not_fit_are_refused(tmp_path):
    net = reference_resnet(18, "sequential")
    cases = {
        "wrong_depth": dict(original_2020_checkpoint(net, "resnet34")),
        "unsupported": dict(original_2020_checkpoint(net, "mobilenet2")),
        "newer_format": {**this_repository_checkpoint(net, 32), "format_version": 2},
        "no_image_size": {k: v for k, v in this_repository_checkpoint(net, 32).items() if k != "image_size"},
    }
    messages = {
        "wrong_depth": "do not fit a resnet34",
        "unsupported": "'mobilenet2' is not supported",
        "newer_format": "format_version 2",
        "no_image_size": "image_size/normalization missing",
    }
    for name, checkpoint in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(checkpoint, path)
        with pytest.raises(InputError, match=messages[name]):
            load_checkpoint(path)


def test_unreadable_image_is_an_input_error(tmp_path):
    net = reference_resnet(18, "sequential")
    path = tmp_path / "ckpt.pt"
    torch.save(original_2020_checkpoint(net), path)
    embedder = FaceEmbedder(path, image_size=32)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="could not read image"):
        embedder.embed([broken])
    with pytest.raises(InputError, match="image not found"):
        embedder.embed([tmp_path / "absent.jpg"])


def test_resnet_depth_from_keys_matches_torchvision():
    for depth in (18, 34, 50, 101, 152):
        with torch.device("meta"):  # shapes only: no time spent initialising 60M weights
            net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        state = {f"model.{key}": value for key, value in net.state_dict().items()}
        assert checkpoint_loading.resnet_depth_from_keys(state) == depth
    assert checkpoint_loading.resnet_depth_from_keys({"model.fc.weight": torch.zeros(1)}) is None


# ------------------------------------------------------------------------------------------ facenet-pytorch, presets


def test_facenet_pytorch_state_dict_loads_with_its_preprocessing(tmp_path):
    from facenet_pytorch import InceptionResnetV1, fixed_image_standardization

    torch.manual_seed(10)
    # as facenet-pytorch saves its published files: a plain state dict, logits over its training identities
    facenet = randomize_batch_norm(InceptionResnetV1(classify=True, num_classes=7), seed=10).eval()
    path = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(facenet.state_dict(), path)

    loaded = load_checkpoint(path)
    assert loaded.layout == inference.LAYOUT_FACENET_PYTORCH == "facenet-pytorch"
    assert (loaded.architecture, loaded.embedding_dim, loaded.num_classes) == (
        "inception_resnet_v1",
        512,
        None,
    )
    assert (loaded.image_size, loaded.preprocess, loaded.best_distance_threshold) == (
        160,
        "facenet-pytorch",
        None,
    )
    assert loaded.alignment == inference.Alignment("none", 160, 32)

    images = random_images(2, 160, seed=11)
    pixels = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1).float() for i in images])
    facenet.classify = False  # its embedding: what facenet-pytorch users get from model(x)
    with torch.no_grad():
        expected = facenet(fixed_image_standardization(pixels))
    torch.testing.assert_close(FaceEmbedder(loaded).embed(images), expected, atol=1e-4, rtol=1e-4)


def test_original_2021_preset(tmp_path):
    net = reference_resnet(18, "sequential", seed=12)
    path = tmp_path / "model_resnet18_triplet_epoch_3.pt"
    torch.save(original_2020_checkpoint(net), path)
    mean, std = (0.6071, 0.4609, 0.3944), (0.2457, 0.2175, 0.2129)

    loaded = load_checkpoint(path, preprocess="original-2021")
    assert loaded.layout == LAYOUT_ORIGINAL_2020 and loaded.preprocess == "original-2021"
    assert (loaded.image_size, loaded.mean, loaded.std) == (140, mean, std)
    assert loaded.alignment == inference.Alignment("none", 140, 28)
    images = random_images(2, 140, seed=13)
    expected = reference_embedding(
        net, torch.stack([preprocess_reference(i, mean, std) for i in images]), "sequential"
    )
    torch.testing.assert_close(
        FaceEmbedder(path, preprocess="original-2021").embed(images), expected, atol=2e-5, rtol=1e-4
    )
    # without a preset the 2020 preprocessing, and image_size still overrides a preset's size
    assert load_checkpoint(path).preprocess == "original-2020"
    assert load_checkpoint(path, image_size=112, preprocess="original-2021").image_size == 112
    with pytest.raises(
        InputError, match="unknown preprocessing preset 'original-2022'; choose one of original-2020"
    ):
        load_checkpoint(path, preprocess="original-2022")


def test_stored_preprocessing_wins_over_a_preset(tmp_path, caplog):
    net = reference_resnet(18, "sequential", seed=14)
    path = tmp_path / "ours.pt"
    torch.save(this_repository_checkpoint(net, image_size=40), path)
    with caplog.at_level("WARNING", logger="checkpoint_loading"):
        loaded = load_checkpoint(path, preprocess="original-2021")
    assert (loaded.image_size, loaded.mean, loaded.std, loaded.preprocess) == (
        40,
        THIS_REPO_MEAN,
        THIS_REPO_STD,
        None,
    )
    assert len(caplog.records) == 1 and "ignoring preset original-2021" in caplog.text
    assert "\n" not in caplog.records[0].getMessage()

    same = tmp_path / "same.pt"
    torch.save(
        {**this_repository_checkpoint(net, 224), "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}, same
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="checkpoint_loading"):
        load_checkpoint(same, preprocess="original-2020")
    assert caplog.records == []


def test_alignment_entry_and_its_default(tmp_path):
    net = reference_resnet(18, "sequential", seed=15)
    checkpoint = this_repository_checkpoint(net, image_size=64)
    path = tmp_path / "default.pt"
    torch.save(checkpoint, path)
    guessed = load_checkpoint(path)
    assert guessed.alignment == inference.Alignment("none", 64, 13)  # round(32 * 64 / 160)
    assert guessed.info()["alignment_source"] == "guessed: not stored in the checkpoint"  # reports say so
    inference.resolve_alignment(guessed, "arcface112", None, used=True)
    assert guessed.info()["alignment_source"] == "command line"
    entry = {"template": "arcface112", "image_size": 112, "margin": 0}
    torch.save({**checkpoint, "alignment": entry}, path)
    loaded = load_checkpoint(path)
    assert (
        loaded.alignment == inference.Alignment("arcface112", 112, 0) and loaded.info()["alignment"] == entry
    )
    assert loaded.info()["alignment_source"] == "checkpoint"
    assert FaceEmbedder(loaded).alignment == loaded.alignment
    bad = {
        "malformed": {"template": "arcface112"},
        "bad alignment": {"template": "dlib", "image_size": 112, "margin": 0},
        "bad alignment margin": {"template": "none", "image_size": 64, "margin": 64},
    }
    for message, value in bad.items():
        torch.save({**checkpoint, "alignment": value}, path)
        with pytest.raises(InputError, match=message):
            load_checkpoint(path)


def test_load_for_training_gives_a_trainable_registry_model(tmp_path):
    from models import ResNetEmbedding

    net = reference_resnet(18, "sequential", num_classes=5, seed=16)
    path = tmp_path / "center.pt"
    entry = {"template": "arcface112", "image_size": 112, "margin": 0}
    torch.save({**this_repository_checkpoint(net, image_size=48, num_classes=5), "alignment": entry}, path)

    loaded = inference.load_for_training(path)
    assert isinstance(loaded.model, ResNetEmbedding) and loaded.model.training
    assert all(p.requires_grad for p in loaded.model.parameters())
    assert loaded.num_classes is None and not hasattr(
        loaded.model.model, "classifier"
    )  # old identities dropped
    assert (loaded.architecture, loaded.embedding_dim, loaded.image_size) == ("resnet18", EMBEDDING_DIM, 48)
    assert (loaded.mean, loaded.std, loaded.alignment.template) == (
        THIS_REPO_MEAN,
        THIS_REPO_STD,
        "arcface112",
    )
    torch.testing.assert_close(loaded.model.model.fc[3].weight, net.fc[3].weight)

    new = inference.load_for_training(path, num_classes=3)
    assert new.num_classes == 3 and new.model.model.classifier.out_features == 3
    torch.testing.assert_close(new.model.model.layer1[0].conv1.weight, net.layer1[0].conv1.weight)
    embeddings, logits = new.model.forward_training(torch.randn(4, 3, 48, 48), logit_scale=2.0)
    (logits.sum() + embeddings.sum()).backward()
    assert new.model.model.conv1.weight.grad is not None

    # the 2019 model: its backbone under a new head of ours (its single Linear has no counterpart here)
    legacy_net = reference_resnet(18, "linear")
    legacy = tmp_path / "legacy.pt"
    torch.save(original_2019_checkpoint(legacy_net, "resnet18"), legacy)
    old = inference.load_for_training(legacy)
    assert isinstance(old.model, ResNetEmbedding) and old.new_head and old.best_distance_threshold is None
    assert (old.embedding_dim, old.distance_scale) == (EMBEDDING_DIM, 1.0)
    torch.testing.assert_close(old.model.model.layer4[1].conv2.weight, legacy_net.layer4[1].conv2.weight)
    assert not loaded.new_head


@pytest.mark.parametrize(
    "history, epoch, step, note",
    [
        ({"validated_epochs": [1, 2]}, 2, 0, None),  # validated on these very weights
        ({"validated_epochs": [2]}, 3, 0, "measured after epoch 2, and these weights are from epoch 3"),
        (
            {"validated_epochs": [2]},
            2,
            5,
            "measured after epoch 2, and these weights are from epoch 2 plus 5",
        ),
        (None, 3, 0, None),  # the original's layout: its threshold is the saved epoch's
    ],
)
def test_a_threshold_measured_on_earlier_weights_is_flagged(tmp_path, caplog, history, epoch, step, note):
    checkpoint = this_repository_checkpoint(reference_resnet(18, "sequential"), image_size=40)
    checkpoint.update(epoch=epoch, step_in_epoch=step)
    if history is not None:
        checkpoint["history"] = history
    path = tmp_path / "model.pt"
    torch.save(checkpoint, path)
    loaded = load_checkpoint(path)
    assert loaded.best_distance_threshold == 0.97
    if note is None:
        assert loaded.threshold_note is None
    else:
        assert note in loaded.threshold_note
    with caplog.at_level(logging.WARNING, logger="inference"):
        assert inference.decision_threshold(None, 0.97, path, note=loaded.threshold_note) == 0.97
        assert inference.decision_threshold(0.5, 0.97, path, note=loaded.threshold_note) == 0.5
    assert ("the last validation's" in caplog.text) == (note is not None)


def test_a_threshold_used_at_another_input_size_is_flagged(tmp_path, capsys):
    """Distances change with the input size, so the stored threshold no longer separates the pairs."""
    path = tmp_path / "model.pt"
    torch.save(this_repository_checkpoint(reference_resnet(18, "sequential"), image_size=40), path)
    assert load_checkpoint(path, image_size=40).threshold_note is None
    note = load_checkpoint(path, image_size=64).threshold_note
    assert note == "it was measured at 40 px input, and these embeddings are made at 64 px"
    checkpoint = this_repository_checkpoint(reference_resnet(18, "sequential"), image_size=40)
    checkpoint.update(epoch=3, history={"validated_epochs": [2]})
    torch.save(checkpoint, path)
    note = load_checkpoint(path, image_size=64).threshold_note
    assert "measured after epoch 2" in note and "made at 64 px" in note
    assert export_onnx.main(["--model_path", str(path), str(tmp_path / "m.onnx"), "--image_size", "64"]) == 0
    assert "made at 64 px" in capsys.readouterr().out


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"best_distance_threshold": "abc"}, "best_distance_threshold 'abc' is not a positive distance"),
        ({"best_distance_threshold": float("nan")}, "best_distance_threshold nan is not a positive distance"),
        ({"best_distance_threshold": -1.0}, "is not a positive distance"),
        ({"epoch": "x"}, "epoch 'x' is not a whole number"),
        (
            {"normalization": {"mean": [0.5] * 3, "std": [float("nan")] * 3}},
            "bad image_size 40 or normalization",
        ),
    ],
)
def test_malformed_numbers_in_a_checkpoint_are_one_line_input_errors(tmp_path, entry, message):
    checkpoint = this_repository_checkpoint(reference_resnet(18, "sequential"), image_size=40)
    checkpoint.update(entry)
    path = tmp_path / "model.pt"
    torch.save(checkpoint, path)
    with pytest.raises(InputError, match=message) as caught:
        load_checkpoint(path)
    assert "\n" not in str(caught.value)


def test_embedding_leaves_a_model_in_training_mode_as_it_found_it(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(this_repository_checkpoint(reference_resnet(18, "sequential"), image_size=40), path)
    loaded = load_checkpoint(path)
    loaded.model.train()
    FaceEmbedder(loaded).embed(random_images(2, 40))
    assert loaded.model.training
    loaded.model.eval()
    FaceEmbedder(loaded).embed(random_images(2, 40))
    assert not loaded.model.training


def test_template_and_crop_margin_set_how_raw_photos_are_cropped(tmp_path, caplog):
    path = tmp_path / "model.pt"
    torch.save(
        this_repository_checkpoint(reference_resnet(18, "sequential"), image_size=40), path
    )  # no alignment

    def resolved(template, crop_margin, used=True):
        loaded = load_checkpoint(path)
        inference.resolve_alignment(loaded, template, crop_margin, used)
        return loaded.alignment

    with caplog.at_level(logging.WARNING, logger="inference"):
        assert resolved(None, None) == checkpoint_loading.default_alignment(40)
    assert (
        "does not say how its training crops were made" in caplog.text
        and "--template arcface112" in caplog.text
    )
    assert resolved("arcface112", None) == checkpoint_loading.Alignment("arcface112", 112, 0)
    assert resolved(None, 5) == checkpoint_loading.Alignment("none", 40, 5)
    assert resolved("none", None) == checkpoint_loading.default_alignment(40)
    for template, margin, used, message in [
        ("arcface112", None, False, "add --align"),
        ("arcface112", 4, True, "--crop_margin applies to --template none"),
        (None, 40, True, r"--crop_margin must be in \[0, 40\)"),
    ]:
        with pytest.raises(InputError, match=message):
            resolved(template, margin, used)

    stored = this_repository_checkpoint(reference_resnet(18, "sequential"), image_size=40)
    stored["alignment"] = {"template": "none", "image_size": 40, "margin": 6}
    torch.save(stored, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inference"):
        assert resolved(None, None).margin == 6 and resolved("none", None).margin == 6  # the checkpoint's
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="inference"):
        assert resolved("arcface112", None).template == "arcface112"
    assert "was trained on" in caplog.text and "using" in caplog.text

    # the same template keeps the stored crop size: align_dataset's 182/44 crops, resized to the 40 px input
    stored["alignment"] = {"template": "none", "image_size": 182, "margin": 44}
    torch.save(stored, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inference"):
        assert resolved("none", None) == checkpoint_loading.Alignment("none", 182, 44)
    assert caplog.text == ""
    assert resolved(None, 30) == checkpoint_loading.Alignment("none", 182, 30)
    with pytest.raises(InputError, match=r"--crop_margin must be in \[0, 182\)"):
        resolved(None, 182)
    stored["alignment"] = {"template": "arcface112", "image_size": 224, "margin": 0}
    torch.save(stored, path)
    assert resolved("arcface112", None) == checkpoint_loading.Alignment("arcface112", 224, 0)
    assert resolved("none", None) == checkpoint_loading.default_alignment(40)  # another template
