"""A cosine classifier with margin softmax, its classes sharded over ranks and optionally sampled (PartialFC).

PartialFC: An et al., "Partial FC: Training 10 Million Identities on a Single Machine" (2021,
https://arxiv.org/abs/2010.05222) and "Killing Two Birds with One Stone: Efficient and Robust Training of Face
Recognition CNNs by Partial FC" (2022, https://arxiv.org/abs/2203.15565). Margins: ``losses.margin_softmax``
(ArcFace https://arxiv.org/abs/1801.07698, CosFace https://arxiv.org/abs/1801.09414).

How a step works, with world size W (W = 1 without torch.distributed):

1. Sharding. Rank r owns the contiguous classes ``shard_range(num_classes, W, r)``: the first
   ``num_classes % W`` ranks hold one class more than the others. ``weight`` is that shard, a Parameter of
   this module only; DDP must not see it (keep the classifier out of the DDP-wrapped module).
2. Every rank all-gathers the unit embeddings and labels of the whole (global) batch of N samples.
3. Sampling (``sample_rate < 1``, training mode only): each rank keeps every class of its shard that is a
   label in the global batch, plus a uniform random subset of its other classes, ``max(num_positives,
   round(sample_rate * shard_size), 1)`` in all; the randomness comes from a generator seeded with
   (``seed``, ``sample_step``, first class of the shard), so a run is reproducible and resumes exactly
   (``sample_step`` counts the sampled forwards and is saved in ``state_dict``). The initial centers are
   N(0, 0.01^2) drawn from ``seed`` in fixed blocks of classes: the same full weight for any W.
4. Cosine logits of all N embeddings against the kept centers (both L2-normalised, no bias), the margin on
   the targets that fall in this shard, in float32 at least and outside autocast.
5. Softmax cross-entropy across ranks: all-reduced row max, sum of exponentials and target logit. The
   gradient with respect to this shard's logits is exactly ``(softmax - onehot) / N``.

What forward returns and where gradients go. The loss is the mean cross-entropy over the GLOBAL batch, the
same value on every rank. Each center gets exactly d(global mean)/d(center). The embeddings' gradient: the
backward of the all-gather sums the gathered gradients over ranks and keeps this rank's rows, which is
d(global mean)/d(embedding); it is then multiplied by W, because DDP *averages* the backbone's gradients over
the W ranks. So, with the backbone in DDP, the backbone's gradient is exactly that of the single-process
loss over the whole global batch (tests/test_margin_losses.py checks both to 1e-10). Do not use the
classifier with W > 1 on a backbone that DDP does not average (its gradients would be W times too large).

Optimizer. The centers use ``PartialSGD`` (SGD with momentum, weight decay, optionally Nesterov), which steps
only the rows the forwards since its last step used: with sampling, PartialFC's rule that a center not
sampled is untouched (no weight decay, no momentum drift, its momentum buffer kept as it was); without
sampling, every row, exactly as ``torch.optim.SGD``. The gradient is an ordinary dense ``weight.grad`` (zeros
in the rows not sampled), so GradScaler's unscale and inf check work as usual (both see this rank's shard
only, as would a gradient-norm clip).

Centers as moving averages (``center_momentum`` m, optional). Instead of being learned by the optimizer,
each center of this shard that is a label in the global batch moves after the step's loss is computed:
``c <- normalize(m * c / |c| + (1 - m) * u)``, with u the normalised sum of that class's unit embeddings in
the batch (their mean direction); the weight then takes no gradient and the optimizer leaves it alone. This is
the prototype memory of Smirnov et al., "Prototype Memory for Large-scale Face Representation Learning"
(2021, https://arxiv.org/abs/2105.02103): with few images per identity a center learned by SGD sees too few
updates to be worth much, while an average of the embeddings is one as soon as the class is seen. Every rank
updates its own shard from the gathered global batch, so W ranks move the centers as one process would. The
centers then need no optimizer (leave them out of GradScaler's: it refuses an optimizer without gradients).

Device syncs: forward checks the labels' range (one sync), gathers the ranks' batch sizes when W > 1 (one),
sampling needs the number of positives (a few), and moving the centers one more.

Checkpoints. ``state_dict()`` holds this rank's shard. To move between world sizes, ``full_state_dict`` (a
collective call) gathers the full weight and the full momentum to rank 0, and ``load_full_state_dict``, called
on every rank with the same full state, keeps each rank's rows: a checkpoint written with W processes resumes
with W'.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .margin_softmax import DEFAULT_SCALE, LOSS_MARGINS, fallback_threshold, margin_logits

INIT_STD = 0.01  # centers start as N(0, 0.01^2); only their direction matters to the logits
INIT_CHUNK = 4096  # classes drawn per generator at initialisation, so the full weight does not depend on W
NORM_EPS = 1e-12  # as F.normalize: a center's norm is clamped to at least this


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank's contiguous classes; the first ``num_classes % world_size`` get one more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps), so nearby inputs give unrelated streams."""
    state = 0
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 + 0x9E3779B97F4A7C15
        state &= 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state >> 1


