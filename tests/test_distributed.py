"""Scale-out under torchrun on the CPU (gloo): ranks agree on folders, stops and failures; preemption.

Every run here is bounded in time; the harness (tests/distributed_harness.py) injects clock offsets, failures
and kills by environment variables.
"""

import csv
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.training_data import REPO, common_args

HARNESS = str(REPO / "tests" / "distributed_harness.py")


def torchrun(nproc=2, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *extra]


def environment(**harness):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.update({f"HARNESS_{key.upper()}": str(value) for key, value in harness.items()})
    return env


def triplet_args(data, output_dir, *extra):
    args = [*common_args(data, output_dir), "--num_triplets_train", "48", "--batch_size", "8", *extra]
    if output_dir is None:
        at = args.index("--output_dir")
        del args[at : at + 2]
    return [str(a) for a in args]


def run(command, cwd=REPO, timeout=240, **harness):
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment(**harness)
    )


def test_ranks_share_one_folder_identical_weights_and_disjoint_shards(tiny_demo_data, tmp_path):
    """No --output_dir and rank 1's clock a second ahead: one folder (rank 0 names it); after training the
    ranks hold the same weights, and each loaded its own images."""
    dump = tmp_path / "dump"
    dump.mkdir()
    args = [*common_args(tiny_demo_data, "unused"), "--batch_size", "5", "--epochs", "1"]
    at = args.index("--output_dir")
    del args[at : at + 2]
    command = [*torchrun(2, "--standalone"), HARNESS, "train_center.py", *(str(a) for a in args)]
    result = run(command, cwd=tmp_path, clock_offset_rank=1, dump_dir=dump)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (folder,) = (tmp_path / "runs").iterdir()
    assert (folder / "checkpoints" / "model_resnet18_center_epoch_1.pt").is_file()
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][key]), key
    assert len(rank0["indices"]) == len(rank1["indices"]) == 15  # 30 images, 15 each
    assert not set(rank0["indices"]) & set(rank1["indices"])


