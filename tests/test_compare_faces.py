"""compare_faces.py: the one-line verdict, the CSV mode, and exit codes."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import compare_faces
from compare_faces import main
from inference import FaceEmbedder
from models import build_model

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^distance (\d+\.\d{4}) threshold (\d+\.\d{4}) (same|different)$")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny untrained checkpoint (threshold 0.5) and four 32 px photos: a, an exact copy of a, b, c."""
    root = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    model = build_model("resnet18", embedding_dim=16)
    checkpoint = {
        "epoch": 1,
        "embedding_dimension": 16,
        "batch_size_training": 8,
        "model_state_dict": model.state_dict(),
        "model_architecture": "resnet18",
        "optimizer_model_state_dict": {},
        "best_distance_threshold": 0.5,
        "image_size": 32,
        "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3},
        "args": {},
        "format_version": 1,
    }
    torch.save(checkpoint, root / "model.pt")
    torch.save({**checkpoint, "best_distance_threshold": None}, root / "no_threshold.pt")
    rng = np.random.default_rng(0)
    photos = root / "photos"
    photos.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photos / f"{name}.png")
    (photos / "a_copy.png").write_bytes((photos / "a.png").read_bytes())
    return root


def run_main(capsys, argv):
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_identical_photos_are_the_same_person(files, capsys):
    photos = files / "photos"
    status, out, err = run_main(
        capsys, ["--model_path", str(files / "model.pt"), str(photos / "a.png"), str(photos / "a_copy.png")]
    )
    assert status == 0 and err == ""
    assert LINE.match(out.strip()) and out.count("\n") == 1
    assert out.strip() == "distance 0.0000 threshold 0.5000 same"


def test_distance_and_verdict_follow_the_embeddings(files, capsys):
    photos = files / "photos"
    embeddings = FaceEmbedder(files / "model.pt").embed([photos / "a.png", photos / "b.png"])
    expected = float((embeddings[0] - embeddings[1]).norm())
    assert expected > 0
    # a threshold just above the distance says same, just below says different: both exit 0
    for threshold, verdict in ((expected + 1e-3, "same"), (expected - 1e-3, "different")):
        status, out, _ = run_main(
            capsys,
            ["--model_path", str(files / "model.pt"), str(photos / "a.png"), str(photos / "b.png")]
            + ["--threshold", str(threshold)],
        )
        match = LINE.match(out.strip())
        assert status == 0 and match, out
        assert float(match.group(1)) == pytest.approx(expected, abs=1e-4)
        assert float(match.group(2)) == pytest.approx(threshold, abs=1e-4)
        assert match.group(3) == verdict


def test_pairs_csv_embeds_each_image_once(files, tmp_path, capsys, monkeypatch):
    photos = files / "photos"
    pairs = tmp_path / "pairs.csv"
    # relative paths are resolved against the CSV's folder; absolute ones are kept
    rows = [("a.png", "a_copy.png"), ("a.png", "b.png"), (str(photos / "b.png"), "c.png")]
    pd.DataFrame(rows, columns=["image1", "image2"]).to_csv(pairs, index=False)
    for name in ("a.png", "a_copy.png", "c.png"):
        (tmp_path / name).write_bytes((photos / name).read_bytes())
    (tmp_path / "b.png").write_bytes((photos / "b.png").read_bytes())

    seen = []
    real_loader = compare_faces.load_checkpoint

    def counting_loader(*args, **kwargs):
        loaded = real_loader(*args, **kwargs)
        loaded.model.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
        return loaded

    monkeypatch.setattr(compare_faces, "load_checkpoint", counting_loader)
    output = tmp_path / "out" / "distances.csv"
    status, out, err = run_main(
        capsys,
        ["--model_path", str(files / "model.pt"), "--pairs_csv", str(pairs), "--output_csv", str(output)]
        + ["--threshold", "0.05"],
    )
    assert status == 0 and err == "", err
    # distinct files: a, a_copy, b (twice: relative in tmp_path and absolute in photos), c
    assert sum(seen) == 5

    result = pd.read_csv(output)
    assert list(result.columns) == ["image1", "image2", "distance", "same"]
    assert result[["image1", "image2"]].values.tolist() == [list(row) for row in rows]
    embedder = FaceEmbedder(files / "model.pt")
    expected = [embedder.distance(tmp_path / "a.png", tmp_path / "a_copy.png")]
    expected += [embedder.distance(tmp_path / "a.png", tmp_path / "b.png")]
    expected += [embedder.distance(photos / "b.png", tmp_path / "c.png")]
    np.testing.assert_allclose(result["distance"], expected, atol=2e-6)
    assert result["same"].tolist() == [d < 0.05 for d in expected] == [True, False, False]
    # the results are not replaced by a second run unless asked
    argv = ["--model_path", str(files / "model.pt"), "--pairs_csv", str(pairs), "--output_csv", str(output)]
    before = output.read_bytes()
    status, _, err = run_main(capsys, argv + ["--threshold", "0.5"])
    assert status == 2 and err == f"error: --output_csv {output} exists; pass --overwrite to replace it\n"
    assert output.read_bytes() == before
    assert run_main(capsys, argv + ["--threshold", "0.5", "--overwrite"])[0] == 0
    assert pd.read_csv(output)["same"].tolist() == [d < 0.5 for d in expected]
    assert "wrote 3 pairs" in out


