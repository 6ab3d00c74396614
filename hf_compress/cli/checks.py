"""The checks `hf-compress` runs before any work: outputs that would lose files, paths, the plan, the tokenizer.

Each raises a `ValueError` whose message names the flag, the value and the fix; `hf_compress.cli.main` prints it as
one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..data import looks_like_local_path
from ..deploy import load_compressed
from ..pruning import load_plan

PLAN_FILE, REPORT_FILE = "pruning_plan.json", "pruning_report.json"
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


#### Outputs, paths and the plan, checked before anything is loaded


def check_output_dir(
    args: argparse.Namespace,
    inputs: Mapping[str, str | None],
    marker: str = PLAN_FILE,
    made: str = "pruned",
) -> Path:
    """The output folder, once it is clear that writing there loses nothing.

    Args:
        args: The command's arguments (`output_dir`, and `overwrite` when the command has that flag).
        inputs: Flags -> input paths; the output may be none of them.
        marker: The file that makes a folder a previous output of the command (replaced without `--overwrite`).
        made: What the command writes, for the messages ("pruned", "ONNX").
    """
    value = args.output_dir
    can_overwrite = hasattr(args, "overwrite")
    output = Path(value).expanduser()
    resolved = output.resolve()
    for flag, source in inputs.items():
        if (
            source is not None
            and Path(source).expanduser().is_dir()
            and Path(source).expanduser().resolve() == resolved
        ):
            raise ValueError(
                f"--output-dir {value} is the {flag} folder: the {made} files would mix with or overwrite the "
                f"original ones. Write to a new folder, e.g. --output-dir {output.name or 'model'}-{made.lower()}."
            )
    if output.exists() and not output.is_dir():
        raise ValueError(
            f"--output-dir {value} is an existing file; name a new folder (or a previous output) instead."
        )
    if output.is_dir() and not getattr(args, "overwrite", False) and not (output / marker).is_file():
        contents = sorted(entry.name for entry in output.iterdir())
        if contents:
            shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
            fix = "name a new or empty folder" + (
                ", or add --overwrite to write into it anyway" if can_overwrite else ""
            )
            raise ValueError(
                f"--output-dir {value} is a folder with other files in it ({shown}) and not a previous hf-compress "
                f"output (no {marker}); {fix}."
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


def check_local_path(flag: str, value: str) -> None:
    """A value written as a path (not a Hub id such as "glue" or "org/name") must exist: no Hub lookup for a typo."""
    if looks_like_local_path(value) and not Path(value).expanduser().exists():
        raise ValueError(f"{flag} {value}: no such file or folder (for a Hub id, write it as 'name' or 'org/name').")


def read_plan(value: str) -> dict[str, Any]:
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


def load_model(value: str, **kwargs: Any) -> PreTrainedModel:
    """The `--model`, as `load_compressed` loads it (`kwargs`, e.g. `dtype`, passed on), or a ValueError naming the
    flag."""
    try:
        return load_compressed(value, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(f"--model {value}: cannot load a model from it ({first_line(error)}).") from None


def load_tokenizer(source: str, vocab_size: int | None) -> tuple[PreTrainedTokenizerBase | None, str | None]:
    """The tokenizer at `source`, or `None` and why it cannot be the model's tokenizer."""
    path = Path(source).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None, f"the folder has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, ImportError) as error:
        return None, f"no tokenizer loads from it ({first_line(error)})"
    if vocab_size and len(tokenizer) < MIN_VOCAB_FRACTION * vocab_size:
        return None, (
            f"its tokenizer has {len(tokenizer)} tokens but the model has {vocab_size} token embeddings, so it is not "
            "the model's tokenizer"
        )
    return tokenizer, None


def check_encoding(
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


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
