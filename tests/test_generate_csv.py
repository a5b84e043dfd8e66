import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datasets.face_table import read_face_csv
from datasets.generate_csv_files import CsvSummary, generate_csv, main
from errors import InputError
from tests.conftest import write_random_image

REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def read_rows(csv_path):
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        return next(reader), list(reader)


def brute_force_rows(root):
    """The expected rows by a plain os.walk: sorted identity folders with images, sorted files."""
    identities = sorted(
        d
        for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d))
        and not d.startswith(".")
        and any(
            os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES and not f.startswith(".")
            for f in os.listdir(os.path.join(root, d))
        )
    )
    rows = []
    for label, name in enumerate(identities):
        for file in sorted(os.listdir(os.path.join(root, name))):
            stem, ext = os.path.splitext(file)
            hidden = file.startswith(".")
            if (
                ext.lower() in IMAGE_SUFFIXES
                and not hidden
                and os.path.isfile(os.path.join(root, name, file))
            ):
                rows.append([stem, name, str(label), ext])
    return rows


@pytest.fixture
def messy_tree(make_face_tree):
    """Images plus the things real folders hold: notes, hidden files, nested folders, an empty identity."""
    root = make_face_tree(counts=(2, 3, 1, 2), exts=(".jpg", ".png", ".JPEG"))
    (root / "README.txt").write_text("top-level file")
    (root / "id_001" / "notes.txt").write_text("not an image")
    (root / "id_001" / ".DS_Store").write_bytes(b"\0")
    (root / "id_001" / "._img_00.jpg").write_bytes(b"\0\5\26\7")  # macOS's metadata twin of an image
    (root / "id_002" / "nested").mkdir()
    (root / "zz_empty").mkdir()
    (root / ".hidden_identity").mkdir()
    write_random_image(root / ".hidden_identity" / "x.jpg")
    return root


def test_rows_match_a_brute_force_listing(messy_tree, tmp_path):
    csv_path = tmp_path / "out" / "faces.csv"  # the folder is created
    summary = generate_csv(messy_tree, csv_path, num_workers=3)
    header, rows = read_rows(csv_path)
    assert header == ["id", "name", "class", "ext"]
    assert rows == brute_force_rows(messy_tree)
    # skipped: README.txt and .hidden_identity at the top; notes.txt, .DS_Store, ._img_00.jpg and nested/
    # inside identities. zz_empty is an identity folder without images: nothing skipped, but it gets no class
    assert summary == CsvSummary(num_images=8, num_identities=4, num_skipped_files=6, bad_images=[])
    assert {row[1] for row in rows} == {"id_000", "id_001", "id_002", "id_003"}
    assert {row[3] for row in rows} == {".jpg", ".png", ".JPEG"}


def test_classes_follow_sorted_identity_names(make_face_tree, tmp_path):
    root = tmp_path / "tree"
    for name in ["zeta", "Alpha", "mike", "bravo"]:
        write_random_image(root / name / "0001_01.jpg")
    generate_csv(root, tmp_path / "f.csv")
    _, rows = read_rows(tmp_path / "f.csv")
    assert [(row[1], int(row[2])) for row in rows] == [("Alpha", 0), ("bravo", 1), ("mike", 2), ("zeta", 3)]
    assert rows[0][0] == "0001_01"  # the id is the stem, leading zeros kept


def test_the_csv_reads_back_to_existing_files(messy_tree, tmp_path):
    csv_path = tmp_path / "faces.csv"
    generate_csv(messy_tree, csv_path)
    table = read_face_csv(messy_tree, csv_path)
    assert len(table.paths) == 8 and table.num_classes == 4
    assert all(os.path.isfile(p) for p in table.paths)


def test_verify_leaves_unreadable_images_out_and_lists_them(make_face_tree, tmp_path):
    root = make_face_tree(counts=(3, 2, 2))
    truncated = root / "id_000" / "img_00.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = root / "id_001" / "img_01.png"
    garbage.write_bytes(b"garbage")
    # identity 2 has only unreadable images: with --verify it must disappear and classes stay contiguous
    for path in (root / "id_002").iterdir():
        path.write_bytes(b"")

    plain = generate_csv(root, tmp_path / "plain.csv")
    assert plain.num_images == 7 and plain.bad_images == []

    verified = generate_csv(root, tmp_path / "verified.csv", verify=True, num_workers=2)
    bad = sorted(str(p) for p in [truncated, garbage, *(root / "id_002").iterdir()])
    assert sorted(verified.bad_images) == bad
    assert verified.num_images == 3 and verified.num_identities == 2
    _, rows = read_rows(tmp_path / "verified.csv")
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("img_01", "id_000", "0"),
        ("img_02", "id_000", "0"),
        ("img_00", "id_001", "1"),
    ]


