"""``hf-lowmem export MODEL_DIR --format {hf,onnx,torchscript,exported-program} --output OUT``: a trained
model folder to a deployable format, validated against PyTorch (see :mod:`hf_lowmem.export`)."""

from __future__ import annotations

import argparse
import json
import sys

FORMAT_CHOICES = ("hf", "onnx", "torchscript", "exported-program")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Export a model folder (save_pretrained / LowMemTrainer.save_model output) for inference. Every format is "
        "checked against the PyTorch model on inputs of two shapes and the largest logit difference is printed; "
        "on any failure nothing is left at --output."
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the model folder (config.json + safetensors)")
    p.add_argument("--format", required=True, choices=FORMAT_CHOICES,
                   help="hf: transformers safetensors in the original precision; onnx: model.onnx (onnxruntime, "
                        "float32); torchscript: model.pt (torch.jit.trace); exported-program: model.pt2 (torch.export)")
    p.add_argument("--output", "-o", required=True, metavar="OUT", help="output folder (created; must be empty or new)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="precision of the export (default: the original precision; float32 for onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT once the new export has validated")
    p.add_argument("--no_validate", dest="validate", action="store_false",
                   help="skip the comparison with PyTorch (not recommended)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest allowed absolute logit difference (default: relative to the largest logit, by dtype)")
    p.add_argument("--onnx_exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="auto: torch.onnx dynamo exporter, falling back to the TorchScript-based one")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: the exporter's)")
    p.add_argument("--attn_implementation", default=None,
                   help="attention used while exporting (default: sdpa where the model supports it, else eager)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(a: argparse.Namespace) -> int:
    from hf_lowmem.errors import LowMemError
    from hf_lowmem.export import export_model

    try:
        result = export_model(
            a.model_dir, a.output, a.format, dtype=a.dtype, overwrite=a.overwrite, validate=a.validate,
            tolerance=a.tolerance, onnx_exporter=a.onnx_exporter, opset=a.opset,
            attn_implementation=a.attn_implementation,
        )
    except LowMemError as e:
        print(f"hf-lowmem export: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.summary())
    return 0
