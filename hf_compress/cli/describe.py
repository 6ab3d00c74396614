"""`hf-compress inspect`: what a checkpoint (or an ONNX export) is, in one screen or as JSON.

For a PyTorch checkpoint the numbers are `hf_compress.report.summarize`'s (the ones `compression_report`, pruning
reports and model cards show), plus the sparsity of the encoder's linear weights and how the checkpoint loads. For a
folder holding `.onnx` files, or a `.onnx` file, it is `hf_compress.deploy.inspect_onnx`'s description.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..architectures import get_layers, supported_model_types
from ..data import HubUnreachableError, require_hub_or_local
from ..deploy import inspect_onnx
from ..remote_code.modeling_hf_compress import CONFIG_KEY
from ..report import count_parameters, format_bytes, format_count, summarize, weight_bytes
from .checks import check_local_path, load_model


def run_inspect(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """`hf-compress inspect MODEL`: print the description of a checkpoint or an ONNX export (JSON with `--json`)."""
    value = args.model
    path = Path(value).expanduser()
    check_local_path("MODEL", value)
    is_onnx = path.suffix == ".onnx" if path.is_file() else path.is_dir() and any(path.glob("*.onnx"))
    if path.is_file() and not is_onnx:
        raise ValueError(
            f"MODEL {value} is a file; pass a checkpoint folder (save_pretrained), a Hub id, an ONNX export folder or "
            "a .onnx file."
        )
    if is_onnx:
        try:
            description = {"kind": "onnx", **inspect_onnx(path)}
        except ImportError as error:
            raise ValueError(str(error)) from None
        print(json.dumps(description, indent=2) if args.json else format_onnx(description))
        return
    try:
        require_hub_or_local(models={"MODEL": value}, argv=argv)
    except HubUnreachableError:  # its suggested command rewrites flags; MODEL is positional
        raise HubUnreachableError(
            f"The Hugging Face Hub cannot be reached, and MODEL {value} is not a local path or in the cache. Run "
            "the same command on a local copy: hf-compress inspect PATH/TO/MODEL_FOLDER (a save_pretrained folder)."
        ) from None
    description = describe_checkpoint(load_model(value).eval(), args.seq_len)
    description = {"kind": "pytorch", "model": value, **description}
    print(json.dumps(description, indent=2) if args.json else format_checkpoint(description))


#### PyTorch checkpoints


def _linear_zeros(module: nn.Module) -> tuple[int, int]:
    """(exact zeros, entries) of the weights of the `nn.Linear` modules inside `module`."""
    zeros = total = 0
    for linear in module.modules():
        if isinstance(linear, nn.Linear):
            total += linear.weight.numel()
            zeros += int((linear.weight == 0).sum())
    return zeros, total


@torch.no_grad()
def describe_checkpoint(model: PreTrainedModel, seq_len: int = 128) -> dict[str, Any]:
    """Plain data on a loaded model: class, model_type, structure per layer, size, FLOPs, sparsity, how it loads.

    Args:
        model: The model (as `load_compressed` loads it).
        seq_len: Sequence length the encoder FLOPs are counted at.

    Returns:
        `class`, `model_type`, `parameters`, `size_bytes`, `seq_len`, `encoder_flops_per_token` and
        `encoder_flops_per_sequence` (`None` for an architecture without a registered spec), `layers` (per layer:
        `heads`, `max_heads`, `ffn_neurons`, `sparsity`), `sparsity` (exact zeros over all entries of the encoder's
        linear weights; of every `nn.Linear` for an unregistered architecture, as `sparsity_scope` says, `None`
        without any),
        `stock_structure`, `hf_compress_structure` (the config has an `hf_compress` entry), `needs_remote_code`
        (the config has an `auto_map`) and `loads_with`.
    """
    config = model.config
    auto_map = getattr(config, "auto_map", None) or {}
    description: dict[str, Any] = {
        "class": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "model_type": config.model_type,
    }
    if config.model_type in supported_model_types():
        summary = summarize(model, seq_len)
        layers = []
        zeros = total = 0
        for index, layer in enumerate(get_layers(model)):
            layer_zeros, layer_total = _linear_zeros(layer)
            zeros, total = zeros + layer_zeros, total + layer_total
            layers.append(
                {
                    "layer": index,
                    "heads": summary.heads_per_layer[index],
                    "max_heads": summary.max_heads,
                    "ffn_neurons": summary.ffn_per_layer[index],
                    "sparsity": layer_zeros / layer_total if layer_total else 0.0,
                }
            )
        description.update(
            parameters=summary.parameters,
            size_bytes=summary.size_bytes,
            seq_len=seq_len,
            encoder_flops_per_token=summary.flops_per_token,
            encoder_flops_per_sequence=summary.flops_per_token * seq_len,
            layers=layers,
            sparsity=zeros / total if total else 0.0,
            sparsity_scope="the encoder's linear weights",
            stock_structure=summary.structure.is_stock,
        )
    else:
        zeros, total = _linear_zeros(model)
        description.update(
            parameters=count_parameters(model),
            size_bytes=weight_bytes(model),
            seq_len=seq_len,
            encoder_flops_per_token=None,
            encoder_flops_per_sequence=None,
            layers=None,
            sparsity=zeros / total if total else None,
            sparsity_scope="all nn.Linear weights (no registered architecture, so no per-layer structure)",
            stock_structure=None,
        )
    description.update(
        hf_compress_structure=bool(getattr(config, CONFIG_KEY, None)),
        needs_remote_code=bool(auto_map),
        loads_with=(
            "stock transformers with trust_remote_code=True (the checkpoint carries its modeling code, see auto_map), "
            "or hf_compress.load_compressed without remote code"
            if auto_map
            else "stock transformers (from_pretrained), no remote code"
        ),
    )
    return description


def _per_layer(values: Sequence[int]) -> str:
    return f"{values[0]} in each of {len(values)} layers" if len(set(values)) == 1 else ", ".join(map(str, values))


def format_checkpoint(description: Mapping[str, Any]) -> str:
    """The `describe_checkpoint` result (plus `model`) as text."""
    d = description
    rows = [
        ("architecture", f"{d['class']} (model_type {d['model_type']})"),
        ("parameters", f"{d['parameters']:,} ({format_bytes(d['size_bytes'])} of weights)"),
    ]
    layers = d["layers"]
    if layers is not None:
        heads = [layer["heads"] for layer in layers]
        rows += [
            ("layers", str(len(layers))),
            ("attention heads", f"{sum(heads)} of {len(layers) * layers[0]['max_heads']}: {_per_layer(heads)}"),
            (
                "FFN neurons",
                f"{sum(layer['ffn_neurons'] for layer in layers):,}: "
                f"{_per_layer([layer['ffn_neurons'] for layer in layers])}",
            ),
            (
                f"encoder FLOPs @ {d['seq_len']} tokens",
                f"{format_count(d['encoder_flops_per_token'])} per token, {format_count(d['encoder_flops_per_sequence'])} per "
                "sequence",
            ),
        ]
    rows += [
        (
            "sparsity",
            "n/a (no nn.Linear weights)"
            if d["sparsity"] is None
            else f"{d['sparsity']:.1%} zeros in {d['sparsity_scope']}",
        ),
        (
            "structure",
            "not readable (unregistered architecture)"
            if d["stock_structure"] is None
            else "stock (every head, one FFN width)"
            if d["stock_structure"]
            else "per-layer (pruned by hf-compress, recorded in config.hf_compress)"
            if d["hf_compress_structure"]
            else "per-layer",
        ),
        ("needs remote code", "yes" if d["needs_remote_code"] else "no"),
        ("loads with", d["loads_with"]),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{d['model']}", ""] + [f"{name:<{width}}  {text}" for name, text in rows]
    if layers is not None:
        lines += ["", "layer  heads  FFN neurons  sparsity"]
        lines += [
            f"{layer['layer']:>5}  {layer['heads']:>2}/{layer['max_heads']:<2}  {layer['ffn_neurons']:>11,}  "
            f"{layer['sparsity']:>8.1%}"
            for layer in layers
        ]
    return "\n".join(lines)


#### ONNX exports


def format_onnx(description: Mapping[str, Any]) -> str:
    """The `inspect_onnx` result as text: what the export recorded, then each graph."""
    lines = [f"ONNX export {description['folder']}"]
    export = description.get("export")
    if export:
        lines.append(
            f"exported from {export.get('architecture')} with {export.get('exporter')}, opset {export.get('opset')}, "
            f"torch {export.get('torch_version')}, onnxruntime {export.get('onnxruntime_version')}"
        )
        if export.get("max_abs_diff") is not None:
            text = f"max |ONNX Runtime - PyTorch| at export: {export['max_abs_diff']:.2g} (fp32)"
            for mode, diff in (export.get("int8_max_abs_diff") or {}).items():
                text += f", {diff:.2g} (int8 {mode})"
            lines.append(text)
        structure = export.get("structure")
        if structure:
            lines.append(
                f"structure: {len(structure['heads'])} layers; heads {_per_layer(structure['heads'])}; FFN neurons "
                f"{_per_layer(structure['ffn'])}"
            )
    else:
        lines.append("no onnx_export.json: not written by hf-compress export (or the file was removed)")
    for name, graph in description["graphs"].items():

        def axes(values: Mapping[str, list]) -> str:
            return ", ".join(f"{key} [{', '.join(map(str, dims))}]" for key, dims in values.items())

        lines += [
            "",
            f"{name}: {format_bytes(graph['bytes'])}, opset {graph['opset']}, {graph['int8_ops']} int8 operators",
            f"  inputs:  {axes(graph['inputs'])}",
            f"  outputs: {axes(graph['outputs'])}",
        ]
    return "\n".join(lines)