def test_an_existing_csv_is_replaced_not_appended(tiny_face_tree, tmp_path):
    csv_path = tmp_path / "faces.csv"
    csv_path.write_text("stale,content\n" * 100)
    generate_csv(tiny_face_tree, csv_path)
    _, rows = read_rows(csv_path)
    assert len(rows) == 12
    assert not list(tmp_path.glob(".*.tmp"))  # atomic_write's temporary name is gone


@pytest.mark.parametrize("case", ["missing", "empty", "no_images", "files_only"])
def test_unusable_dataroots_are_input_errors(tmp_path, case):
    root = tmp_path / "root"
    if case != "missing":
        root.mkdir()
    if case == "no_images":
        (root / "person").mkdir()
        (root / "person" / "notes.txt").write_text("x")
    if case == "files_only":
        write_random_image(root / "loose.jpg")
    with pytest.raises(InputError, match=str(root)) as error:
        generate_csv(root, tmp_path / "out.csv")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("where", ["identity", "image"])
def test_a_name_that_is_not_utf8_is_an_input_error(tiny_face_tree, tmp_path, where):
    latin1 = b"caf\xe9"  # "cafe" with an e-acute in Latin-1: not UTF-8
    if where == "identity":
        os.mkdir(os.fsencode(tiny_face_tree) + b"/" + latin1)
        write_random_image(Path(os.fsdecode(os.fsencode(tiny_face_tree) + b"/" + latin1)) / "a.jpg")
    else:
        write_random_image(tiny_face_tree / "id_000" / "tmp.jpg").rename(
            os.fsdecode(os.fsencode(tiny_face_tree / "id_000") + b"/" + latin1 + b".jpg")
        )
    csv_path = tmp_path / "out.csv"
    with pytest.raises(InputError, match="caf.*: the name is not valid UTF-8") as error:
        generate_csv(tiny_face_tree, csv_path)
    assert "\n" not in str(error.value)
    assert not csv_path.exists()


def test_num_workers_must_be_positive(tiny_face_tree, tmp_path):
    with pytest.raises(InputError, match="num_workers"):
        generate_csv(tiny_face_tree, tmp_path / "x.csv", num_workers=0)


def test_cli_exit_codes_and_output(tiny_face_tree, tmp_path, capsys):
    csv_path = tmp_path / "cli.csv"
    assert (
        main(["-d", str(tiny_face_tree), "--csv_name", str(csv_path), "--verify", "--num_workers", "2"]) == 0
    )
    assert "12 images of 4 identities" in capsys.readouterr().out
    assert read_rows(csv_path)[1] == brute_force_rows(tiny_face_tree)
    # a second run keeps the CSV unless --overwrite
    before = csv_path.read_bytes()
    assert main(["-d", str(tiny_face_tree), "--csv_name", str(csv_path)]) == 2
    assert "cli.csv exists; pass --overwrite" in capsys.readouterr().err and csv_path.read_bytes() == before
    assert main(["-d", str(tiny_face_tree), "--csv_name", str(csv_path), "--overwrite"]) == 0

    assert main(["--dataroot", str(tmp_path / "nope"), "--csv_name", str(tmp_path / "n.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "nope") in err and err.count("\n") == 1

    with pytest.raises(SystemExit) as exit_info:
        main([])  # --dataroot is required
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "invocation", [["datasets/generate_csv_files.py"], ["-m", "datasets.generate_csv_files"]]
)
def test_runs_as_a_script_and_as_a_module(tiny_face_tree, tmp_path, invocation):
    csv_path = tmp_path / "script.csv"
    result = subprocess.run(
        [sys.executable, *invocation, "-d", str(tiny_face_tree), "--csv_name", str(csv_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert read_rows(csv_path)[1] == brute_force_rows(tiny_face_tree)


def test_progress_wraps_every_identity_folder(tiny_face_tree, tmp_path):
    seen = []

    def progress(folders, total):
        seen.append(total)
        for folder in folders:
            seen.append(folder.name)
            yield folder

    generate_csv(tiny_face_tree, tmp_path / "p.csv", progress=progress)
    assert seen == [4, "id_000", "id_001", "id_002", "id_003"]
