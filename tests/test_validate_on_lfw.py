"""validate_on_LFW.py: embedding bookkeeping, distances, and the command on the shared LFW crops."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import eval_metrics
import validate_on_LFW
from datasets.lfw_dataset import find_lfw_image, read_pairs
from datasets.verification_bin import write_verification_bin
from fileio import write_json_atomic
from inference import FaceEmbedder, distance, embed_images
from models import build_model
from validate_on_LFW import main
from verification import distances_of_pairs, embed_dataset, evaluate_model_on_lfw

REPO = Path(__file__).resolve().parent.parent
LFW_DIR = REPO.parent / "shared" / "data" / "lfw_112"
LFW_PAIRS = REPO.parent / "shared" / "data" / "lfw_pairs.txt"
NUM_LFW_IMAGES = 7701  # distinct images used by the 6,000 standard pairs


class TinyEmbedder(nn.Module):
    """A cheap embedding model (pool, linear, normalise) that records what it sees."""

    def __init__(self, embedding_dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.linear = nn.Linear(3 * 4 * 4, embedding_dim)
        self.rows_seen = 0
        self.modes_seen = set()

    def forward(self, images):
        self.rows_seen += images.shape[0]
        self.modes_seen.add(self.training)
        return F.normalize(self.linear(self.pool(images).flatten(1)), dim=1)


class IndexedTensors(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index


def test_embed_dataset_puts_row_i_at_item_i_whatever_the_order():
    images = torch.randn(11, 3, 12, 12)
    model = TinyEmbedder().train()
    loader = DataLoader(IndexedTensors(images), batch_size=3, shuffle=True)  # any order must land right
    embeddings = embed_dataset(model, loader, torch.device("cpu"), progress=False)
    assert embeddings.dtype == torch.float32 and embeddings.shape == (11, 8)
    with torch.no_grad():
        expected = torch.cat([model.eval()(image[None]) for image in images])
    torch.testing.assert_close(embeddings, expected)
    assert model.rows_seen == 11 + 11


def test_embed_dataset_restores_mode_and_supports_flip():
    images = torch.randn(5, 3, 12, 12)
    model = TinyEmbedder().train()
    loader = DataLoader(IndexedTensors(images), batch_size=2)
    embeddings = embed_dataset(model, loader, torch.device("cpu"), flip=True, progress=False)
    assert model.training and model.modes_seen == {False}  # evaluated in eval mode, handed back training
    with torch.no_grad():
        expected = F.normalize(model.eval()(images) + model(images.flip(-1)), dim=1)
    torch.testing.assert_close(embeddings, expected)


def test_pair_distances_match_a_loop():
    rng = np.random.default_rng(0)
    embeddings = torch.from_numpy(rng.normal(size=(9, 5)).astype(np.float32))
    pairs = rng.integers(0, 9, size=(20, 2))
    distances = distances_of_pairs(embeddings, pairs)
    assert distances.dtype == np.float64
    expected = [
        float(np.sqrt(np.sum((embeddings[a].double() - embeddings[b].double()).numpy() ** 2)))
        for a, b in pairs
    ]
    np.testing.assert_allclose(distances, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="pairs"):
        distances_of_pairs(embeddings, pairs[:, :1])


class FakePairs(IndexedTensors):
    """An LFWDataset stand-in: images plus `pairs` and `issame`, ten folds of eight pairs."""

    def __init__(self, seed=0):
        generator = torch.Generator().manual_seed(seed)
        super().__init__(torch.randn(30, 3, 12, 12, generator=generator))
        rng = np.random.default_rng(seed)
        self.pairs = rng.integers(0, 30, size=(80, 2))
        self.issame = np.tile([True] * 4 + [False] * 4, 10)
        self.num_folds = 10


def test_evaluate_model_on_lfw_equals_brute_force():
    dataset = FakePairs()
    model = TinyEmbedder().train()
    metrics, distances = evaluate_model_on_lfw(model, dataset, "cpu", batch_size=7, progress=False)
    assert model.training
    with torch.no_grad():
        model.eval()
        expected = np.array(
            [
                float(torch.dist(model(dataset.images[a][None]), model(dataset.images[b][None])))
                for a, b in dataset.pairs
            ]
        )
    np.testing.assert_allclose(distances, expected, rtol=1e-5, atol=1e-6)
    reference = eval_metrics.evaluate_lfw(expected, dataset.issame)
    np.testing.assert_allclose(metrics.accuracy, reference.accuracy)
    assert metrics.roc_auc == pytest.approx(reference.roc_auc)


# ------------------------------------------------------------------------------------------- the command


def save_untrained_checkpoint(path: Path, image_size: int, seed: int = 0) -> Path:
    """A this-repository checkpoint of an untrained ResNet-18, as train_triplet.py writes one."""
    torch.manual_seed(seed)
    model = build_model("resnet18", embedding_dim=32)
    torch.save(
        {
            "epoch": 0,
            "embedding_dimension": 32,
            "batch_size_training": 16,
            "model_state_dict": model.state_dict(),
            "model_architecture": "resnet18",
            "optimizer_model_state_dict": {},
            "best_distance_threshold": 0.9,
            "image_size": image_size,
            "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3},
            "args": {"model": "resnet18"},
            "format_version": 1,
        },
        path,
    )
    return path


def write_subset_pairs(path: Path, per_kind: int) -> Path:
    """The first `per_kind` same and different pairs of every official fold, with a matching header."""
    lines = LFW_PAIRS.read_text().splitlines()
    num_folds, official = (int(v) for v in lines[0].split())
    body = lines[1:]
    kept = []
    for fold in range(num_folds):
        block = body[fold * 2 * official : (fold + 1) * 2 * official]
        kept += block[:per_kind] + block[official : official + per_kind]
    path.write_text(f"{num_folds}\t{per_kind}\n" + "\n".join(kept) + "\n")
    return path


def test_command_on_full_lfw_embeds_each_image_once(tmp_path, monkeypatch, capsys):
    checkpoint = save_untrained_checkpoint(tmp_path / "model_epoch_0.pt", image_size=16)
    tiny = TinyEmbedder()
    real_loader = validate_on_LFW.load_checkpoint

    def load_tiny(path, device="cpu", image_size=None, preprocess=None):
        loaded = real_loader(path, device, image_size=image_size, preprocess=preprocess)
        loaded.model = tiny  # everything real but the (expensive) network: counting is what matters here
        loaded.embedding_dim = tiny.linear.out_features
        return loaded

    monkeypatch.setattr(validate_on_LFW, "load_checkpoint", load_tiny)
    seen = {}
    real_evaluate = eval_metrics.evaluate_lfw

    def recording_evaluate(distances, labels, **kwargs):
        seen["distances"], seen["labels"] = np.array(distances), np.array(labels)
        return real_evaluate(distances, labels, **kwargs)

    monkeypatch.setattr(eval_metrics, "evaluate_lfw", recording_evaluate)
    status = main(
        ["--model_path", str(checkpoint), "--lfw", str(LFW_DIR), "--lfw_pairs", str(LFW_PAIRS)]
        + ["--batch_size", "256", "--num_workers", "1", "--no_progress"]
    )
    assert status == 0
    assert tiny.rows_seen == NUM_LFW_IMAGES  # 7,701 forward rows for 6,000 pairs, not 12,000

    out = capsys.readouterr().out
    assert f"6000 pairs, {NUM_LFW_IMAGES} images" in out
    for start in (
        "Accuracy on LFW: ",
        "Precision ",
        "Recall ",
        "ROC Area Under Curve: ",
        "Best distance threshold: ",
    ):
        assert any(line.startswith(start) for line in out.splitlines()), start
    for far in ("0.1", "0.01", "0.001"):
        assert any(line.startswith("TAR: ") and line.endswith(f"@ FAR: {far}") for line in out.splitlines())

    output_dir = tmp_path / "model_epoch_0_lfw"  # the default: next to the checkpoint
    report = json.loads((output_dir / "lfw_metrics.json").read_text())
    assert (
        report["evaluation"]["num_pairs"] == 6000
        and report["evaluation"]["num_skipped_pairs"] == 0
        and report["evaluation"]["num_images"] == NUM_LFW_IMAGES
    )
    assert report["checkpoint"]["path"] == str(checkpoint.resolve())
    assert report["checkpoint"]["layout"] == "this repository"
    assert len(report["per_fold"]["accuracy"]) == 10
    # the labels are the official ones (each fold: 300 same, then 300 different), and sampled distances
    # equal those of the two images embedded on their own
    np.testing.assert_array_equal(seen["labels"], np.tile(np.repeat([True, False], 300), 10))
    pairs = read_pairs(LFW_PAIRS)
    embedder = FaceEmbedder(load_tiny(checkpoint))
    for index in np.random.default_rng(0).choice(6000, size=12, replace=False):
        a, b = pairs.first[index], pairs.second[index]
        images = [find_lfw_image(str(LFW_DIR), *a), find_lfw_image(str(LFW_DIR), *b)]
        assert seen["distances"][index] == pytest.approx(float(distance(*embedder.embed(images))), abs=1e-5)
    oracle = real_evaluate(seen["distances"], seen["labels"], num_folds=10)
    assert report["metrics"]["accuracy_mean"] == pytest.approx(float(oracle.accuracy.mean()))
    assert report["per_fold"]["accuracy"] == pytest.approx(oracle.accuracy.tolist())
    assert (output_dir / "lfw_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_resnet18_matches_a_pair_by_pair_oracle(tmp_path, capsys):
    """An untrained ResNet-18 on 120 official pairs: the numbers equal those of embedding each pair alone."""
    checkpoint = save_untrained_checkpoint(tmp_path / "untrained.pt", image_size=32)
    pairs_path = write_subset_pairs(tmp_path / "pairs_subset.txt", per_kind=6)
    output_dir = tmp_path / "results"
    status = main(
        ["--model_path", str(checkpoint), "--lfw", str(LFW_DIR), "--lfw_pairs", str(pairs_path)]
        + ["--num_workers", "0", "--output_dir", str(output_dir), "--no_progress"]
    )
    assert status == 0
    report = json.loads((output_dir / "lfw_metrics.json").read_text())

    # the oracle: read the pairs file itself and embed both images of every pair (no dataset class, no
    # de-duplication), batched only for speed
    first, second, labels = [], [], []
    for line in pairs_path.read_text().splitlines()[1:]:
        fields = line.split()
        name1, i, name2, j = fields if len(fields) == 4 else (fields[0], fields[1], fields[0], fields[2])
        first.append(LFW_DIR / name1 / f"{name1}_{int(i):04d}.jpg")
        second.append(LFW_DIR / name2 / f"{name2}_{int(j):04d}.jpg")
        labels.append(name1 == name2)
    embedder = FaceEmbedder(checkpoint, batch_size=len(first))
    distances = distance(embedder.embed(first), embedder.embed(second))
    oracle = eval_metrics.metrics_summary(eval_metrics.evaluate_lfw(distances, np.array(labels)))
    assert report["metrics"].keys() == oracle.keys()
    for key, value in oracle.items():
        assert report["metrics"][key] == pytest.approx(value, abs=1e-5), key

    # an untrained network is only somewhat better than chance (random conv features see pixel similarity):
    # on the full 6,000 pairs at 32 px this checkpoint's kind measured 0.61; a 120-pair subset varies more
    accuracy = report["metrics"]["accuracy_mean"]
    assert 0.4 <= accuracy <= 0.75
    assert f"Accuracy on LFW: {accuracy:.4f}" in capsys.readouterr().out


def test_earlier_results_are_replaced_only_with_overwrite(tmp_path):
    json_path, plot_path = validate_on_LFW.output_paths(tmp_path, flip=False)
    assert validate_on_LFW.output_paths(tmp_path, flip=True)[0].name == "lfw_metrics_flip.json"
    mine, other = tmp_path / "mine.pt", tmp_path / "other.pt"
    validate_on_LFW.check_overwrite(json_path, plot_path, mine)  # nothing there yet
    write_json_atomic({"checkpoint": {"path": str(mine.resolve())}}, json_path)
    # its own earlier results too: a re-run with other pairs or settings would replace them silently
    with pytest.raises(validate_on_LFW.InputError, match="already holds this checkpoint's earlier results"):
        validate_on_LFW.check_overwrite(json_path, plot_path, mine)
    with pytest.raises(validate_on_LFW.InputError, match="another checkpoint"):
        validate_on_LFW.check_overwrite(json_path, plot_path, other)
    json_path.write_text("not json")
    with pytest.raises(validate_on_LFW.InputError, match="another checkpoint"):
        validate_on_LFW.check_overwrite(json_path, plot_path, mine)
    json_path.unlink()
    plot_path.write_bytes(b"someone's plot")
    with pytest.raises(validate_on_LFW.InputError, match="not written for this checkpoint"):
        validate_on_LFW.check_overwrite(json_path, plot_path, mine)
    assert plot_path.read_bytes() == b"someone's plot"
    validate_on_LFW.check_overwrite(json_path, plot_path, other, overwrite=True)  # asked for: allowed


def test_command_refuses_to_overwrite_and_keeps_the_file(tmp_path, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    previous = '{"checkpoint": {"path": "/elsewhere/model.pt"}}'
    (output_dir / "lfw_metrics.json").write_text(previous)
    checkpoint = save_untrained_checkpoint(tmp_path / "model.pt", image_size=16)
    status = main(
        ["--model_path", str(checkpoint), "--lfw", str(LFW_DIR), "--lfw_pairs", str(LFW_PAIRS)]
        + ["--output_dir", str(output_dir)]
    )
    assert status == 2
    assert (output_dir / "lfw_metrics.json").read_text() == previous
    assert capsys.readouterr().err.startswith("error: ")
    # the same command with --overwrite replaces them with this checkpoint's
    command = ["--model_path", str(checkpoint), "--lfw", str(LFW_DIR), "--lfw_pairs", str(LFW_PAIRS)]
    assert main([*command, "--output_dir", str(output_dir), "--overwrite"]) == 0
    written = json.loads((output_dir / "lfw_metrics.json").read_text())
    assert written["checkpoint"]["path"] == str(checkpoint.resolve())


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    checkpoint = save_untrained_checkpoint(tmp_path / "model.pt", image_size=16)
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    broken_pairs = tmp_path / "pairs.txt"
    broken_pairs.write_text("10\t300\nAaron_Peirsol 1\n")
    base = ["--lfw", str(LFW_DIR), "--lfw_pairs", str(LFW_PAIRS), "--output_dir", str(tmp_path / "o")]
    cases = {
        "missing.pt: no such file": ["--model_path", str(tmp_path / "missing.pt")] + base,
        f"checkpoint {tmp_path}: a folder, not a file": ["--model_path", str(tmp_path)] + base,
        "could not read checkpoint": ["--model_path", str(not_a_checkpoint)] + base,
        "--lfw: folder not found": ["--model_path", str(checkpoint), "--lfw", str(tmp_path / "nope")]
        + base[2:],
        f"--lfw_pairs {tmp_path / 'nope.txt'}: no such file": [
            "--model_path",
            str(checkpoint),
            "--lfw",
            str(LFW_DIR),
        ]
        + ["--lfw_pairs", str(tmp_path / "nope.txt")],
        "expected 'Name i j'": ["--model_path", str(checkpoint), "--lfw", str(LFW_DIR)]
        + ["--lfw_pairs", str(broken_pairs), "--output_dir", str(tmp_path / "o")],
    }
    for message, argv in cases.items():
        assert main(argv) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_an_output_dir_that_cannot_be_written_is_refused_before_any_embedding(tmp_path, capsys):
    checkpoint = save_untrained_checkpoint(tmp_path / "model.pt", image_size=16)
    a_file = tmp_path / "results"
    a_file.write_text("keep me")
    args = ["--model_path", str(checkpoint), "--lfw", str(LFW_DIR), "--lfw_pairs", str(LFW_PAIRS)]
    assert main([*args, "--output_dir", str(a_file / "sub")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: --output_dir {a_file / 'sub'}: {a_file} is not a folder\n"
    assert "Accuracy" not in captured.out and a_file.read_text() == "keep me"


def test_a_target_that_cannot_be_evaluated_fails_before_any_is_embedded(tmp_path, capsys):
    """A .bin of same-person pairs only, given after LFW: refused by name before LFW's 7,000 images are
    embedded, and nothing written."""
    import pickle

    checkpoint = save_untrained_checkpoint(tmp_path / "model.pt", image_size=32)
    jpeg = next(LFW_DIR.glob("*/*.jpg")).read_bytes()
    same_only = tmp_path / "same_only.bin"
    same_only.write_bytes(pickle.dumps(([jpeg] * 8, [True] * 4)))
    args = ["--model_path", str(checkpoint), "--lfw", str(LFW_DIR), "--lfw_pairs", str(LFW_PAIRS)]
    assert main([*args, "--val_targets", str(same_only), "--output_dir", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"error: --val_targets {same_only}: 4 same-person and 0 different-person pairs; the protocol needs at "
        "least 2 of each\n"
    )
    assert "Accuracy" not in captured.out and not (tmp_path / "o").exists()


def test_the_pairs_file_inside_the_lfw_folder_is_found_as_training_finds_it(make_lfw_tree, tmp_path, capsys):
    root, pairs_path = make_lfw_tree(num_folds=2, pairs_per_kind=2, size=32)
    (root / "pairs.txt").write_bytes(pairs_path.read_bytes())
    checkpoint = save_untrained_checkpoint(tmp_path / "model.pt", image_size=32)
    args = ["--model_path", str(checkpoint), "--lfw", str(root), "--num_workers", "0", "--no_progress"]
    assert main([*args, "--output_dir", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "lfw_metrics.json").read_text())
    assert report["evaluation"]["lfw_pairs"] == str(root / "pairs.txt")


def test_flip_through_embed_images_matches_validation_path():
    # the command and the FaceEmbedder share one flip implementation
    model = TinyEmbedder().eval()
    images = torch.randn(4, 3, 12, 12)
    loader = DataLoader(IndexedTensors(images), batch_size=4)
    with torch.no_grad():
        direct = embed_images(model, images, flip=True)
    torch.testing.assert_close(
        embed_dataset(model, loader, torch.device("cpu"), flip=True, progress=False), direct
    )


@pytest.mark.parametrize("native_bf16", [True, False])
def test_the_command_embeds_in_the_precision_the_run_validated_in(tmp_path, capsys, monkeypatch, native_bf16):
    """A run trained with --amp bf16 on a CPU validated in bf16: by default the command does too, so its
    numbers are the run's, where bf16 is native; --amp overrides; a stored fp16 needs CUDA, so the CPU
    falls back to auto, as it does for bf16 on a CPU without native bf16."""
    native = (torch.bfloat16, "bf16: native") if native_bf16 else (None, "off: no native bf16")
    monkeypatch.setattr(validate_on_LFW, "auto_amp", lambda device: native)
    pairs_path = write_subset_pairs(tmp_path / "pairs_subset.txt", per_kind=2)
    untrained = save_untrained_checkpoint(tmp_path / "untrained.pt", image_size=32)
    checkpoint = torch.load(untrained, weights_only=True)
    results = {}
    for stored, amp in ((None, None), ("bf16", None), ("bf16", "off"), ("fp16", None), ("off", None)):
        path = tmp_path / f"stored_{stored}.pt"
        torch.save({**checkpoint, **({} if stored is None else {"validation_precision": stored})}, path)
        argv = ["--model_path", str(path), "--lfw", str(LFW_DIR), "--lfw_pairs", str(pairs_path)]
        argv += ["--num_workers", "0", "--no_progress", "--output_dir", str(tmp_path / f"out_{stored}_{amp}")]
        assert main(argv + ([] if amp is None else ["--amp", amp])) == 0
        out = capsys.readouterr().out
        report = json.loads((tmp_path / f"out_{stored}_{amp}" / "lfw_metrics.json").read_text())
        results[stored, amp] = (report["evaluation"]["amp_dtype"], out.splitlines()[0])
    assert results[None, None][0] is None and "precision off (--amp auto)" in results[None, None][1]
    if native_bf16:
        assert results["bf16", None][0] == "bfloat16"
        assert "bf16, as the training run validated" in results["bf16", None][1]
    else:
        assert results["bf16", None][0] is None
        assert "validated in bf16, not native here" in results["bf16", None][1]
    assert results["bf16", "off"][0] is None and "precision off (--amp off)" in results["bf16", "off"][1]
    assert (
        results["fp16", None][0] is None and "validated in fp16, not native here" in results["fp16", None][1]
    )
    assert results["off", None][0] is None and "off, as the training run validated" in results["off", None][1]


def test_command_evaluates_bins_and_prints_one_table(tmp_path, capsys):
    """--lfw as a .bin plus another --val_targets file (a .bin whatever its name): per-target JSON with the
    folder path's numbers."""
    checkpoint = save_untrained_checkpoint(tmp_path / "untrained.pt", image_size=32)
    pairs_path = write_subset_pairs(tmp_path / "pairs_subset.txt", per_kind=3)
    bin_path = tmp_path / "lfw.bin"
    write_verification_bin(LFW_DIR, pairs_path, bin_path)
    other = tmp_path / "other_set.pkl"
    other.write_bytes(bin_path.read_bytes())
    folder_dir, bins_dir = tmp_path / "folder", tmp_path / "bins"
    base = ["--model_path", str(checkpoint), "--num_workers", "0", "--no_progress"]
    assert (
        main([*base, "--lfw", str(LFW_DIR), "--lfw_pairs", str(pairs_path), "--output_dir", str(folder_dir)])
        == 0
    )
    capsys.readouterr()
    assert (
        main([*base, "--lfw", str(bin_path), "--val_targets", str(other), "--output_dir", str(bins_dir)]) == 0
    )
    out = capsys.readouterr().out
    table = out[out.index("target ") :].splitlines()
    assert table[1].split()[0] == "lfw" and table[2].split()[0] == "other_set" and len(table) == 3
    expected = json.loads((folder_dir / "lfw_metrics.json").read_text())["metrics"]
    for name in ("lfw", "other_set"):
        report = json.loads((bins_dir / f"{name}_metrics.json").read_text())
        assert report["metrics"] == pytest.approx(expected, abs=1e-12)
        assert report["evaluation"]["num_pairs"] == 60 and report["evaluation"]["num_images"] == 120
        assert (bins_dir / f"{name}_roc.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "nothing to evaluate"),
        (["--lfw", "/nonexistent.bin"], "--lfw: file not found: /nonexistent.bin"),
        (["--lfw", str(LFW_PAIRS), "--lfw_pairs", str(LFW_PAIRS)], "--lfw_pairs goes with an --lfw folder"),
        (["--val_targets", "/nonexistent/cfp_fp.bin"], "--val_targets: file not found"),
        (
            ["--lfw", str(LFW_DIR)],
            f"no LFW pairs file: pass --lfw_pairs (none of pairs.txt, lfw_pairs.txt, LFW_pairs.txt in {LFW_DIR})",
        ),
        (
            ["--lfw", str(LFW_DIR), "--lfw_pairs", str(LFW_PAIRS), "--image_size", "8"],
            "--image_size 8: resnet18 needs at least 32 px",
        ),
    ],
)
def test_command_target_errors_are_one_line(tmp_path, capsys, args, message):
    checkpoint = save_untrained_checkpoint(tmp_path / "untrained.pt", image_size=32)
    assert main(["--model_path", str(checkpoint), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_command_takes_the_preprocessing_preset_of_a_checkpoint_that_stores_none(tmp_path):
    """The original's 2021 files: 140 px and VGGFace2's mean and std, named with --preprocess."""
    from checkpoint_loading import PREPROCESS_PRESETS
    from tests.checkpoint_layouts import original_2020_checkpoint, reference_resnet

    checkpoint = tmp_path / "model_resnet18_triplet_2021.pt"
    torch.save(original_2020_checkpoint(reference_resnet(18, "sequential")), checkpoint)
    pairs_path = write_subset_pairs(tmp_path / "pairs_subset.txt", per_kind=2)
    common = ["--model_path", str(checkpoint), "--lfw", str(LFW_DIR), "--lfw_pairs", str(pairs_path)]
    common += ["--num_workers", "0", "--no_progress"]
    assert main([*common, "--output_dir", str(tmp_path / "preset"), "--preprocess", "original-2021"]) == 0
    described = json.loads((tmp_path / "preset" / "lfw_metrics.json").read_text())["checkpoint"]
    preset = PREPROCESS_PRESETS["original-2021"]
    assert described["image_size"] == preset.image_size == 140
    assert described["mean"] == pytest.approx(list(preset.mean))
    assert described["std"] == pytest.approx(list(preset.std))
    assert main([*common, "--output_dir", str(tmp_path / "default")]) == 0
    default = json.loads((tmp_path / "default" / "lfw_metrics.json").read_text())["checkpoint"]
    assert default["image_size"] == 224 and default["mean"] == pytest.approx([0.5, 0.5, 0.5])
