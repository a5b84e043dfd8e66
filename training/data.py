"""Training data plumbing: the image CSV, each process's share of an epoch, and the DataLoader."""

from __future__ import annotations

import argparse
import atexit
import itertools
import multiprocessing
import signal
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datasets.generate_csv_files import generate_csv
from datasets.image_files import is_recordio
from datasets.transforms import ToNormalizedTensor, mean_and_std
from devices import usable_workers
from errors import InputError
from training.runtime import Runtime, barrier, epoch_seed, log


def ensure_dataset_csv(args: argparse.Namespace, runtime: Runtime) -> str | None:
    """The training CSV: ``--dataset_csv``, or one listed now from ``--dataroot`` into the output folder;
    None for a ``.rec``, whose index lists it already."""
    if is_recordio(args.dataroot):
        return None
    if args.dataset_csv is not None:
        return args.dataset_csv
    csv_path = Path(args.output_dir) / "dataset.csv"
    if runtime.is_main and not csv_path.is_file():
        summary = generate_csv(args.dataroot, csv_path)
        log.info(
            f"listed {summary.num_images} images of {summary.num_identities} identities in {csv_path}"
            + (f" ({summary.num_skipped_files} other files skipped)" if summary.num_skipped_files else "")
        )
    barrier(runtime)
    return str(csv_path)


def classifier_classes(dataset, args: argparse.Namespace) -> int:
    """The identities a classifier over ``dataset`` has (center and margin losses): at least 2, or an InputError
    naming the data."""
    if dataset.num_classes < 2:
        raise InputError(
            f"--dataroot {args.dataroot}: {dataset.num_classes} identity; training a classifier needs at least 2"
        )
    return dataset.num_classes


def shard_length(num_items: int, world_size: int, block: int = 1) -> int:
    """Items in each process's share: ``num_items // world_size``, and with several processes rounded down to
    whole blocks (when a share holds one), so that every share starts at a multiple of ``block``."""
    share = num_items // world_size
    if world_size > 1 and share >= block:
        share -= share % block
    return share


class ShardSampler(Sampler[int]):
    """This process's share of ``range(num_items)`` for one epoch, from item ``start`` of the share on.

    Shares are contiguous and of equal length (``shard_length``: what does not divide evenly is dropped),
    so every process runs the same number of steps. With ``block`` (the batch size) every share starts at
    a multiple of it, so blocks of consecutive items (triplets drawn from a few identities per batch) stay
    in one batch on every process. With ``shuffle`` the order is a permutation drawn from ``seed`` alone,
    the same on every process.
    """

    def __init__(
        self,
        num_items: int,
        rank: int,
        world_size: int,
        start: int = 0,
        shuffle=False,
        seed=0,
        block: int = 1,
    ):
        self.num_items, self.rank, self.world_size = num_items, rank, world_size
        self.start, self.shuffle, self.seed = start, shuffle, seed
        self.share = shard_length(num_items, world_size, block)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(
                self.num_items, generator=torch.Generator().manual_seed(self.seed)
            ).tolist()
        else:
            order = range(self.num_items)
        share = order[self.rank * self.share : (self.rank + 1) * self.share]
        return iter(share[self.start :])

    def __len__(self) -> int:
        return self.share - self.start


class SkipBatches(Sampler[list[int]]):
    """A batch sampler without its first ``start`` batches (to continue an interrupted epoch)."""

    def __init__(self, batch_sampler, start: int):
        self.batch_sampler, self.start = batch_sampler, start

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.start, None)

    def __len__(self) -> int:
        return len(self.batch_sampler) - self.start


class DistinctRepeats(Sampler[list]):
    """A batch sampler whose repeated indices within a batch become ``(index, n)`` for the n-th repeat.

    P x K batches repeat the images of identities with fewer than K (LFW-like data has many); seeded by the
    index alone (``SeededSamples``), each repeat would be the same pixels, a positive at distance 0 that
    teaches nothing. Keyed apart, each repeat is its own augmentation of the image; first occurrences stay
    plain indices, so batches without repeats load exactly as before.
    """

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler

    def __iter__(self):
        for batch in self.batch_sampler:
            seen: dict[int, int] = {}
            keyed = []
            for index in batch:
                repeat = seen.get(index, 0)
                seen[index] = repeat + 1
                keyed.append((index, repeat) if repeat else index)
            yield keyed

    def __len__(self) -> int:
        return len(self.batch_sampler)


def shuffled_steps(num_items: int, batch_size: int, runtime: Runtime) -> int:
    """Steps of an epoch over every item once (each process a share; the last batch may be short, but never a
    single image: batch norm cannot train on one, so such an image waits for the next epoch)."""
    share = shard_length(num_items, runtime.world_size)
    steps = share // batch_size if ends_on_single_image(share, batch_size) else -(-share // batch_size)
    if steps == 0:
        over = f" over {runtime.world_size} processes leave {share} each" if runtime.world_size > 1 else ""
        raise InputError(
            f"--dataroot has too few training images: {num_items}{over}; a step needs at least 2"
        )
    return steps


