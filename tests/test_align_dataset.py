"""Face alignment: geometry against references, MTCNN on real photographs, the folder tool end to end."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from facenet_pytorch import MTCNN
from PIL import Image, ImageDraw
from skimage import data as skimage_data
from skimage.transform import SimilarityTransform

from datasets import align_dataset, mtcnn
from datasets.align_dataset import REPORT_NAME
from datasets.face_alignment import (
    ARCFACE_TEMPLATE_112,
    crop_square,
    square_box_with_margin,
    umeyama_similarity,
    warp_to_template,
)
from datasets.image_files import load_image, to_rgb
from datasets.mtcnn import Face, FaceDetector, detection_view, select_face, to_photo_coordinates
from errors import InputError

LFW_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw_112"
REPO_ROOT = Path(__file__).resolve().parent.parent
# hand-placed on skimage's astronaut photo (Eileen Collins, 512x512): eyes, nose tip, mouth corners
ASTRONAUT_LANDMARKS = np.array([[202, 102], [247, 103], [223, 128], [205, 143], [244, 143]], dtype=float)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """MTCNN's small convolutions gain little from threads, and lose a lot when other jobs share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def detector():
    return FaceDetector(device="cpu", min_face_size=20)


@pytest.fixture(scope="module")
def lfw_faces():
    """Eight LFW crops of different people (ArcFace-aligned, so their landmarks sit on the template)."""
    identities = sorted(path for path in LFW_DIR.iterdir() if path.is_dir())
    picks = np.random.default_rng(7).choice(len(identities), 8, replace=False)
    return [Image.open(sorted(identities[i].iterdir())[0]).convert("RGB") for i in picks]


def paste_scene(face, rng, width, height, side):
    """The face crop resized to side x side on a noisy colour-gradient background; returns (photo, rect)."""
    ramp = np.linspace(0, 1, width)[None, :, None]
    background = rng.uniform(0, 255, 3) * (1 - ramp) + rng.uniform(0, 255, 3) * ramp
    background = background + rng.normal(0, 12, (height, width, 3))
    photo = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    left, top = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    photo.paste(face.resize((side, side), Image.Resampling.BICUBIC), (left, top))
    return photo, np.array([left, top, left + side, top + side], dtype=float)


def iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    return intersection / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection)


def best_face(detector, photo, max_side=640):
    view, shrink = detection_view(photo, max_side)
    face = select_face(detector.detect([view])[0], view.shape[1], view.shape[0])
    return None if face is None else to_photo_coordinates(face, shrink)


# ----------------------------------------------------------------------------------------------- geometry


