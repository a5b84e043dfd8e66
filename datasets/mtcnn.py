"""MTCNN face detection (Zhang et al. 2016, https://arxiv.org/abs/1604.02878) for batches of photos.

The three-stage cascade is driven here rather than by facenet-pytorch's ``MTCNN.detect``, which spent a third
of its CPU time in float "area" resampling and much of the rest in NCHW max-pooling: here every resize (image
pyramid, stage-2/3 crops) is the uint8 antialiased one and the networks run channels_last, about 1.7x faster
on the CPU; the thresholds, box regression and non-maximum suppressions are facenet-pytorch's, reached through
`datasets/facenet_pytorch_adapter.py`. `select_face` picks the face a photo is about; `detection_view` and
`to_photo_coordinates` let large photos be searched at a smaller size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import batched_nms

from datasets.facenet_pytorch_adapter import (
    candidate_boxes,
    mtcnn_networks,
    nms_min,
    regress_boxes,
    square_boxes,
)


@dataclass
class Face:
    """One detected face, in the pixel coordinates of the photo it was found in."""

    box: np.ndarray  # (4,) x1, y1, x2, y2
    landmarks: np.ndarray  # (5, 2) x, y: left eye, right eye, nose, left and right mouth corners
    prob: float


class FaceDetector:
    """The MTCNN cascade on facenet-pytorch's P-, R- and O-nets, for batches of uint8 RGB images.

    Images of the same size go through the networks together; `detect` returns every face that passes the
    three networks' thresholds (choosing one is `select_face`'s job).
    """

    def __init__(self, device="cpu", min_face_size=20, thresholds=(0.6, 0.7, 0.7), factor=0.709):
        self.device = torch.device(device)
        self.min_face_size = min_face_size
        self.thresholds = thresholds
        self.factor = factor
        pnet, rnet, onet = mtcnn_networks(self.device)
        # channels_last: PyTorch's CPU max-pool is several times faster on it (RNet and ONet run ~3x
        # faster, PNet ~1.3x); the networks' outputs are unchanged
        self.pnet = pnet.to(memory_format=torch.channels_last)
        self.rnet = rnet.to(memory_format=torch.channels_last)
        self.onet = onet.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def detect(self, images):
        """Faces in each of `images` (HxWx3 uint8 arrays of any sizes): a list of lists of `Face`."""
        faces = [[] for _ in images]
        by_size = {}
        for index, image in enumerate(images):
            by_size.setdefault(image.shape[:2], []).append(index)
        for indices in by_size.values():
            batch = torch.from_numpy(np.stack([images[i] for i in indices])).to(self.device)
            batch = batch.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
            for index, group_faces in zip(indices, self._detect_same_size(batch), strict=True):
                faces[index] = group_faces
        return faces

    def _detect_same_size(self, batch):
        boxes, image_inds = self._propose(batch)
        boxes, image_inds = self._refine(batch, boxes, image_inds)
        boxes, image_inds, points = self._output(batch, boxes, image_inds)
        boxes, points, image_inds = boxes.cpu().numpy(), points.cpu().numpy(), image_inds.cpu().numpy()
        return [
            [
                Face(box=b[:4].copy(), landmarks=p.copy(), prob=float(b[4]))
                for b, p in zip(boxes[image_inds == i], points[image_inds == i], strict=True)
            ]
            for i in range(len(batch))
        ]

    def pyramid_scales(self, height, width):
        """Scales at which PNet's 12 px window sees faces from `min_face_size` up to the whole image."""
        scale = 12.0 / self.min_face_size
        side = min(height, width) * scale
        scales = []
        while side >= 12:
            scales.append(scale)
            scale *= self.factor
            side *= self.factor
        return scales

    def _propose(self, batch):
        """Stage 1: PNet over the image pyramid, candidate boxes per image (x1, y1, x2, y2, score)."""
        height, width = batch.shape[2:]
        # (an image smaller than min_face_size has no pyramid level and no candidates)
        all_boxes = [torch.zeros(0, 9, device=batch.device)]
        all_inds = [torch.zeros(0, dtype=torch.long, device=batch.device)]
        for scale in self.pyramid_scales(height, width):
            size = (int(height * scale + 1), int(width * scale + 1))
            level = _normalize(_resize_uint8(batch, size))
            reg, probs = self.pnet(level.contiguous(memory_format=torch.channels_last))
            boxes, image_inds = candidate_boxes(reg, probs[:, 1], scale, self.thresholds[0])
            keep = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.5)
            all_boxes.append(boxes[keep])
            all_inds.append(image_inds[keep])
        boxes, image_inds = torch.cat(all_boxes), torch.cat(all_inds)
        keep = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        boxes, image_inds = boxes[keep], image_inds[keep]
        width_height = (boxes[:, 2:4] - boxes[:, 0:2]).repeat(1, 2)
        regressed = boxes[:, :4] + boxes[:, 5:9] * width_height
        return square_boxes(torch.cat([regressed, boxes[:, 4:5]], dim=1)), image_inds

    def _refine(self, images, boxes, image_inds):
        """Stage 2: RNet rescores and regresses each candidate."""
        if len(boxes) == 0:
            return boxes, image_inds
        reg, probs = self.rnet(_crop_boxes(images, boxes, image_inds, 24))
        score = probs[:, 1]
        passed = score > self.thresholds[1]
        boxes = torch.cat([boxes[passed, :4], score[passed, None]], dim=1)
        image_inds, reg = image_inds[passed], reg[passed]
        keep = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        return square_boxes(regress_boxes(boxes[keep], reg[keep])), image_inds[keep]

    def _output(self, images, boxes, image_inds):
        """Stage 3: ONet gives the final score, box and five landmarks."""
        if len(boxes) == 0:
            return boxes, image_inds, torch.zeros(0, 5, 2, device=boxes.device)
        reg, points, probs = self.onet(_crop_boxes(images, boxes, image_inds, 48))
        score = probs[:, 1]
        passed = score > self.thresholds[2]
        boxes = torch.cat([boxes[passed, :4], score[passed, None]], dim=1)
        image_inds, reg, points = image_inds[passed], reg[passed], points[passed]
        # landmarks come relative to the box (the MATLAB-style +1 box size of the original code)
        box_w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        box_h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        points_x = box_w * points[:, :5] + boxes[:, 0:1] - 1
        points_y = box_h * points[:, 5:] + boxes[:, 1:2] - 1
        points = torch.stack([points_x, points_y], dim=2)
        boxes = regress_boxes(boxes, reg)
        keep = nms_min(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        return boxes[keep], image_inds[keep], points[keep]


def _resize_uint8(images, size):
    """Antialiased resize of a uint8 NCHW batch to `size` (h, w), as a float tensor.

    On the CPU the uint8 kernel is SIMD and ~6x faster than the float one; other devices resize floats.
    The antialiased resize stands in for OpenCV's INTER_AREA of the original MTCNN code.
    """
    if images.device.type == "cpu":
        return F.interpolate(images, size=size, mode="bilinear", antialias=True).float()
    return F.interpolate(images.float(), size=size, mode="bilinear", antialias=True)


def _normalize(images):
    return (images - 127.5) * 0.0078125


def _crop_boxes(images, boxes, image_inds, size):
    """Every box of `boxes` on images `image_inds` of the uint8 NCHW `images`, resized to size x size.

    Box corners follow facenet-pytorch's MATLAB-style convention (pixels x1 - 1 .. x2 - 1). The parts of a
    box outside its image read as zero, the padding of the original MTCNN code. A loop of small uint8
    resizes measured several times faster on the CPU than one `roi_align` call, whose cost grows with the
    box size when it averages like an area resize.
    """
    height, width = images.shape[2:]
    crops = []
    for (x1, y1, x2, y2), index in zip(boxes[:, :4].trunc().int().tolist(), image_inds.tolist(), strict=True):
        left, top, right, bottom = x1 - 1, y1 - 1, x2, y2
        inner_left, inner_top = max(left, 0), max(top, 0)
        inner_right, inner_bottom = min(right, width), min(bottom, height)
        if inner_right <= inner_left or inner_bottom <= inner_top:
            crops.append(torch.zeros(1, 3, size, size, device=images.device))
            continue
        region = images[index : index + 1, :, inner_top:inner_bottom, inner_left:inner_right]
        padding = (inner_left - left, right - inner_right, inner_top - top, bottom - inner_bottom)
        if any(padding):
            region = F.pad(region, padding)
        crops.append(_resize_uint8(region, (size, size)))
    return _normalize(torch.cat(crops)).contiguous(memory_format=torch.channels_last)


def select_face(faces, image_width, image_height, min_prob=0.9):
    """The face a photo is about: the largest and most central one, weighted by its probability.

    score = prob * sqrt(box area) * exp(-2 * offset^2), where offset^2 is the box centre's squared distance
    from the image centre in half-widths and half-heights, averaged over the two axes (0 at the centre,
    0.5 at the middle of an edge, 1 in a corner). A face at the middle of an edge thus needs a box about
    2.7x wider than a face at the centre to be chosen. Faces below `min_prob` are never chosen; returns
    None when no face is left.
    """
    best, best_score = None, -1.0
    for face in faces:
        if face.prob < min_prob:
            continue
        x1, y1, x2, y2 = face.box
        side = math.sqrt(max(x2 - x1, 0.0) * max(y2 - y1, 0.0))
        dx = ((x1 + x2) / 2 - image_width / 2) / (image_width / 2)
        dy = ((y1 + y2) / 2 - image_height / 2) / (image_height / 2)
        score = face.prob * side * math.exp(-(dx * dx + dy * dy))
        if score > best_score:
            best, best_score = face, score
    return best


def detection_view(photo, max_side):
    """The photo shrunk so its longest side is at most max_side (uint8 HxWx3) and the shrink factors
    (photo pixels per view pixel, along x and y)."""
    scale = min(1.0, max_side / max(photo.size))
    if scale == 1.0:
        return np.asarray(photo), (1.0, 1.0)
    size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    # an area (box) average, like the original MTCNN's INTER_AREA; reducing_gap=1 lets PIL first divide by
    # the integer part of the factor with its fast reduce(), which makes a 1 MP photo's shrink ~3x cheaper
    view = photo.resize(size, Image.Resampling.BOX, reducing_gap=1.0)
    return np.asarray(view), (photo.width / size[0], photo.height / size[1])


def to_photo_coordinates(face, shrink):
    """Map a face found on the detection view back to the full photo (pixel centres at integers)."""
    if shrink == (1.0, 1.0):
        return face
    factors = np.array(shrink)
    return Face(
        box=(face.box + 0.5) * np.tile(factors, 2) - 0.5,
        landmarks=(face.landmarks + 0.5) * factors - 0.5,
        prob=face.prob,
    )
