"""How the processes of a run stay in step, and how one failing process ends them all.

One all-reduce per step (the one host sync a step needs) carries the step's loss sum and count, whether its
loss was finite and whether a stop was requested (SIGINT / SIGTERM), on every process. So all processes
apply or skip the same steps and stop after the same step.

A process that fails cannot take part in that all-reduce: it may fail where the others are already inside
another collective it will never join (DDP's buffer broadcast at the start of a forward, the gradient
all-reduce in a backward, a sharded classifier's gathers, rank 0's validation while the others wait). So a
failure goes through the process group's key-value store instead (`FailureWatch`): the failing process writes
``rank, message, exit status`` there and exits; every other process polls the store from a thread and, within
a poll interval, prints that message and exits with that status, wherever its main thread is waiting. Without
it the others would sit in a collective until its timeout (minutes to hours).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from errors import one_line, user_error
from training.runtime import Runtime, all_reduce_sum


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop finishes the current step, checkpoints and exits."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            # a second Ctrl-C means now; a second SIGTERM does not: on a cluster one preemption can arrive
            # twice (the scheduler signals every process of the job, and torchrun forwards its own copy)
            if name == "SIGINT":
                raise KeyboardInterrupt
            return
        self.signal_name = name
        hint = " (Ctrl-C again stops at once, without one)" if name == "SIGINT" else ""
        print(f"{name}: stopping after this step with a checkpoint{hint}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def exit_status(self) -> int:
        """130 after SIGINT; 143 after SIGTERM, or when another process was the one asked to stop."""
        return 130 if self.signal_name == "SIGINT" else 143


FAILURE_POLL_SECONDS = 0.5


@dataclass
class StepVerdict:
    """What all processes agreed on after a step's forward pass."""

    loss_sum: float  # summed over the processes
    count: float
    nonfinite: bool  # some process's loss was not finite: skip the step everywhere
    stop: bool  # some process was asked to stop: stop after this step everywhere


def agree_on_step(out, stop_requested: bool, runtime: Runtime) -> StepVerdict:
    """All-reduce a step's bookkeeping and the stop flag; ``out`` is the task's StepOutput."""
    nonfinite = (~torch.isfinite(out.loss_sum)).double()
    measured = torch.stack([out.loss_sum.double().nan_to_num(), out.count.double(), nonfinite])
    stop = torch.tensor([float(stop_requested)], dtype=torch.float64)
    stats = all_reduce_sum(torch.cat([measured, stop.to(measured.device, non_blocking=True)]), runtime)
    loss_sum, count, any_nonfinite, any_stop = stats.tolist()
    return StepVerdict(loss_sum, count, bool(any_nonfinite), bool(any_stop))


def agree_to_stop(stop_requested: bool, runtime: Runtime) -> bool:
    """Whether any process was asked to stop, between epochs: a request that came during the validation or
    the checkpoint stops the run there, not after the next epoch's first step."""
    flag = torch.tensor([float(stop_requested)], dtype=torch.float64, device=runtime.device)
    return bool(all_reduce_sum(flag, runtime).item())


@dataclass
class Failure:
    rank: int
    message: str
    status: int  # the exit status every process ends with

    @property
    def line(self) -> str:
        return f"error: rank {self.rank}: {self.message}"


class FailureWatch:
    """Within a distributed run: `report` a failure of this process; a thread ends this process when another
    one reports first. A no-op in a single process. Use as a context manager (the thread stops on exit)."""

    def __init__(self, runtime: Runtime, poll_seconds: float = FAILURE_POLL_SECONDS):
        self.rank = runtime.rank
        self.store = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._printed = False
        self._reporting = False
        if not runtime.distributed:
            return
        self.store = dist.distributed_c10d._get_default_store()
        # torchrun --max_restarts: a restarted run must not read the failure that ended the previous attempt
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.count_key = f"facenet_failure/{attempt}/count"
        self.failure_key = f"facenet_failure/{attempt}/first"
        self._thread = threading.Thread(
            target=self._watch, args=(poll_seconds,), name="failure-watch", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> FailureWatch:
        return self

    def __exit__(self, *exc) -> bool:
        self._done.set()
        return False

    def report(self, error: BaseException, status: int) -> Failure | None:
        """Record this process's failure, unless another process's came first, and return the run's first
        failure (None in a single process); `announce` prints it."""
        if self.store is None:
            return None
        self._reporting = True  # from now on this process ends by its own failure, not by the watcher
        known = user_error(error)
        message = known[1] if known is not None else one_line(error)
        own = Failure(self.rank, message or type(error).__name__, status)
        try:
            if self.store.add(self.count_key, 1) == 1:
                self.store.set(self.failure_key, json.dumps(vars(own)))
                first = own
            else:  # another process failed first: this failure is most likely its consequence
                first = self._read_first()
        except Exception:  # noqa: BLE001 - the store is gone (its host exited): only our own to tell
            first = own
        return first

    def announce(self, failure: Failure) -> None:
        """Print ``error: rank R: message`` on stderr, once per process."""
        self._print_once(failure)

    def _read_first(self) -> Failure:
        self.store.wait([self.failure_key], timedelta(seconds=30))
        return Failure(**json.loads(self.store.get(self.failure_key)))

    def _print_once(self, failure: Failure) -> bool:
        with self._lock:
            if self._printed:
                return False
            self._printed = True
        print(failure.line, file=sys.stderr, flush=True)
        return True

    def _watch(self, poll_seconds: float) -> None:
        while not self._done.wait(poll_seconds):
            try:
                if self._reporting or self.store.add(self.count_key, 0) == 0:
                    continue
                failure = self._read_first()
            except Exception:  # noqa: BLE001 - the store went away: the run is ending anyway
                return
            if self._reporting or self._done.is_set():
                return
            self._print_once(failure)
            os._exit(failure.status)  # the main thread may be blocked in a collective: end here
