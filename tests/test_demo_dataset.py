"""Tests for the synthetic demo dataset generator (tiny sizes, so the whole file runs in seconds)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo.make_demo_dataset as demo
import demo.render as render
from demo.make_demo_dataset import DemoDataset, make_demo_dataset
from demo.render import render_identity
from errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent

SMALL = dict(
    num_train_identities=4,
    images_per_identity=3,
    num_lfw_identities=8,
    max_images_per_lfw_identity=4,
    image_size=32,
    pairs_per_fold=3,
    num_folds=2,
)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _parse_pairs(path: Path):
    """A parser written from the LFW pairs format, independent of the generator's writer."""
    lines = path.read_text().splitlines()
    num_folds, pairs_per_fold = (int(v) for v in lines[0].split("\t"))
    folds = []
    body = lines[1:]
    assert len(body) == num_folds * 2 * pairs_per_fold
    for fold in range(num_folds):
        block = [
            line.split("\t") for line in body[fold * 2 * pairs_per_fold : (fold + 1) * 2 * pairs_per_fold]
        ]
        same, different = block[:pairs_per_fold], block[pairs_per_fold:]
        assert all(len(fields) == 3 for fields in same)
        assert all(len(fields) == 4 for fields in different)
        same = [(name, int(i), int(j)) for name, i, j in same]
        different = [(a, int(i), b, int(j)) for a, i, b, j in different]
        folds.append((same, different))
    return num_folds, pairs_per_fold, folds


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> DemoDataset:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", seed=3, **SMALL)


def test_returns_paths_and_layout(small_dataset):
    root = small_dataset.train_dir.parent
    assert small_dataset == DemoDataset(root / "train", root / "lfw", root / "lfw_pairs.txt")
    identities = sorted(p.name for p in small_dataset.train_dir.iterdir())
    assert identities == [f"id_{k:04d}" for k in range(SMALL["num_train_identities"])]
    for identity in identities:
        files = sorted(p.name for p in (small_dataset.train_dir / identity).iterdir())
        assert files == [f"{identity}_{k:04d}.png" for k in range(1, SMALL["images_per_identity"] + 1)]
    people = sorted(p for p in small_dataset.lfw_dir.iterdir())
    assert len(people) == SMALL["num_lfw_identities"]
    for person in people:
        files = sorted(p.name for p in person.iterdir())
        # LFW numbering: Name_0001.png, Name_0002.png, ... without gaps, 2 to max images
        assert 2 <= len(files) <= SMALL["max_images_per_lfw_identity"]
        assert files == [f"{person.name}_{k:04d}.png" for k in range(1, len(files) + 1)]
    marker = json.loads((root / "demo_dataset.json").read_text())
    assert marker["seed"] == 3 and marker["image_size"] == SMALL["image_size"]


def test_pairs_file_follows_the_lfw_format(small_dataset):
    num_folds, pairs_per_fold, folds = _parse_pairs(small_dataset.pairs_path)
    assert (num_folds, pairs_per_fold) == (SMALL["num_folds"], SMALL["pairs_per_fold"])

    def image(name, number):
        path = small_dataset.lfw_dir / name / f"{name}_{number:04d}.png"
        assert path.is_file(), path
        return path

    fold_people = []
    for same, different in folds:
        people = set()
        for name, i, j in same:
            image(name, i), image(name, j)
            assert i != j
            people.add(name)
        for a, i, b, j in different:
            image(a, i), image(b, j)
            assert a != b
            people.update((a, b))
        # no pair is listed twice within a fold
        assert len(set(same)) == len(same)
        assert len({frozenset([(a, i), (b, j)]) for a, i, b, j in different}) == len(different)
        fold_people.append(people)
    # like real LFW, no identity appears in two folds
    for k, people in enumerate(fold_people):
        for other in fold_people[k + 1 :]:
            assert not people & other


