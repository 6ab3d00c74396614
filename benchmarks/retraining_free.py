"""Retraining-free structured pruning of a sequence classifier: accuracy and wall time of one `prune` call.

Usage (a GLUE-style folder with `train.tsv` and `validation.tsv`, header `sentence\\tlabel`):

```bash
python benchmarks/retraining_free.py --model path/to/minilm-l6-sst2 --data path/to/sst2 \
    --keep 0.6 --importance fisher --num-calibration 256 --threads 2 --output retraining_free.json
# the same plan without the least-squares rescaling, for comparison:
python benchmarks/retraining_free.py --model path/to/minilm-l6-sst2 --data path/to/sst2 --no-rescale
```

Calibration: `--num-calibration` sentences drawn at random (seed `--seed`) from the train split, with their
labels, in batches of `--batch-size` sentences of similar length, padded per batch (at most `--max-length` tokens).
Evaluation: accuracy on the whole validation split, for the unpruned and the pruned model in the same run, and the
pruned model's fidelity to the unpruned one (agreement of predictions, mean KL divergence of the predicted
distributions). The wall time is that of the `prune` call (importance scores, mask search, rescaling and the
structural edits); tokenizing and evaluating are not included. FLOPs are encoder FLOPs per token at `--seq-len`
tokens, as `PruningConfig` counts them.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_compress import PruningConfig, load_text_classification_dataset, predict_logits, prune
from hf_compress.metrics import accuracy


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="A sequence-classification checkpoint (folder or Hub id).")
    parser.add_argument("--data", required=True, help="Folder with train.tsv and validation.tsv (or a Hub dataset).")
    parser.add_argument("--data-config", default=None, help="Hub dataset configuration, e.g. sst2 for glue.")
    parser.add_argument("--target", default="flops", choices=["flops", "params"])
    parser.add_argument("--keep", type=float, default=0.6, help="Fraction of encoder FLOPs (or params) to keep.")
    parser.add_argument("--importance", default="fisher", choices=["fisher", "taylor", "magnitude"])
    parser.add_argument("--scope", default="global", choices=["global", "layer"])
    parser.add_argument("--no-rescale", action="store_true", help="Skip the least-squares rescaling.")
    parser.add_argument("--round-to", type=int, default=8, help="FFN widths in multiples of this (1: no rounding).")
    parser.add_argument("--num-calibration", type=int, default=256, help="Train sentences used for calibration.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128, help="Sequence length at which FLOPs are counted.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="Write the results (and the pruning report) as JSON here.")
    return parser.parse_args()


def batches(dataset, tokenizer, text_column: str, label_column: str, batch_size: int, max_length: int) -> DataLoader:
    encoded = dataset.map(
        lambda rows: tokenizer(rows[text_column], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=[c for c in dataset.column_names if c != label_column],
    )
    # Batches of similar lengths: dynamic padding then adds few pad tokens (order does not matter to the results).
    encoded = encoded.map(lambda row: {"length": len(row["input_ids"])}).sort("length").remove_columns("length")
    return DataLoader(encoded, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))


def main() -> None:
    args = parse_args()
    # Show hf-compress's INFO lines (its loggers come from transformers.utils.logging).
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model)
    data = load_text_classification_dataset(args.data, args.data_config, label2id=model.config.label2id or None)
    (text_column,) = data.text_columns
    train, validation = data.dataset["train"], data.dataset["validation"]
    calibration = train.select(random.Random(args.seed).sample(range(len(train)), args.num_calibration))
    calibration = batches(calibration, tokenizer, text_column, data.label_column, args.batch_size, args.max_length)
    evaluation = batches(validation, tokenizer, text_column, data.label_column, 64, args.max_length)

    teacher_logits, labels = predict_logits(model, evaluation, desc="unpruned")
    config = PruningConfig(
        target=args.target,
        keep=args.keep,
        importance=args.importance,
        scope=args.scope,
        rescale=not args.no_rescale,
        seq_len=args.seq_len,
        round_to=args.round_to,
    )
    start = time.perf_counter()
    report = prune(model, config, dataloader=calibration)
    seconds = time.perf_counter() - start
    pruned_logits, _ = predict_logits(model, evaluation, desc="pruned")
    teacher_accuracy = accuracy(teacher_logits.argmax(-1), labels)["accuracy"]
    pruned_accuracy = accuracy(pruned_logits.argmax(-1), labels)["accuracy"]
    # Fidelity to the unpruned model, less noisy than accuracy on 872 sentences.
    agreement = (pruned_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(
        pruned_logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True, reduction="batchmean"
    ).item()

    results = {
        "model": args.model,
        "config": config.to_dict(),
        "num_calibration": args.num_calibration,
        "threads": args.threads,
        "unpruned_accuracy": teacher_accuracy,
        "pruned_accuracy": pruned_accuracy,
        "relative_accuracy": pruned_accuracy / teacher_accuracy,
        "agreement_with_unpruned": agreement,
        "kl_to_unpruned": kl,
        "flops_ratio": report.flops_ratio,
        "params_ratio": report.params_ratio,
        "heads_per_layer": list(report.after.heads_per_layer),
        "ffn_per_layer": list(report.after.ffn_per_layer),
        "prune_seconds": seconds,
    }
    print(report)
    print(json.dumps(results, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({**results, "report": report.to_dict()}, f, indent=2)


if __name__ == "__main__":
    main()
