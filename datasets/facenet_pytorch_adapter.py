"""The one place that touches facenet-pytorch's internals: its MTCNN networks and box helpers.

`datasets/mtcnn.py` drives the three-stage cascade itself (faster on the CPU than ``MTCNN.detect``) and needs
the P-, R- and O-nets with the weights shipped inside the facenet-pytorch wheel, plus four helpers of its
``detect_face`` module. They are not a public API, so the version is pinned in requirements.txt and
``tests/test_facenet_pytorch_adapter.py`` checks each of them on known inputs: a new facenet-pytorch that
changes them fails there, loudly, rather than as wrong crops.
"""

from __future__ import annotations

import os

import torch
from facenet_pytorch import MTCNN
from facenet_pytorch.models.utils import detect_face as _detect_face

from errors import InputError

PINNED_VERSION = "2.5.3"


def mtcnn_networks(device) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(PNet, RNet, ONet) in eval mode on ``device``, with the weights shipped inside the wheel."""
    try:
        mtcnn = MTCNN(device=torch.device(device))
    except FileNotFoundError as error:  # the weights live in the installed package, never downloaded
        raise InputError(
            f"facenet-pytorch's MTCNN weights are missing ({os.path.normpath(error.filename)}); reinstall it: "
            f"pip install --force-reinstall facenet-pytorch=={PINNED_VERSION}"
        ) from None
    return mtcnn.pnet.eval(), mtcnn.rnet.eval(), mtcnn.onet.eval()


def candidate_boxes(regression, scores, scale, threshold):
    """PNet's score map -> (boxes (N, 9): x1, y1, x2, y2, score, 4 regressions; their image indices)."""
    return _detect_face.generateBoundingBox(regression, scores, scale, threshold)


def regress_boxes(boxes, regression):
    """Apply the networks' box regression (offsets in box sizes) to ``boxes``."""
    return _detect_face.bbreg(boxes, regression)


def square_boxes(boxes):
    """Each box grown to a square around its centre (the side is the longer one)."""
    return _detect_face.rerec(boxes)


def nms_min(boxes, scores, image_indices, threshold):
    """Per-image non-maximum suppression with overlap = intersection / the smaller area (kept indices)."""
    return _detect_face.batched_nms_numpy(boxes, scores, image_indices, threshold, "Min")
