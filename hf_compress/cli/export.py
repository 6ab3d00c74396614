"""`hf-compress export`: an ONNX Runtime folder (fp32 graph, optional int8 graphs) from any checkpoint.

Every check runs before the model is exported: the output folder (`checks.check_output_dir`, with `onnx_export.json`
as the mark of a previous export), the pairing of `--quantize static` with `--calibration-file`, the calibration
sentences themselves, the `onnx` extra, and the tokenizer. The export is `hf_compress.deploy.export_onnx`, which
checks the graph against PyTorch; the command prints what it wrote and that difference per file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging as _pylogging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers.utils import logging

from ..data import require_hub_or_local
from ..deploy import OnnxExport, export_onnx
from ..deploy.model_card import ONNX_FILE_DESCRIPTIONS
from ..deploy.onnx_runtime import EXPORT_INFO_FILE, require_onnx
from ..report import format_bytes
from .calibration import calibration_texts
from .checks import check_encoding, check_local_path, check_output_dir, load_model, load_tokenizer
from .commands import CommandFailed, quiet


def run_export(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """`hf-compress export`: check every input, export to ONNX (and int8), print the files and their errors."""
    modes = tuple(dict.fromkeys(args.quantize or ()))
    output_dir = check_output_dir(
        args,
        {"--model": args.model, "--tokenizer": args.tokenizer, "--calibration-file": args.calibration_file},
        marker=EXPORT_INFO_FILE,
        made="ONNX",
    )
    check_local_path("--model", args.model)
    if args.tokenizer is not None:
        check_local_path("--tokenizer", args.tokenizer)
    if "static" in modes and args.calibration_file is None:
        raise ValueError(
            "--quantize static calibrates activation scales on real sentences: add --calibration-file (a text file "
            "with one sentence per line, or a data file or folder), or use --quantize dynamic, which needs no data."
        )
    if args.calibration_file is not None and "static" not in modes:
        raise ValueError(
            f"--calibration-file {args.calibration_file} is used only by static quantization: add --quantize static "
            "(or --quantize dynamic static), or leave --calibration-file out."
        )
    texts = calibration_texts(args) if "static" in modes else None
    try:
        require_onnx()
    except ImportError as error:
        raise ValueError(str(error)) from None
    models = {"--model": args.model, **({"--tokenizer": args.tokenizer} if args.tokenizer else {})}
    require_hub_or_local(models=models, argv=argv)

    model = load_model(args.model, dtype=torch.float32)  # the graph is fp32 whatever the checkpoint's dtype
    vocab_size = getattr(model.config, "vocab_size", None)
    flag, source = ("--tokenizer", args.tokenizer) if args.tokenizer else ("--model", args.model)
    tokenizer, problem = load_tokenizer(source, vocab_size)
    if problem is not None and (args.tokenizer is not None or texts is not None):
        raise ValueError(
            f"{flag} {source}: {problem}. "
            + ("Static calibration encodes the sentences with it: " if texts is not None else "")
            + "pass the tokenizer the model was trained with, with --tokenizer (a folder or Hub id)."
        )
    if texts is not None:
        encoded = {"input_ids": tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]}
        check_encoding(encoded, tokenizer, flag, source, vocab_size)

    try:
        # export_onnx's "no tokenizer" warning is in the summary below.
        with _only_own_info_lines(), quiet(export_onnx.__module__, logging.ERROR):
            result = export_onnx(
                model,
                output_dir,
                tokenizer=tokenizer,
                opset=args.opset,
                quantize=modes or None,
                calibration_texts=texts,
                max_length=args.max_length,
            )
    except RuntimeError as error:  # the graph was written but disagrees with PyTorch: a failure, not a refusal
        raise CommandFailed(str(error)) from None
    print(
        format_summary(
            result,
            type(model).__name__,
            num_calibration=len(texts) if texts else None,
            tokenizer_saved=tokenizer is not None,
        )
    )
    if tokenizer is None:
        print(
            f"\nThe folder has NO tokenizer: --model {problem}. Copy the model's tokenizer there, or export again "
            "with --tokenizer, to run it on raw text."
        )


@contextlib.contextmanager
def _only_own_info_lines() -> Iterator[None]:
    """Keep hf-compress's INFO lines and drop the exporter's and quantizer's (onnxscript's optimizer and ONNX Runtime
    log a line per rewritten node and initializer, some through the root logger); their warnings still show."""
    root, own = _pylogging.getLogger(), _pylogging.getLogger(__name__.split(".")[0])
    levels = root.level, own.level
    own.setLevel(own.getEffectiveLevel())  # what it showed before, whether set on it or inherited from the root
    root.setLevel(max(root.level, _pylogging.WARNING))
    try:
        yield
    finally:
        root.setLevel(levels[0])
        own.setLevel(levels[1])


def format_summary(
    result: OnnxExport, architecture: str, num_calibration: int | None = None, tokenizer_saved: bool = True
) -> str:
    """The files an export wrote, with size and largest difference from PyTorch, as a few lines of text."""
    rows = [("fp32", result.model_path, result.max_abs_diff)]
    rows += [(mode, path, result.int8_max_abs_diff.get(mode)) for mode, path in result.quantized_paths.items()]
    table = [("file", "size", "max |ONNX - PyTorch|", "")]
    for mode, path, diff in rows:
        description = ONNX_FILE_DESCRIPTIONS.get(path.name, "ONNX graph")
        if mode == "static" and num_calibration:
            description = description.replace("on sample text", f"on {num_calibration} sentences")
        table.append((path.name, format_bytes(_file_bytes(path)), "" if diff is None else f"{diff:.2g}", description))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = [
        f"Exported {architecture} to {os.fspath(result.output_dir)} (opset {result.opset}; inputs "
        f"{', '.join(result.input_names)}, batch and sequence axes dynamic; outputs "
        f"{', '.join(result.output_names)}).",
        "",
    ]
    for index, row in enumerate(table):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths[:3]))
    lines += [
        "",
        "Differences: ONNX Runtime vs PyTorch fp32 on padded random batches of shapes other than the export's "
        "(int8 graphs are expected to differ more).",
        f"Also wrote config.json, {EXPORT_INFO_FILE}{' and the tokenizer' if tokenizer_saved else ''}. Run it with "
        "hf_compress.OnnxModel("
        f"{os.fspath(result.output_dir)!r}) or onnxruntime.InferenceSession on a .onnx file.",
    ]
    return "\n".join(lines)


def _file_bytes(path: Path) -> int:
    """A graph's bytes, with its external weights file (`model.onnx.data`, past protobuf's 2 GB) when it has one."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
