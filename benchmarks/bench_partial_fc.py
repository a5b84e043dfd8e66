"""Memory and step time of the sharded, sampled cosine classifier (losses/partial_fc.py), on the CPU with gloo.

    python benchmarks/bench_partial_fc.py                                  # 360k x 512, 1 and 2 processes,
                                                                           # sample rate 1.0 and 0.1
    python benchmarks/bench_partial_fc.py --num_classes 100000 --steps 5 --world_sizes 1 2 4

Each configuration runs in fresh processes (W of them, on 127.0.0.1 with gloo; the machine's cores split
between them). A step is what training does to the classifier: random unit embeddings (``--batch_size`` per
process) and random labels, forward (all-gather, logits, margin, distributed softmax cross-entropy), backward,
``PartialSGD.step`` (momentum 0.9, weight decay 5e-4) and ``zero_grad``; the backbone is left out. The step
time is the median over ``--steps`` timed steps (after one warm-up) of the slowest rank's time.

Memory per process is computed from the tensors: the weight shard, its gradient (dense, the shard's size, also
when sampling: zeros in the rows not sampled) and the momentum buffer, each ``shard_size x embedding_dim x 4``
bytes. The peak resident set size of the process (torch itself included) is printed next to it; it also holds
the step's temporaries (the normalised weight, the logits and their gradient).

Compute: the logits matmul costs 2 * N * d * k FLOPs forward and twice that backward (gradients with respect to
the embeddings and the centers), N the global batch, k the centers a rank keeps. Sampling divides k by about
1 / sample_rate; the table prints the FLOPs per process and per step and the share saved against rate 1.0.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from losses.partial_fc import CosineClassifier, PartialSGD  # noqa: E402

MOMENTUM, WEIGHT_DECAY, LR = 0.9, 5e-4, 0.1
PROCESS_TIMEOUT_S = 600


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_classes", type=int, default=360_000)
    parser.add_argument("--embedding_dim", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=128, help="embeddings per process and step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--world_sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sample_rates", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, split over ranks")
    return parser


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_rank(rank: int, world_size: int, port: int, args: argparse.Namespace, rate: float, results) -> None:
    torch.set_num_threads(max(1, args.threads // world_size))
    if world_size > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=PROCESS_TIMEOUT_S),
        )
    torch.manual_seed(rank)
    classifier = CosineClassifier(args.num_classes, args.embedding_dim, sample_rate=rate, seed=0)
    optimizer = PartialSGD(classifier, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(1000 + rank)
    times, kept, state_bytes = [], [], 0
    for step in range(args.steps + 1):
        embeddings = torch.randn(args.batch_size, args.embedding_dim, generator=generator)
        labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator)
        if world_size > 1:
            dist.barrier()
        start = time.perf_counter()
        loss = classifier(embeddings, labels)
        loss.backward()
        kept.append(len(classifier.updated_rows))
        # weight, its (dense) gradient and the momentum buffer, as they stand before zero_grad frees the gradient
        optimizer.step()
        tensors = (classifier.weight, classifier.weight.grad, optimizer.momentum_buffer())
        state_bytes = max(state_bytes, sum(t.numel() * t.element_size() for t in tensors))
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if step:  # the first step warms up (allocations, momentum buffer)
            times.append(elapsed)
    if world_size > 1:
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times = slowest.tolist()
        dist.destroy_process_group()
    results.put(
        {
            "rank": rank,
            "shard_size": classifier.shard_size,
            "kept": statistics.median(kept[1:]),
            "state_bytes": state_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_times": times,
            "loss": float(loss),
        }
    )


def run_config(args: argparse.Namespace, world_size: int, rate: float) -> list[dict]:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    port = free_port()
    processes = [
        context.Process(target=run_rank, args=(rank, world_size, port, args, rate, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=PROCESS_TIMEOUT_S)
        if process.is_alive():
            process.kill()
    if any(process.exitcode != 0 for process in processes):
        raise RuntimeError(f"a rank failed (world size {world_size}, sample rate {rate})")
    return sorted((results.get() for _ in processes), key=lambda result: result["rank"])


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f}"


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    command = "python benchmarks/bench_partial_fc.py " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    rows, full_flops = [], {}
    for world_size in args.world_sizes:
        for rate in args.sample_rates:
            results = run_config(args, world_size, rate)
            global_batch = world_size * args.batch_size
            kept = max(result["kept"] for result in results)
            flops = 6 * global_batch * args.embedding_dim * kept
            if rate == 1.0:
                full_flops[world_size] = flops
            saved = 1 - flops / full_flops[world_size] if world_size in full_flops else float("nan")
            rows.append(
                "| {} | {} | {} | {:.0f} | {} | {} | {:.3f} | {:.1f} | {:.0%} |".format(
                    world_size,
                    rate,
                    results[0]["shard_size"],
                    kept,
                    gib(max(result["state_bytes"] for result in results)),
                    gib(max(result["peak_rss_bytes"] for result in results)),
                    statistics.median(results[0]["step_times"]),
                    flops / 1e9,
                    saved,
                )
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print()
    print(f"`{command.strip()}`")
    print(
        f"\n{args.num_classes:,} classes x {args.embedding_dim}, batch {args.batch_size} per process, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, median of {args.steps} steps\n"
    )
    print(
        "| processes | sample rate | classes per process | centers kept | weight + grad + momentum (GiB) "
        "| peak RSS (GiB) | step (s) | logits GFLOP per process, fwd+bwd | compute saved |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