def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint_and_auto_resume_finishes(
    tiny_demo_data, tmp_path
):
    output_dir, ready = tmp_path / "run", tmp_path / "ready"
    ready.mkdir()
    command = [
        *torchrun(2, "--standalone"),
        HARNESS,
        "train_triplet.py",
        *triplet_args(tiny_demo_data, output_dir),
    ]
    command += ["--epochs", "1"]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=environment(ready_dir=ready, step_sleep=0.5),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (ready / "rank1.pid").is_file():
            assert time.monotonic() < deadline and process.poll() is None, "rank 1 never started training"
            time.sleep(0.2)
        os.kill(int((ready / "rank1.pid").read_text()), signal.SIGTERM)
        output, _ = process.communicate(timeout=60)  # every rank ends within a minute (else TimeoutExpired)
    finally:
        process.kill()
    assert process.returncode != 0, output[-3000:]
    assert "a stop request on another process" in output and "SIGTERM" in output
    (interrupted,) = (output_dir / "checkpoints").glob("*_interrupted.pt")
    assert torch.load(interrupted, weights_only=True)["step_in_epoch"] > 0
    resumed = run(
        [*torchrun(2, "--standalone"), "train_triplet.py", *triplet_args(tiny_demo_data, output_dir)]
        + ["--epochs", "1", "--resume_path", "auto"]
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {interrupted}" in resumed.stdout
    assert (output_dir / "checkpoints" / "model_resnet18_triplet_epoch_1.pt").is_file()


def test_an_exception_on_one_rank_ends_every_rank_with_its_message(tiny_demo_data, tmp_path):
    command = [*torchrun(2, "--standalone"), HARNESS, "train_triplet.py"]
    command += [*triplet_args(tiny_demo_data, tmp_path / "run"), "--epochs", "1"]
    result = run(command, timeout=120, fail="1:2")  # within the timeout, not the collectives' 30 minutes
    assert result.returncode != 0
    output = result.stdout + result.stderr
    # both processes print the failing rank's one-line message
    assert output.count("error: rank 1: injected failure") == 2, output[-3000:]


@pytest.mark.parametrize(
    "script, fault, message",
    [
        # rank 1 fails loading while rank 0 is already in the forward's DDP broadcast
        ("train_triplet.py", {"fail_load": "1:9"}, "unreadable image"),
        # rank 1 fails before the sharded classifier's gathers, which rank 0 has entered
        ("train_margin.py", {"fail": "1:2"}, "injected failure"),
    ],
)
def test_a_failure_outside_the_agreed_step_still_ends_every_rank_with_its_message(
    tiny_demo_data, tmp_path, script, fault, message
):
    args = triplet_args(tiny_demo_data, tmp_path / "run", "--epochs", "1")
    if script == "train_margin.py":
        at = args.index("--num_triplets_train")
        del args[at : at + 2]
    result = run([*torchrun(2, "--standalone"), HARNESS, script, *args], timeout=120, **fault)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count(f"error: rank 1: {message}") == 2, output[-3000:]


def test_torchrun_max_restarts_recovers_from_a_failed_rank_with_auto_resume(tiny_demo_data, tmp_path):
    """The README's cluster recipe: a rank fails in the first attempt only; torchrun restarts both, which
    resume from the last checkpoint and finish (the failure of attempt 0 does not end attempt 1)."""
    args = triplet_args(tiny_demo_data, tmp_path / "run", "--epochs", "2", "--resume_path", "auto")
    command = [*torchrun(2, "--standalone", "--max_restarts", "1"), HARNESS, "train_triplet.py", *args]
    # the README's advice for restarts (a restart on torchrun's shared store can fail to connect)
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    try:
        result = run(command, timeout=240, fail="1:5", attempt="0")  # 3 steps an epoch: step 2 of epoch 2
    finally:
        del os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "error: rank 1: injected failure" in output
    assert "resumed from" in output and "continuing at epoch 2" in output
    with (tmp_path / "run" / "training_log.csv").open() as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_on_one_machine_train_an_epoch(tiny_demo_data, tmp_path):
    """Two torchrun launches joined by PyTorch's c10d rendezvous, as on two machines."""
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        command = [*torchrun(1, "--nnodes", "2", "--node_rank", str(node_rank), "--rdzv-backend", "c10d",
                             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"),
                   "train_triplet.py", *triplet_args(tiny_demo_data, tmp_path / "run"), "--epochs", "1"]  # fmt: skip
        nodes.append(subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=environment()))  # fmt: skip
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "x2 processes" in outputs[0]
    assert (tmp_path / "run" / "checkpoints" / "model_resnet18_triplet_epoch_1.pt").is_file()


def test_a_killed_run_resubmitted_with_auto_resume_ends_like_an_uninterrupted_one(tiny_demo_data, tmp_path):
    """Two data workers, a checkpoint every 2 steps, SIGKILL at step 5 of epoch 2: the resubmitted command
    (unchanged, --resume_path auto) ends with the weights of the run that was never killed."""

    def command(output_dir):
        args = triplet_args(tiny_demo_data, output_dir, "--epochs", "2", "--checkpoint_every_steps", "2")
        args[args.index("--num_workers") + 1] = "2"
        return [sys.executable, HARNESS, "train_triplet.py", *args, "--resume_path", "auto"]

    straight = run(command(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    # an epoch's own checkpoint supersedes its step checkpoints
    assert not list((tmp_path / "straight" / "checkpoints").glob("*_step_*.pt"))
    killed = run(command(tmp_path / "killed"), kill="0:11")  # 6 steps an epoch: step 5 of epoch 2
    assert killed.returncode == -signal.SIGKILL
    step_checkpoints = sorted(path.name for path in (tmp_path / "killed" / "checkpoints").glob("*_step_*.pt"))
    assert step_checkpoints == ["model_resnet18_triplet_epoch_2_step_4.pt"]
    resumed = run(command(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert not list((tmp_path / "killed" / "checkpoints").glob("*_step_*.pt"))
    assert "continuing at epoch 2 of 2, step 5 of 6" in resumed.stdout
    final = [
        torch.load(folder / "checkpoints" / "model_resnet18_triplet_epoch_2.pt", weights_only=True)
        for folder in (tmp_path / "straight", tmp_path / "killed")
    ]
    for key, value in final[0]["model_state_dict"].items():
        assert torch.equal(value, final[1]["model_state_dict"][key]), key
    with (tmp_path / "killed" / "training_log.csv").open() as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]
