"""Fine-tuning a trained model on new people against training from scratch, with the same budget.

    python benchmarks/bench_finetune.py                    # about 10 CPU minutes, half of it the base model
    python benchmarks/bench_finetune.py --epochs 6 --seeds 0 1 --work_dir /tmp/finetune

1. The base model: `train_triplet.py --demo` (the demo's defaults: ResNet-18 at 64 px, two epochs) on the demo
   identities (demo_data/, generator seed 0). A base checkpoint already in --work_dir is reused.
2. "Your own people": a second synthetic dataset drawn with generator seed 1, so none of its identities is a
   demo identity: --new_identities x --new_images training images, and LFW-like pairs (ten folds) over 200
   more new identities, which no run trains on.
3. The arms, each run by `train_triplet.py` itself on the new training images for --epochs epochs of
   --num_triplets_train triplets (the same steps, data order and seed for all): from scratch
   (`--model resnet18 --image_size 64`); fine-tuned (`--init_from` the base checkpoint) with the same recipe
   (Adam, lr 1e-3); fine-tuned at lr 1e-4; and that with the head alone for the first epoch
   (`--freeze_backbone_epochs 1`).
   Accuracy on the new pairs after each epoch is the run's own validation (its training_log.csv); epoch 0 is
   the starting model: the base checkpoint, or an untrained ResNet-18 drawn from the run's seed.

Writes benchmarks/results/finetune.md, finetune.json and finetune_curves.png (--output_dir to change).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

import eval_metrics
import train_triplet
from datasets.lfw_dataset import LFWDataset
from demo.make_demo_dataset import make_demo_dataset
from inference import load_checkpoint
from models import build_model
from verification import evaluate_model_on_lfw

REPO = Path(__file__).resolve().parent.parent
# every arm: Adam, lr 1e-3 unless it says otherwise (the training scripts' default)
ARMS = {
    "from scratch": ["--model", "resnet18", "--image_size", "64"],
    "fine-tune (lr 1e-3)": ["--init_from", "{base}"],
    "fine-tune, lr 1e-4": ["--init_from", "{base}", "--lr", "1e-4"],
    "fine-tune, lr 1e-4, head first": [
        "--init_from",
        "{base}",
        "--lr",
        "1e-4",
        "--freeze_backbone_epochs",
        "1",
    ],
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every arm")
    parser.add_argument("--num_triplets_train", type=int, default=640, help="triplets per epoch (batch_all)")
    parser.add_argument("--new_identities", type=int, default=40, help="new people to train on")
    parser.add_argument("--new_images", type=int, default=10, help="training images per new person")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of every arm")
    parser.add_argument("--work_dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--output_dir", type=Path, default=REPO / "benchmarks" / "results")
    return parser


def train(argv: list[str]) -> float:
    """Run train_triplet.py in this process; its wall-clock seconds."""
    started = time.perf_counter()
    status = train_triplet.main([str(a) for a in argv])
    if status != 0:
        raise SystemExit(f"train_triplet.py {' '.join(map(str, argv))} exited with {status}")
    return time.perf_counter() - started


def base_checkpoint(work_dir: Path) -> Path:
    """The demo run's last checkpoint (trained now unless --work_dir holds it)."""
    output = work_dir / "base_demo"
    checkpoint = output / "checkpoints" / "model_resnet18_triplet_epoch_2.pt"
    if not checkpoint.is_file():
        train(["--demo", "--output_dir", output])
    return checkpoint


def accuracy_of(model, pairs: LFWDataset) -> float:
    metrics, _ = evaluate_model_on_lfw(
        model.eval(), pairs, torch.device("cpu"), batch_size=128, progress=False
    )
    return float(eval_metrics.metrics_summary(metrics)["accuracy_mean"])


def starting_accuracies(base: Path, new, seed: int) -> dict[str, float]:
    """Accuracy on the new pairs before any step: the base checkpoint, and an untrained ResNet-18."""
    loaded = load_checkpoint(base)
    tuned = accuracy_of(loaded.model, LFWDataset(new.lfw_dir, new.pairs_path, transform=loaded.transform()))
    torch.manual_seed(seed)
    scratch = accuracy_of(
        build_model("resnet18", 128), LFWDataset(new.lfw_dir, new.pairs_path, transform=loaded.transform())
    )
    return {arm: scratch if arm == "from scratch" else tuned for arm in ARMS}


def arm_argv(arm: str, new, output: Path, base: Path, args, seed: int) -> list[str]:
    """The command line of one arm: the same data, budget and seed for all."""
    common = [
        "--dataroot", new.train_dir, "--lfw", new.lfw_dir, "--lfw_pairs", new.pairs_path,
        "--output_dir", output, "--epochs", args.epochs, "--num_triplets_train", args.num_triplets_train,
        "--batch_size", 32, "--num_workers", 2, "--lfw_batch_size", 128, "--seed", seed,
    ]  # fmt: skip
    return [*common, *(value.format(base=base) for value in ARMS[arm])]