def test_umeyama_matches_scikit_image():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (5, 2))
    angle, scale, shift = 0.4, 0.6, np.array([12.0, -30.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rotation.T + shift
    assert np.allclose(umeyama_similarity(src, dst), np.hstack([scale * rotation, shift[:, None]]), atol=1e-9)
    noisy = dst + rng.normal(0, 2.0, dst.shape)
    reference = SimilarityTransform.from_estimate(src, noisy).params[:2]
    assert np.allclose(umeyama_similarity(src, noisy), reference, atol=1e-9)
    # a mirrored point set: still a proper rotation (no reflection), as scikit-image solves it
    mirrored = noisy * np.array([-1.0, 1.0])
    matrix = umeyama_similarity(src, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0
    assert np.allclose(matrix, SimilarityTransform.from_estimate(src, mirrored).params[:2], atol=1e-9)


def test_square_crop_leaves_the_margin_around_the_box():
    photo = Image.new("RGB", (400, 300))
    box = (150.0, 80.0, 230.0, 200.0)  # 80 x 120: the square follows the longer side
    ImageDraw.Draw(photo).rectangle((150, 80, 229, 199), fill=(255, 255, 255))
    crop = np.asarray(crop_square(photo, square_box_with_margin(box, 160, 32), 160))[..., 0] > 127
    rows, cols = np.nonzero(crop)
    # the box's long side spans the central 160 - 32 px; the short side is centred
    assert abs(rows.min() - 16) <= 1 and abs(rows.max() - 143) <= 1
    assert (
        abs((cols.min() + cols.max()) / 2 - 79.5) <= 1
        and abs(cols.max() - cols.min() + 1 - 128 * 80 / 120) <= 2
    )


def test_square_crop_pads_outside_the_photo_with_black():
    photo = Image.new("RGB", (100, 100), (200, 200, 200))
    crop = np.asarray(crop_square(photo, (-50.0, 0.0, 50.0, 100.0), 100))
    assert crop[:, :48].max() == 0 and crop[:, 52:].min() == 200


@pytest.mark.parametrize("face_scale", [0.8, 5.0])  # 5x: the warp first shrinks the region (antialiasing)
def test_warp_puts_the_landmarks_on_the_template(face_scale):
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = face_scale * (ARCFACE_TEMPLATE_112 - 56) @ rotation.T + np.array([400.0, 350.0])
    # a Gaussian dot on each landmark (pixel centres at integer coordinates, as MTCNN's landmarks)
    rows, cols = np.mgrid[0:700, 0:800]
    dots = sum(
        np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * (1.5 * face_scale) ** 2)) for x, y in landmarks
    )
    photo = Image.fromarray((255 * dots).astype(np.uint8)).convert("RGB")
    warped = np.asarray(warp_to_template(photo, landmarks, 112), dtype=float)[..., 0]
    for x, y in ARCFACE_TEMPLATE_112:
        window = warped[int(y) - 5 : int(y) + 6, int(x) - 5 : int(x) + 6]
        rows, cols = np.mgrid[int(y) - 5 : int(y) + 6, int(x) - 5 : int(x) + 6]
        centroid = np.array([(cols * window).sum(), (rows * window).sum()]) / window.sum()
        assert np.linalg.norm(centroid - (x, y)) < 0.2


def test_crops_for_the_refinement_nets_match_a_padded_reference():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (2, 3, 60, 80), dtype=np.uint8))
    boxes = torch.tensor([[10.0, 5.0, 40.0, 35.0], [-9.5, 50.0, 30.0, 90.0], [70.0, -20.0, 100.0, 10.0]])
    image_inds = torch.tensor([0, 1, 0])
    crops = mtcnn._crop_boxes(images, boxes, image_inds, 24)
    for crop, (x1, y1, x2, y2), index in zip(
        crops, boxes.trunc().int().tolist(), image_inds.tolist(), strict=True
    ):
        padded = F.pad(images[index].float(), (50, 50, 50, 50))  # zeros around the image
        region = padded[:, y1 - 1 + 50 : y2 + 50, x1 - 1 + 50 : x2 + 50]
        reference = F.interpolate(region[None], size=(24, 24), mode="bilinear", antialias=True)[0]
        assert torch.allclose(crop, (reference - 127.5) * 0.0078125, atol=1.01 / 128)


def test_uint8_and_float_resizes_agree():
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 3, 90, 70), dtype=np.uint8))
    fast = mtcnn._resize_uint8(images, (33, 27))
    reference = F.interpolate(images.float(), size=(33, 27), mode="bilinear", antialias=True)
    assert fast.dtype == torch.float32 and (fast - reference).abs().max() <= 1.0


# ----------------------------------------------------------------------------------------------- selection


def make_face(box, prob=0.99):
    return Face(box=np.array(box, dtype=float), landmarks=np.zeros((5, 2)), prob=prob)


def test_select_face_prefers_large_central_confident_faces():
    central = make_face([270, 190, 370, 290])
    small_corner = make_face([5, 5, 45, 45])
    assert select_face([small_corner, central], 640, 480) is central
    same_size_at_edge = make_face([0, 190, 100, 290])
    assert select_face([same_size_at_edge, central], 640, 480) is central
    # an edge face wins once it is much larger (size before centrality, by the documented weights)
    big_at_edge = make_face([0, 90, 300, 390])
    assert select_face([central, big_at_edge], 640, 480) is big_at_edge
    unsure_big = make_face([170, 90, 470, 390], prob=0.8)
    assert select_face([unsure_big, small_corner], 640, 480) is small_corner
    assert select_face([unsure_big], 640, 480) is None
    assert select_face([unsure_big], 640, 480, min_prob=0.5) is unsure_big
    assert select_face([], 640, 480) is None


