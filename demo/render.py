"""Procedurally drawn cartoon faces: the pixels of the synthetic demo dataset.

Every identity is a face with its own head shape, skin tone, hair, eyes, brows, nose, mouth and sometimes
glasses, a beard or a mole. Every image of it changes pose (rotation, shift, scale, a yaw-like shift of the
inner features), expression, lighting, blur, noise, clothing and background clutter, so raw pixel distance
does not verify pairs well but a small CNN learns the identities in minutes.

Faces are rendered as signed distance functions on the pixel grid, all images of one identity at once in
numpy, with antialiased edges (coverage = distance in pixels clipped to [0, 1]), so no supersampling and no
per-pixel Python loops are needed. `render_identity` is the entry point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

_HAIR_COLORS = np.array(
    [[0.08, 0.06, 0.05], [0.25, 0.15, 0.08], [0.45, 0.30, 0.15], [0.85, 0.70, 0.40], [0.60, 0.25, 0.10],
     [0.65, 0.65, 0.65], [0.92, 0.92, 0.90]],
    dtype=np.float32,
)  # fmt: skip
_IRIS_COLORS = np.array(
    [[0.30, 0.18, 0.08], [0.15, 0.35, 0.65], [0.25, 0.45, 0.25], [0.40, 0.42, 0.45], [0.10, 0.07, 0.05]],
    dtype=np.float32,
)  # fmt: skip
_SKIN_LIGHT = np.array([0.96, 0.80, 0.69], dtype=np.float32)
_SKIN_DARK = np.array([0.36, 0.22, 0.13], dtype=np.float32)


@dataclass(frozen=True)
class Identity:
    """Appearance parameters shared by every image of one person (canonical units: image half-width = 1)."""

    head_center_y: float
    head_width: float
    head_top: float
    head_bottom: float
    skin: np.ndarray
    ear_size: float
    hair_color: np.ndarray
    hair_style: int  # 0 bald, 1 short, 2 fringe, 3 long
    hair_volume: float
    hairline_y: float
    eye_y: float
    eye_spacing: float
    eye_width: float
    eye_height: float
    iris_color: np.ndarray
    brow_gap: float
    brow_thickness: float
    brow_slant: float
    brow_color: np.ndarray
    nose_length: float
    nose_width: float
    mouth_y: float
    mouth_width: float
    lip_thickness: float
    mouth_curve: float
    lip_color: np.ndarray
    glasses: bool
    glasses_color: np.ndarray
    glasses_radius: float
    beard: bool
    moustache: bool
    mole: tuple[float, float] | None


def _draw_identity(rng: np.random.Generator) -> Identity:
    """Draws one person; ranges are wide so that identities are learnable from a few thousand images."""
    skin_mix = rng.uniform(0.0, 1.0)
    skin = (1 - skin_mix) * _SKIN_LIGHT + skin_mix * _SKIN_DARK + rng.normal(0.0, 0.03, 3)
    hair_color = _HAIR_COLORS[rng.integers(len(_HAIR_COLORS))] + rng.normal(0.0, 0.04, 3)
    head_width = rng.uniform(0.40, 0.58)
    return Identity(
        head_center_y=rng.uniform(-0.12, 0.02),
        head_width=head_width,
        head_top=rng.uniform(0.48, 0.62),
        head_bottom=rng.uniform(0.52, 0.74),
        skin=np.clip(skin, 0, 1).astype(np.float32),
        ear_size=rng.uniform(0.05, 0.10),
        hair_color=np.clip(hair_color, 0, 1).astype(np.float32),
        hair_style=int(rng.choice(4, p=[0.12, 0.38, 0.25, 0.25])),
        hair_volume=rng.uniform(0.04, 0.20),
        hairline_y=rng.uniform(-0.40, -0.22),
        eye_y=rng.uniform(-0.14, 0.0),
        eye_spacing=rng.uniform(0.15, 0.25),
        eye_width=rng.uniform(0.065, 0.11),
        eye_height=rng.uniform(0.35, 0.7),
        iris_color=(_IRIS_COLORS[rng.integers(len(_IRIS_COLORS))] + rng.normal(0, 0.03, 3)).astype(
            np.float32
        ),
        brow_gap=rng.uniform(0.07, 0.14),
        brow_thickness=rng.uniform(0.012, 0.04),
        brow_slant=rng.uniform(-0.35, 0.35),
        brow_color=np.clip(hair_color * rng.uniform(0.5, 1.0), 0, 1).astype(np.float32),
        nose_length=rng.uniform(0.12, 0.26),
        nose_width=rng.uniform(0.04, 0.10),
        mouth_y=rng.uniform(0.24, 0.38),
        mouth_width=rng.uniform(0.10, 0.22),
        lip_thickness=rng.uniform(0.012, 0.04),
        mouth_curve=rng.uniform(-1.5, 3.0),
        lip_color=np.clip(skin * [0.85, 0.55, 0.55] + rng.normal(0, 0.04, 3), 0, 1).astype(np.float32),
        glasses=bool(rng.uniform() < 0.25),
        glasses_color=rng.uniform(0.0, 0.6, 3).astype(np.float32),
        glasses_radius=rng.uniform(1.2, 1.6),
        beard=bool(rng.uniform() < 0.2),
        moustache=bool(rng.uniform() < 0.2),
        mole=(rng.uniform(-0.3, 0.3), rng.uniform(-0.1, 0.35)) if rng.uniform() < 0.3 else None,
    )


# --- signed distance helpers: arrays of shape (n, H, W), negative inside, one unit = image half-width ---


def _col(values: np.ndarray) -> np.ndarray:
    """Per-image scalars (n,) -> (n, 1, 1) for broadcasting against the pixel grid."""
    return np.asarray(values, dtype=np.float32)[:, None, None]


def _ellipse(x, y, cx, cy, rx, ry):
    """Approximate signed distance to an axis-aligned ellipse: |q| - 1 rescaled by its gradient.

    The rescaling keeps edges one pixel wide all around thin ellipses (the approximation from
    https://iquilezles.org/articles/ellipsedist/); k0 / k1 always lies between the two radii. Far from a
    thin ellipse it underestimates the distance, so it is bounded below by the distance to the centre
    minus the larger radius: no faint halo, and shapes stay inside their bounding circle.
    """
    dx, dy = x - cx, y - cy
    qx, qy = dx / rx, dy / ry
    k0 = np.sqrt(qx * qx + qy * qy)
    k1 = np.sqrt((qx / rx) ** 2 + (qy / ry) ** 2)
    low = np.asarray(np.minimum(rx, ry), dtype=np.float32)  # a numpy float64 scalar would promote
    high = np.asarray(np.maximum(rx, ry), dtype=np.float32)
    approx = (k0 - 1.0) * np.clip(k0 / (k1 + 1e-12), low, high)
    return np.maximum(approx, np.sqrt(dx * dx + dy * dy) - high)


def _box(x, y, cx, cy, rx, ry):
    return np.maximum(np.abs(x - cx) - rx, np.abs(y - cy) - ry)


def _segment(x, y, ax, ay, bx, by, radius):
    """Distance to a capsule (a thick line from a to b), for brows, the nose ridge and glasses."""
    dx, dy = bx - ax, by - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
    return np.sqrt((x - ax - t * dx) ** 2 + (y - ay - t * dy) ** 2) - radius


def _curve_band(x, y, cx, cy, half_width, curve, thickness):
    """A parabola-shaped band y = cy - curve * (x - cx)^2, used for lips (curve > 0 smiles)."""
    centre = cy - curve * (x - cx) ** 2
    return np.maximum(np.abs(y - centre) - thickness, np.abs(x - cx) - half_width)


class _Frames(NamedTuple):
    """Pixel coordinates in the frames shapes are drawn in, each (n, H, W) or (1, H, W)."""

    ix: np.ndarray  # the image itself: background clutter, lighting
    iy: np.ndarray
    x: np.ndarray  # the face, after undoing the per-image shift, rotation and scale: head, neck, ears
    y: np.ndarray
    xf: np.ndarray  # eyes, brows, mouth: shifted sideways by yaw, like features in front of a turning head
    xn: np.ndarray  # the nose tip sticks out further
    xh: np.ndarray  # hair at the back of the head moves the other way

    def crop(self, rows: slice, cols: slice) -> _Frames:
        return _Frames(*(frame[:, rows, cols] for frame in self))


class _Region:
    """Part of a batch of n RGB float images, with the frames cropped to it; painting writes through.

    Images are stored channel first, (3, n, H, W), so that blending runs over long contiguous rows
    rather than numpy's slow inner loops of length 3.
    """

    def __init__(self, image: np.ndarray, frames: _Frames, pixel: np.ndarray):
        self.image = image
        self.frames = frames
        self.pixel = pixel  # (n, 1, 1): one pixel in the units of the distances painted (wider = blurrier)

    def paint(self, sdf, color, opacity=1.0):
        """Alpha-blends color (3,) or per-image (n, 3) over the image where sdf < 0, antialiased."""
        alpha = np.clip(0.5 - sdf / self.pixel, 0.0, 1.0) * opacity
        color = np.asarray(color, dtype=np.float32)
        color = color.T[:, :, None, None] if color.ndim == 2 else color[:, None, None, None]
        self.image += (color - self.image) * alpha


@dataclass
class _Variation:
    """Per-image draws for a batch of n images of one identity (arrays of shape (n,) unless noted)."""

    angle: np.ndarray
    scale: np.ndarray
    shift_x: np.ndarray
    shift_y: np.ndarray
    yaw: np.ndarray
    blur: np.ndarray
    eye_open: np.ndarray
    smile: np.ndarray
    mouth_open: np.ndarray
    brow_raise: np.ndarray
    shirt: np.ndarray  # (n, 3)
    gain: np.ndarray
    contrast: np.ndarray
    cast: np.ndarray  # (n, 3)
    light_x: np.ndarray
    light_y: np.ndarray
    noise: np.ndarray
    glasses_on: np.ndarray  # bool


def _draw_variation(rng: np.random.Generator, n: int) -> _Variation:
    return _Variation(
        angle=rng.uniform(-0.3, 0.3, n),
        scale=rng.uniform(0.82, 1.18, n),
        shift_x=rng.uniform(-0.14, 0.14, n),
        shift_y=rng.uniform(-0.12, 0.12, n),
        yaw=rng.uniform(-0.35, 0.35, n),
        blur=rng.uniform(1.0, 2.6, n),
        eye_open=np.where(rng.uniform(size=n) < 0.06, 0.15, rng.uniform(0.7, 1.15, n)),
        smile=rng.normal(0.0, 1.0, n),
        mouth_open=np.where(rng.uniform(size=n) < 0.25, rng.uniform(0.01, 0.05, n), 0.0),
        brow_raise=rng.uniform(-0.025, 0.025, n),
        shirt=rng.uniform(0.05, 0.95, (n, 3)),
        gain=rng.uniform(0.75, 1.25, n),
        contrast=rng.uniform(0.7, 1.2, n),
        cast=rng.uniform(0.9, 1.1, (n, 3)),
        light_x=rng.uniform(-0.35, 0.35, n),
        light_y=rng.uniform(-0.25, 0.25, n),
        noise=rng.uniform(0.0, 0.06, n),
        glasses_on=rng.uniform(size=n) < 0.9,
    )


class _Canvas:
    """A batch of n images of one identity; small shapes are painted only inside their bounding window."""

    def __init__(self, var: _Variation, size: int):
        self.var = var
        self.size = size
        grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
        iy, ix = np.meshgrid(grid, grid, indexing="ij")
        ix, iy = ix[None], iy[None]
        cos, sin, scale = _col(np.cos(var.angle)), _col(np.sin(var.angle)), _col(var.scale)
        u, v = ix - _col(var.shift_x), iy - _col(var.shift_y)
        x = (cos * u + sin * v) / scale
        y = (-sin * u + cos * v) / scale
        yaw = _col(var.yaw)
        self.frames = _Frames(ix, iy, x, y, x - 0.22 * yaw, x - 0.32 * yaw, x + 0.04 * yaw)
        self.image = np.zeros((3, len(var.angle), size, size), dtype=np.float32)
        self.image_pixel = _col(2.0 / size * var.blur)
        self.face_pixel = self.image_pixel / scale

    def background(self) -> _Region:
        """The whole image, for shapes drawn in image coordinates."""
        return _Region(self.image, self.frames, self.image_pixel)

    def around(self, cx: float, cy: float, radius: float, depth: float = 0.0) -> _Region:
        """The window holding every face point within radius of (cx, cy), in all images of the batch.

        depth is the yaw shift of the frame the shape is drawn in (0.22 for xf, 0.32 for xn, -0.04 for xh).
        """
        var = self.var
        fx = cx + depth * var.yaw
        cos, sin = np.cos(var.angle), np.sin(var.angle)
        px = var.shift_x + var.scale * (cos * fx - sin * cy)
        py = var.shift_y + var.scale * (sin * fx + cos * cy)
        # antialiasing reaches half a (blurred) pixel beyond the shape; one more pixel covers rounding
        reach = var.scale * radius + (var.blur + 2.0) / self.size
        rows, cols = self._span(py - reach, py + reach), self._span(px - reach, px + reach)
        return _Region(self.image[:, :, rows, cols], self.frames.crop(rows, cols), self.face_pixel)

    def face(self) -> _Region:
        """The whole image, for large shapes drawn in face coordinates."""
        return _Region(self.image, self.frames, self.face_pixel)

    def _span(self, low: np.ndarray, high: np.ndarray) -> slice:
        start = int(np.floor((low.min() + 1.0) / 2.0 * self.size))
        stop = int(np.ceil((high.max() + 1.0) / 2.0 * self.size))
        return slice(min(max(start, 0), self.size), min(max(stop, 0), self.size))


def _paint_background(canvas: _Canvas, rng: np.random.Generator):
    """A random two-tone gradient plus a few random boxes and blobs that do not move with the face."""
    n = canvas.image.shape[1]
    region = canvas.background()
    x, y = region.frames.ix, region.frames.iy
    top = rng.uniform(0.0, 1.0, (n, 3)).astype(np.float32)
    bottom = rng.uniform(0.0, 1.0, (n, 3)).astype(np.float32)
    mix = (y + 1) / 2
    region.image[:] = top.T[:, :, None, None] * (1 - mix) + bottom.T[:, :, None, None] * mix
    for shape in (_box, _ellipse, _box, _ellipse):
        cx, cy = _col(rng.uniform(-1.1, 1.1, n)), _col(rng.uniform(-1.1, 1.1, n))
        rx, ry = _col(rng.uniform(0.08, 0.45, n)), _col(rng.uniform(0.08, 0.45, n))
        sdf = shape(x, y, cx, cy, rx, ry)
        region.paint(sdf, rng.uniform(0.0, 1.0, (n, 3)), opacity=_col(rng.uniform(0.5, 1.0, n)))


def _render_batch(identity: Identity, rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Renders n images of one identity; returns uint8 (n, size, size, 3)."""
    var = _draw_variation(rng, n)
    canvas = _Canvas(var, size)
    _paint_background(canvas, rng)
    _paint_body(canvas, identity, var)
    _paint_face(canvas, identity, var)
    return _finish(canvas.image, var, rng, canvas.frames)


def _head_sdf(ident: Identity, x, y):
    """The head is two half ellipses, so that crown and jaw vary independently."""
    dy = y - ident.head_center_y
    height = np.where(dy < 0, np.float32(ident.head_top), np.float32(ident.head_bottom))
    return _ellipse(x, y, 0.0, ident.head_center_y, ident.head_width, height)


def _paint_body(canvas: _Canvas, ident: Identity, var: _Variation):
    """Long hair behind the head, shoulders in a per-image shirt, neck and ears."""
    region = canvas.face()
    x, y, xh = region.frames.x, region.frames.y, region.frames.xh
    cy = ident.head_center_y
    if ident.hair_style == 3:
        hair = _box(xh, y, 0.0, cy + 0.25, ident.head_width + 0.12 + ident.hair_volume, 0.6)
        hair = np.maximum(hair, _ellipse(xh, y, 0.0, cy + 0.1, ident.head_width * 1.5, 1.2))
        region.paint(hair, ident.hair_color)
    neck_top = cy + ident.head_bottom * 0.6
    region.paint(_ellipse(x, y, 0.0, neck_top + 0.75, 0.95, 0.42), var.shirt)
    region.paint(_box(x, y, 0.0, neck_top + 0.2, ident.head_width * 0.45, 0.25), ident.skin * 0.85)
    for side in (-1.0, 1.0):
        cx, cy = side * ident.head_width, ident.eye_y + 0.06
        ear = canvas.around(cx, cy, ident.ear_size * 1.7)
        f = ear.frames
        ear.paint(_ellipse(f.x, f.y, cx, cy, ident.ear_size, ident.ear_size * 1.7), ident.skin * 0.92)


def _paint_face(canvas: _Canvas, ident: Identity, var: _Variation):
    skin = ident.skin
    region = canvas.face()
    head = _head_sdf(ident, region.frames.x, region.frames.y)
    region.paint(head, skin)
    # soft shading towards the rim, so the head reads as round
    rim = np.clip(1.0 + head / 0.12, 0.0, 1.0) * (head < 0)
    region.paint(head, skin * 0.7, opacity=0.5 * rim)
    _paint_hair(canvas, ident)
    _paint_eyes(canvas, ident, var)
    # nose: a shaded ridge and two nostrils
    nose_top, nose_tip = ident.eye_y + 0.05, ident.eye_y + 0.05 + ident.nose_length
    nose = canvas.around(0.0, (nose_top + nose_tip) / 2, ident.nose_length / 2 + ident.nose_width, depth=0.32)
    f = nose.frames
    nose.paint(_segment(f.xn, f.y, 0.0, nose_top, 0.0, nose_tip, ident.nose_width * 0.35), skin * 0.7, 0.45)
    for side in (-1.0, 1.0):
        nostril = _ellipse(f.xn, f.y, side * ident.nose_width * 0.5, nose_tip, ident.nose_width * 0.35, 0.018)
        nose.paint(nostril, skin * 0.35, 0.8)
    mouth_y = max(ident.mouth_y, nose_tip + 0.08)
    if ident.beard:
        f = region.frames
        beard = np.maximum(head, -(f.y - (mouth_y - 0.06 - 0.5 * (f.xf**2))))
        region.paint(beard, ident.hair_color, 0.9)
    _paint_mouth(canvas, ident, var, mouth_y)
    if ident.mole is not None:
        mx, my = ident.mole
        mole = canvas.around(mx, my, 0.02, depth=0.22)
        mole.paint(_ellipse(mole.frames.xf, mole.frames.y, mx, my, 0.018, 0.018), skin * 0.3)


def _paint_mouth(canvas: _Canvas, ident: Identity, var: _Variation, mouth_y: float):
    """Lips follow a parabola whose curve is the identity's plus a per-image smile; open mouths show a gap."""
    curve = _col(ident.mouth_curve + var.smile)
    # the lips bend by at most |curve| * width^2; the window must hold the most curved image of the batch
    bend = float(np.abs(curve).max()) * ident.mouth_width**2
    mouth = canvas.around(0.0, mouth_y, ident.mouth_width + bend + 0.1, depth=0.22)
    x, y = mouth.frames.xf, mouth.frames.y
    if ident.moustache:
        mouth.paint(
            _curve_band(x, y, 0.0, mouth_y - 0.045, ident.mouth_width * 1.05, -1.0, 0.02), ident.hair_color
        )
    gap = _col(var.mouth_open)
    if np.any(var.mouth_open > 0):
        mouth.paint(
            _curve_band(x, y, 0.0, mouth_y, ident.mouth_width, curve, gap + 0.005), [0.15, 0.03, 0.03]
        )
    for lip in (-1.0, 1.0):
        band = _curve_band(
            x, y, 0.0, mouth_y + lip * gap, ident.mouth_width, curve, ident.lip_thickness * 0.6
        )
        mouth.paint(band, ident.lip_color)


def _paint_hair(canvas: _Canvas, ident: Identity):
    """Hair is an ellipse a little larger than the crown, cut off below a curved hairline."""
    if ident.hair_style == 0:
        return
    region = canvas.face()
    xh, y = region.frames.xh, region.frames.y
    cy = ident.head_center_y
    top = _ellipse(
        xh, y, 0.0, cy - 0.02, ident.head_width + ident.hair_volume, ident.head_top + ident.hair_volume
    )
    if ident.hair_style == 2:  # fringe: a low, nearly flat hairline
        hairline = cy + ident.hairline_y + 0.12 - 0.1 * xh**2
    else:
        hairline = cy + ident.hairline_y + 0.9 * xh**2
    region.paint(np.maximum(top, y - hairline), ident.hair_color)


def _paint_eyes(canvas: _Canvas, ident: Identity, var: _Variation):
    eye_h = _col(ident.eye_width * ident.eye_height * var.eye_open)
    brow_y = _col(ident.eye_y - ident.brow_gap - var.brow_raise)
    half = ident.eye_width * 1.1  # half the brow length
    lift = ident.brow_slant * half  # positive slant lifts the outer end
    for side in (-1.0, 1.0):
        cx, cy = side * ident.eye_spacing, ident.eye_y
        # the window holds the glasses and the highest brow of the batch
        glasses = ident.eye_width * ident.glasses_radius + 0.015
        brow = np.hypot(half, ident.brow_gap + 0.03 + abs(lift)) + ident.brow_thickness
        reach = max(glasses, brow)
        region = canvas.around(cx, cy, reach, depth=0.22)
        x, y = region.frames.xf, region.frames.y
        eye = _ellipse(x, y, cx, cy, ident.eye_width, eye_h)
        region.paint(eye, [0.95, 0.95, 0.93])
        iris = np.maximum(eye, _ellipse(x, y, cx, cy, ident.eye_width * 0.5, ident.eye_width * 0.5))
        region.paint(iris, ident.iris_color)
        pupil = np.maximum(eye, _ellipse(x, y, cx, cy, ident.eye_width * 0.22, ident.eye_width * 0.22))
        region.paint(pupil, [0.02, 0.02, 0.02])
        brow = _segment(
            x, y, cx - half, brow_y + side * lift, cx + half, brow_y - side * lift, ident.brow_thickness
        )
        region.paint(brow, ident.brow_color)
        if ident.glasses:
            radius = ident.eye_width * ident.glasses_radius
            ring = np.abs(_ellipse(x, y, cx, cy, radius, radius * 0.8)) - 0.012
            region.paint(ring, ident.glasses_color, _col(var.glasses_on))
    if ident.glasses:
        inner = max(ident.eye_spacing - ident.eye_width * ident.glasses_radius, 0.01)
        bridge = canvas.around(0.0, ident.eye_y, inner + 0.02, depth=0.22)
        f = bridge.frames
        bridge.paint(
            _segment(f.xf, f.y, -inner, ident.eye_y, inner, ident.eye_y, 0.01),
            ident.glasses_color,
            _col(var.glasses_on),
        )


def _finish(image, var: _Variation, rng: np.random.Generator, frames: _Frames) -> np.ndarray:
    """Lighting (gain, contrast, colour cast, a directional gradient) and sensor noise, then 8-bit."""
    light = 1.0 + _col(var.light_x) * frames.ix + _col(var.light_y) * frames.iy
    image = image * (light * _col(var.gain)) * var.cast.T[:, :, None, None].astype(np.float32)
    mean = image.mean(axis=(0, 2, 3), keepdims=True)
    image = (image - mean) * _col(var.contrast) + mean
    image = image + rng.standard_normal(image.shape, dtype=np.float32) * _col(var.noise)
    image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(image.transpose(1, 2, 3, 0))


def render_identity(identity_seed: tuple[int, ...], num_images: int, image_size: int) -> np.ndarray:
    """All images of the identity drawn from identity_seed, as uint8 (num_images, size, size, 3)."""
    rng = np.random.default_rng(np.random.SeedSequence(identity_seed))
    identity = _draw_identity(rng)
    return _render_batch(identity, rng, num_images, image_size)