def read_accuracies(output: Path) -> tuple[list[float], list[float]]:
    with (output / "training_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return [float(r["accuracy_mean"]) for r in rows], [float(r["accuracy_std"]) for r in rows]


def run_arms(args, work_dir: Path, base: Path, new) -> list[dict]:
    records = []
    for seed in args.seeds:
        start = starting_accuracies(base, new, seed)
        for arm in ARMS:
            output = work_dir / f"{re.sub('[^a-z0-9]+', '_', arm).strip('_')}_seed{seed}"
            argv = [str(a) for a in arm_argv(arm, new, output, base, args, seed)]
            saved = output / "bench_record.json"
            if saved.is_file() and json.loads(saved.read_text())["argv"] == argv:
                records.append(json.loads(saved.read_text()))  # run already, in this --work_dir
                continue
            seconds = train(argv)
            accuracies, stds = read_accuracies(output)
            records.append(
                {"arm": arm, "seed": seed, "accuracies": [start[arm], *accuracies], "stds": [None, *stds],
                 "wall_seconds": round(seconds, 1), "argv": argv}
            )  # fmt: skip
            saved.write_text(json.dumps(records[-1], indent=1) + "\n")
    return records


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for index, arm in enumerate(ARMS):
            curves = np.array([r["accuracies"] for r in records if r["arm"] == arm]) * 100
            ax.plot(range(curves.shape[1]), curves.mean(axis=0), marker="o", color=f"C{index}", label=arm)
        seeds = len({r["seed"] for r in records})
        ax.set(
            xlabel="epoch on the new people",
            ylabel="accuracy on their pairs (%)",
            xticks=range(curves.shape[1]),
        )
        ax.set_title(f"New synthetic people: from the demo model vs from scratch (mean of {seeds} seed(s))")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
        fig.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def table(records: list[dict], epochs: int) -> list[str]:
    """Markdown: one row per arm, accuracy (mean over seeds) after each epoch."""
    header = "| arm | " + " | ".join(f"epoch {e}" for e in range(epochs + 1)) + " |"
    lines = [header, "|---|" + "---:|" * (epochs + 1)]
    for arm in ARMS:
        rows = [r for r in records if r["arm"] == arm]
        means = np.mean([r["accuracies"] for r in rows], axis=0) * 100
        cells = [f"{value:.1f}%" for value in means]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def describe(args, new_params: dict) -> str:
    seeds = ", ".join(map(str, args.seeds))
    return " ".join(
        [
            "Base model: `train_triplet.py --demo` (ResNet-18, 64 px, 2 epochs on the 160 demo identities).",
            f"New people: the demo generator with seed 1 ({new_params['new_identities']} identities x",
            f"{new_params['new_images']} training images; 600 pairs over 200 other new identities, ten folds).",
            f"Each arm: `train_triplet.py` on the new images, {args.epochs} epochs x {args.num_triplets_train}",
            "triplets (batch_all, batch 32, Adam at lr 1e-3 unless the arm says otherwise), training seed(s)",
            f"{seeds}. Accuracy on the new pairs (mean of ten folds); epoch 0 is the starting model (the base",
            "checkpoint; for the scratch arm an untrained ResNet-18). Every arm runs the same steps; the",
            "head-first arm's frozen epoch is cheaper (no backward pass through the backbone).",
        ]
    )


def write_results(records: list[dict], args, new_params: dict, command: str, work_dir: Path) -> None:
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.json").write_text(
        json.dumps({"new_people": new_params, "runs": records}, indent=1) + "\n"
    )
    plot(records, out / "finetune_curves.png")
    text = [
        "# Fine-tuning on new people vs training from scratch",
        "",
        f"`{command}`",
        "",
        describe(args, new_params),
        "",
        *table(records, args.epochs),
        "",
        f"Commands of each arm (seed {args.seeds[0]}; WORK is the --work_dir):",
        "",
        *[
            f"- {r['arm']}: `train_triplet.py {' '.join(r['argv'])}`".replace(str(work_dir), "WORK")
            for r in records
            if r["seed"] == args.seeds[0]
        ],
        "",
    ]
    (out / "finetune.md").write_text("\n".join(text))


def result_flags(argv: list[str]) -> list[str]:
    """The flags that decide the results: all but where files go (--work_dir, --output_dir)."""
    kept, skip = [], False
    for value in argv:
        if value in ("--work_dir", "--output_dir"):
            skip = True
        elif skip:
            skip = False
        else:
            kept.append(value)
    return kept


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    command = " ".join(["python benchmarks/bench_finetune.py", *result_flags(argv or [])])
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as temporary:
        work_dir = args.work_dir or Path(temporary)
        base = base_checkpoint(work_dir)
        new = make_demo_dataset(
            work_dir / f"new_people_{args.new_identities}x{args.new_images}",
            seed=1,
            num_train_identities=args.new_identities,
            images_per_identity=args.new_images,
            num_workers=2,
        )
        records = run_arms(args, work_dir, base, new)
    new_params = {"new_identities": args.new_identities, "new_images": args.new_images, "generator_seed": 1}
    write_results(records, args, new_params, command, work_dir)
    print("\n".join(table(records, args.epochs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
