"""Additive and angular margins on the target logit of a cosine softmax: CosFace, ArcFace and their combination.

- CosFace (Wang et al. 2018, "CosFace: Large Margin Cosine Loss for Deep Face Recognition",
  https://arxiv.org/abs/1801.09414): target logit ``s * (cos(theta) - m)``.
- ArcFace (Deng et al. 2019, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
  https://arxiv.org/abs/1801.07698): target logit ``s * cos(theta + m)``; its section 2.2 writes the three
  margins as one, ``s * (cos(m1 * theta + m2) - m3)``, which is what ``margin_logits`` computes
  (SphereFace's multiplicative m1, ArcFace's additive angular m2, CosFace's additive cosine m3).

Only the target logit of each row gets a margin; every other logit is ``s * cos``. A row whose label is -1 has
its target elsewhere (in another rank's shard of the classes, or in a class PartialFC did not sample) and gets
no margin at all.

The non-monotonic edge. ``cos(m1 * theta + m2)`` decreases with theta only while ``m1 * theta + m2 <= pi``,
i.e. for ``theta <= theta_max = (pi - m2) / m1``. Past it, a target that moves *away* from its center would
get a *larger* logit, which rewards the wrong thing. The ArcFace reference implementations of the paper's
time (its MXNet ``train_softmax`` and insightface's early PyTorch ``ArcFace`` class, "easy margin" off)
switch to a CosFace-like penalty there: for ``cos(theta) <= th`` with ``th = cos(pi - m)`` they use
``cos(theta) - mm``, ``mm = sin(pi - m) * m``, i.e. the first-order expansion
``cos(theta + m) ~ cos(theta) - sin(theta) * m`` with sin taken at the threshold. ``margin_logits`` does exactly
this for ArcFace and generalises it to any (m1, m2): at the threshold the extra angle the margin adds is
``delta = m1 * theta_max + m2 - theta_max = pi - theta_max``, so

    th = cos(theta_max),   mm = sin(theta_max) * (pi - theta_max),
    target = cos(m1 * theta + m2) - m3   if cos(theta) > th
             cos(theta) - mm - m3         otherwise

which is the reference's rule when m1 = 1 (theta_max = pi - m2). When theta_max >= pi (CosFace, or no angular
margin) there is no edge and no fallback. Like the reference, the fallback is not continuous at the threshold
(for ArcFace m = 0.5 it jumps from -1 to about -1.117); it is monotonic on each side and always below the
non-target value cos(theta). ``monotonic=False`` turns the rule off and gives the paper's formula everywhere,
as insightface's later ``arcface_torch`` computes it (``fallback_threshold`` exposes th and mm).

Numerics. Everything is computed in float32 at least (float64 inputs stay float64), with autocast disabled:
a margin of 0.35 on a logit scaled by 64 is lost in half precision. The angle is ``acos`` of the cosine
clamped to ``[-1 + eps, 1 - eps]`` (``COSINE_CLAMP_EPS``), so the gradient never becomes inf or NaN when an
embedding lies exactly on a center (there, and wherever ``|cos| > 1 - eps``, the clamp makes the target
logit's gradient zero: such a row is already as close to its center as it can get); pure CosFace (m1 = 1, m2 = 0) never takes the acos and is exactly ``cos - m3``.
"""

from __future__ import annotations

import math

import torch

# margins (m1, m2, m3) of s * (cos(m1 * theta + m2) - m3); the papers' face-recognition settings
LOSS_MARGINS: dict[str, tuple[float, float, float]] = {
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.35),
}
DEFAULT_SCALE = 64.0
# acos has an infinite derivative at +-1; clamping first keeps the gradient finite (zero past the clamp)
COSINE_CLAMP_EPS = 1e-7


def fallback_threshold(m1: float = 1.0, m2: float = 0.0) -> tuple[float, float] | None:
    """``(th, mm)`` of the monotonic rule above, or None when cos(m1 * theta + m2) is monotonic on [0, pi]."""
    if not (m1 > 0 and math.isfinite(m1) and math.isfinite(m2)):
        raise ValueError(f"m1 must be positive and m1, m2 finite, got m1 = {m1}, m2 = {m2}")
    theta_max = (math.pi - m2) / m1
    if theta_max >= math.pi:
        return None
    if theta_max <= 0:
        raise ValueError(f"m2 = {m2} leaves no angle where the margin is monotonic")
    return math.cos(theta_max), math.sin(theta_max) * (math.pi - theta_max)


def margin_logits(
    cosine: torch.Tensor,
    labels: torch.Tensor,
    scale: float = DEFAULT_SCALE,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    monotonic: bool = True,
) -> torch.Tensor:
    """``scale * cos`` with the combined margin on each row's target column: ``scale * (cos(m1 theta + m2) - m3)``.

    ``cosine`` is (N, C); ``labels`` (N,) holds each row's target column in ``cosine``, or -1 for a row whose
    target is not among these columns (no margin then). Returns (N, C) in float32, or float64 for float64 input.
    ``monotonic`` applies the ArcFace reference rule past the non-monotonic edge (see the module docstring).
    """
    fallback = fallback_threshold(m1, m2) if monotonic else None
    dtype = torch.promote_types(cosine.dtype, torch.float32)
    with torch.autocast(device_type=cosine.device.type, enabled=False):
        cosine = cosine.to(dtype)
        labels = labels.to(device=cosine.device, dtype=torch.long)
        has_target = labels >= 0
        # gather/scatter with a clamped index rather than boolean indexing: no device sync
        column = labels.clamp_min(0)[:, None]
        target_cosine = cosine.gather(1, column).squeeze(1)
        if m1 == 1.0 and m2 == 0.0:
            target = target_cosine - m3
        else:
            theta = torch.acos(target_cosine.clamp(-1.0 + COSINE_CLAMP_EPS, 1.0 - COSINE_CLAMP_EPS))
            target = torch.cos(m1 * theta + m2) - m3
            if fallback is not None:
                threshold, penalty = fallback
                target = torch.where(target_cosine > threshold, target, target_cosine - penalty - m3)
        target = torch.where(has_target, target, target_cosine)
        return cosine.scatter(1, column, target[:, None]) * scale


class MarginLogits(torch.nn.Module):
    """``margin_logits`` as a module holding its scale and margins."""

    def __init__(
        self,
        scale: float = DEFAULT_SCALE,
        margin: tuple[float, float, float] = LOSS_MARGINS["arcface"],
        monotonic: bool = True,
    ):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = float(scale)
        self.margin = tuple(float(m) for m in margin)
        if len(self.margin) != 3:
            raise ValueError(f"margin must be (m1, m2, m3), got {margin}")
        self.monotonic = monotonic
        fallback_threshold(*self.margin[:2])  # validates m1 and m2

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return margin_logits(cosine, labels, self.scale, *self.margin, monotonic=self.monotonic)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}, monotonic={self.monotonic}"
