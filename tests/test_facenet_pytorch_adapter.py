"""The facenet-pytorch internals datasets/mtcnn.py relies on, checked on known inputs.

These are not facenet-pytorch's public API: a new release may change them. Each test states what the
cascade needs; a failure here means `datasets/facenet_pytorch_adapter.py` must be adapted to that release.
"""

from importlib.metadata import version
from pathlib import Path

import facenet_pytorch
import numpy as np
import torch

from datasets import facenet_pytorch_adapter as adapter


def test_the_pinned_version_is_installed():
    installed = version("facenet-pytorch")
    assert installed == adapter.PINNED_VERSION, (
        f"facenet-pytorch {installed} is installed but the adapter was checked against "
        f"{adapter.PINNED_VERSION}; run these tests and adapt datasets/facenet_pytorch_adapter.py"
    )
    with open(Path(__file__).resolve().parents[1] / "requirements.txt") as handle:
        assert f"facenet-pytorch=={adapter.PINNED_VERSION}" in handle.read()


@torch.inference_mode()
def test_the_three_networks_load_offline_with_their_output_shapes():
    pnet, rnet, onet = adapter.mtcnn_networks("cpu")
    assert not (pnet.training or rnet.training or onet.training)
    regression, probs = pnet(torch.zeros(1, 3, 12, 12))
    assert regression.shape == (1, 4, 1, 1) and probs.shape == (1, 2, 1, 1)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 1, 1))
    regression, probs = rnet(torch.zeros(2, 3, 24, 24))
    assert regression.shape == (2, 4) and probs.shape == (2, 2)
    regression, landmarks, probs = onet(torch.zeros(2, 3, 48, 48))
    assert regression.shape == (2, 4) and landmarks.shape == (2, 10) and probs.shape == (2, 2)
    # the weights are the trained ones shipped in the wheel (its data/*.pt files), not a fresh initialisation
    shipped = Path(facenet_pytorch.__file__).parent / "data"
    for network, name in ((pnet, "pnet"), (rnet, "rnet"), (onet, "onet")):
        weights = torch.load(shipped / f"{name}.pt", map_location="cpu", weights_only=True)
        state = network.state_dict()
        assert sorted(weights) == sorted(state), name
        assert all(torch.equal(state[key], weights[key]) for key in weights), name


def test_candidate_boxes_map_score_cells_to_12px_windows():
    """A PNet cell (row y, column x) at pyramid scale s covers the 12 px window at (2x, 2y) / s."""
    scores = torch.zeros(1, 3, 4)
    scores[0, 1, 2] = 0.9  # row 1, column 2
    regression = torch.zeros(1, 4, 3, 4)
    regression[0, :, 1, 2] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    boxes, image_indices = adapter.candidate_boxes(regression, scores, 0.5, 0.6)
    assert boxes.shape == (1, 9) and image_indices.tolist() == [0]
    x, y, scale = 2, 1, 0.5
    expected_corners = [
        np.floor((2 * x + 1) / scale),
        np.floor((2 * y + 1) / scale),
        np.floor((2 * x + 12) / scale),
        np.floor((2 * y + 12) / scale),
    ]
    np.testing.assert_allclose(boxes[0, :4].numpy(), expected_corners)
    np.testing.assert_allclose(boxes[0, 4:].numpy(), [0.9, 0.1, 0.2, 0.3, 0.4], rtol=1e-6)


def test_regress_boxes_moves_corners_by_fractions_of_the_inclusive_size():
    boxes = torch.tensor([[10.0, 20.0, 29.0, 59.0, 0.8]])  # 20 x 40 pixels, corners inclusive
    regression = torch.tensor([[0.1, -0.05, 0.2, 0.25]])
    regressed = adapter.regress_boxes(boxes.clone(), regression)
    np.testing.assert_allclose(regressed[0, :4].numpy(), [12.0, 18.0, 33.0, 69.0], rtol=1e-6)
    assert float(regressed[0, 4]) == float(boxes[0, 4])


def test_square_boxes_grow_the_short_side_about_the_centre():
    squared = adapter.square_boxes(torch.tensor([[10.0, 20.0, 30.0, 60.0, 0.5]]))
    np.testing.assert_allclose(squared[0, :4].numpy(), [0.0, 20.0, 40.0, 60.0])


def test_nms_min_suppresses_a_box_inside_a_better_one_per_image():
    boxes = torch.tensor([[0, 0, 100, 100], [10, 10, 30, 30], [10, 10, 30, 30], [200, 200, 260, 260]]).float()
    scores = torch.tensor([0.9, 0.8, 0.95, 0.7])
    image_indices = torch.tensor([0, 0, 1, 0])
    keep = sorted(np.asarray(adapter.nms_min(boxes, scores, image_indices, 0.7)).tolist())
    # the small box of image 0 lies wholly inside the better one: overlap / smaller area = 1, suppressed;
    # the same box on image 1 has nothing to compete with
    assert keep == [0, 2, 3]