# ----------------------------------------------------------------------------------------------- detection


def test_astronaut_face_and_landmarks(detector):
    photo = Image.fromarray(skimage_data.astronaut())
    face = best_face(detector, photo)
    assert face is not None and face.prob > 0.99
    assert np.abs(face.landmarks - ASTRONAUT_LANDMARKS).max() < 8  # eyes are 45 px apart
    x1, y1, x2, y2 = face.box
    assert x1 < 202 < 247 < x2 and y1 < 102 < 143 < y2


def test_detector_agrees_with_facenet_pytorch_mtcnn(detector, lfw_faces):
    """The cascade driven here versus facenet-pytorch's own `MTCNN.detect` on the same photos."""
    reference = MTCNN(device="cpu", keep_all=True)
    rng = np.random.default_rng(3)
    photos = [skimage_data.astronaut()] + [
        np.asarray(paste_scene(face, rng, 400, 320, 140)[0]) for face in lfw_faces[:2]
    ]
    for photo in photos:
        faces = [face for face in detector.detect([photo])[0] if face.prob > 0.9]
        boxes, probs, points = reference.detect(Image.fromarray(photo), landmarks=True)
        keep = np.array(probs) > 0.9
        assert len(faces) == keep.sum() >= 1
        for box, point in zip(boxes[keep], points[keep], strict=True):
            match = max(faces, key=lambda face: iou(face.box, box))
            assert iou(match.box, box) > 0.8
            assert np.abs(match.landmarks - point).max() < 0.08 * (box[2] - box[0])


def test_pasted_lfw_faces_are_found_and_aligned(detector, lfw_faces):
    rng = np.random.default_rng(11)
    for face_image in lfw_faces:
        width, height = int(rng.integers(400, 801)), int(rng.integers(400, 801))
        side = int(rng.uniform(0.2, 0.6) * min(width, height))
        photo, rect = paste_scene(face_image, rng, width, height, side)
        face = best_face(detector, photo, max_side=512)
        assert face is not None
        # the seed-style crop (160 px, margin 32) covers the pasted crop
        assert iou(square_box_with_margin(face.box, 160, 32), rect) > 0.5
        # the ArcFace warp takes the pasted face's true landmarks near the template...
        true_landmarks = rect[:2] + ARCFACE_TEMPLATE_112 * side / 112
        matrix = umeyama_similarity(face.landmarks, ARCFACE_TEMPLATE_112)
        mapped = true_landmarks @ matrix[:, :2].T + matrix[:, 2]
        assert np.abs(mapped - ARCFACE_TEMPLATE_112).max() < 10
        # ...and so the aligned crop looks like the LFW crop that was pasted
        aligned = np.asarray(warp_to_template(photo, face.landmarks).convert("L"), dtype=float)
        source = np.asarray(face_image.convert("L"), dtype=float)
        assert np.corrcoef(aligned[16:-16, 16:-16].ravel(), source[16:-16, 16:-16].ravel())[0, 1] > 0.6


def test_the_large_central_face_is_chosen_over_a_small_one(detector, lfw_faces):
    rng = np.random.default_rng(4)
    photo, _ = paste_scene(lfw_faces[4], rng, 640, 480, 90)
    photo.paste(lfw_faces[4].resize((90, 90)), (10, 10))  # a small face in the corner
    photo.paste(lfw_faces[5].resize((220, 220)), (230, 140))  # the subject
    assert len([face for face in detector.detect([np.asarray(photo)])[0] if face.prob > 0.9]) >= 2
    assert iou(square_box_with_margin(best_face(detector, photo).box, 160, 32), (230, 140, 450, 360)) > 0.5


