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
with stock transformers and `trust_remote_code=True`), the tokenizer, `pruning_plan.json` and `pruning_report.json`
(`apply-plan` writes the checkpoint, the tokenizer and `pruning_plan.json`).

Every check on the command line's values runs before any pruning and before anything is written; a failed check
exits with status 2 and one line on stderr naming the value and the fix. The command refuses:

- a tokenizer that cannot encode the calibration text: the `--model` folder has no tokenizer files (transformers 5
  would quietly build an empty 5-token one), its vocabulary is less than half the model's `vocab_size`, or it turns
  most of the calibration text into its unknown token. Pass the model's tokenizer with `--tokenizer`. (`apply-plan`
  needs no calibration: without a usable tokenizer it saves the model without one and says so.)
- an `--output-dir` that is the `--model` (or `--tokenizer` / `--dataset`) folder, even with `--overwrite`; one that
  is an existing file; and a non-empty folder that is not a previous hf-compress output (it has no
  `pruning_plan.json`) unless `--overwrite` is given.
- a missing, malformed or mismatched `--plan`, text or label columns the data does not have, and sizes below 1.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import random
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from .data import _TEXT_COLUMNS, HubUnreachableError, _labels_to_ids, _load_local_folder, require_hub_or_local
from .deploy.checkpoint import load_compressed
from .pruning.config import PruningConfig
from .pruning.pruner import apply_plan, load_plan, prune, save_plan

logger = hf_logging.get_logger(__name__)

PLAN_FILE, REPORT_FILE = "pruning_plan.json", "pruning_report.json"
_FILE_KINDS = {".tsv": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "json"}
# Files of which a tokenizer folder has at least one; without any, transformers 5 builds an empty (5-token) tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
# A tokenizer with fewer tokens than this share of the model's `vocab_size` is not the model's tokenizer.
MIN_VOCAB_FRACTION = 0.5
# Calibration text of which more than this share of the (non-special) tokens is the unknown token is not read right.
MAX_UNKNOWN_FRACTION = 0.5


def _positive_int(value: str) -> int:
    """An `int` >= 1, for counts and sizes."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer; give a whole number >= 1.")
    return number


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
    """The `hf-compress` argument parser, with the `prune` and `apply-plan` commands."""
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
    return parser


#### Checks of the outputs, run before anything is loaded


def _check_output_dir(args: argparse.Namespace, inputs: Mapping[str, str | None]) -> Path:
    """The output folder, once it is clear that writing there loses nothing; `inputs` maps flags to input paths."""
    value = args.output_dir
    output = Path(value).expanduser()
    resolved = output.resolve()
    for flag, source in inputs.items():
        if (
            source is not None
            and Path(source).expanduser().is_dir()
            and Path(source).expanduser().resolve() == resolved
        ):
            raise ValueError(
                f"--output-dir {value} is the {flag} folder: the pruned files would overwrite the original ones. "
                f"Write to a new folder, e.g. --output-dir {output.name or 'model'}-pruned."
            )
    if output.exists() and not output.is_dir():
        raise ValueError(
            f"--output-dir {value} is an existing file; name a new folder (or a previous output) instead."
        )
    if output.is_dir() and not args.overwrite and not (output / PLAN_FILE).is_file():
        contents = sorted(entry.name for entry in output.iterdir())
        if contents:
            shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
            raise ValueError(
                f"--output-dir {value} is a folder with other files in it ({shown}) and not a previous hf-compress "
                f"output (no {PLAN_FILE}); name a new or empty folder, or add --overwrite to write into it anyway."
            )
    ancestor = resolved
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(
            f"--output-dir {value}: {ancestor} is a file, so the folder cannot be made there; pick another."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"--output-dir {value}: {ancestor} is not writable; pick a folder you can write to.")
    return output


def _check_local(flag: str, value: str) -> None:
    # A value written as a path (not a Hub id such as "glue" or "org/name") must exist: no Hub lookup for a typo.
    looks_like_path = value.startswith((".", "/", "~")) or value.count("/") > 1 or Path(value).suffix in _FILE_KINDS
    if looks_like_path and not Path(value).expanduser().exists():
        raise ValueError(f"{flag} {value}: no such file or folder (for a Hub id, write it as 'name' or 'org/name').")


def _read_plan(value: str) -> dict[str, Any]:
    """The `--plan` file's plan, or a ValueError naming the file."""
    path = Path(value).expanduser()
    if not path.is_file():
        what = "a folder" if path.is_dir() else "no such file"
        raise ValueError(
            f"--plan {value}: {what}; pass the {PLAN_FILE} that `hf-compress prune` wrote to its --output-dir."
        )
    try:
        return load_plan(path)
    except UnicodeDecodeError:
        raise ValueError(
            f"--plan {value} is not a text file; pass the {PLAN_FILE} written by `hf-compress prune`."
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--plan {value} is not valid JSON ({error}); pass the {PLAN_FILE} written by `hf-compress prune`."
        ) from None
    except ValueError as error:  # load_plan: JSON, but not a plan; its message names the file
        raise ValueError(f"--plan {error}") from None


