"""Calibration data: for `hf-compress prune`, a sample of one split with its text and label columns, in batches; for
`hf-compress export --quantize static`, a sample of sentences (`calibration_texts`).

The files and the Hub are read by `hf_compress.data` (the same reader as `load_text_classification_dataset`); what
is particular to the command line is that a single file is a split of its own, and that every problem names this
command's flags.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from ..data import detect_text_columns, labels_to_ids, load_local_splits, read_data_file
from .checks import check_encoding

logger = logging.get_logger(__name__)


def _split(args: argparse.Namespace) -> Dataset:
    """The `--split` of `--dataset` (a single file is its own split), as stored."""
    path = Path(args.dataset).expanduser()
    if path.is_file():
        try:
            dataset = read_data_file(path)
        except ValueError as error:
            raise ValueError(f"--dataset {error}") from None
        if len(dataset) == 0:
            raise ValueError(f"--dataset {path} has no rows below its header.")
        return dataset
    splits = (
        load_local_splits(path, (args.split,)) if path.is_dir() else load_dataset(args.dataset, args.dataset_config)
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
        text_columns = detect_text_columns(columns)
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
        dataset = labels_to_ids(DatasetDict({args.split: dataset}), label_column, label2id)[0][args.split]
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


def calibration_loader(
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
    check_encoding(encoded, tokenizer, flag, args.tokenizer or args.model, getattr(config, "vocab_size", None))
    if label_column is None:
        logger.info("No label column %r: importance is scored against the model's own predictions.", "label")
    elif label_column != "labels":
        encoded = encoded.rename_column(label_column, "labels")
    logger.info("Calibrating on %d examples of %s; text %s.", len(encoded), args.dataset, list(text_columns))
    # Similar lengths in a batch: dynamic padding then adds few pad tokens.
    encoded = encoded.map(lambda row: {"length": len(row["input_ids"])}).sort("length").remove_columns("length")
    return DataLoader(encoded, batch_size=args.batch_size, collate_fn=DataCollatorWithPadding(tokenizer))


#### The calibration sentences of `hf-compress export --quantize static`

# Data files read as tables (a text column); any other file is plain text, one sentence per line.
_TABLE_SUFFIXES = (".tsv", ".csv", ".json", ".jsonl")


def calibration_texts(args: argparse.Namespace) -> list[str]:
    """Up to `--num-calibration` sentences of `--calibration-file`, sampled with `--seed`.

    The file is plain text (one sentence per line, blank lines skipped), or a data file or folder as `hf-compress
    prune --dataset` reads them (`.tsv` / `.csv` / `.json` / `.jsonl`, a folder with one file per split, `--split`
    picking one), whose text column is detected or named with `--text-column`. Local files only: this runs before the
    model is loaded, and the sentences only set activation ranges.
    """
    value = args.calibration_file
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(
            f"--calibration-file {value}: no such file or folder; pass a text file with one sentence per line, or a "
            "data file or folder like `hf-compress prune --dataset` takes."
        )
    if path.is_file() and path.suffix.lower() not in _TABLE_SUFFIXES:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(
                f"--calibration-file {value} is not a UTF-8 text file; pass one sentence per line, or a .tsv / .csv "
                "/ .json / .jsonl data file."
            ) from None
        texts = [line.strip() for line in lines if line.strip()]
        source = "lines"
    else:
        texts, source = _table_texts(args, path)
    if not texts:
        raise ValueError(
            f"--calibration-file {value} holds no text; static quantization calibrates on real sentences of the task "
            "(a few hundred)."
        )
    if args.num_calibration < len(texts):
        texts = [texts[i] for i in sorted(random.Random(args.seed).sample(range(len(texts)), args.num_calibration))]
    logger.info("Calibrating static int8 on %d %s of %s.", len(texts), source, value)
    return texts


def _table_texts(args: argparse.Namespace, path: Path) -> tuple[list[str], str]:
    """The texts of one column of a data file, or of the `--split` file of a data folder."""
    try:
        # A folder: the --split file (load_local_splits raises, naming the expected files, when there is none).
        dataset = read_data_file(path) if path.is_file() else load_local_splits(path, (args.split,))[args.split]
    except ValueError as error:
        raise ValueError(f"--calibration-file {error}") from None
    columns = dataset.column_names
    if args.text_column is not None:
        if args.text_column not in columns:
            raise ValueError(
                f"--text-column {args.text_column}: {path} has no such column; its columns are {columns}."
            )
        column = args.text_column
    else:
        detected = detect_text_columns(columns)
        if detected is None:
            raise ValueError(
                f"--calibration-file {path}: cannot tell which column holds the text; its columns are {columns}. "
                "Name it with --text-column."
            )
        if len(detected) > 1:
            raise ValueError(
                f"--calibration-file {path} holds sentence pairs ({' and '.join(detected)}); static calibration "
                "takes single texts. Name one column with --text-column."
            )
        column = detected[0]
    texts = [text.strip() for text in dataset[column] if isinstance(text, str) and text.strip()]
    return texts, f"'{column}' texts"
