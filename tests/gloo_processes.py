"""Run a test function in 2 (or more) gloo processes on 127.0.0.1, spawned, each with one torch thread."""

import gc
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROCESS_TIMEOUT_S = 240  # generous: a loaded 2-core machine takes long to spawn two torch processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, worker, args):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=150),
    )
    try:
        worker(rank, *args)
        # the worker's DDP wrappers sit in reference cycles: freed now, while their process group lives, not by
        # the interpreter's shutdown after it is gone (which aborted the process now and then: "terminate
        # called without an active exception")
        gc.collect()
        # every rank past its last collective before any tears the group down: a rank leaving right after
        # its part of a gather while rank 0 still receives made gloo abort the leaving process (SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # the worker's results are written; skip the interpreter's teardown of torch's C++ state, the other place
    # such an abort can come from (a failed worker raised above and exits non-zero as usual)
    os._exit(0)


def run_on_gloo(worker, *args, world_size=2):
    context = mp.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(target=_entry, args=(rank, world_size, port, worker, args))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=PROCESS_TIMEOUT_S)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert [process.exitcode for process in processes] == [0] * world_size