#### Model and tokenizer


def _load_model(value: str) -> PreTrainedModel:
    try:
        return load_compressed(value)
    except (OSError, ValueError) as error:
        raise ValueError(f"--model {value}: cannot load a model from it ({_first_line(error)}).") from None


def _load_tokenizer(source: str, vocab_size: int | None) -> tuple[PreTrainedTokenizerBase | None, str | None]:
    """The tokenizer at `source`, or `None` and why it cannot be the model's tokenizer."""
    path = Path(source).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None, f"the folder has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, ImportError) as error:
        return None, f"no tokenizer loads from it ({_first_line(error)})"
    if vocab_size and len(tokenizer) < MIN_VOCAB_FRACTION * vocab_size:
        return None, (
            f"its tokenizer has {len(tokenizer)} tokens but the model has {vocab_size} token embeddings, so it is not "
            "the model's tokenizer"
        )
    return tokenizer, None


def _check_encoding(
    encoded: Dataset, tokenizer: PreTrainedTokenizerBase, flag: str, source: str, vocab_size: int | None
) -> None:
    """Refuse a tokenizer (from `flag source`) whose calibration ids are mostly unknown, or beyond the embeddings."""
    unknown_id = tokenizer.unk_token_id
    special = set(tokenizer.all_special_ids) - {unknown_id}
    total = unknown = largest = 0
    for ids in encoded["input_ids"]:
        largest = max(largest, max(ids, default=0))
        for token in ids:
            if token not in special:
                total += 1
                unknown += token == unknown_id
    if vocab_size and largest >= vocab_size:
        raise ValueError(
            f"{flag} {source}: its tokenizer gives token id {largest}, but the model has only {vocab_size} token "
            "embeddings, so it is not the model's tokenizer. Pass the right one with --tokenizer."
        )
    if total == 0:
        raise ValueError("The calibration texts are empty; name the column that holds the text with --text-column.")
    if unknown_id is not None and unknown > MAX_UNKNOWN_FRACTION * total:
        raise ValueError(
            f"{flag} {source}: its tokenizer reads {unknown / total:.0%} of the calibration text as the unknown token "
            f"{tokenizer.unk_token!r}, so it is not the tokenizer the model was trained with. Pass that one with "
            "--tokenizer (a folder or Hub id), or check that --text-column names the text."
        )


#### Calibration data


def _load_file(path: Path) -> Dataset:
    kind = _FILE_KINDS.get(path.suffix)
    if kind is None:
        raise ValueError(f"--dataset {path}: unknown file type {path.suffix!r}; use .tsv, .csv, .json or .jsonl.")
    if kind != "tsv":
        return load_dataset(kind, data_files=str(path), split="train")
    # GLUE-style TSV: unquoted, since sentences contain quote characters.
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"--dataset {path} has no rows below its header.")
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    for name, values in columns.items():
        if all(value.lstrip("-").isdigit() for value in values):
            columns[name] = [int(value) for value in values]
    return Dataset.from_dict(columns)


