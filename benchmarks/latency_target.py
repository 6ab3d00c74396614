"""Pruning to a measured latency budget: the speed-up asked for against the speed-up obtained, and the accuracy.

    python benchmarks/latency_target.py   # --teacher and --data default to ../shared; --help for the settings

The teacher is pruned without training (`prune` with `PruningConfig(target="latency")`: Fisher scores and
least-squares rescaling on `--num-calibration` training sentences) to each `--keeps` fraction of its latency at a batch
of `--batch-size` x `--seq-len` tokens on `--threads` torch threads, from one latency table (measured once and saved
to `--latency-table`, or read from there when it was measured for this machine and setting; one measured elsewhere is
refused). The realised speed-up of every pruned model over the teacher is measured with `compare_latency`, all models
interleaved in one run on `--batch-size` validation sentences padded to `--seq-len` tokens; accuracy on the validation
split (the first `--max-eval` sentences, all by default). Writes `--output` (JSON) and prints a table: target vs
predicted (by the table) vs realised speed-up, and accuracy.

With `--while-distilling STEPS` the budget is reached while distilling instead: a copy of the teacher is distilled
from the teacher for STEPS steps (batch 32, `--train-length` tokens, T=2, alpha=0.5, learning rate 1e-4) while
`GradualStructuredPruningCallback(PruningConfig(target="latency", keep=...))` prunes it on the cubic schedule between
10% and 60% of the steps, from the same latency table.

A quick check that it runs (seconds, numbers meaningless):

    python benchmarks/latency_target.py --max-eval 32 --rounds 2 --keeps 0.5 --num-calibration 32 \
        --table-repeats 1 --latency-table /tmp/latency_table.json --output /tmp/latency_target.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import random
import time
from pathlib import Path

import torch
from repo_paths import shown_path
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_compress import (
    DistillationTrainer,
    DistillationTrainingArguments,
    GradualStructuredPruningCallback,
    LatencyTable,
    PruningConfig,
    compare_latency,
    compression_report,
    load_text_classification_dataset,
    measure_latency_table,
    predict_logits,
    prune,
)
from hf_compress.metrics import accuracy

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(ROOT.parent / "shared" / "models" / "minilm-l6-sst2"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument(
        "--keeps", type=float, nargs="+", default=[1 / 2, 1 / 3, 1 / 5, 1 / 10], help="latency fractions to keep"
    )
    parser.add_argument("--num-calibration", type=int, default=256, help="training sentences for Fisher and rescale")
    parser.add_argument("--max-eval", type=int, default=None, help="evaluate on the first N validation sentences")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per timed call (budget and check)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per timed sequence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds of compare_latency")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds of compare_latency")
    parser.add_argument("--table-repeats", type=int, default=7, help="timed rounds of the latency table")
    parser.add_argument("--round-to", type=int, default=8, help="FFN widths in multiples of this (table-chosen)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--while-distilling", type=int, default=0, metavar="STEPS", help="reach each budget while distilling this long"
    )
    parser.add_argument("--train-length", type=int, default=64, help="tokens per training sentence (distilling)")
    parser.add_argument("--work-dir", default=str(ROOT / "benchmarks" / ".work" / "latency-target"))
    parser.add_argument("--latency-table", default=str(ROOT / "benchmarks" / "results" / "latency_table.json"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "latency_target.json"))
    args = parser.parse_args(argv)
    if args.while_distilling < 0:
        raise ValueError(f"--while-distilling {args.while_distilling}: give a number of steps (e.g. 400), or 0.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    data = load_text_classification_dataset(args.data, label2id=teacher.config.label2id or None)
    (text_column,) = data.text_columns
    train, validation = data.dataset["train"], data.dataset["validation"]
    if args.max_eval:
        validation = validation.select(range(min(args.max_eval, len(validation))))

    def encode(dataset, max_length: int):
        return dataset.map(
            lambda rows: tokenizer(rows[text_column], truncation=True, max_length=max_length),
            batched=True,
            remove_columns=[c for c in dataset.column_names if c != data.label_column],
        )

    def batches(dataset, batch_size: int) -> DataLoader:
        return DataLoader(
            encode(dataset, args.seq_len), batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer)
        )

    sample = random.Random(args.seed).sample(range(len(train)), args.num_calibration)
    if args.while_distilling:
        size = min(len(train), 32 * args.while_distilling)
        training = encode(train.shuffle(seed=args.seed).select(range(size)), args.train_length)
    calibration = batches(train.select(sample), 32)
    evaluation = batches(validation, 64)

    #### The latency table: measured once for this machine and setting, then reused
    table_path = Path(args.latency_table)
    if table_path.is_file():
        table = LatencyTable.load(table_path)
        print(f"Reusing the latency table {table_path} ({table.key.describe()}).", flush=True)
    else:
        table = measure_latency_table(
            teacher, args.batch_size, args.seq_len, args.threads, round_to=args.round_to, repeats=args.table_repeats
        )
        table.save(table_path)
        print(f"Measured the latency table in {table.seconds:.0f}s; saved to {table_path}.", flush=True)

    #### Prune to each budget
    teacher_logits, labels = predict_logits(teacher, evaluation)
    teacher_accuracy = accuracy(teacher_logits.argmax(-1), labels)["accuracy"]
    models: dict[str, torch.nn.Module] = {"teacher": teacher}
    variants: dict[str, dict] = {}
    for keep in args.keeps:
        name = f"keep {keep:.3g}"
        model = copy.deepcopy(teacher)
        config = PruningConfig(
            target="latency",
            keep=keep,
            importance="fisher",
            seq_len=args.seq_len,
            round_to=args.round_to,
            latency_batch_size=args.batch_size,
            latency_threads=args.threads,
            latency_table=str(table_path),  # checked against this machine and setting: refused if it does not fit
        )
        start = time.perf_counter()
        if args.while_distilling:
            trainer_args = DistillationTrainingArguments(
                output_dir=str(Path(args.work_dir) / f"keep-{keep:.3g}"),
                max_steps=args.while_distilling,
                per_device_train_batch_size=32,
                learning_rate=1e-4,
                temperature=2.0,
                alpha=0.5,
                seed=args.seed,
                logging_steps=50,
                save_strategy="no",
                report_to="none",
            )
            pruning = GradualStructuredPruningCallback(config, begin_step=0.1, end_step=0.6, frequency=10)
            model.requires_grad_(True)
            trainer = DistillationTrainer(
                model=model,
                teacher_model=teacher,
                args=trainer_args,
                train_dataset=training,
                processing_class=tokenizer,
                callbacks=[pruning],
            )
            trainer.train()
            model = trainer.model
            predicted_ms = pruning.history[-1][1]
            latency = {"after_ms": predicted_ms, "budget_ms": keep * pruning.reference_cost}
            latency["predicted_speedup"] = pruning.reference_cost / predicted_ms
            removed_layers = []  # the callback thins layers, it never drops one
        else:
            report = prune(model, config, dataloader=calibration, show_progress=False)
            latency, removed_layers = report.latency, report.removed_layers
            print(f"{name}: {report.summary()}", flush=True)
        seconds = time.perf_counter() - start
        shape = compression_report(model, reference=teacher, seq_len=args.seq_len)
        logits, _ = predict_logits(model, evaluation)
        models[name] = model.eval()
        variants[name] = {
            "keep": keep,
            "target_speedup": 1 / keep,
            "predicted_speedup": latency["predicted_speedup"],
            "predicted_ms": latency["after_ms"],
            "budget_ms": latency["budget_ms"],
            "accuracy": accuracy(logits.argmax(-1), labels)["accuracy"],
            "agreement_with_teacher": (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item(),
            "heads_per_layer": list(shape.model.heads_per_layer),
            "ffn_per_layer": list(shape.model.ffn_per_layer),
            "removed_layers": removed_layers,
            "parameters": shape.model.parameters,
            "flops_ratio": shape.ratio("flops_per_token"),
            "prune_seconds": seconds,
        }

    #### The realised speed-ups: every model interleaved in one run
    sentences = list(validation[text_column])[: args.batch_size]
    sentences = (sentences * (args.batch_size // max(len(sentences), 1) + 1))[: args.batch_size]
    fixed = tokenizer(sentences, padding="max_length", truncation=True, max_length=args.seq_len, return_tensors="pt")
    comparison = compare_latency(models, fixed, rounds=args.rounds, warmup=args.warmup, threads=args.threads)
    print(comparison, flush=True)
    for name, variant in variants.items():
        speedup = comparison.speedups[name]
        variant["realised_speedup"] = {"median": speedup.median, "low": speedup.low, "high": speedup.high}
        variant["median_ms"] = comparison.stats[name].median_ms

    result = {
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("teacher", "data", "output", "work_dir")},
            "latency_table": shown_path(table_path),
        },
        "machine": platform.machine(),
        "latency_table": {
            "key": table.to_dict()["key"],
            "rest_ms": table.rest_ms,
            "full_layer_ms": table.layer_latency(table.key.max_heads, table.max_ffn),
            "empty_layer_ms": table.empty_layer_ms,
            "seconds": table.seconds,
        },
        "validation_sentences": len(labels),
        "teacher_accuracy": teacher_accuracy,
        "teacher_median_ms": comparison.stats["teacher"].median_ms,
        "noisy": comparison.warnings,
        "variants": variants,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"\nTeacher: accuracy {teacher_accuracy:.4f}, {comparison.stats['teacher'].median_ms:.1f} ms per call.")
    print("| keep | target | predicted | realised [10%-90%] | ms | accuracy | layers | heads | FFN |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for variant in variants.values():
        realised = variant["realised_speedup"]
        print(
            f"| {variant['keep']:.3g} | {variant['target_speedup']:.2f}x | {variant['predicted_speedup']:.2f}x | "
            f"{realised['median']:.2f}x [{realised['low']:.2f}-{realised['high']:.2f}] | {variant['median_ms']:.1f} | "
            f"{variant['accuracy']:.4f} | {len(variant['heads_per_layer'])} | {variant['heads_per_layer']} | "
            f"{variant['ffn_per_layer']} |"
        )
    print(f"\nWrote {args.output}")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
