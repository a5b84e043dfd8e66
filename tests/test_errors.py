import pytest

from errors import InputError, one_line, report_input_errors


def test_one_line_unwraps_data_loader_worker_errors():
    wrapped = InputError(
        "Caught InputError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nerrors.InputError: LFW image unreadable: a.jpg (OSError: truncated)\n'
    )
    assert one_line(wrapped) == "LFW image unreadable: a.jpg (OSError: truncated)"
    assert one_line(InputError("plain message")) == "plain message"


def test_report_input_errors_exit_statuses(capsys):
    def bad():
        raise InputError("--lfw /x: no such folder")

    assert report_input_errors(bad) == 2
    assert capsys.readouterr().err == "error: --lfw /x: no such folder\n"
    assert report_input_errors(lambda: None) == 0
    assert report_input_errors(lambda: {"a report": 1}) == 0
    assert report_input_errors(lambda: 130) == 130


def test_bugs_stay_tracebacks():
    def buggy():
        raise KeyError("not the user's fault")

    with pytest.raises(KeyError):
        report_input_errors(buggy)


def test_path_problems_and_ctrl_c_become_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for body in (
        lambda: (tmp_path / "missing" / "out").mkdir(),  # a parent that does not exist
        lambda: (a_file / "out").mkdir(),  # a file where a folder should be
        lambda: (
            (tmp_path / "x.tmp").write_text("") or (tmp_path / "x.tmp").replace(tmp_path)
        ),  # onto a folder
    ):
        assert report_input_errors(body) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path}") and err.count("\n") == 1, err

    def interrupted():
        raise KeyboardInterrupt

    assert report_input_errors(interrupted) == 130
    assert capsys.readouterr().err == "interrupted\n"

    def socket_trouble():
        raise ConnectionResetError("peer gone")  # an OSError about no path: a traceback, not a user error

    with pytest.raises(ConnectionResetError):
        report_input_errors(socket_trouble)