def ends_on_single_image(share: int, batch_size: int) -> bool:
    """Whether batches of ``batch_size`` over ``share`` items would end on a batch of one."""
    return share % batch_size == 1


def shuffled_batches(dataset, args: argparse.Namespace, runtime: Runtime, epoch: int, start_step: int):
    """The loader of an epoch over every item once, in an order drawn from (seed, epoch), this process's
    share, from batch ``start_step`` on (without a last batch of one image, as ``shuffled_steps``)."""
    sampler = ShardSampler(
        len(dataset),
        runtime.rank,
        runtime.world_size,
        start=start_step * args.batch_size,
        shuffle=True,
        seed=epoch_seed(args.seed, epoch),
    )
    drop_last = ends_on_single_image(sampler.share, args.batch_size)
    return make_loader(
        dataset, args, runtime, epoch, sampler=sampler, batch_size=args.batch_size, drop_last=drop_last
    )


class ImagesToDevice:
    """Workers send uint8 batches (pinned when the device is a GPU); here they are copied without blocking,
    then converted and normalised on the device, channels_last. The same arithmetic as the CPU transform.

    ``normalization`` is the run's ``{"mean": [...], "std": [...]}`` (``args.normalization``: that of the
    checkpoint it starts from or resumes); None normalises with the default 0.5, 0.5.
    """

    def __init__(self, device: torch.device, normalization: dict | None = None):
        self.device = device
        self.normalize = ToNormalizedTensor(*mean_and_std(normalization)).to(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = self.normalize(images.to(self.device, non_blocking=True))
        return images.contiguous(memory_format=torch.channels_last)


def stack_triplets(samples) -> torch.Tensor:
    """Collate (anchor, positive, negative) samples into one (3B, C, H, W) batch, anchors first, in the
    worker: the pinned buffer is then the one copied to the device, with no concatenation after it."""
    anchors, positives, negatives = zip(*samples, strict=True)
    return torch.stack([*anchors, *positives, *negatives])


class SeededSamples(Dataset):
    """``dataset[index]`` with the random augmentation drawn from a generator seeded by (seed, epoch, index).

    So a sample is augmented the same whichever worker loads it and whatever was loaded before: an epoch
    resumed mid-way, with any number of workers, sees exactly the images of the uninterrupted run. An item
    ``(index, n)`` (``DistinctRepeats``) is the n-th repeat of ``index`` in its batch, with its own draw.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, repeat = item if isinstance(item, tuple) else (item, 0)
        # the CPU generator alone (torch.manual_seed would seed CUDA too, 30x slower), restored afterwards
        generator = torch.default_generator
        saved = generator.get_state()
        # (torch's CPU generator keeps 32 bits of the seed: a repeat moves it by a large odd step, far from the
        # neighbouring indices' seeds; manual_seed takes at most 64 bits, which a large --seed passes)
        generator.manual_seed((self.seed * 1_000_003 + int(index) + int(repeat) * 1_000_000_007) % 2**64)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(saved)


def make_loader(dataset, args: argparse.Namespace, runtime: Runtime, epoch: int, **sampling) -> DataLoader:
    """A DataLoader over ``dataset`` whose augmentation depends only on (seed, epoch, sample index)."""
    workers = usable_workers(args.num_workers, runtime.local_world_size)
    if workers:
        kill_workers_at_exit()
    return DataLoader(
        SeededSamples(dataset, epoch_seed(args.seed, epoch)),
        num_workers=workers,
        pin_memory=runtime.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(epoch_seed(args.seed, epoch)),
        worker_init_fn=ignore_stop_signals if workers else None,
        **sampling,
    )


def kill_workers_at_exit() -> None:
    """Make sure data workers cannot outlive the main process's exit.

    Workers ignore SIGTERM (`ignore_stop_signals`), and the SIGTERM is all multiprocessing's own exit hook
    sends them before it waits for them. When the main process exits on an error raised while its workers
    were loading (a worker's bad image, say), the DataLoader iterator can still be held by the error's
    traceback, so it never tells them to stop: the process printed its error and then waited for them for
    ever. This hook, registered after multiprocessing's and so run before it, kills them instead (they hold
    nothing worth keeping)."""
    if not getattr(kill_workers_at_exit, "registered", False):
        atexit.register(_kill_daemonic_children)
        kill_workers_at_exit.registered = True


def _kill_daemonic_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave SIGINT / SIGTERM to the main process, which finishes its step and checkpoints.

    A cluster's SIGTERM (or a Ctrl-C) reaches every process of the job, the workers included; a worker that
    took it (the main process's handler is inherited through fork) would die, and the main process would
    then fail on "DataLoader worker exited unexpectedly" instead of writing its checkpoint. A worker still
    ends with the main process (the DataLoader shuts it down, or it notices its parent is gone).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