def _split(args: argparse.Namespace) -> Dataset:
    """The `--split` of `--dataset` (a single file is its own split), as stored."""
    path = Path(args.dataset).expanduser()
    if path.is_file():
        return _load_file(path)
    splits = (
        _load_local_folder(path, (args.split,)) if path.is_dir() else load_dataset(args.dataset, args.dataset_config)
    )
    if args.split not in splits:
        raise ValueError(f"--split {args.split}: {args.dataset} has no such split; pick one of {list(splits)}.")
    return splits[args.split]


def _calibration_data(
    args: argparse.Namespace, label2id: dict | None, num_labels: int
) -> tuple[Dataset, tuple[str, ...], str | None]:
    """The calibration split, its text column(s) and its label column (None when it has none)."""
    dataset = _split(args)
    columns = dataset.column_names
    if args.text_column:
        missing = [column for column in args.text_column if column not in columns]
        if missing:
            raise ValueError(
                f"--text-column {' '.join(missing)}: {args.dataset} has no such column; its columns are {columns}. "
                "Name the text column with --text-column (two for sentence pairs)."
            )
        if len(args.text_column) > 2:
            raise ValueError(
                f"--text-column {' '.join(args.text_column)}: name one text column, or two for sentence pairs."
            )
        text_columns = tuple(args.text_column)
    else:
        text_columns = next((names for names in _TEXT_COLUMNS if all(c in columns for c in names)), None)
        if text_columns is None:
            raise ValueError(
                f"--dataset {args.dataset}: cannot tell which column holds the text; its columns are {columns}. "
                "Name it with --text-column (two for sentence pairs)."
            )
    label_column = args.label_column or "label"
    if label_column not in columns:
        if args.label_column is not None:
            raise ValueError(
                f"--label-column {args.label_column}: {args.dataset} has no such column; its columns are {columns}. "
                "Name the label column, or leave --label-column out to score against the model's own predictions."
            )
        return dataset, text_columns, None
    try:
        dataset = _labels_to_ids(DatasetDict({args.split: dataset}), label_column, label2id)[0][args.split]
    except ValueError as error:
        raise ValueError(f"--label-column {label_column}: {error}") from None
    if str(getattr(dataset.features[label_column], "dtype", "")).startswith("int"):
        bad = sorted({label for label in dataset[label_column] if not 0 <= label < num_labels})
        if bad:
            raise ValueError(
                f"--label-column {label_column} holds the labels {bad[:5]}, but the model has {num_labels} classes "
                f"(0..{num_labels - 1}); pick a labelled split with --split, or another column."
            )
    return dataset, text_columns, label_column


