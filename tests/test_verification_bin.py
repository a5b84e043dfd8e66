import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from datasets.lfw_dataset import LFWDataset, find_lfw_image, read_pairs
from datasets.make_verification_bin import main
from datasets.transforms import eval_transform
from datasets.verification_bin import (
    VerificationBinDataset,
    read_verification_bin,
    write_verification_bin,
)
from errors import InputError
from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
LFW_DIR = SHARED_DATA / "lfw_112"
LFW_PAIRS = SHARED_DATA / "lfw_pairs.txt"


@pytest.fixture(scope="module")
def lfw_bin(tmp_path_factory):
    """The full standard LFW set (6,000 pairs, 12,000 images, ~42 MB) written once: about 0.2 s."""
    path = tmp_path_factory.mktemp("bins") / "lfw.bin"
    summary = write_verification_bin(LFW_DIR, LFW_PAIRS, path)
    assert (summary.num_pairs, summary.num_images) == (6000, 12000)
    return path


def test_lfw_bin_round_trips_the_files_and_the_pairs(lfw_bin):
    images, issame = read_verification_bin(lfw_bin)
    parsed = read_pairs(LFW_PAIRS)
    assert len(images) == 12000 and issame.dtype == bool
    assert np.array_equal(issame, parsed.issame) and int(issame.sum()) == 3000
    for i, (first, second) in enumerate(zip(parsed.first, parsed.second, strict=True)):
        assert images[2 * i] == Path(find_lfw_image(str(LFW_DIR), *first)).read_bytes()
        assert images[2 * i + 1] == Path(find_lfw_image(str(LFW_DIR), *second)).read_bytes()


def test_lfw_bin_dataset_matches_lfw_dataset(lfw_bin):
    transform = eval_transform(112)
    dataset = VerificationBinDataset(lfw_bin, transform=transform)
    folder = LFWDataset(LFW_DIR, LFW_PAIRS, transform=transform)
    assert len(dataset) == 12000 and dataset.name == "lfw"
    assert np.array_equal(dataset.pairs, np.arange(12000).reshape(6000, 2))
    assert np.array_equal(dataset.issame, folder.issame)
    assert dataset.num_folds == folder.num_folds == 10
    assert np.array_equal(dataset.fold_of_pair, folder.fold_of_pair)
    for pair in (0, 1, 2999, 3001, 5999):  # same-person and different-person pairs, first and last folds
        for side in (0, 1):
            image, index = dataset[int(dataset.pairs[pair, side])]
            expected, _ = folder[int(folder.pairs[pair, side])]
            assert index == 2 * pair + side and torch.equal(image, expected)


def test_existing_evaluation_runs_on_a_bin_unchanged(make_lfw_tree, tmp_path):
    try:
        from verification import evaluate_model_on_lfw
    except ImportError:  # before the verification module existed
        from validate_on_LFW import evaluate_model_on_lfw

    root, pairs_path = make_lfw_tree(num_folds=10, pairs_per_kind=1)
    bin_path = tmp_path / "small.bin"
    write_verification_bin(root, pairs_path, bin_path)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())
    transform = eval_transform(32)
    kwargs = {"device": torch.device("cpu"), "progress": False}
    from_bin, bin_distances = evaluate_model_on_lfw(
        model, VerificationBinDataset(bin_path, transform), **kwargs
    )
    from_folder, folder_distances = evaluate_model_on_lfw(
        model, LFWDataset(root, pairs_path, transform), **kwargs
    )
    assert len(bin_distances) == 20 and np.allclose(bin_distances, folder_distances)
    assert np.array_equal(from_bin.accuracy, from_folder.accuracy) and len(from_bin.accuracy) == 10


