"""The `hf-compress` argument parser: `prune` (one flag per `PruningConfig` field), `apply-plan`, `export` (ONNX)
and `inspect`.

The pruning flags are generated from the `PruningConfig` dataclass (name, type, default and help text), so a new or
renamed field is a new or renamed flag with nothing to change here. `export` and `inspect` import nothing of ONNX:
`--help` works without the `onnx` extra.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

from ..pruning.config import PruningConfig

# The ONNX exporter's lowest opset (`hf_compress.deploy.onnx_export.DEFAULT_OPSET`; not imported, so that `--help`
# does not load torch.onnx).
MIN_OPSET = 18
QUANTIZE_MODES = ("dynamic", "static")


def _positive_int(value: str) -> int:
    """An `int` >= 1, for counts and sizes."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer; give a whole number >= 1.")
    return number


def _opset(value: str) -> int:
    """An ONNX opset the dynamo exporter writes (>= 18)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < MIN_OPSET:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an opset the exporter writes; give {MIN_OPSET} (the default) or newer."
        )
    return number


def _int_or_int_list(value: str) -> int | list[int]:
    """`--layers 2` (how many) or `--layers 1,3` (which)."""
    try:
        if "," in value or value.startswith("["):
            return [int(v) for v in value.strip("[]").split(",") if v.strip()]
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a number nor a comma-separated list of indices (e.g. 2 or 1,3)."
        ) from None


def _argument_type(annotation: Any) -> Callable[[str], Any]:
    """How to read a flag's value, from its field's type: `float | None` -> float, `int | list[int]` -> either."""
    kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)] or [annotation]
    if any(typing.get_origin(kind) is list for kind in kinds):
        return _int_or_int_list
    return next((kind for kind in (float, int) if kind in kinds), str)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per `PruningConfig` field, with the field's help text, read according to the field's type.

    Nothing here names a field: a boolean that defaults to True becomes `--no-<name>`, one that defaults to False a
    switch, a list-or-number field takes `2` or `1,3`, and every other field its type's value.
    """
    group = parser.add_argument_group("pruning (PruningConfig)")
    annotations = typing.get_type_hints(PruningConfig)
    for field in fields(PruningConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        kind = annotations[field.name]
        default = None if field.default is MISSING else field.default
        if kind is bool and default is True:
            group.add_argument(
                "--no-" + field.name.replace("_", "-"),
                dest=field.name,
                action="store_false",
                help=f"Turn off {field.name}: {help_text}",
            )
        elif kind is bool:
            group.add_argument(flag, action="store_true", help=help_text)
        elif _argument_type(kind) is _int_or_int_list:
            group.add_argument(flag, type=_int_or_int_list, default=default, help=help_text + " E.g. 2, or 1,3.")
        else:
            group.add_argument(
                flag, type=_argument_type(kind), default=default, help=f"{help_text} (default: {default})"
            )


_TOKENIZER_HELP = (
    "Tokenizer folder or Hub id (default: the --model's own). Use it when the model folder has no tokenizer files, "
    "e.g. --tokenizer bert-base-uncased for a model fine-tuned from it."
)
_OVERWRITE_HELP = (
    "Also write into a non-empty --output-dir that is not a previous hf-compress output (files of the same name are "
    "replaced). A folder holding pruning_plan.json is a previous output and is replaced without this flag. The "
    "--model folder itself is never written to."
)


def build_parser() -> argparse.ArgumentParser:
    """The `hf-compress` argument parser, with the `prune`, `apply-plan`, `export` and `inspect` commands."""
    parser = argparse.ArgumentParser(
        prog="hf-compress", description="Distillation and structured pruning for Hugging Face transformers."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    prune_parser = commands.add_parser(
        "prune",
        help="Prune a model to a FLOPs / parameter budget, retraining-free.",
        description="Score heads and FFN neurons on calibration data, remove the least important ones to meet the "
        "budget, rescale the rest by least squares, and save the smaller model. All inputs are checked before any "
        "work: a tokenizer that cannot encode the calibration text (no tokenizer files in the --model folder, a "
        "vocabulary much smaller than the model's, or mostly unknown tokens) is refused, and so is an --output-dir "
        "that is the --model folder or an existing file.",
    )
    prune_parser.add_argument("--model", required=True, help="Model folder or Hub id (a fine-tuned classifier).")
    prune_parser.add_argument(
        "--tokenizer",
        default=None,
        help=_TOKENIZER_HELP + " It must encode the calibration text and is saved with the pruned model.",
    )
    prune_parser.add_argument(
        "--dataset",
        required=True,
        help="Hub dataset id, a folder with train/validation files, or one CSV/TSV/JSON file.",
    )
    prune_parser.add_argument("--dataset-config", default=None, help="Hub dataset configuration (e.g. sst2 for glue).")
    prune_parser.add_argument("--split", default="train", help="Split to draw calibration examples from.")
    prune_parser.add_argument(
        "--text-column",
        nargs="+",
        default=None,
        help="Text column, or two for sentence pairs (default: the first of sentence, text, sentence1 sentence2, "
        "question sentence, premise hypothesis that the data has).",
    )
    prune_parser.add_argument(
        "--label-column",
        default=None,
        help="Label column (default: label, if the data has one); without one, scores use the model's own "
        "predictions.",
    )
    prune_parser.add_argument(
        "--num-samples", type=_positive_int, default=256, help="Calibration examples, >= 1 (default: 256)."
    )
    prune_parser.add_argument(
        "--batch-size", type=_positive_int, default=32, help="Calibration batch size, >= 1 (default: 32)."
    )
    prune_parser.add_argument(
        "--max-length", type=_positive_int, default=128, help="Truncate examples to this many tokens (default: 128)."
    )
    prune_parser.add_argument("--seed", type=int, default=0, help="Seed of the calibration sample.")
    prune_parser.add_argument(
        "--output-dir",
        required=True,
        help="Where the pruned model, tokenizer, plan and report go: a new or empty folder, or a previous output.",
    )
    prune_parser.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _add_config_arguments(prune_parser)

    plan_parser = commands.add_parser(
        "apply-plan",
        help="Apply a saved pruning plan to a copy of the model it was made for.",
        description="Replay pruning_plan.json (written by `hf-compress prune`) on the same original model. No "
        "calibration: the tokenizer is only copied. If neither --tokenizer nor the --model folder gives a usable one "
        "(no tokenizer files, or a vocabulary much smaller than the model's), the model is saved without a tokenizer "
        "and the command says so; a --tokenizer that cannot be used is an error.",
    )
    plan_parser.add_argument("--model", required=True, help="Model folder or Hub id the plan was made for.")
    plan_parser.add_argument("--plan", required=True, help="The plan's JSON file (pruning_plan.json).")
    plan_parser.add_argument("--tokenizer", default=None, help=_TOKENIZER_HELP + " It is saved with the model.")
    plan_parser.add_argument(
        "--output-dir",
        required=True,
        help="Where the pruned model, tokenizer and a copy of the plan go: a new or empty folder, or a previous "
        "output.",
    )
    plan_parser.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _add_export_parser(commands)
    _add_inspect_parser(commands)
    return parser


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    export_parser = commands.add_parser(
        "export",
        help="Export a model (pruned, distilled or stock) to ONNX, optionally with int8 copies.",
        description="Write an ONNX Runtime folder (model.onnx with dynamic batch and sequence axes, config.json, the "
        "tokenizer, onnx_export.json) with hf_compress.export_onnx, and print each graph's largest difference from "
        "PyTorch on padded batches of other shapes. With --quantize, also int8 graphs: dynamic (no data needed) "
        "and/or static (activation scales calibrated on --calibration-file). All inputs are checked before any "
        "work: an --output-dir that is the --model folder, an existing file or a folder with other files in it, a "
        "--calibration-file without --quantize static (or the reverse), and a tokenizer that cannot encode the "
        "calibration text are refused.",
    )
    export_parser.add_argument(
        "--model", required=True, help="Model folder or Hub id: any checkpoint hf-compress writes, or a stock one."
    )
    export_parser.add_argument(
        "--output-dir",
        required=True,
        help="Where the ONNX files go: a new or empty folder, or a previous export (it holds onnx_export.json), "
        "whose graphs are replaced.",
    )
    export_parser.add_argument(
        "--tokenizer",
        default=None,
        help=_TOKENIZER_HELP + " It is saved beside the graphs and encodes the --calibration-file. Without a usable "
        "one (and without --quantize static) the folder is written without a tokenizer, and the command says so.",
    )
    export_parser.add_argument(
        "--quantize",
        nargs="+",
        choices=QUANTIZE_MODES,
        default=None,
        help="Also write int8 graphs: 'dynamic' (model_int8_dynamic.onnx, activations quantized per batch, no data "
        "needed) and/or 'static' (model_int8_static.onnx, calibrated activation scales; needs --calibration-file).",
    )
    export_parser.add_argument(
        "--calibration-file",
        default=None,
        help="Sentences for --quantize static: a text file with one sentence per line, or a local data file "
        "(.tsv/.csv/.json/.jsonl) or folder with one file per split, like `hf-compress prune --dataset`. Use the "
        "task's own text.",
    )
    export_parser.add_argument(
        "--text-column",
        default=None,
        help="The text column of a --calibration-file data file (default: the first of sentence, text that it has).",
    )
    export_parser.add_argument(
        "--split", default="train", help="The split of a --calibration-file folder to read (default: train)."
    )
    export_parser.add_argument(
        "--num-calibration",
        type=_positive_int,
        default=256,
        help="Calibration sentences, sampled from --calibration-file with --seed, >= 1 (default: 256).",
    )
    export_parser.add_argument("--seed", type=int, default=0, help="Seed of the calibration sample.")
    export_parser.add_argument(
        "--opset", type=_opset, default=MIN_OPSET, help=f"ONNX opset, >= {MIN_OPSET} (default: {MIN_OPSET})."
    )
    export_parser.add_argument(
        "--max-length",
        type=_positive_int,
        default=128,
        help="Truncate calibration sentences to this many tokens (default: 128). The graph itself takes any length "
        "up to the model's position embeddings.",
    )


def _add_inspect_parser(commands: argparse._SubParsersAction) -> None:
    inspect_parser = commands.add_parser(
        "inspect",
        help="Describe a model: architecture, heads and FFN widths per layer, parameters, FLOPs, sparsity.",
        description="Describe a checkpoint: its class and model_type, the attention heads and FFN neurons of each "
        "layer, parameters and size, encoder FLOPs at --seq-len tokens, sparsity (the share of exact zeros in the "
        "encoder's linear weights) and whether stock transformers needs trust_remote_code to load it. For a folder "
        "holding .onnx files (an `hf-compress export` output) or a .onnx file: each graph's inputs, outputs, opset, "
        "size and int8 operators, and what the export recorded.",
    )
    inspect_parser.add_argument(
        "model", metavar="MODEL", help="A model folder, a Hub id, an ONNX folder or a .onnx file."
    )
    inspect_parser.add_argument(
        "--seq-len",
        type=_positive_int,
        default=128,
        help="Sequence length the encoder FLOPs are counted at (default: 128).",
    )
    inspect_parser.add_argument("--json", action="store_true", help="Print the description as JSON.")
