"""The `hf-compress` command line (`hf_compress.cli:main`, also `python -m hf_compress.cli`).

```bash
# Keep 60% of the encoder FLOPs of a fine-tuned classifier, calibrating on 256 training sentences, no retraining:
hf-compress prune --model path/or/hub-id --dataset path/to/sst2 --keep 0.6 --output-dir pruned
# Replay the saved plan on another copy of the same model:
hf-compress apply-plan --model path/or/hub-id --plan pruned/pruning_plan.json --output-dir pruned-again
# ONNX for ONNX Runtime, with int8 copies (static calibrated on one sentence per line of a text file):
hf-compress export --model pruned --output-dir pruned-onnx --quantize dynamic static --calibration-file sst2.txt
# What a checkpoint (or an ONNX folder) is: heads and FFN widths per layer, parameters, FLOPs, sparsity, remote code:
hf-compress inspect pruned --seq-len 128
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

`export` writes `model.onnx` (and `model_int8_dynamic.onnx` / `model_int8_static.onnx`), `config.json`, the tokenizer
and `onnx_export.json` with `hf_compress.export_onnx`, and prints each file's size and largest difference from
PyTorch. Before any work it refuses the same outputs as `prune` (a previous export, holding `onnx_export.json`, is
replaced), `--quantize static` without `--calibration-file` and a `--calibration-file` without it, calibration data
with no text, and a tokenizer that cannot encode the calibration text. A graph that disagrees with PyTorch after the
export exits with status 1. `inspect` prints a checkpoint's description (`--json` for JSON); bad input exits with 2.

The package reads in the order a command runs: `parser` (the flags, one per `PruningConfig` field), `checks` (the
refusals above, before any work), `calibration` (the data `prune` scores on, the sentences `export` calibrates on),
`commands` (`prune`, `apply-plan`), `export`, `describe` (`inspect`).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence

from ..data import HubUnreachableError
from .commands import CommandFailed, run_apply_plan, run_prune
from .describe import run_inspect
from .export import run_export
from .parser import build_parser

_COMMANDS = {"prune": run_prune, "apply-plan": run_apply_plan, "export": run_export, "inspect": run_inspect}

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hf-compress` with `argv` (default: the process's arguments); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # The loggers are transformers.utils.logging's (plain `logging` loggers); an application shows their INFO lines.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        _COMMANDS[args.command](args, ["hf-compress", *argv])
    except HubUnreachableError as error:
        print(f"hf-compress {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, CommandFailed) as error:  # one line, like argparse's own errors
        message = re.sub(r"\s*\n\s*", " ", str(error).strip())
        print(f"hf-compress {args.command}: error: {message}", file=sys.stderr)
        return 1 if isinstance(error, CommandFailed) else 2
    return 0
