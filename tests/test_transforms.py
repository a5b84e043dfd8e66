import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as v1

from datasets.image_files import DECODE_ERRORS, load_image
from datasets.transforms import (
    FACE_MEAN,
    FACE_STD,
    ToNormalizedTensor,
    eval_transform,
    train_transform,
)
from tests.conftest import write_random_image


def random_pil(height=40, width=24, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("mean,std", [(FACE_MEAN, FACE_STD), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_fused_normalisation_equals_to_tensor_then_normalize(mean, std):
    image = random_pil()
    oracle = v1.Normalize(mean, std)(v1.ToTensor()(image))
    torch.testing.assert_close(ToNormalizedTensor(mean, std)(image), oracle, rtol=1e-6, atol=1e-6)
    # a uint8 CHW tensor gives the same result as the PIL image it came from
    as_tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    torch.testing.assert_close(ToNormalizedTensor(mean, std)(as_tensor), oracle, rtol=1e-6, atol=1e-6)


def test_fused_normalisation_refuses_float_tensors():
    with pytest.raises(TypeError, match="uint8"):
        ToNormalizedTensor()(torch.zeros(3, 4, 4))


def test_eval_transform_equals_the_original_pipeline_with_a_square_resize():
    image = random_pil(50, 30)
    oracle = v1.Compose([v1.Resize((32, 32)), v1.ToTensor(), v1.Normalize(FACE_MEAN, FACE_STD)])(image)
    result = eval_transform(32)(image)
    assert result.shape == (3, 32, 32) and result.dtype == torch.float32
    torch.testing.assert_close(result, oracle, rtol=1e-6, atol=1e-6)


def test_train_transform_is_square_in_range_and_random():
    image = random_pil(50, 30)
    transform = train_transform(48)
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(12)]
    for out in outputs:
        assert out.shape == (3, 48, 48) and out.dtype == torch.float32
        assert out.min() >= -1.0 and out.max() <= 1.0
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])  # flips / rotations happen


def test_train_transform_without_augmentation_matches_eval():
    # rotation by 0 degrees and no flip: the two pipelines must agree (same resize and normalisation)
    image = random_pil(40, 40)
    transform = train_transform(40)
    transform.transforms[1].p = 0.0  # RandomHorizontalFlip
    transform.transforms[2].degrees = [0.0, 0.0]  # RandomRotation
    torch.testing.assert_close(transform(image), eval_transform(40)(image))


@pytest.mark.parametrize("bad_size", [0, -3, 1.5, (32, 32), True])
def test_image_size_must_be_a_positive_int(bad_size):
    with pytest.raises(ValueError, match="image_size"):
        train_transform(bad_size)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_load_image_returns_rgb_whatever_the_file_mode(tmp_path, mode):
    path = tmp_path / f"face_{mode}.png"
    random_pil(20, 20).convert(mode).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (20, 20)
    assert eval_transform(16)(image).shape == (3, 16, 16)


def test_load_image_fails_loudly_on_truncated_and_garbage_files(tmp_path):
    good = write_random_image(tmp_path / "good.jpg", size=64)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    assert np.asarray(load_image(good)).shape == (64, 64, 3)
    for path in (truncated, garbage):
        with pytest.raises(DECODE_ERRORS):
            load_image(path)
