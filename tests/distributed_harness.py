"""Runs a training script (under torchrun or alone) with test-only faults chosen by environment variables.

    python tests/distributed_harness.py train_triplet.py --dataroot ...

- HARNESS_CLOCK_OFFSET_RANK=r: that rank's clock runs one second ahead (time.time).
- HARNESS_FAIL=r:n: rank r raises ValueError("injected failure") in its n-th loss computation (for
  train_margin.py, before the sharded classifier's collectives, which the other ranks are then inside).
- HARNESS_FAIL_LOAD=r:n: rank r's n-th sample raises ValueError("unreadable image") as it is loaded (before
  the forward, whose DDP broadcast the other ranks are then inside).
- HARNESS_KILL=r:n: rank r kills itself with SIGKILL at its n-th loss computation (no chance to checkpoint).
- HARNESS_ATTEMPT=a: the faults above only in torchrun's restart attempt a (TORCHELASTIC_RESTART_COUNT).
- HARNESS_READY_DIR=d: each rank writes d/rank<r>.pid at its first loss computation.
- HARNESS_STEP_SLEEP=s: each loss computation sleeps s seconds first (so a signal lands mid-epoch).
- HARNESS_DUMP_DIR=d: after training, each rank writes d/rank<r>.pt: its model parameters and the dataset
  indices it loaded.
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import losses.center_loss  # noqa: E402
import losses.partial_fc  # noqa: E402
import losses.triplet_loss  # noqa: E402
import training.data  # noqa: E402
import training.engine  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
calls = []
loaded_indices = []


def rank_and_count(variable):
    value = os.environ.get(variable)
    attempt = os.environ.get("HARNESS_ATTEMPT")
    if not value or (attempt is not None and attempt != os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")):
        return None
    rank, count = value.split(":")
    return int(rank), int(count)


def on_loss_call():
    calls.append(1)
    if os.environ.get("HARNESS_STEP_SLEEP"):
        time.sleep(float(os.environ["HARNESS_STEP_SLEEP"]))
    ready = os.environ.get("HARNESS_READY_DIR")
    if ready and len(calls) == 1:
        Path(ready, f"rank{RANK}.pid").write_text(str(os.getpid()))
    if rank_and_count("HARNESS_FAIL") == (RANK, len(calls)):
        raise ValueError("injected failure")
    if rank_and_count("HARNESS_KILL") == (RANK, len(calls)):
        os.kill(os.getpid(), signal.SIGKILL)


def wrap(cls, name, before):
    real = getattr(cls, name)

    def wrapped(self, *args, **kwargs):
        before(self, *args, **kwargs)
        return real(self, *args, **kwargs)

    setattr(cls, name, wrapped)


if os.environ.get("HARNESS_CLOCK_OFFSET_RANK") == str(RANK):
    real_time = time.time
    time.time = lambda: real_time() + 1.0

wrap(losses.triplet_loss.TripletLoss, "forward", lambda self, *a, **k: on_loss_call())
wrap(losses.triplet_loss.TripletLoss, "over_batch", lambda self, *a, **k: on_loss_call())  # batch-all
wrap(losses.center_loss.CenterLoss, "forward", lambda self, *a, **k: on_loss_call())
wrap(losses.partial_fc.CosineClassifier, "forward", lambda self, *a, **k: on_loss_call())


def on_load(self, index):
    loaded_indices.append(int(index))
    if rank_and_count("HARNESS_FAIL_LOAD") == (RANK, len(loaded_indices)):
        raise ValueError("unreadable image")


wrap(training.data.SeededSamples, "__getitem__", on_load)

real_fit = training.engine.Trainer.fit


def fit_then_dump(self):
    status = real_fit(self)
    dump = os.environ.get("HARNESS_DUMP_DIR")
    if dump:
        # parameters, not buffers: DDP broadcasts rank 0's batch-norm statistics at each forward, but the
        # last forward leaves each rank's own (rank 0's are the ones checkpointed)
        parameters = {name: value.detach() for name, value in self.task.model.named_parameters()}
        state = {"model": parameters, "indices": loaded_indices}
        torch.save(state, Path(dump) / f"rank{RANK}.pt")
    return status


training.engine.Trainer.fit = fit_then_dump

script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(str(REPO / script), run_name="__main__")
