"""export_onnx.py: ONNX Runtime gives the PyTorch embeddings, at any batch size, from 0..255 pixels."""

import json

import numpy as np
import onnx  # both in requirements.txt: a missing one fails here rather than skipping the file
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import export_onnx
from inference import FaceEmbedder, load_checkpoint
from models import build_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint of this repository with non-default preprocessing and an alignment entry."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_model("resnet18", embedding_dim=16)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():  # batch-norm statistics that a wrong export could not match by chance
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
    path = root / "model.pt"
    torch.save(
        {
            "epoch": 3,
            "embedding_dimension": 16,
            "model_state_dict": model.state_dict(),
            "model_architecture": "resnet18",
            "best_distance_threshold": 0.8125,
            "image_size": 48,
            "normalization": {"mean": [0.6, 0.45, 0.4], "std": [0.25, 0.2, 0.22]},
            "alignment": {"template": "arcface112", "image_size": 112, "margin": 0},
            "format_version": 1,
        },
        path,
    )
    output = root / "model.onnx"
    assert export_onnx.main(["--model_path", str(path), str(output)]) == 0
    return path, output


def test_onnx_runtime_matches_pytorch_for_batches_1_and_3(checkpoint):
    path, output = checkpoint
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["embeddings"]
    embedder = FaceEmbedder(path)
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        pixels = rng.integers(0, 256, (batch, 48, 48, 3), dtype=np.uint8)
        (ours,) = session.run(None, {"images": pixels.transpose(0, 3, 1, 2).astype(np.float32)})
        expected = embedder.embed([Image.fromarray(p) for p in pixels]).numpy()
        assert ours.shape == (batch, 16) and ours.dtype == np.float32
        assert np.abs(ours - expected).max() < 1e-4
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_metadata_holds_preprocessing_and_threshold(checkpoint):
    path, output = checkpoint
    props = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    loaded = load_checkpoint(path)
    assert props["image_size"] == "48" and json.loads(props["mean"]) == [0.6, 0.45, 0.4]
    assert json.loads(props["std"]) == [0.25, 0.2, 0.22]
    assert (props["layout"], props["architecture"], props["embedding_dim"]) == (
        "this repository",
        "resnet18",
        "16",
    )
    assert float(props["best_distance_threshold"]) == loaded.best_distance_threshold == 0.8125
    assert json.loads(props["alignment"]) == {"template": "arcface112", "image_size": 112, "margin": 0}
    assert props["alignment_source"] == "checkpoint"
    assert "0..255" in props["input_range"] and props["source"] == "model.pt"
    # the batch dimension is symbolic
    shape = onnx.load(str(output)).graph.input[0].type.tensor_type.shape.dim
    assert shape[0].dim_param and [d.dim_value for d in shape[1:]] == [3, 48, 48]


def test_never_overwrites_without_overwrite(checkpoint, capsys):
    path, output = checkpoint
    before = output.read_bytes()
    assert export_onnx.main(["--model_path", str(path), str(output)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {output} exists; pass --overwrite to replace it\n"
    assert output.read_bytes() == before
    assert export_onnx.main(["--model_path", str(path), str(output.with_suffix(".txt"))]) == 2
    # an existing folder is refused for what it is, not offered to --overwrite
    assert export_onnx.main(["--model_path", str(path), str(output.parent)]) == 2
    assert capsys.readouterr().err.endswith(f"error: {output.parent} is a folder; name a file\n")
    assert (
        export_onnx.main(["--model_path", str(path), str(output.with_name("old.onnx")), "--opset", "11"]) == 2
    )
    assert "--opset 11: choose 18 (the torch.export-based exporter's oldest) to" in capsys.readouterr().err
    assert (
        export_onnx.main(["--model_path", str(path), str(output.with_name("new.onnx")), "--opset", "99"]) == 2
    )
    assert "--opset 99: choose 18" in capsys.readouterr().err  # not a fallback to 18 reported as 99
    assert not output.with_name("new.onnx").exists()
    assert (
        export_onnx.main(["--model_path", str(path.with_name("ghost.pt")), str(output.with_name("g.onnx"))])
        == 2
    )
    assert not output.with_name("g.onnx").exists() and not output.with_name("old.onnx").exists()
    small = output.with_name("small.onnx")
    assert export_onnx.main(["--model_path", str(path), str(small), "--image_size", "8"]) == 2
    assert "--image_size 8: resnet18 needs at least 32 px" in capsys.readouterr().err and not small.exists()