def test_photos_are_loaded_upright(tmp_path):
    upright = Image.fromarray(skimage_data.astronaut())
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, rotate 90 degrees clockwise to view
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    loaded = align_dataset.load_photo(tmp_path / "turned.jpg")
    assert loaded.size == upright.size and loaded.mode == "RGB"
    assert np.abs(np.asarray(loaded, dtype=float) - np.asarray(upright, dtype=float)).mean() < 4


def test_large_photo_is_detected_shrunk_and_mapped_back(detector, lfw_faces):
    rng = np.random.default_rng(5)
    photo, rect = paste_scene(lfw_faces[0], rng, 2400, 1800, 500)
    view, shrink = detection_view(photo, 640)
    assert view.shape == (480, 640, 3) and shrink == pytest.approx((2400 / 640, 1800 / 480))
    face = best_face(detector, photo, max_side=640)
    true_landmarks = rect[:2] + ARCFACE_TEMPLATE_112 * 500 / 112
    assert np.abs(face.landmarks - true_landmarks).max() < 0.1 * 500


def test_noise_and_tiny_images_have_no_face(detector):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    tiny = rng.integers(0, 256, (15, 9, 3), dtype=np.uint8)  # smaller than min_face_size: no pyramid at all
    assert [select_face(faces, 320, 240) for faces in detector.detect([noise, tiny])] == [None, None]


# ----------------------------------------------------------------------------------------------- the tool


@pytest.fixture
def photo_tree(tmp_path, lfw_faces):
    """raw/<two identities>/ with pasted faces (jpg and png), one noise photo, one broken file, a note."""
    rng = np.random.default_rng(2)
    raw = tmp_path / "raw"
    for identity, faces in (("Alice_A", lfw_faces[:2]), ("Bob_B", lfw_faces[2:4])):
        (raw / identity).mkdir(parents=True)
        for index, face in enumerate(faces):
            photo, _ = paste_scene(face, rng, 480, 400, 180)
            photo.save(raw / identity / f"{identity}_{index + 1:04d}.{'jpg' if index == 0 else 'png'}")
    Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(
        raw / "Bob_B" / "Bob_B_0003.jpg"
    )
    (raw / "Bob_B" / "Bob_B_0004.jpg").write_bytes(b"not a jpeg")
    (raw / "Bob_B" / "notes.txt").write_text("ignored")
    return raw


def test_tool_mirrors_the_tree_reports_failures_and_resumes(photo_tree, tmp_path, capsys):
    out = tmp_path / "aligned"
    argv = ["--input_dir", str(photo_tree), "--output_dir", str(out), "--num_workers", "0", "--no-progress"]
    assert align_dataset.main(argv) == 0
    written = sorted(path.relative_to(out).as_posix() for path in out.rglob("*.png"))
    assert written == [
        "Alice_A/Alice_A_0001.png",
        "Alice_A/Alice_A_0002.png",
        "Bob_B/Bob_B_0001.png",
        "Bob_B/Bob_B_0002.png",
    ]
    assert all(Image.open(out / path).size == (160, 160) for path in written)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["no_face"] == ["Bob_B/Bob_B_0003.jpg"]
    assert list(report["unreadable"]) == ["Bob_B/Bob_B_0004.jpg"]
    assert report["identities"]["Bob_B"] == {"photos": 4, "aligned": 2, "no_face": 1, "unreadable": 1}
    assert report["totals"]["processed_this_run"] == 6 and report["settings"]["margin"] == 32
    first_times = {path: (out / path).stat().st_mtime_ns for path in written}

    assert align_dataset.main(argv) == 0  # everything is done or known to fail: nothing runs again
    again = json.loads((out / REPORT_NAME).read_text())
    assert again["totals"]["processed_this_run"] == 0
    assert again["no_face"] == report["no_face"] and again["unreadable"] == report["unreadable"]
    assert {path: (out / path).stat().st_mtime_ns for path in written} == first_times

    assert align_dataset.main(argv + ["--retry_failed"]) == 0
    assert json.loads((out / REPORT_NAME).read_text())["totals"]["processed_this_run"] == 2

    capsys.readouterr()
    assert align_dataset.main(argv + ["--template", "arcface112"]) == 2  # the folder holds other crops
    assert capsys.readouterr().err.startswith("error: ")

    # other detection settings decide failures anew: the two failures are tried again without --retry_failed
    assert align_dataset.main(argv + ["--max_side", "1000"]) == 0
    retried = json.loads((out / REPORT_NAME).read_text())
    assert retried["totals"]["processed_this_run"] == 2 and retried["settings"]["max_side"] == 1000

    # an output folder holds the crops of one input folder
    other = tmp_path / "other_raw"
    photo_tree.rename(other)
    other_argv = ["--input_dir", str(other), "--output_dir", str(out), "--num_workers", "0", "--no-progress"]
    before = (out / REPORT_NAME).read_bytes()
    assert align_dataset.main(other_argv + ["--max_side", "1000"]) == 2
    assert f"holds crops of {photo_tree}, not of {other}" in capsys.readouterr().err
    assert (out / REPORT_NAME).read_bytes() == before


