"""Accuracy and speed of compressed models where they are served: PyTorch and ONNX Runtime, fp32 and int8.

    python benchmarks/onnx_runtime.py   # --teacher and --data default to ../shared; --help for the settings

The teacher and copies of it pruned without training (`prune`: Fisher scores and least-squares rescaling on
`--num-calibration` training sentences) to each `--keep` fraction of its encoder FLOPs are each run as: PyTorch fp32,
PyTorch dynamic int8 (`quantize_dynamic_int8`), and ONNX Runtime fp32, dynamic int8 and static int8 (`export_onnx`,
calibrated on the same training sentences). Accuracy is measured on the whole validation split; latency with
`compare_latency`, every model interleaved in one run against the PyTorch fp32 teacher, at a batch of 32 x 128 tokens
and at batch 1 over `--num-real` validation sentences at their own lengths (the serving case). ONNX Runtime's threads
do not spin between runs (`spinning=False`): spinning would steal the cores from the models timed next. Writes
`--output` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
from compression_runtimes import RUNTIMES, accuracy, make_runtimes, one_at_a_time
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_compress import (
    PruningConfig,
    compare_latency,
    compression_report,
    device_name,
    load_text_classification_dataset,
    prune,
)

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(ROOT.parent / "shared" / "models" / "minilm-l6-sst2"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--keep", type=float, nargs="*", default=[0.5, 0.25], help="FLOPs fractions to prune to")
    parser.add_argument("--num-calibration", type=int, default=256)
    parser.add_argument("--num-real", type=int, default=64, help="validation sentences timed one at a time")
    parser.add_argument("--max-eval", type=int, default=None, help="evaluate on the first N validation sentences")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=str(ROOT / "benchmarks" / ".work" / "onnx"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "onnx_runtime.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    data = load_text_classification_dataset(args.data).dataset
    validation = data["validation"]
    if args.max_eval:
        validation = validation.select(range(min(args.max_eval, len(validation))))
    sentences, labels = validation["sentence"], validation["label"]
    calibration = data["train"].shuffle(seed=args.seed).select(range(args.num_calibration))
    calibration_texts = calibration["sentence"]
    encoded_calibration = calibration.map(
        lambda b: tokenizer(b["sentence"], truncation=True, max_length=128), batched=True, remove_columns="sentence"
    )
    loader = DataLoader(encoded_calibration, batch_size=32, collate_fn=DataCollatorWithPadding(tokenizer))
    evaluation = [
        (dict(tokenizer(sentences[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")),
         torch.tensor(labels[i : i + 32]))
        for i in range(0, len(sentences), 32)
    ]  # fmt: skip

    variants: dict[str, dict] = {}
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    sources = {"teacher": (teacher, 0.0)}
    for keep in args.keep:
        model = AutoModelForSequenceClassification.from_pretrained(args.teacher)
        start = time.perf_counter()
        prune(model, PruningConfig(keep=keep, importance="fisher"), dataloader=loader, show_progress=False)
        sources[f"pruned to {keep:g} FLOPs"] = (model.eval(), time.perf_counter() - start)

    models: dict[str, object] = {}
    for name, (model, seconds) in sources.items():
        folder = work / name.replace(" ", "-")
        start = time.perf_counter()
        runtimes = make_runtimes(model, list(RUNTIMES), folder, tokenizer, calibration_texts, args.threads)
        export = json.loads((folder / "onnx_export.json").read_text())
        report = compression_report(model, reference=teacher, seq_len=128)
        variants[name] = {
            "prune_seconds": seconds,
            "export_seconds": time.perf_counter() - start,
            "max_abs_diff_onnx_vs_pytorch": export["max_abs_diff"],
            "flops_ratio": report.model.flops_per_token / report.reference.flops_per_token,
            "parameters": report.model.parameters,
            "int8_max_abs_diff": export["int8_max_abs_diff"],
            "file_bytes": {path.name: path.stat().st_size for path in sorted(folder.glob("*.onnx"))},
            "accuracy": {},
        }
        for runtime, runnable in runtimes.items():
            variants[name]["accuracy"][runtime] = accuracy(runnable, evaluation)
            models[f"{name} | {runtime}"] = runnable
            print(f"{name:>22} {runtime:>18}: accuracy {variants[name]['accuracy'][runtime]:.4f}", flush=True)

    reference = "teacher | pytorch-fp32"
    fixed = tokenizer(sentences[:32], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    b32 = compare_latency(models, fixed, rounds=args.rounds, reference=reference, threads=args.threads)
    real = [
        dict(tokenizer([s], truncation=True, max_length=128, return_tensors="pt")) for s in sentences[: args.num_real]
    ]
    b1 = compare_latency(
        {name: one_at_a_time(model, real) for name, model in models.items()},
        {},
        rounds=args.rounds,
        reference=reference,
        threads=args.threads,
    )
    teacher_accuracy = variants["teacher"]["accuracy"]["pytorch-fp32"]
    rows = []
    for key in models:
        name, runtime = key.split(" | ")
        acc = variants[name]["accuracy"][runtime]
        rows.append(
            {
                "variant": name,
                "runtime": runtime,
                "accuracy": acc,
                "retained": acc / teacher_accuracy,
                "b32x128": {"median_ms": b32.stats[key].median_ms, **vars(b32.speedups[key])},
                "b1_real": {"median_ms": b1.stats[key].median_ms, **vars(b1.speedups[key])},
            }
        )
    result = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("teacher", "data", "work_dir", "output")},
        "cpu": device_name(torch.device("cpu")),
        "machine": platform.machine(),
        "threads": args.threads,
        "rounds": args.rounds,
        "validation_sentences": len(sentences),
        "noisy": {"b32x128": b32.warnings, "b1_real": b1.warnings},
        "variants": variants,
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print("\n| variant | runtime | accuracy | retained | speed-up b32x128 | speed-up b1 real |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        s32, s1 = row["b32x128"], row["b1_real"]
        print(
            f"| {row['variant']} | {row['runtime']} | {row['accuracy']:.4f} | {row['retained']:.1%} | "
            f"{s32['median']:.2f}x ({s32['low']:.2f}-{s32['high']:.2f}) | "
            f"{s1['median']:.2f}x ({s1['low']:.2f}-{s1['high']:.2f}) |"
        )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