def test_train_and_lfw_identities_are_disjoint(small_dataset):
    train_names = {p.name for p in small_dataset.train_dir.iterdir()}
    lfw_names = {p.name for p in small_dataset.lfw_dir.iterdir()}
    assert not train_names & lfw_names
    # and no LFW-like face is a copy of a training face
    train_images = {p.read_bytes() for p in small_dataset.train_dir.rglob("*.png")}
    assert not any(p.read_bytes() in train_images for p in small_dataset.lfw_dir.rglob("*.png"))


def test_images_are_rgb_of_the_requested_size(small_dataset, tmp_path):
    for path in list(small_dataset.train_dir.rglob("*.png")) + list(small_dataset.lfw_dir.rglob("*.png")):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size == (SMALL["image_size"], SMALL["image_size"])
    other = make_demo_dataset(tmp_path / "d48", **{**SMALL, "image_size": 48, "num_train_identities": 1})
    with Image.open(next(other.train_dir.rglob("*.png"))) as image:
        assert image.size == (48, 48) and image.mode == "RGB"


def test_same_seed_gives_identical_bytes_and_other_seed_differs(small_dataset, tmp_path):
    first = _all_files(small_dataset.train_dir.parent)
    again = make_demo_dataset(tmp_path / "again", seed=3, **SMALL)
    assert _all_files(again.train_dir.parent) == first
    other = _all_files(make_demo_dataset(tmp_path / "other", seed=4, **SMALL).train_dir.parent)
    train_images = [key for key in first if key.startswith("train") and key.endswith(".png")]
    assert train_images and all(other[key] != first[key] for key in train_images)
    assert other["lfw_pairs.txt"] != first["lfw_pairs.txt"]


def test_files_do_not_depend_on_the_number_of_workers(small_dataset, tmp_path):
    parallel = make_demo_dataset(tmp_path / "parallel", seed=3, num_workers=2, **SMALL)
    assert _all_files(parallel.train_dir.parent) == _all_files(small_dataset.train_dir.parent)


def test_identities_do_not_depend_on_how_many_are_drawn(tmp_path):
    """Each identity has its own random stream: more training identities leave the first ones unchanged."""
    few = make_demo_dataset(tmp_path / "few", **SMALL)
    more = make_demo_dataset(tmp_path / "more", **{**SMALL, "num_train_identities": 6})
    for path in few.train_dir.rglob("*.png"):
        assert path.read_bytes() == (more.train_dir / path.relative_to(few.train_dir)).read_bytes()
    assert _all_files(few.lfw_dir) == _all_files(more.lfw_dir)


def test_existing_dataset_is_reused_not_regenerated(small_dataset, monkeypatch):
    before = _all_files(small_dataset.train_dir.parent)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated an existing dataset")

    monkeypatch.setattr(demo, "_generate", fail)
    assert make_demo_dataset(small_dataset.train_dir.parent, seed=3, **SMALL) == small_dataset
    assert _all_files(small_dataset.train_dir.parent) == before