def test_a_folder_of_crops_without_a_report_is_not_added_to(photo_tree, tmp_path, capsys):
    """Crops of unknown settings (another tool's): adding ours would mix two crop rules in one dataset."""
    out = tmp_path / "aligned"
    (out / "Alice_A").mkdir(parents=True)
    (out / "Alice_A" / "Alice_A_0001.png").write_bytes(b"someone's 64 px crop")
    argv = ["--input_dir", str(photo_tree), "--output_dir", str(out), "--num_workers", "0", "--no-progress"]
    assert align_dataset.main(argv) == 2
    assert f"--output_dir {out} holds files but no {REPORT_NAME}" in capsys.readouterr().err
    assert [p.name for p in out.rglob("*")] == ["Alice_A", "Alice_A_0001.png"]


def test_the_report_is_on_disk_before_the_first_crop(photo_tree, tmp_path, monkeypatch):
    """So a run killed outright (SIGKILL, out of memory: no finally runs) leaves a folder the next run can
    check and resume, not crops without settings."""
    out = tmp_path / "aligned"
    seen = []

    def first_crop_killed(todo, config, *args):
        seen.append(json.loads((out / REPORT_NAME).read_text()))
        yield from ()

    monkeypatch.setattr(align_dataset, "run_alignment", first_crop_killed)
    argv = ["--input_dir", str(photo_tree), "--output_dir", str(out), "--num_workers", "0", "--no-progress"]
    assert align_dataset.main(argv) == 0
    (report,) = seen
    assert report["settings"]["margin"] == 32 and report["totals"]["not_processed"] == 6


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe not json",
        b'{"settings": [1, 2], "input_dir": "x"}',
        b'{"settings": {}, "input_dir": "x", "no_face": 3}',
        b'{"settings": {}, "input_dir": "x", "unreadable": []}',
    ],
)
def test_a_malformed_report_is_a_one_line_error(photo_tree, tmp_path, capsys, content):
    out = tmp_path / "aligned"
    out.mkdir()
    (out / REPORT_NAME).write_bytes(content)
    argv = ["--input_dir", str(photo_tree), "--output_dir", str(out), "--num_workers", "0", "--no-progress"]
    assert align_dataset.main(argv) == 2
    assert "is not an alignment report" in capsys.readouterr().err
    assert (out / REPORT_NAME).read_bytes() == content