def write_pickle(path: Path, content, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    return path


@pytest.fixture
def two_jpegs(make_lfw_tree):
    root, _ = make_lfw_tree(num_folds=1, pairs_per_kind=1)
    return [path.read_bytes() for path in sorted(root.rglob("*.jpg"))[:2]]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_bin_of_numpy_uint8_arrays_loads(two_jpegs, tmp_path, protocol):
    arrays = [np.frombuffer(image, dtype=np.uint8) for image in two_jpegs]
    path = write_pickle(tmp_path / "np.bin", (arrays, np.array([True])), protocol)
    images, issame = read_verification_bin(path)
    assert images == two_jpegs and issame.tolist() == [True]
    path = write_pickle(tmp_path / "scalars.bin", (arrays, [np.bool_(False)]), protocol)
    assert read_verification_bin(path).issame.tolist() == [False]
    assert VerificationBinDataset(path)[1][0].size == (32, 32)
    columns = [array.reshape(-1, 1) for array in arrays]  # what cv2.imencode returns
    path = write_pickle(tmp_path / "columns.bin", (columns, [True]), protocol)
    assert read_verification_bin(path).images == two_jpegs


def test_python2_pickle_loads_its_strings_as_bytes(two_jpegs, tmp_path):
    """Python 2 wrote images as `str` (SHORT_BINSTRING / BINSTRING); only encoding="bytes" keeps them bytes."""

    def py2_string(data: bytes) -> bytes:
        return b"T" + len(data).to_bytes(4, "little") + data  # BINSTRING

    stream = b"\x80\x02((" + b"".join(py2_string(image) for image in two_jpegs) + b"l(\x88lt."
    path = tmp_path / "py2.bin"
    path.write_bytes(stream)
    with pytest.raises(UnicodeDecodeError):  # a plain load cannot even read it (the JPEGs are not ASCII)
        pickle.loads(stream)
    images, issame = read_verification_bin(path)
    assert images == two_jpegs and issame.tolist() == [True]


class Payload:
    """Unpickling this calls `function(*args)`: what a malicious .bin does."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker: Path):
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "eval": Payload(eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess": Payload(subprocess.call, ["touch", str(marker)]),
        "object array": np.array([Payload(os.system, f"touch {marker}")], dtype=object),
    }


@pytest.mark.parametrize("kind", ["os.system", "eval", "subprocess", "object array"])
def test_malicious_pickle_is_refused_and_runs_nothing(two_jpegs, tmp_path, kind):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(payloads(control)[kind]))  # the payload works when unpickled normally
    assert control.exists()

    marker = tmp_path / "marker"
    path = write_pickle(tmp_path / "evil.bin", ([two_jpegs[0], payloads(marker)[kind]], [True]))
    with pytest.raises(InputError, match=r"evil\.bin: refused to load") as error:
        read_verification_bin(path)
    assert not marker.exists()
    assert "\n" not in str(error.value)


def test_object_dtype_array_is_refused(two_jpegs, tmp_path):
    path = write_pickle(tmp_path / "objects.bin", (two_jpegs, np.array([True], dtype=object)), protocol=2)
    with pytest.raises(InputError, match=r"objects\.bin: refused to load"):
        read_verification_bin(path)


def test_image_count_must_be_twice_the_pair_count(two_jpegs, tmp_path):
    path = write_pickle(tmp_path / "odd.bin", ([*two_jpegs, two_jpegs[0]], [True]))
    with pytest.raises(InputError, match=r"odd\.bin: 3 images for 1 pairs"):
        read_verification_bin(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a pickle at all", "not a readable verification pickle"),
        (pickle.dumps(([b"a", b"b"], [True]))[:-5], "not a readable verification pickle"),
        (pickle.dumps({"images": []}), "expected a pickle of"),
        (pickle.dumps(([1, 2], [True])), "image 0 is a int"),
        (pickle.dumps(([b"a", b"b"], [2])), "issame holds values"),
        (pickle.dumps(([], [])), "the file holds no pairs"),
        (
            pickle.dumps(([np.zeros((4, 4, 3), np.uint8)] * 2, [True])),
            r"image 0 is decoded pixels .*\(4, 4, 3\)",
        ),
        (pickle.dumps(([np.zeros((4, 4), np.uint8)] * 2, [True])), r"image 0 is decoded pixels .*\(4, 4\)"),
    ],
)
def test_malformed_bin_is_an_input_error(tmp_path, content, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_verification_bin(path)


def test_undecodable_image_is_an_input_error(two_jpegs, tmp_path):
    path = write_pickle(tmp_path / "broken.bin", ([two_jpegs[0], b"not an image"], [False]))
    dataset = VerificationBinDataset(path)
    assert dataset[0][1] == 0
    with pytest.raises(InputError, match=r"broken\.bin: image 1 does not decode"):
        dataset[1]


def test_missing_lfw_image_is_an_input_error(make_lfw_tree, tmp_path):
    root, pairs_path = make_lfw_tree()
    os.remove(root / "P0_0" / "P0_0_0002.jpg")
    out = tmp_path / "lfw.bin"
    with pytest.raises(InputError, match="P0_0_0002.jpg"):
        write_verification_bin(root, pairs_path, out)
    assert not out.exists() and not list(tmp_path.glob(".lfw.bin*"))


def test_cli_writes_a_bin_and_reports_bad_input(tiny_lfw, tmp_path, capsys):
    root, pairs_path = tiny_lfw
    out = tmp_path / "tiny.bin"
    assert main(["--lfw", str(root), "--lfw_pairs", str(pairs_path), "--output", str(out)]) == 0
    assert "8 pairs, 16 images" in capsys.readouterr().out
    assert len(read_verification_bin(out).issame) == 8
    other = tmp_path / "other.bin"
    assert (
        main(["--lfw", str(tmp_path / "nowhere"), "--lfw_pairs", str(pairs_path), "--output", str(other)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: LFW image folder not found") and err.count("\n") == 1
    # an existing file is kept unless --overwrite
    before = out.read_bytes()
    args = ["--lfw", str(root), "--lfw_pairs", str(pairs_path), "--output", str(out)]
    assert main(args) == 2
    assert "tiny.bin exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*args, "--overwrite"]) == 0


def test_an_image_that_does_not_decode_is_refused_when_packing(make_lfw_tree, tmp_path, capsys):
    root, pairs_path = make_lfw_tree()
    (root / "P0_0" / "P0_0_0002.jpg").write_text("not a jpeg")
    out = tmp_path / "broken.bin"
    assert main(["--lfw", str(root), "--lfw_pairs", str(pairs_path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "P0_0_0002.jpg: does not decode" in err and err.count("\n") == 1 and not out.exists()


def test_pairs_without_folds_are_written_so_every_block_holds_both_kinds(make_lfw_tree, tmp_path, capsys):
    """A .bin is read in ten consecutive blocks; a headerless file sorted by kind is written fold by fold."""
    root, pairs_path = make_lfw_tree(num_folds=1, pairs_per_kind=20, header=False)
    out = tmp_path / "view1.bin"
    assert main(["--lfw", str(root), "--lfw_pairs", str(pairs_path), "--output", str(out)]) == 0
    assert "has no folds" in capsys.readouterr().out
    issame = read_verification_bin(out).issame
    assert [block.tolist() for block in np.array_split(issame, 10)] == [[True, True, False, False]] * 10
    # the .bin's ten blocks are the folds the folder itself is evaluated in: the same metrics, also for
    # counts that are not multiples of ten
    uneven_root, uneven_pairs = make_lfw_tree(
        num_folds=1, pairs_per_kind=13, header=False, root=tmp_path / "u"
    )
    lines = uneven_pairs.read_text().splitlines()
    uneven_pairs.write_text("\n".join(lines[:13] + lines[13:] + lines[16:20]) + "\n")  # 13 same, 17 different
    uneven_bin = tmp_path / "uneven.bin"
    assert (
        main(["--lfw", str(uneven_root), "--lfw_pairs", str(uneven_pairs), "--output", str(uneven_bin)]) == 0
    )
    capsys.readouterr()
    from verification import evaluate_model_on_lfw

    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())
    kwargs = {"device": torch.device("cpu"), "progress": False}
    from_bin, _ = evaluate_model_on_lfw(
        model, VerificationBinDataset(uneven_bin, eval_transform(32)), **kwargs
    )
    from_folder, _ = evaluate_model_on_lfw(
        model, LFWDataset(uneven_root, uneven_pairs, eval_transform(32)), **kwargs
    )
    assert from_bin.positives_per_fold.tolist() == from_folder.positives_per_fold.tolist()
    np.testing.assert_allclose(from_bin.accuracy, from_folder.accuracy)
    # another fold count cannot be a .bin's: its pairs too are written as ten blocks holding both kinds
    two_root, two_pairs = make_lfw_tree(num_folds=2, pairs_per_kind=10, root=tmp_path / "two")
    two_bin = tmp_path / "two.bin"
    assert main(["--lfw", str(two_root), "--lfw_pairs", str(two_pairs), "--output", str(two_bin)]) == 0
    assert "has 2 folds, not the 10 of a .bin" in capsys.readouterr().out
    blocks = np.array_split(read_verification_bin(two_bin).issame, 10)
    assert all(block.any() and not block.all() for block in blocks)
    # with ten folds the file's own order is kept
    root, pairs_path = make_lfw_tree(num_folds=10, pairs_per_kind=1, root=tmp_path / "ten")
    assert (
        main(["--lfw", str(root), "--lfw_pairs", str(pairs_path), "--output", str(out), "--overwrite"]) == 0
    )
    assert "note" not in capsys.readouterr().out
    assert read_verification_bin(out).issame.tolist() == [True, False] * 10


def test_cli_runs_as_a_script_from_the_repository_root(tiny_lfw, tmp_path):
    root, pairs_path = tiny_lfw
    out = tmp_path / "script.bin"
    command = ["datasets/make_verification_bin.py", "--lfw", str(root), "--lfw_pairs", str(pairs_path)]
    result = subprocess.run(
        [sys.executable, *command, "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(read_verification_bin(out).images) == 16
