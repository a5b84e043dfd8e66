"""A run's folder: named by rank 0 for every process, claimed (never over another run's files), described in
``run_config.json``; and the checkpoint ``--resume_path auto`` continues from, agreed by every process."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

from fileio import write_json_atomic
from training.checkpoint import claim_output_dir, default_output_dir, latest_checkpoint
from training.cli import prepare_demo_data, was_given
from training.runtime import Runtime, barrier
from training.validation import Validator


def prepare_output(args: argparse.Namespace, runtime: Runtime, task_name: str, resuming: bool):
    """The run's folder, claimed and described (``run_config.json``); the validator, on the main process;
    whether the folder was "new" or "empty" before (None: it held a run, or this is not the main process); and
    the run_config file this start wrote (None on the other processes)."""
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args, task_name)
    if runtime.distributed:  # rank 0 names the folder: the others' clocks may be a second later
        chosen = [str(output_dir)]
        dist.broadcast_object_list(chosen, src=0)
        output_dir = Path(chosen[0])
    args.output_dir = str(output_dir)
    if args.demo:  # one process per machine generates it (demo_data/ may not be on a shared disk)
        if runtime.local_rank == 0:
            prepare_demo_data(args)
        barrier(runtime)  # the other ranks find it generated
        if runtime.local_rank != 0:
            prepare_demo_data(args)
    run_config = {"task": task_name, **vars(args)}
    validator = fresh = config_path = None
    if runtime.is_main:
        fresh = "new" if not output_dir.exists() else None if any(output_dir.iterdir()) else "empty"
        claim_output_dir(output_dir, run_config, resuming=resuming)
        validator = Validator(args, runtime, output_dir)  # reads the pairs files: fails before any writing
        output_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_config_path(output_dir)
        write_json_atomic(run_config, config_path)
    barrier(runtime)
    return output_dir, validator, fresh, config_path


def run_config_path(output_dir: Path) -> Path:
    """``run_config.json`` for a run's first start; each resume adds ``run_config_resume_<k>.json``, so the
    settings a run began with are never replaced by a resumed run's."""
    path, resumes = output_dir / "run_config.json", 0
    while path.exists():
        resumes += 1
        path = output_dir / f"run_config_resume_{resumes}.json"
    return path


def agreed_latest_checkpoint(args: argparse.Namespace, task_name: str, runtime: Runtime) -> str | None:
    """--resume_path auto: the newest complete checkpoint of --output_dir as rank 0 sees it, or None."""
    latest = [None]
    if runtime.is_main:
        # the model named on the command line, or any (an --init_from run's is the checkpoint's)
        model = args.model if was_given(args, "model") else None
        batch_size = args.batch_size if was_given(args, "batch_size") else None  # else the checkpoint's
        found = latest_checkpoint(Path(args.output_dir), model, task_name, runtime.world_size, batch_size)
        latest = [None if found is None else str(found)]
    if runtime.distributed:
        dist.broadcast_object_list(latest, src=0)
    return latest[0]