def test_a_detector_that_cannot_start_in_a_worker_ends_the_run(photo_tree, tmp_path, monkeypatch, capsys):
    """Raised in the pool's initializer, the error would restart the worker forever; the first batch raises it."""

    class MissingWeights:
        def __init__(self, config):
            raise InputError("facenet-pytorch's MTCNN weights are missing (pnet.pt)")

    monkeypatch.setattr(align_dataset, "Aligner", MissingWeights)  # the forked workers inherit it
    out = tmp_path / "aligned"
    argv = ["--input_dir", str(photo_tree), "--output_dir", str(out), "--num_workers", "1", "--no-progress"]
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the run hung"))
    signal.alarm(60)
    try:
        assert align_dataset.main(argv) == 2
    finally:
        signal.alarm(0)
    assert "MTCNN weights are missing" in capsys.readouterr().err
    assert json.loads((out / REPORT_NAME).read_text())["totals"]["not_processed"] == 6


def test_16_bit_grey_photos_are_scaled_not_clipped_to_white(tmp_path):
    grey = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)  # a 16-bit grey PNG: Pillow opens it as mode I;16
    assert Image.open(path).mode == "I;16"
    expected = np.rint(grey / 257.0).astype(np.uint8)
    in_32_bits = Image.fromarray(grey.astype(np.int32))  # mode I, as some Pillow versions open such files
    for loaded in (align_dataset.load_photo(path), load_image(path), to_rgb(in_32_bits)):
        assert loaded.mode == "RGB"
        pixels = np.asarray(loaded)
        assert np.abs(pixels[..., 0].astype(int) - expected).max() <= 1 and pixels.std() > 50


def test_tool_with_worker_processes_and_arcface_template(photo_tree, tmp_path):
    out = tmp_path / "aligned112"
    argv = [
        "--input_dir",
        str(photo_tree),
        "--output_dir",
        str(out),
        "--template",
        "arcface112",
        "--format",
        "jpg",
    ]
    assert align_dataset.main(argv + ["--num_workers", "2", "--batch_size", "2", "--no-progress"]) == 0
    written = sorted(path.relative_to(out).as_posix() for path in out.rglob("*.jpg"))
    assert written == [
        "Alice_A/Alice_A_0001.jpg",
        "Alice_A/Alice_A_0002.jpg",
        "Bob_B/Bob_B_0001.jpg",
        "Bob_B/Bob_B_0002.jpg",
    ]
    assert all(Image.open(out / path).size == (112, 112) for path in written)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["totals"] == {
        "photos": 6,
        "aligned": 4,
        "no_face": 1,
        "unreadable": 1,
        "processed_this_run": 6,
        "not_processed": 0,
    }


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--input_dir", "{tmp}/missing", "--output_dir", "{tmp}/out"], "is not a folder"),
        (["--input_dir", "{tmp}/empty", "--output_dir", "{tmp}/out"], "holds no images"),
        (["--input_dir", "{tmp}/raw", "--output_dir", "{tmp}/raw/aligned"], "inside --input_dir"),
        (["--input_dir", "{tmp}/raw", "--output_dir", "{tmp}/out", "--margin", "160"], "--margin"),
        (
            ["--input_dir", "{tmp}/raw", "--output_dir", "{tmp}/out", "--image_size", "100000"],
            "--image_size must be from 1 to 4096, got 100000",
        ),
        (
            [
                "--input_dir",
                "{tmp}/raw",
                "--output_dir",
                "{tmp}/out",
                "--template",
                "arcface112",
                "--margin",
                "8",
            ],
            "--margin",
        ),
        (
            ["--input_dir", "{tmp}/raw", "--output_dir", "{tmp}/out", "--min_face_prob", "1.5"],
            "--min_face_prob",
        ),
        (["--input_dir", "{tmp}/clash", "--output_dir", "{tmp}/out"], "would both be written to"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "raw" / "someone").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "raw" / "someone" / "a.jpg")
    (tmp_path / "clash" / "someone").mkdir(parents=True)
    for name in ("a.jpg", "a.png"):
        Image.new("RGB", (32, 32)).save(tmp_path / "clash" / "someone" / name)
    assert align_dataset.main([arg.format(tmp=tmp_path) for arg in extra] + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_runs_as_a_script(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "datasets/align_dataset.py",
            "--input_dir",
            str(tmp_path / "missing"),
            "--output_dir",
            str(tmp_path / "o"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: --input_dir")
