"""The `hf-compress` command line.

```bash
# Keep 60% of the encoder FLOPs of a fine-tuned classifier, calibrating on 256 training sentences, no retraining:
hf-compress prune --model path/or/hub-id --dataset path/to/sst2 --keep 0.6 --output-dir pruned
# Replay the saved plan on another copy of the same model:
hf-compress apply-plan --model path/or/hub-id --plan pruned/pruning_plan.json --output-dir pruned-again
```

`--dataset` is a Hub dataset id (with `--dataset-config`), a local folder with one file per split (GLUE-style
`train.tsv` / `validation.tsv` with a `sentence<TAB>label` header, or `.csv` / `.json` / `.jsonl`), or a single such
file. The output folder gets the pruned checkpoint (`save_pretrained`, loadable with `hf_compress.load_compressed`, or
with stock transformers and `trust_remote_code=True`), the tokenizer, `pruning_plan.json` and `pruning_report.json`.
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path

from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding

from .checkpoint import load_compressed
from .data import HubUnreachableError, load_text_classification_dataset, require_hub_or_local
from .pruner import apply_plan, prune, save_plan
from .pruning_config import PruningConfig

logger = logging.getLogger(__name__)

PLAN_FILE, REPORT_FILE = "pruning_plan.json", "pruning_report.json"
_FILE_KINDS = {".tsv": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def _layers(value: str) -> int | list[int]:
    """`--layers 2` (how many) or `--layers 1,3` (which)."""
    try:
        if "," in value or value.startswith("["):
            return [int(v) for v in value.strip("[]").split(",") if v.strip()]
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a number of layers nor a comma-separated list of layer indices (e.g. 2 or 1,3)."
        ) from None


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per `PruningConfig` field, with the field's help text."""
    group = parser.add_argument_group("pruning (PruningConfig)")
    for field in fields(PruningConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if field.name == "rescale":
            group.add_argument(
                "--no-rescale", dest="rescale", action="store_false", help="Skip the least-squares rescaling."
            )
        elif field.name == "uniform":
            group.add_argument(flag, action="store_true", help=help_text)
        elif field.name == "layers":
            group.add_argument(flag, type=_layers, default=None, help=help_text + " E.g. 2, or 1,3.")
        else:
            kind = {"keep": float, "rescale_damping": float, "head_ratio": float, "ffn_ratio": float}.get(field.name)
            kind = kind or (int if field.name in ("seq_len", "num_batches", "round_to") else str)
            default = None if field.default is MISSING else field.default
            group.add_argument(flag, type=kind, default=default, help=f"{help_text} (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-compress", description="Distillation and structured pruning for Hugging Face transformers."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    prune_parser = commands.add_parser(
        "prune",
        help="Prune a model to a FLOPs / parameter budget, retraining-free.",
        description="Score heads and FFN neurons on calibration data, remove the least important ones to meet the "
        "budget, rescale the rest by least squares, and save the smaller model.",
    )
    prune_parser.add_argument("--model", required=True, help="Model folder or Hub id (a fine-tuned classifier).")
    prune_parser.add_argument(
        "--dataset",
        required=True,
        help="Hub dataset id, a folder with train/validation files, or one CSV/TSV/JSON file.",
    )
    prune_parser.add_argument("--dataset-config", default=None, help="Hub dataset configuration (e.g. sst2 for glue).")
    prune_parser.add_argument("--split", default="train", help="Split to draw calibration examples from.")
    prune_parser.add_argument(
        "--text-column", nargs="+", default=None, help="Text column, or two for sentence pairs (default: detected)."
    )
    prune_parser.add_argument(
        "--label-column", default="label", help="Label column; without one, scores use the model's own predictions."
    )
    prune_parser.add_argument("--num-samples", type=int, default=256, help="Calibration examples (default: 256).")
    prune_parser.add_argument("--batch-size", type=int, default=32, help="Calibration batch size (default: 32).")
    prune_parser.add_argument("--max-length", type=int, default=128, help="Truncate examples to this many tokens.")
    prune_parser.add_argument("--seed", type=int, default=0, help="Seed of the calibration sample.")
    prune_parser.add_argument("--output-dir", required=True, help="Where the pruned model, plan and report go.")
    _add_config_arguments(prune_parser)

    plan_parser = commands.add_parser(
        "apply-plan",
        help="Apply a saved pruning plan to a copy of the model it was made for.",
        description="Replay pruning_plan.json (written by `hf-compress prune`) on the same original model.",
    )
    plan_parser.add_argument("--model", required=True, help="Model folder or Hub id the plan was made for.")
    plan_parser.add_argument("--plan", required=True, help="The plan's JSON file.")
    plan_parser.add_argument("--output-dir", required=True, help="Where the pruned model goes.")
    return parser


def _load_file(path: Path) -> Dataset:
    kind = _FILE_KINDS.get(path.suffix)
    if kind is None:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use .tsv, .csv, .json or .jsonl.")
    if kind != "tsv":
        return load_dataset(kind, data_files=str(path), split="train")
    # GLUE-style TSV: unquoted, since sentences contain quote characters.
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"{path} has no rows below its header.")
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    for name, values in columns.items():
        if all(value.lstrip("-").isdigit() for value in values):
            columns[name] = [int(value) for value in values]
    return Dataset.from_dict(columns)


def _calibration_data(args: argparse.Namespace, label2id: dict | None) -> tuple[Dataset, tuple[str, ...], str | None]:
    """The calibration split, its text column(s) and its label column (None when it has none)."""
    path = Path(args.dataset).expanduser()
    if path.is_file():
        dataset = _load_file(path)
        columns = dataset.column_names
        text_columns = tuple(args.text_column or next(([c] for c in ("sentence", "text") if c in columns), []))
        if not text_columns or any(c not in columns for c in text_columns):
            raise ValueError(f"{path} has the columns {columns}; name the text column(s) with --text-column.")
        label_column = args.label_column if args.label_column in columns else None
        if label_column and label2id and isinstance(dataset[0][label_column], str):
            dataset = dataset.map(lambda row: {label_column: label2id[row[label_column]]})
        return dataset, text_columns, label_column
    data = load_text_classification_dataset(
        args.dataset, args.dataset_config, args.text_column, args.label_column, label2id, splits=(args.split,)
    )
    if args.split not in data.dataset:
        raise ValueError(f"{args.dataset} has no {args.split!r} split; pick one of {list(data.dataset)} with --split.")
    return data.dataset[args.split], data.text_columns, data.label_column


def _calibration_loader(args: argparse.Namespace, tokenizer, label2id: dict | None) -> DataLoader:
    dataset, text_columns, label_column = _calibration_data(args, label2id)
    if args.num_samples < len(dataset):
        dataset = dataset.select(sorted(random.Random(args.seed).sample(range(len(dataset)), args.num_samples)))
    encoded = dataset.map(
        lambda rows: tokenizer(*(rows[c] for c in text_columns), truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=[c for c in dataset.column_names if c != label_column],
    )
    if label_column is None:
        logger.info("No label column %r: importance is scored against the model's own predictions.", args.label_column)
    elif label_column != "labels":
        encoded = encoded.rename_column(label_column, "labels")
    # Similar lengths in a batch: dynamic padding then adds few pad tokens.
    encoded = encoded.map(lambda row: {"length": len(row["input_ids"])}).sort("length").remove_columns("length")
    return DataLoader(encoded, batch_size=args.batch_size, collate_fn=DataCollatorWithPadding(tokenizer))


def _save(model, tokenizer, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)


def _check_local(flag: str, value: str) -> None:
    # A value written as a path (not a Hub id such as "glue" or "org/name") must exist: no Hub lookup for a typo.
    looks_like_path = value.startswith((".", "/", "~")) or value.count("/") > 1 or Path(value).suffix in _FILE_KINDS
    if looks_like_path and not Path(value).expanduser().exists():
        raise ValueError(f"{flag} {value}: no such file or folder (for a Hub id, write it as 'name' or 'org/name').")


def _run_prune(args: argparse.Namespace, argv: Sequence[str]) -> None:
    config = PruningConfig(**{f.name: getattr(args, f.name) for f in fields(PruningConfig)})
    _check_local("--model", args.model)
    _check_local("--dataset", args.dataset)
    require_hub_or_local(models={"--model": args.model}, datasets={"--dataset": args.dataset}, argv=argv)
    model = load_compressed(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = _calibration_loader(args, tokenizer, model.config.label2id or None)
    report = prune(model, config, dataloader=calibration)
    output_dir = Path(args.output_dir)
    _save(model, tokenizer, output_dir)
    save_plan(report.plan, output_dir / PLAN_FILE)
    report.save(output_dir / REPORT_FILE)
    print(report)
    print(f"\nSaved the pruned model, {PLAN_FILE} and {REPORT_FILE} to {output_dir}")


def _run_apply_plan(args: argparse.Namespace, argv: Sequence[str]) -> None:
    _check_local("--model", args.model)
    require_hub_or_local(models={"--model": args.model}, argv=argv)
    model = load_compressed(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):  # a model folder without tokenizer files
        tokenizer = None
    apply_plan(model, args.plan)
    _save(model, tokenizer, Path(args.output_dir))
    print(f"Applied {args.plan} and saved the pruned model to {args.output_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hf-compress` with `argv` (default: the process's arguments); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "prune":
            _run_prune(args, ["hf-compress", *argv])
        else:
            _run_apply_plan(args, ["hf-compress", *argv])
    except (ValueError, HubUnreachableError) as error:
        print(f"hf-compress {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