def _calibration_loader(
    args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel
) -> DataLoader:
    """Calibration batches; refuses data or a tokenizer that would make them meaningless."""
    config = model.config
    dataset, text_columns, label_column = _calibration_data(args, config.label2id or None, config.num_labels)
    if args.num_samples < len(dataset):
        dataset = dataset.select(sorted(random.Random(args.seed).sample(range(len(dataset)), args.num_samples)))
    encoded = dataset.map(
        lambda rows: tokenizer(*(rows[c] for c in text_columns), truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=[c for c in dataset.column_names if c != label_column],
    )
    flag = "--tokenizer" if args.tokenizer else "--model"
    _check_encoding(encoded, tokenizer, flag, args.tokenizer or args.model, getattr(config, "vocab_size", None))
    if label_column is None:
        logger.info("No label column %r: importance is scored against the model's own predictions.", "label")
    elif label_column != "labels":
        encoded = encoded.rename_column(label_column, "labels")
    logger.info("Calibrating on %d examples of %s; text %s.", len(encoded), args.dataset, list(text_columns))
    # Similar lengths in a batch: dynamic padding then adds few pad tokens.
    encoded = encoded.map(lambda row: {"length": len(row["input_ids"])}).sort("length").remove_columns("length")
    return DataLoader(encoded, batch_size=args.batch_size, collate_fn=DataCollatorWithPadding(tokenizer))


#### Commands


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Hide a logger's INFO lines for a while (the command prints the same summary itself)."""
    quieted = logging.getLogger(logger_name)
    level = quieted.level
    quieted.setLevel(logging.WARNING)
    try:
        yield
    finally:
        quieted.setLevel(level)


def _run_prune(args: argparse.Namespace, argv: Sequence[str]) -> None:
    config = PruningConfig(**{f.name: getattr(args, f.name) for f in fields(PruningConfig)})
    output_dir = _check_output_dir(
        args, {"--model": args.model, "--tokenizer": args.tokenizer, "--dataset": args.dataset}
    )
    _check_local("--model", args.model)
    _check_local("--dataset", args.dataset)
    models = {"--model": args.model}
    if args.tokenizer is not None:
        _check_local("--tokenizer", args.tokenizer)
        models["--tokenizer"] = args.tokenizer
    require_hub_or_local(models=models, datasets={"--dataset": args.dataset}, argv=argv)
    model = _load_model(args.model)
    tokenizer, problem = _load_tokenizer(args.tokenizer or args.model, getattr(model.config, "vocab_size", None))
    if problem is not None:
        flag = "--tokenizer" if args.tokenizer else "--model"
        raise ValueError(
            f"{flag} {args.tokenizer or args.model}: {problem}. Calibration needs the tokenizer the model was trained "
            "with: pass it with --tokenizer (a folder or Hub id, e.g. the checkpoint the model was fine-tuned from)."
        )
    calibration = _calibration_loader(args, tokenizer, model)
    with _quiet(prune.__module__):  # `prune` logs the summary line that `print(report)` below starts with
        report = prune(model, config, dataloader=calibration)
    _save(model, tokenizer, output_dir)
    save_plan(report.plan, output_dir / PLAN_FILE)
    report.save(output_dir / REPORT_FILE)
    print(report)
    print(f"\nSaved the pruned model, its tokenizer, {PLAN_FILE} and {REPORT_FILE} to {output_dir}")


def _run_apply_plan(args: argparse.Namespace, argv: Sequence[str]) -> None:
    output_dir = _check_output_dir(args, {"--model": args.model, "--tokenizer": args.tokenizer})
    plan = _read_plan(args.plan)
    _check_local("--model", args.model)
    models = {"--model": args.model}
    if args.tokenizer is not None:
        _check_local("--tokenizer", args.tokenizer)
        models["--tokenizer"] = args.tokenizer
    require_hub_or_local(models=models, argv=argv)
    model = _load_model(args.model)
    tokenizer, problem = _load_tokenizer(args.tokenizer or args.model, getattr(model.config, "vocab_size", None))
    if problem is not None and args.tokenizer is not None:
        raise ValueError(f"--tokenizer {args.tokenizer}: {problem}. Pass the tokenizer the model was trained with.")
    try:
        apply_plan(model, plan)  # checks the whole plan against the model before changing it
    except ValueError as error:
        raise ValueError(f"--plan {args.plan}: {error}") from None
    _save(model, tokenizer, output_dir)
    save_plan(plan, output_dir / PLAN_FILE)
    if problem is None:
        print(f"Applied {args.plan} and saved the pruned model, its tokenizer and {PLAN_FILE} to {output_dir}")
    else:
        print(
            f"Applied {args.plan} and saved the pruned model and {PLAN_FILE} to {output_dir}, WITHOUT a tokenizer: "
            f"--model {problem}. Copy the model's tokenizer there, or run again with --tokenizer."
        )


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


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
    except HubUnreachableError as error:
        print(f"hf-compress {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # one line, like argparse's own errors
        message = re.sub(r"\s*\n\s*", " ", str(error).strip())
        print(f"hf-compress {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
