"""Export a checkpoint's embedding model to ONNX, preprocessing and threshold included as metadata.

    python export_onnx.py --model_path model.pt model.onnx [--opset 18] [--overwrite]

Any checkpoint that inference.py loads works (``--preprocess`` for those that store no preprocessing).
The graph takes what a decoded image gives, so that users need no normalisation code:

- input ``images``: float32, shape (N, 3, S, S), RGB pixel values in 0..255 (``uint8`` arrays cast to
  float32), where S is the ``image_size`` of the metadata and N any batch size. Photos must be aligned face
  crops resized to S x S (datasets/align_dataset.py with the metadata's ``alignment`` settings makes them).
- output ``embeddings``: float32 (N, embedding_dim), L2-normalised (norm 10 for the original's 2019 model,
  whose threshold is on that scale).

The normalisation ``(x / 255 - mean) / std`` runs inside the graph. The ONNX model's ``metadata_props``
hold, as strings: ``image_size``, ``mean`` and ``std`` (JSON lists: what the graph applies), ``input_range``,
``layout``, ``architecture``, ``embedding_dim``, ``best_distance_threshold`` (empty when the checkpoint has
none), ``best_distance_threshold_note`` (empty unless that threshold was measured on earlier weights than
these: the last validation's), ``distance_scale``, ``alignment`` (JSON) and ``alignment_source`` (checkpoint, command line, or guessed), ``preprocess`` (the preset used, or empty) and ``source``
(the checkpoint's file name). The export uses torch.onnx's torch.export-based exporter (onnxscript), with
the batch dimension dynamic; an existing output file is kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from errors import InputError, report_input_errors
from fileio import atomic_write, refuse_to_replace
from inference import (
    PREPROCESS_PRESETS,
    LoadedModel,
    add_alignment_flags,
    load_checkpoint,
    preset_help,
    resolve_alignment,
)

DEFAULT_OPSET = 18  # the oldest opset the torch.export-based exporter writes natively
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"


class NormalizedEmbedding(nn.Module):
    """``model((images / 255 - mean) / std)``: the embedding model taking 0..255 RGB pixels."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)
        # (x / 255 - mean) / std == x * scale - shift, as datasets/transforms.ToNormalizedTensor computes it
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", mean / std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images * self.scale - self.shift).float()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a checkpoint's embedding model to ONNX.")
    parser.add_argument(
        "--model_path", required=True, type=Path, help="checkpoint (.pt), any supported layout"
    )
    parser.add_argument("output", type=Path, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--preprocess", choices=tuple(PREPROCESS_PRESETS), default=None, help=preset_help())
    parser.add_argument("--image_size", type=int, default=None, help="input size; default: the checkpoint's")
    add_alignment_flags(parser)  # what the metadata's alignment entry says
    return parser


def metadata(loaded: LoadedModel) -> dict[str, str]:
    """The ONNX metadata_props: how to feed the graph and how to judge its output, as strings."""
    threshold = loaded.best_distance_threshold
    return {
        "image_size": str(loaded.image_size),
        "mean": json.dumps([float(value) for value in loaded.mean]),
        "std": json.dumps([float(value) for value in loaded.std]),
        "input_range": "float32 RGB 0..255, NCHW; normalised inside the graph",
        "layout": loaded.layout,
        "architecture": loaded.architecture,
        "embedding_dim": str(loaded.embedding_dim),
        "best_distance_threshold": "" if threshold is None else repr(float(threshold)),
        "best_distance_threshold_note": loaded.threshold_note or "",  # set when measured on earlier weights
        "distance_scale": repr(float(loaded.distance_scale)),
        "alignment": json.dumps(loaded.alignment.as_dict()),
        "alignment_source": loaded.alignment_source,  # a guess unless the checkpoint or the flags said
        "preprocess": loaded.preprocess or "",
        "source": Path(loaded.path).name if loaded.path else "",
    }


def export(loaded: LoadedModel, opset: int):
    """The ONNX ModelProto of `loaded`'s embedding model with normalisation, dynamic batch, and metadata."""
    wrapper = NormalizedEmbedding(loaded.model, loaded.mean, loaded.std).eval()
    example = torch.rand(2, 3, loaded.image_size, loaded.image_size) * 255
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():  # the exporter's deprecation and tracing notes are not the user's
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                verbose=False,
            )
        except Exception as error:  # noqa: BLE001 - the exporter raises many types; say which opset failed
            message = str(error).strip().splitlines()
            raise InputError(
                f"ONNX export at opset {opset} failed: {message[0] if message else type(error).__name__}"
            ) from None
    proto = program.model_proto
    for key, value in metadata(loaded).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def run(args) -> None:
    import onnx  # only this command needs onnx

    refuse_to_replace(args.output, args.overwrite)  # a folder is refused as one there
    if args.output.suffix.lower() != ".onnx":
        raise InputError(f"the output should be a .onnx file, got {args.output}")
    newest = onnx.defs.onnx_opset_version()
    if not DEFAULT_OPSET <= args.opset <= newest:
        raise InputError(
            f"--opset {args.opset}: choose {DEFAULT_OPSET} (the torch.export-based exporter's oldest) to "
            f"{newest} (the installed onnx's newest)"
        )
    loaded = load_checkpoint(args.model_path, "cpu", image_size=args.image_size, preprocess=args.preprocess)
    resolve_alignment(loaded, args.template, args.crop_margin, used=True)
    proto = export(loaded, args.opset)
    written = max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    if written != args.opset:  # the exporter falls back to its own opset when it cannot convert
        raise InputError(f"--opset {args.opset}: the installed exporter wrote opset {written} instead")
    onnx.checker.check_model(proto)
    with atomic_write(args.output, "wb") as handle:
        handle.write(proto.SerializeToString())
    print(
        f"wrote {args.output}: {loaded.architecture}, {loaded.embedding_dim}-d embeddings of "
        f"{loaded.image_size} px RGB 0..255 input, opset {args.opset}"
    )
    if loaded.threshold_note:
        print(f"note: its best_distance_threshold is the last validation's: {loaded.threshold_note}")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return report_input_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
