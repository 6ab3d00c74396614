"""The `hf-compress` commands `prune` (calibrate, prune, save with plan and report) and `apply-plan` (replay a plan),
and what every command shares (`quiet`, `CommandFailed`); `export` and `inspect` live in `export.py` and `describe.py`.

Both run every check of `hf_compress.cli.checks` before loading anything heavy, and print their result summary.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from ..data import require_hub_or_local
from ..pruning import PruningConfig, apply_plan, prune, save_plan
from ..pruning.constants import LATENCY_TABLE_NAME
from .calibration import calibration_loader
from .checks import PLAN_FILE, REPORT_FILE, check_local_path, check_output_dir, load_model, load_tokenizer, read_plan


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, output_dir: Path) -> None:
    """The model (as `save_pretrained` writes it) and, when there is one, its tokenizer."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)


class CommandFailed(Exception):
    """The work itself failed (not a refused input): `hf_compress.cli.main` prints the message and exits with 1."""


@contextlib.contextmanager
def quiet(logger_name: str, level: int = logging.WARNING) -> Iterator[None]:
    """Hide a logger's lines below `level` for a while (the command prints the same summary itself)."""
    quieted = logging.get_logger(logger_name)
    previous = quieted.level
    quieted.setLevel(level)
    try:
        yield
    finally:
        quieted.setLevel(previous)


def run_prune(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """`hf-compress prune`: check every input, calibrate, prune to the budget, save model, tokenizer, plan, report."""
    config = PruningConfig(**{f.name: getattr(args, f.name) for f in fields(PruningConfig)})
    output_dir = check_output_dir(
        args, {"--model": args.model, "--tokenizer": args.tokenizer, "--dataset": args.dataset}
    )
    check_local_path("--model", args.model)
    check_local_path("--dataset", args.dataset)
    models = {"--model": args.model}
    if args.tokenizer is not None:
        check_local_path("--tokenizer", args.tokenizer)
        models["--tokenizer"] = args.tokenizer
    require_hub_or_local(models=models, datasets={"--dataset": args.dataset}, argv=argv)
    model = load_model(args.model)
    tokenizer, problem = load_tokenizer(args.tokenizer or args.model, getattr(model.config, "vocab_size", None))
    if problem is not None:
        flag = "--tokenizer" if args.tokenizer else "--model"
        raise ValueError(
            f"{flag} {args.tokenizer or args.model}: {problem}. Calibration needs the tokenizer the model was trained "
            "with: pass it with --tokenizer (a folder or Hub id, e.g. the checkpoint the model was fine-tuned from)."
        )
    calibration = calibration_loader(args, tokenizer, model)
    with quiet(prune.__module__):  # `prune` logs the summary line that `print(report)` below starts with
        report = prune(model, config, dataloader=calibration)
    _save(model, tokenizer, output_dir)
    save_plan(report.plan, output_dir / PLAN_FILE)
    report.save(output_dir / REPORT_FILE)
    if report.latency_table is not None and config.latency_table is None:
        # The table measured for this run: pass it back with --latency-table to prune again without measuring.
        report.latency_table.save(output_dir / LATENCY_TABLE_NAME)
    print(report)
    print(f"\nSaved the pruned model, its tokenizer, {PLAN_FILE} and {REPORT_FILE} to {output_dir}")


def run_apply_plan(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """`hf-compress apply-plan`: replay a saved plan on the model it was made for and save the result."""
    output_dir = check_output_dir(args, {"--model": args.model, "--tokenizer": args.tokenizer})
    plan = read_plan(args.plan)
    check_local_path("--model", args.model)
    models = {"--model": args.model}
    if args.tokenizer is not None:
        check_local_path("--tokenizer", args.tokenizer)
        models["--tokenizer"] = args.tokenizer
    require_hub_or_local(models=models, argv=argv)
    model = load_model(args.model)
    tokenizer, problem = load_tokenizer(args.tokenizer or args.model, getattr(model.config, "vocab_size", None))
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