def initial_weight(seed: int, start: int, stop: int, embedding_dim: int) -> torch.Tensor:
    """Rows ``start:stop`` of the N(0, INIT_STD^2) initial weight: the same rows whatever the sharding."""
    weight = torch.empty(stop - start, embedding_dim)
    for chunk in range(start // INIT_CHUNK, (stop - 1) // INIT_CHUNK + 1):
        first = chunk * INIT_CHUNK
        block = torch.randn(
            INIT_CHUNK, embedding_dim, generator=torch.Generator().manual_seed(mix_seed(seed, chunk))
        )
        lo, hi = max(start, first), min(stop, first + INIT_CHUNK)
        weight[lo - start : hi - start] = block[lo - first : hi - first] * INIT_STD
    return weight


def _world(process_group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(process_group), dist.get_rank(process_group)
    if process_group is not None:
        raise RuntimeError("a process_group was given but torch.distributed is not initialised")
    return 1, 0


def _gather_sizes(count: int, device: torch.device, group, world_size: int) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([count], dtype=torch.long, device=device), group=group)
    return torch.cat(sizes).tolist()


def _all_gather_rows(tensor: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's rows (ranks may hold different numbers); no autograd."""
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])


class _AllGather(torch.autograd.Function):
    """Forward: every rank's rows, concatenated. Backward: the gradient summed over ranks, this rank's rows."""

    @staticmethod
    def forward(ctx, tensor, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather_rows(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        # every rank computed only its shard's share of d loss / d (gathered embeddings); the sum is the total
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` (undoes DDP's average over ranks)."""

    @staticmethod
    def forward(ctx, tensor, factor):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over N rows whose classes are split in column shards across ranks.

    ``labels`` holds each row's target column in this shard, or -1 when its target lives in another shard.
    Every target must be in exactly one shard. Returns the same scalar on every rank; the gradient with
    respect to this shard's logits is ``(softmax - onehot) / N``.
    """

    @staticmethod
    def forward(ctx, logits, labels, group, distributed):
        num_rows = logits.shape[0]
        row_max = logits.detach().amax(dim=1)
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        probabilities = (logits.detach() - row_max[:, None]).exp_()
        sum_exp = probabilities.sum(dim=1)
        has_target = labels >= 0
        column = labels.clamp_min(0)[:, None]
        target_logit = torch.where(has_target, logits.detach().gather(1, column).squeeze(1) - row_max, 0.0)
        if distributed:
            # one all-reduce for both sums: [sum of exps | shifted target logit]
            packed = torch.cat([sum_exp, target_logit])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            sum_exp, target_logit = packed[:num_rows], packed[num_rows:]
        probabilities.div_(sum_exp[:, None])
        ctx.save_for_backward(probabilities, labels)
        return (sum_exp.log() - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        probabilities, labels = ctx.saved_tensors
        grad = probabilities.clone()
        column = labels.clamp_min(0)[:, None]
        one_hot = (labels >= 0).to(grad.dtype)[:, None]
        grad.scatter_add_(1, column, -one_hot)
        return grad * (grad_loss / probabilities.shape[0]), None, None, None


class CosineClassifier(nn.Module):
    """Margin-softmax classifier over ``num_classes`` unit centers, sharded over ranks, optionally sampled.

    ``forward(embeddings, labels)`` takes this rank's batch (any size, ranks may differ) and returns the mean
    cross-entropy over the global batch; see the module docstring for sharding, sampling, gradients, the
    optimizer rule and checkpoints. ``margin`` is (m1, m2, m3) of ``margin_logits`` (``LOSS_MARGINS``).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        sample_rate: float = 1.0,
        margin: tuple[float, float, float] = LOSS_MARGINS["arcface"],
        scale: float = DEFAULT_SCALE,
        process_group=None,
        seed: int = 0,
        monotonic: bool = True,
        center_momentum: float | None = None,
    ):
        super().__init__()
        if num_classes < 1 or embedding_dim < 1:
            raise ValueError(
                f"num_classes and embedding_dim must be positive, got {num_classes}, {embedding_dim}"
            )
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if len(margin) != 3:
            raise ValueError(f"margin must be (m1, m2, m3), got {margin}")
        fallback_threshold(*margin[:2])  # validates m1 and m2
        if center_momentum is not None and not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"center_momentum must be in [0, 1), got {center_momentum}")
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.sample_rate = float(sample_rate)
        self.margin = tuple(float(m) for m in margin)
        self.scale = float(scale)
        self.monotonic = monotonic
        self.seed = int(seed)
        self.process_group = process_group
        self.world_size, self.rank = _world(process_group)
        if num_classes < self.world_size:
            raise ValueError(f"{num_classes} classes cannot be split over {self.world_size} ranks")
        self.class_start, self.class_stop = shard_range(num_classes, self.world_size, self.rank)
        self.shard_size = self.class_stop - self.class_start
        self.center_momentum = None if center_momentum is None else float(center_momentum)
        self.weight = nn.Parameter(
            initial_weight(self.seed, self.class_start, self.class_stop, embedding_dim),
            requires_grad=self.center_momentum is None,  # moving-average centers are not learned
        )
        self.sample_step = 0
        self._updated_rows: torch.Tensor | None = None  # local rows used since the optimizer's last step
        self._all_rows_updated = False

    # ----- forward

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must be (N, {self.embedding_dim}), got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels must be ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            labels = labels.to(device=embeddings.device, dtype=torch.long)
            if bool(((labels < 0) | (labels >= self.num_classes)).any()):
                raise ValueError(f"labels must be in [0, {self.num_classes})")
            embeddings = F.normalize(embeddings.to(dtype), dim=1)
            if self.world_size > 1:
                sizes = _gather_sizes(labels.shape[0], labels.device, self.process_group, self.world_size)
                embeddings = _ScaleGradient.apply(embeddings, float(self.world_size))
                embeddings = _AllGather.apply(embeddings, sizes, self.rank, self.process_group)
                labels = _all_gather_rows(labels, sizes, self.process_group)
            in_shard = (labels >= self.class_start) & (labels < self.class_stop)
            local_labels = torch.where(in_shard, labels - self.class_start, -1)
            shard_labels = local_labels
            weight = self.weight
            # sampling is for training steps; a loss under no_grad (validation) sees every class
            if self.training and self.sample_rate < 1.0 and torch.is_grad_enabled():
                rows = self.sample_rows(local_labels)
                local_labels = self._remap(local_labels, rows)
                weight = weight[rows]
                self.sample_step += 1
            else:
                rows = None
            if torch.is_grad_enabled() and self.weight.requires_grad:
                self._record_rows(rows)
            if self.center_momentum is not None and rows is None:
                # the centers move in place after the loss; backward needs the ones the loss saw
                weight = weight.clone()
            # x . w / |w| rather than x . normalize(w): no normalised copy of the weight, and a backward with
            # one elementwise pass over the weight instead of normalize's several
            weight = weight.to(dtype)
            weight_norms = torch.linalg.vector_norm(weight, dim=1).clamp_min(NORM_EPS)
            cosine = F.linear(embeddings, weight) / weight_norms
            logits = margin_logits(cosine, local_labels, self.scale, *self.margin, monotonic=self.monotonic)
            loss = _ShardedCrossEntropy.apply(logits, local_labels, self.process_group, self.world_size > 1)
            if self.center_momentum is not None and self.training and torch.is_grad_enabled():
                # after the logits: this step's loss saw the centers as they were (the cosine keeps its own
                # copy of the weight for backward, so the in-place move below leaves that intact)
                self._move_centers(embeddings.detach(), shard_labels)
            return loss

    @torch.no_grad()
    def _move_centers(self, embeddings: torch.Tensor, shard_labels: torch.Tensor) -> None:
        """The moving-average update of this shard's centers that are labels of the global batch (see the
        module docstring); a batch whose embeddings are not finite (an fp16 overflow) moves nothing."""
        if not bool(torch.isfinite(embeddings).all()):
            return
        present = shard_labels >= 0
        rows, members = shard_labels[present], embeddings[present]
        if rows.numel() == 0:
            return
        classes, position = torch.unique(rows, return_inverse=True)
        sums = torch.zeros(
            classes.numel(), embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device
        )
        directions = F.normalize(sums.index_add_(0, position, members), dim=1)
        current = F.normalize(self.weight[classes].to(embeddings.dtype), dim=1)
        moved = F.normalize(self.center_momentum * current + (1.0 - self.center_momentum) * directions, dim=1)
        self.weight[classes] = moved.to(self.weight.dtype)

    @torch.no_grad()
    def sample_rows(self, local_labels: torch.Tensor) -> torch.Tensor:
        """Sorted local rows to keep this step: every positive of the shard plus uniform random others.

        ``local_labels`` are the global batch's labels as rows of this shard, -1 for other shards' classes.
        Uses (and does not advance) ``sample_step``.
        """
        device = local_labels.device
        # slot shard_size collects the -1s (the classes of other shards)
        positive = torch.zeros(self.shard_size + 1, dtype=torch.bool, device=device)
        positive[torch.where(local_labels >= 0, local_labels, self.shard_size)] = True
        positive = positive[: self.shard_size]
        num_positives = int(positive.sum())
        # at least one row, so a shard always has a logit column (and a row max) even with no positive
        num_kept = min(self.shard_size, max(1, num_positives, round(self.sample_rate * self.shard_size)))
        generator = torch.Generator().manual_seed(self._sampling_seed())
        order = torch.randperm(self.shard_size, generator=generator).to(device)
        # the positives, plus the first other rows of a random permutation; a mask's nonzero() comes sorted
        # (sorting the indices instead costs ~0.2 s for 36k int64 on a CPU)
        kept = positive.clone()
        kept[order[~positive[order]][: num_kept - num_positives]] = True
        return kept.nonzero().flatten()

    def _sampling_seed(self) -> int:
        return mix_seed(self.seed, self.sample_step, self.class_start)

    def _remap(self, local_labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Shard rows -> positions among the kept rows (every positive is kept, so -1 stays -1 only)."""
        position = torch.full((self.shard_size + 1,), -1, dtype=torch.long, device=rows.device)
        position[rows] = torch.arange(rows.numel(), device=rows.device)
        return position[torch.where(local_labels >= 0, local_labels, self.shard_size)]

    # ----- which rows the optimizer may update

    def _record_rows(self, rows: torch.Tensor | None) -> None:
        if rows is None:
            self._all_rows_updated = True
        elif self._updated_rows is None:
            self._updated_rows = rows
        else:  # several forwards before one step (gradient accumulation): their union
            self._updated_rows = torch.unique(torch.cat([self._updated_rows, rows]))

    @property
    def updated_rows(self) -> torch.Tensor:
        """Sorted local rows the forwards since the optimizer's last step used (all of them without sampling)."""
        if self._all_rows_updated:
            return torch.arange(self.shard_size, device=self.weight.device)
        if self._updated_rows is None:
            return torch.empty(0, dtype=torch.long, device=self.weight.device)
        return self._updated_rows

    def take_updated_rows(self) -> tuple[bool, torch.Tensor | None]:
        """``(all_rows, rows)`` used by the forwards since the last call, and forget them (``PartialSGD``)."""
        result = (self._all_rows_updated, None if self._all_rows_updated else self._updated_rows)
        self._updated_rows, self._all_rows_updated = None, False
        return result

    # ----- checkpoints

    def get_extra_state(self) -> dict:
        return {"sample_step": self.sample_step}

    def set_extra_state(self, state: dict) -> None:
        self.sample_step = int(state["sample_step"])

    def gather_full(self, shard: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        """This rank's (shard_size, ...) rows of a per-class tensor -> the full tensor on CPU on rank ``dst``.

        A collective call: every rank must call it. Returns None on the other ranks.
        """
        shard = shard.detach()
        if self.world_size == 1:
            return shard.cpu().clone()
        sizes = [
            len(range(*shard_range(self.num_classes, self.world_size, r))) for r in range(self.world_size)
        ]
        # gather (not all_gather): only rank dst holds the full tensor
        padded = shard.new_zeros((max(sizes), *shard.shape[1:]))
        padded[: shard.shape[0]] = shard
        pieces = [torch.empty_like(padded) for _ in sizes] if self.rank == dst else None
        global_dst = dst if self.process_group is None else dist.get_global_rank(self.process_group, dst)
        dist.gather(padded, pieces, dst=global_dst, group=self.process_group)
        if self.rank != dst:
            return None
        return torch.cat([piece[:size].cpu() for piece, size in zip(pieces, sizes, strict=True)])

    def full_state_dict(self, optimizer: PartialSGD | None = None) -> dict | None:
        """Full weight (and momentum, hyper-parameters) on rank 0, as plain data; None on other ranks.

        A collective call. Load with ``load_full_state_dict`` under any world size.
        """
        state = {
            "num_classes": self.num_classes,
            "embedding_dim": self.embedding_dim,
            "sample_step": self.sample_step,
            "weight": self.gather_full(self.weight),
        }
        if optimizer is not None:
            buffer = optimizer.momentum_buffer()
            state["optimizer"] = {
                "param_groups": [
                    {key: value for key, value in group.items() if key != "params"}
                    for group in optimizer.param_groups
                ],
                "momentum_buffer": None if buffer is None else self.gather_full(buffer),
            }
        return state if self.rank == 0 else None

    @torch.no_grad()
    def load_full_state_dict(self, state: dict, optimizer: PartialSGD | None = None) -> None:
        """Keep this rank's rows of a ``full_state_dict`` (every rank passes the same full state)."""
        if (state["num_classes"], state["embedding_dim"]) != (self.num_classes, self.embedding_dim):
            raise ValueError(
                f"checkpoint has {state['num_classes']} classes x {state['embedding_dim']} dimensions, "
                f"this classifier {self.num_classes} x {self.embedding_dim}"
            )
        self.weight.copy_(state["weight"][self.class_start : self.class_stop])
        self.sample_step = int(state["sample_step"])
        if optimizer is not None and "optimizer" in state:
            # the momentum buffer comes from the file; lr, momentum and weight decay stay as the optimizer was
            # built (from the resumed run's flags: the checkpoint's unless changed on the command line)
            saved = state["optimizer"]
            optimizer.state.clear()
            if saved["momentum_buffer"] is not None:
                buffer = saved["momentum_buffer"][self.class_start : self.class_stop]
                optimizer.state[self.weight]["momentum_buffer"] = buffer.to(self.weight).clone()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"shard=[{self.class_start}, {self.class_stop}) of {self.world_size}, "
            f"sample_rate={self.sample_rate}, margin={self.margin}, scale={self.scale}"
            + ("" if self.center_momentum is None else f", center_momentum={self.center_momentum}")
        )


class PartialSGD(torch.optim.Optimizer):
    """SGD (momentum, weight decay, Nesterov; no dampening) on a ``CosineClassifier``'s rows the forwards used.

    For each row updated, exactly what ``torch.optim.SGD`` does to a parameter holding those rows alone with
    their own momentum buffers: ``d = g + weight_decay * w``, ``buf = momentum * buf + d``,
    ``w -= lr * (d + momentum * buf if nesterov else buf)``. The rows not sampled keep their weight and their
    momentum buffer. Without sampling it is ``torch.optim.SGD`` on the whole shard. Momentum buffers start at
    zero, which equals SGD's first-step ``buf = d`` because there is no dampening.
    """

    def __init__(
        self,
        classifier: CosineClassifier,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}"
            )
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs a positive momentum")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov}
        super().__init__([classifier.weight], defaults)
        self.classifier = classifier

    def momentum_buffer(self) -> torch.Tensor | None:
        return self.state[self.classifier.weight].get("momentum_buffer")

    def zero_grad(self, set_to_none: bool = True) -> None:
        # a step GradScaler skipped must not leave its rows to the next step
        self.classifier.take_updated_rows()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        all_rows, rows = self.classifier.take_updated_rows()
        for group in self.param_groups:
            for weight in group["params"]:
                if weight.grad is None or (rows is None and not all_rows):
                    continue
                buffer = None
                if group["momentum"]:
                    state = self.state[weight]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(weight)
                    buffer = state["momentum_buffer"]
                if all_rows:
                    _sgd_update(weight, weight.grad, buffer, group)
                    continue
                rows_weight = weight.index_select(0, rows)
                rows_buffer = None if buffer is None else buffer.index_select(0, rows)
                _sgd_update(rows_weight, weight.grad.index_select(0, rows), rows_buffer, group)
                weight.index_copy_(0, rows, rows_weight)
                if buffer is not None:
                    buffer.index_copy_(0, rows, rows_buffer)
        return loss


def _sgd_update(weight: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor | None, group: dict) -> None:
    """torch.optim.SGD's update (no dampening), in place on ``weight`` and ``buffer``."""
    direction = grad.add(weight, alpha=group["weight_decay"]) if group["weight_decay"] else grad
    if buffer is not None:
        buffer.mul_(group["momentum"]).add_(direction)
        direction = direction.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
    weight.add_(direction, alpha=-group["lr"])
