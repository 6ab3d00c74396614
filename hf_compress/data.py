"""Text-classification datasets from the Hub or from local files, and a fail-fast check for an unreachable Hub.

`load_text_classification_dataset` accepts the same things a user types on a command line:

- a Hub dataset id, with an optional config: `("glue", "sst2")` -> `datasets.load_dataset("glue", "sst2")`;
- a local folder with one file per split: `train.tsv` / `validation.tsv` (GLUE's format: a header row such as
  `sentence<TAB>label`, no quoting, since sentences contain quote characters), or `train.csv` / `validation.csv`, or
  `train.json` / `train.jsonl` / ... (GLUE's `dev.tsv` is accepted as the validation split).

`read_data_file` is the one reader of a local data file (the loader above and the `hf-compress` command line use it),
`load_local_splits` of a folder of them, `detect_text_columns` and `labels_to_ids` the defaults both apply.

`require_hub_or_local` runs before any download: when the Hub cannot be reached (`HF_HUB_OFFLINE=1`, or no network)
and an argument names a Hub id that is not in the local cache, it fails at once with the same command rewritten to use
local paths, instead of retrying for half a minute per file.
"""

from __future__ import annotations

import csv
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from datasets import config as datasets_config
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub import utils as hub_utils
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Column names tried, in order, when the caller does not name the text column(s).
TEXT_COLUMN_CANDIDATES = (
    ("sentence",),
    ("text",),
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
)
_EXTENSIONS = {".tsv": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_SPLIT_ALIASES = {"validation": ("validation", "dev", "valid"), "train": ("train",), "test": ("test",)}


@dataclass
class TextClassificationData:
    """A loaded dataset and how to read it.

    Attributes:
        dataset: The splits that were found (at least `train` or `validation`).
        text_columns: One column (single sentences) or two (sentence pairs) to tokenize.
        label_column: The column of integer class ids.
        label_names: Class names by id, when the data names them (a `ClassLabel` feature, or string labels).
        source: What was loaded: the Hub id (and config) or the local folder.
    """

    dataset: DatasetDict
    text_columns: tuple[str, ...]
    label_column: str
    label_names: list[str] | None = None
    source: dict[str, str | None] = field(default_factory=dict)


def load_text_classification_dataset(
    name_or_path: str,
    config_name: str | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str = "label",
    label2id: Mapping[str, int] | None = None,
    splits: Sequence[str] = ("train", "validation"),
) -> TextClassificationData:
    """Load a text-classification dataset from the Hub or a local folder.

    Args:
        name_or_path: A local folder of per-split TSV/CSV/JSON files, or a Hub dataset id (`"glue"`, `"imdb"`, ...).
        config_name: The Hub dataset's configuration (`"sst2"` for GLUE); not used for local folders.
        text_columns: The text column, or two columns for sentence pairs. By default the first of `sentence`,
            `text`, `sentence1`+`sentence2`, `question`+`sentence`, `premise`+`hypothesis` that exists.
        label_column: The label column (integer ids, or strings that are mapped to ids).
        label2id: How to map string labels to ids (e.g. the teacher's `config.label2id`); by default sorted order.
        splits: The splits to return; those missing from the source are left out, but at least one must exist.

    Returns:
        A `TextClassificationData` with the splits and the columns to use.

    Raises:
        ValueError: for a folder without recognised files, missing columns, or labels not in `label2id`.

    Example:
        ```python
        data = load_text_classification_dataset("glue", "sst2")
        data = load_text_classification_dataset("path/to/sst2")  # train.tsv + validation.tsv
        data.dataset["validation"][0]  # {'sentence': "it 's a charming ...", 'label': 1}
        ```
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        dataset = load_local_splits(path, splits)
        source = {"path": str(path)}
    elif path.exists():
        raise ValueError(
            f"{name_or_path} is a file; pass the folder that holds it, with one file per split named "
            f"{'/'.join(splits)}.tsv (or .csv, .json, .jsonl)."
        )
    elif looks_like_local_path(name_or_path):
        raise ValueError(f"No such folder: {name_or_path}. Pass an existing folder, or a Hub dataset id like 'glue'.")
    else:
        loaded = load_dataset(name_or_path, config_name)
        dataset = DatasetDict({split: loaded[split] for split in splits if split in loaded})
        if not dataset:
            raise ValueError(
                f"The Hub dataset {name_or_path!r} ({config_name}) has splits {list(loaded)}, none of {list(splits)}."
            )
        source = {"name": name_or_path, "config": config_name}

    columns = next(iter(dataset.values())).column_names
    text_columns = tuple(text_columns) if text_columns else detect_text_columns(columns)
    if text_columns is None:
        raise ValueError(
            f"Cannot tell which column holds the text: the dataset's columns are {columns}. Name it explicitly "
            "(e.g. --text_columns review), or two columns for sentence pairs."
        )
    for column in (*text_columns, label_column):
        if column not in columns:
            raise ValueError(
                f"The dataset has no column {column!r}; its columns are {columns}. Name the text column(s) and the "
                "label column explicitly (e.g. --text_columns review --label_column sentiment)."
            )
    dataset, label_names = labels_to_ids(dataset, label_column, label2id)
    sizes = ", ".join(f"{split}: {len(ds)}" for split, ds in dataset.items())
    logger.info("Loaded %s (%s); text %s, labels %r.", name_or_path, sizes, text_columns, label_column)
    return TextClassificationData(dataset, text_columns, label_column, label_names, source)


def looks_like_local_path(name: str) -> bool:
    """Whether `name` was meant as a local path rather than a Hub id, whether or not it exists.

    A Hub id is "name" or "namespace/name"; anything with more slashes, a leading dot/slash/tilde, a backslash or a
    data file's extension is a path (so a typo in one fails as a missing path instead of a Hub lookup).
    """
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix in _EXTENSIONS or "\\" in name


def load_local_splits(folder: str | os.PathLike, splits: Sequence[str]) -> DatasetDict:
    """The `splits` found in a local folder, one file per split, each read with `read_data_file`.

    Args:
        folder: A folder with files named after the splits: `train.tsv`, `validation.csv` (or GLUE's `dev.tsv`),
            `test.jsonl`, ...
        splits: The splits to look for; those without a file are left out.

    Returns:
        A `DatasetDict` of the splits found.

    Raises:
        ValueError: when no split has a file, or one has several.
    """
    folder = Path(folder)
    found = {}
    for split in splits:
        candidates = [
            folder / f"{alias}{extension}"
            for alias in _SPLIT_ALIASES.get(split, (split,))
            for extension in _EXTENSIONS
            if (folder / f"{alias}{extension}").is_file()
        ]
        if len(candidates) > 1:
            raise ValueError(
                f"{folder} has several files for the {split} split: {[c.name for c in candidates]}; keep one."
            )
        if candidates:
            found[split] = candidates[0]
    if not found:
        raise ValueError(
            f"{folder} has no dataset files. Expected one file per split named {'/'.join(splits)} with the extension "
            f".tsv (GLUE style, a header row like 'sentence<TAB>label'), .csv, .json or .jsonl; found "
            f"{sorted(p.name for p in folder.iterdir())}."
        )
    return DatasetDict({split: read_data_file(file) for split, file in found.items()})


def read_data_file(path: str | os.PathLike) -> Dataset:
    """One local data file as a `Dataset`: a GLUE-style `.tsv`, a `.csv`, or `.json` / `.jsonl` records.

    TSV files are read as GLUE writes them: a header row, tab-separated fields and no quoting (sentences contain quote
    characters); blank lines are skipped and columns of integers become ints. The other formats are read by `datasets`.

    Args:
        path: The file.

    Returns:
        Its rows, with the file's columns.

    Raises:
        ValueError: for another extension, an empty TSV, or a TSV row whose number of fields differs from the header's.

    Example:
        ```python
        read_data_file("glue/sst2/dev.tsv")[0]  # {'sentence': "it 's a charming ...", 'label': 1}
        ```
    """
    path = Path(path)
    kind = _EXTENSIONS.get(path.suffix)
    if kind is None:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use .tsv, .csv, .json or .jsonl.")
    if kind == "tsv":
        return _read_tsv(path)
    return load_dataset(kind, data_files=str(path), split="train")


def _read_tsv(file: Path) -> Dataset:
    # GLUE's TSVs are unquoted: a sentence may start with a quote character that csv's default dialect would treat
    # as the opening of a multi-line field.
    with file.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{file} is empty; a GLUE-style TSV starts with a header row like 'sentence<TAB>label'.")
        # Blank lines are skipped (as `csv.DictReader` does); without quoting, a row is a line, so line_num is its line.
        numbered = [(reader.line_num, row) for row in reader if row]
    rows = [row for _, row in numbered]
    for line, row in numbered:
        if len(row) != len(header):
            raise ValueError(
                f"{file}, line {line}: {len(row)} tab-separated fields but the header {header} has {len(header)}."
            )
    columns = {name: [row[i] for row in rows] for i, name in enumerate(header)}
    for name, values in columns.items():
        # GLUE labels (and any other integer column) arrive as text; ints make them usable as class ids.
        if values and all(value.lstrip("-").isdigit() for value in values):
            columns[name] = [int(value) for value in values]
    return Dataset.from_dict(columns)


def detect_text_columns(columns: Sequence[str]) -> tuple[str, ...] | None:
    """The first of `TEXT_COLUMN_CANDIDATES` that `columns` has (`("sentence",)`, `("premise", "hypothesis")`, ...).

    Returns:
        One column name, or two for sentence pairs; None when no candidate fits (the caller names the flag to fix it).
    """
    return next((names for names in TEXT_COLUMN_CANDIDATES if all(c in columns for c in names)), None)


def labels_to_ids(
    dataset: DatasetDict, label_column: str, label2id: Mapping[str, int] | None = None
) -> tuple[DatasetDict, list[str] | None]:
    """Store a label column as class ids: string labels become a `ClassLabel` column; ids and `ClassLabel`s stay.

    Args:
        dataset: The splits, all with `label_column`.
        label_column: The column of labels.
        label2id: How string labels map to ids (e.g. the model's `config.label2id`); by default sorted order.

    Returns:
        The dataset and the class names by id (None for a column of plain integers).

    Raises:
        ValueError: for a string label missing from `label2id`, or a `label2id` whose ids are not 0 to n - 1.
    """
    feature = next(iter(dataset.values())).features[label_column]
    if isinstance(feature, ClassLabel):
        return dataset, list(feature.names)
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        return dataset, None
    values = sorted({value for split in dataset.values() for value in split[label_column]})
    mapping = dict(label2id) if label2id is not None else {value: i for i, value in enumerate(values)}
    unknown = [value for value in values if value not in mapping]
    if unknown:
        raise ValueError(f"Labels {unknown} are not in label2id {mapping}; add them or fix the data.")
    names = [name for name, _ in sorted(mapping.items(), key=lambda item: item[1])]
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise ValueError(f"label2id {mapping} must map to the ids 0 to {len(mapping) - 1}, each once.")
    # A ClassLabel column stores the ids and keeps the names, as Hub classification datasets do.
    return dataset.cast_column(label_column, ClassLabel(names=names)), names


#### Fail fast without the Hub


class HubUnreachableError(ConnectionError):
    """The Hub cannot be reached and a command named something that only the Hub has."""


def hub_is_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face Hub answers: False in offline mode (`HF_HUB_OFFLINE=1`) or without a connection.

    One request with a short timeout, no retries: this is a probe, not a download.
    """
    if constants.is_offline_mode():
        return False
    try:
        hub_utils.get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any transport failure means "not reachable"; the caller decides what to do
        return False
    return True


def require_hub_or_local(
    models: Mapping[str, str] | None = None,
    datasets: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
    timeout: float = 5.0,
) -> None:
    """Fail at once, with the local-path form of the command, if a Hub id is needed and the Hub is unreachable.

    Values that are existing local paths, and Hub models already in the local cache, need no Hub.

    Args:
        models: Command-line flag -> model id or path (e.g. `{"--teacher": "textattack/bert-base-uncased-SST-2"}`).
        datasets: Command-line flag -> dataset id or path (e.g. `{"--dataset": "glue"}`).
        argv: The command line to rewrite (default `sys.argv`).
        timeout: Seconds to wait for the Hub's answer.

    Raises:
        HubUnreachableError: naming what needs the Hub and showing the same command with local paths.

    Example:
        ```python
        require_hub_or_local(models={"--teacher": args.teacher}, datasets={"--dataset": args.dataset})
        ```
    """
    models, datasets = dict(models or {}), dict(datasets or {})
    remote = {flag: value for flag, value in models.items() if not Path(value).expanduser().exists()}
    remote.update({flag: value for flag, value in datasets.items() if not Path(value).expanduser().exists()})
    if not remote or hub_is_reachable(timeout):
        return
    missing = {
        flag: value
        for flag, value in remote.items()
        if not (flag in models and isinstance(try_to_load_from_cache(value, "config.json"), str))
        and not (flag in datasets and _dataset_in_cache(value))
    }
    if not missing:
        return
    placeholders = {flag: "PATH/TO/MODEL_FOLDER" if flag in models else "PATH/TO/DATA_FOLDER" for flag in missing}
    reason = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "there is no connection to it"
    raise HubUnreachableError(
        f"The Hugging Face Hub cannot be reached ({reason}), and these are not local paths or cached: "
        + ", ".join(f"{flag} {value}" for flag, value in missing.items())
        + ". Run the same command with local copies:\n\n  "
        + _rewrite_command(list(sys.argv if argv is None else argv), placeholders)
        + "\n\nwhere a model folder is one written by `save_pretrained` (config, weights, tokenizer) and a data folder "
        "holds train/validation files (.tsv with a 'sentence<TAB>label' header, .csv or .json)."
    )


def _dataset_in_cache(name: str) -> bool:
    # `datasets` stores a Hub dataset "org/name" under "<cache>/org___name/"; "glue" resolves to "nyu-mll/glue".
    cache = Path(datasets_config.HF_DATASETS_CACHE)
    leaf = name.replace("/", "___")
    return cache.is_dir() and any(entry.name == leaf or entry.name.endswith(f"___{leaf}") for entry in cache.iterdir())


def _rewrite_command(argv: list[str], replacements: Mapping[str, str]) -> str:
    """`argv` with each flag's value replaced (`--flag value` and `--flag=value` forms); absent flags appended."""
    program = ["python", argv[0]] if argv and argv[0].endswith(".py") else argv[:1]
    args, seen, i = argv[1:], set(), 0
    rewritten = []
    while i < len(args):
        arg = args[i]
        flag = arg.split("=", 1)[0]
        if flag in replacements:
            seen.add(flag)
            rewritten += [flag, replacements[flag]]
            i += 1 if "=" in arg else 2
            continue
        rewritten.append(arg)
        i += 1
    rewritten += [item for flag, value in replacements.items() if flag not in seen for item in (flag, value)]
    return shlex.join([*program, *rewritten])