def test_bad_input_exits_2_with_one_line(files, tmp_path, capsys):
    photos = files / "photos"
    model = str(files / "model.pt")
    a, b = str(photos / "a.png"), str(photos / "b.png")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("left,right\na.png,b.png\n")
    missing_image_csv = tmp_path / "missing.csv"
    missing_image_csv.write_text("image1,image2\na.png,ghost.png\n")
    (tmp_path / "a.png").write_bytes((photos / "a.png").read_bytes())
    not_an_image = tmp_path / "text.png"
    not_an_image.write_text("hello")
    cases = {
        "exactly two images": ["--model_path", model, a],
        "none.pt: no such file": ["--model_path", str(tmp_path / "none.pt"), a, b],
        "photos: a folder, not a file": ["--model_path", str(photos), a, b],
        "image not found": ["--model_path", model, a, str(tmp_path / "ghost.png")],
        f"image {photos}: a folder, not a file": ["--model_path", model, a, str(photos)],
        "could not read image": ["--model_path", model, a, str(not_an_image)],
        "stores no best_distance_threshold": ["--model_path", str(files / "no_threshold.pt"), a, b],
        "needs --output_csv": ["--model_path", model, "--pairs_csv", str(bad_csv)],
        "either two images or --pairs_csv": ["--model_path", model, a, b, "--pairs_csv", str(bad_csv)],
        "missing image1, image2": ["--model_path", model, "--pairs_csv", str(bad_csv)]
        + ["--output_csv", str(tmp_path / "o.csv")],
        "ghost.png": ["--model_path", model, "--pairs_csv", str(missing_image_csv)]
        + ["--output_csv", str(tmp_path / "o.csv")],
        "must differ from --pairs_csv": ["--model_path", model, "--pairs_csv", str(bad_csv)]
        + ["--output_csv", str(bad_csv)],
        "--threshold must be a positive distance, got -1.0": [
            "--model_path",
            model,
            a,
            b,
            "--threshold",
            "-1",
        ],
    }
    for message, argv in cases.items():
        status, out, err = run_main(capsys, argv)
        assert status == 2, message
        assert out == "" and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.csv").exists()


def test_runs_as_a_script(files):
    photos = files / "photos"
    command = [sys.executable, str(REPO / "compare_faces.py"), "--model_path", str(files / "no_threshold.pt")]
    command += [str(photos / "a.png"), str(photos / "c.png")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and "--threshold" in result.stderr
    assert "Traceback" not in result.stderr


LFW_112 = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw_112"


@pytest.mark.skipif(not LFW_112.is_dir(), reason="needs ../shared/data/lfw_112")
def test_align_compares_the_faces_in_raw_photos(files, tmp_path, capsys, monkeypatch):
    import inference
    from tests.test_identify import compose_photo

    monkeypatch.setattr(inference, "MIN_FACE_SIZE", 60)  # the pasted faces are 168-224 px
    rng = np.random.default_rng(3)
    crops = sorted((LFW_112 / "Tony_Blair").iterdir())[:2]
    photos = []
    for index, crop in enumerate(crops):
        photos.append(tmp_path / f"photo_{index}.jpg")
        compose_photo(Image.open(crop).convert("RGB"), rng).save(photos[-1], quality=95)
    model = files / "model.pt"
    status, out, err = run_main(capsys, ["--model_path", str(model), "--align", *map(str, photos)])
    assert status == 0, err
    match = LINE.match(out.strip())
    # the distance of the two aligned faces, not of the two whole photos
    embedder = FaceEmbedder(model, align=True)
    faces = embedder.aligned_faces(photos)
    assert [face.size for face in faces] == [(32, 32)] * 2  # the default alignment at the model's 32 px
    expected = FaceEmbedder(model).distance(*faces)
    assert float(match.group(1)) == pytest.approx(expected, abs=1e-4)
    assert abs(expected - FaceEmbedder(model).distance(*photos)) > 1e-3

    blank = tmp_path / "wall.png"
    Image.fromarray(np.full((200, 300, 3), 128, np.uint8)).save(blank)
    status, out, err = run_main(capsys, ["--model_path", str(model), "--align", str(photos[0]), str(blank)])
    assert status == 2 and out == "" and err == f"error: no face found in {blank}\n"


def test_preprocess_preset_for_checkpoints_without_their_own(files, tmp_path, capsys):
    torch.manual_seed(1)
    model = build_model("resnet18", embedding_dim=16)
    path = tmp_path / "original_2021.pt"  # the 2020 keys: no format_version, no preprocessing
    torch.save(
        {
            "model_state_dict": model.state_dict(),
            "model_architecture": "resnet18",
            "best_distance_threshold": 1.0,
        },
        path,
    )
    photos = files / "photos"
    argv = ["--model_path", str(path), str(photos / "a.png"), str(photos / "b.png")]
    status, out, _ = run_main(capsys, argv + ["--preprocess", "original-2021"])
    expected = FaceEmbedder(path, preprocess="original-2021").distance(photos / "a.png", photos / "b.png")
    assert status == 0 and float(LINE.match(out.strip()).group(1)) == pytest.approx(expected, abs=1e-4)
    status, out, _ = run_main(capsys, argv)
    assert float(LINE.match(out.strip()).group(1)) != pytest.approx(expected, abs=1e-4)
    help_text = compare_faces.get_args_parser().format_help()
    assert "--align" in help_text and all(
        name in help_text for name in ("original-2020", "original-2021", "facenet-pytorch")
    )


def test_flip_with_the_stored_threshold_warns_and_an_explicit_threshold_does_not(files, capsys, caplog):
    photos = [str(files / "photos" / name) for name in ("a.png", "b.png")]
    argv = ["--model_path", str(files / "model.pt"), "--flip", *photos]
    assert run_main(capsys, argv)[0] == 0
    assert "--flip with the checkpoint's threshold 0.5000, which was chosen without flipping" in caplog.text
    caplog.clear()
    assert run_main(capsys, [*argv, "--threshold", "0.4"])[0] == 0
    assert "--flip" not in caplog.text
