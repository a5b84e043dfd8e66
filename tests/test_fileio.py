"""fileio.atomic_write: a file is replaced whole or not at all."""

import pytest

from fileio import atomic_write, write_json_atomic


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("old\n")
    with atomic_write(path, "w") as handle:
        handle.write("new\n")
        assert path.read_text() == "old\n"  # not visible before the block ends
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


def test_a_failure_inside_the_block_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "run_config.json"
    write_json_atomic({"epochs": 3}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path, "w") as handle:
            handle.write('{"epochs": ')
            raise RuntimeError("disk full")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_config.json"]


def test_refuse_to_replace_names_a_folder_as_a_folder(tmp_path):
    """--overwrite cannot turn a folder into a file: say so instead of offering it."""
    from errors import InputError
    from fileio import refuse_to_replace

    (tmp_path / "old.bin").write_bytes(b"x")
    with pytest.raises(InputError, match=r"--output .*old\.bin exists; pass --overwrite"):
        refuse_to_replace(tmp_path / "old.bin", overwrite=False, flag="--output")
    refuse_to_replace(tmp_path / "old.bin", overwrite=True, flag="--output")
    for overwrite in (False, True):
        with pytest.raises(InputError, match=f"--output {tmp_path} is a folder; name a file"):
            refuse_to_replace(tmp_path, overwrite=overwrite, flag="--output")