def test_refuses_a_dataset_with_other_parameters(small_dataset):
    with pytest.raises(InputError, match="other parameters"):
        make_demo_dataset(small_dataset.train_dir.parent, seed=4, **SMALL)


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        make_demo_dataset(foreign, **SMALL)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert (foreign / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        make_demo_dataset(tmp_path / "file", **SMALL)


def test_fills_an_existing_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    dataset = make_demo_dataset(tmp_path / "empty", **SMALL)
    assert dataset.pairs_path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no staging folder left behind


@pytest.mark.parametrize(
    "change, message",
    [
        ({"pairs_per_fold": 200}, "same-person pairs"),
        ({"num_lfw_identities": 3}, "twice num_folds"),
        ({"images_per_identity": 0}, "images_per_identity"),
        ({"max_images_per_lfw_identity": 1}, "max_images_per_lfw_identity"),
    ],
)
def test_impossible_sizes_fail_before_writing(tmp_path, change, message):
    with pytest.raises(InputError, match=message):
        make_demo_dataset(tmp_path / "bad", **{**SMALL, **change})
    assert list(tmp_path.iterdir()) == []


def test_faces_of_one_identity_are_closer_than_faces_of_different_identities():
    """A sanity check on the drawing: a crude colour feature of the face centre separates identities."""
    images = np.stack([render_identity((0, 0, k), 8, 64) for k in range(12)]).astype(np.float32) / 255
    # mean colour of a 4 x 4 grid over the centre of the face, normalised per image against lighting
    centre = images[:, :, 16:48, 16:48].reshape(12, 8, 4, 8, 4, 8, 3).mean(axis=(3, 5))
    features = centre.reshape(12, 8, -1)
    features = features / np.linalg.norm(features, axis=-1, keepdims=True)
    flat = features.reshape(96, -1)
    distances = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
    labels = np.repeat(np.arange(12), 8)
    same = (labels[:, None] == labels[None]) & ~np.eye(96, dtype=bool)
    different = labels[:, None] != labels[None]
    assert distances[same].mean() < 0.85 * distances[different].mean()


def test_images_of_one_identity_vary():
    """Per-image variation: no two images of one identity are alike, so pixels alone do not verify."""
    images = render_identity((0, 0, 0), 6, 32).astype(np.float32)
    for a in range(6):
        for b in range(a + 1, 6):
            assert np.abs(images[a] - images[b]).mean() > 10


def test_windowed_painting_matches_painting_the_whole_image(monkeypatch):
    """The speed-up that paints small shapes only inside a bounding window must not change a pixel."""
    windowed = np.stack([render_identity((5, 0, k), 10, 64) for k in range(12)])
    monkeypatch.setattr(render._Canvas, "around", lambda self, cx, cy, radius, depth=0.0: self.face())
    whole = np.stack([render_identity((5, 0, k), 10, 64) for k in range(12)])
    np.testing.assert_array_equal(windowed, whole)


def test_main_writes_the_dataset_and_reports_bad_input(tmp_path, capsys):
    argv = ["--output_dir", str(tmp_path / "cli"), "--num_identities", "2", "--images_per_identity", "2"]
    argv += ["--num_lfw_identities", "4", "--num_folds", "2", "--pairs_per_fold", "2", "--workers", "1"]
    argv += ["--image_size", "24"]
    assert demo.main(argv) == 0
    assert len(list((tmp_path / "cli" / "train").iterdir())) == 2
    assert demo.main(argv) == 0  # reused
    assert demo.main(argv[:-2] + ["--image_size", "32"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("how", [["demo/make_demo_dataset.py"], ["-m", "demo.make_demo_dataset"]])
def test_runs_as_a_script_and_as_a_module(tmp_path, how):
    argv = ["--output_dir", str(tmp_path / "out"), "--num_identities", "1", "--images_per_identity", "2"]
    argv += ["--num_lfw_identities", "4", "--num_folds", "2", "--pairs_per_fold", "1", "--image_size", "16"]
    argv += ["--workers", "2"]  # worker processes must start when the script runs as a file, too
    result = subprocess.run([sys.executable, *how, *argv], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "lfw_pairs.txt").is_file()
    bad = subprocess.run(
        [sys.executable, *how, *argv[:2], "--num_folds", "0"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_a_process_that_loses_the_race_to_write_the_same_dataset_uses_the_winners(tmp_path, monkeypatch):
    """torchrun ranks on machines sharing a disk may generate demo_data/ at the same time."""
    root = tmp_path / "demo"
    real_generate = demo._generate

    def another_process_finishes_first(staging, params, plan, num_workers):
        monkeypatch.setattr(demo, "_generate", real_generate)
        make_demo_dataset(root, **SMALL)  # the winner, done while this process was still generating
        real_generate(staging, params, plan, num_workers)

    make_demo_dataset(tmp_path / "reference", **SMALL)
    monkeypatch.setattr(demo, "_generate", another_process_finishes_first)
    make_demo_dataset(root, **SMALL)
    assert _all_files(root) == _all_files(tmp_path / "reference")
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # staging removed
