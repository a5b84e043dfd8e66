"""Face verification with a model: embed every image of a pairs dataset once, then run the 10-fold protocol.

Each unique image is embedded once (7,701 forward passes for the standard 6,000 LFW pairs, not 12,000), pair
distances come from the stored embeddings, and `eval_metrics.evaluate_lfw` does the rest. The trainer's
per-epoch validation and validate_on_LFW.py both call `evaluate_model_on_lfw`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import eval_metrics
from errors import InputError
from inference import embed_images


def embed_dataset(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    flip: bool = False,
    progress: bool = True,
) -> torch.Tensor:
    """(N, D) float32 CPU embeddings of every item of ``loader.dataset``; row i belongs to item i.

    The loader yields ``(images, indices)``, so any sampler order (or a distributed split) lands in the
    right rows. The model runs in eval mode and gets its previous mode back afterwards.
    """
    device = torch.device(device)
    num_items = len(loader.dataset)
    embeddings: torch.Tensor | None = None
    filled = torch.zeros(num_items, dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
        ):
            for images, indices in tqdm(loader, desc="embedding", unit="batch", disable=not progress):
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                batch_embeddings = embed_images(model, images, flip).cpu()
                if embeddings is None:
                    embeddings = torch.empty(num_items, batch_embeddings.shape[1], dtype=torch.float32)
                embeddings[indices] = batch_embeddings
                filled[indices] = True
    finally:
        model.train(was_training)
    if embeddings is None or not bool(filled.all()):
        missing = num_items - int(filled.sum())
        raise RuntimeError(f"the loader yielded no embeddings for {missing} of {num_items} dataset items")
    return embeddings


class NonFiniteEmbeddings(InputError):
    """The model gave NaN or inf embeddings (its weights, or a precision too narrow for its activations)."""


def check_finite_embeddings(embeddings: torch.Tensor, amp_dtype: torch.dtype | None) -> None:
    """A NaN or inf embedding makes every distance it enters meaningless: name how many, not a later symptom."""
    bad = int((~torch.isfinite(embeddings).all(dim=1)).sum())
    if bad:
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(amp_dtype, "fp32")
        hint = "; try --amp off" if amp_dtype is not None else ""
        raise NonFiniteEmbeddings(
            f"the model's embeddings of {bad} of {len(embeddings)} images are not finite (NaN or inf) "
            f"in {precision}{hint}"
        )


def distances_of_pairs(embeddings, pairs) -> np.ndarray:
    """float64 Euclidean distance of each pair; ``pairs`` is (num_pairs, 2) row indices into ``embeddings``."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    embeddings = np.asarray(embeddings, dtype=np.float64)
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape (num_pairs, 2), got {pairs.shape}")
    return np.linalg.norm(embeddings[pairs[:, 0]] - embeddings[pairs[:, 1]], axis=1)


def check_pair_labels(issame, target: str) -> None:
    """An InputError naming ``target`` when its pairs cannot be evaluated (all of one kind, or fewer than two
    of each): checked before any image is embedded."""
    issame = np.asarray(issame, dtype=bool)
    same, different = int(issame.sum()), int((~issame).sum())
    if same < 2 or different < 2:
        raise InputError(
            f"{target}: {same} same-person and {different} different-person pairs; the protocol needs at least "
            "2 of each"
        )


def evaluate_model_on_lfw(
    model: nn.Module,
    dataset,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    flip: bool = False,
    progress: bool = True,
) -> tuple[eval_metrics.LFWMetrics, np.ndarray]:
    """Metrics and per-pair distances of ``model`` on a pairs dataset (an `LFWDataset`: ``pairs``, ``issame``).

    The folds are the dataset's own (``num_folds`` and ``fold_of_pair``), which stay the official ones when
    pairs with missing images were dropped; pairs without folds (a pairs file without a header, or with one
    fold) get ten holding both kinds, the folds a .bin written from the same file is evaluated in
    (`eval_metrics.stratified_fold_ids`).
    """
    device = torch.device(device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    embeddings = embed_dataset(model, loader, device, amp_dtype=amp_dtype, flip=flip, progress=progress)
    check_finite_embeddings(embeddings, amp_dtype)
    distances = distances_of_pairs(embeddings, dataset.pairs)
    num_folds = getattr(dataset, "num_folds", 10)
    if num_folds < 2:
        fold_ids = eval_metrics.stratified_fold_ids(dataset.issame)
    else:
        fold_ids = getattr(dataset, "fold_of_pair", None)
    metrics = eval_metrics.evaluate_lfw(distances, dataset.issame, num_folds=num_folds, fold_ids=fold_ids)
    return metrics, distances
