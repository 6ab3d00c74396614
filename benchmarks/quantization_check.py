"""fp32 vs dynamic int8 on CPU: accuracy, latency and size on disk of a sequence classifier (optionally sparse first).

Usage (SST-2 validation set as a TSV with a `sentence\\tlabel` header):

```bash
python benchmarks/quantization_check.py --model path/to/minilm-l6-sst2 --data path/to/sst2/validation.tsv \
    --threads 2 --repeats 15 --output quantization.json
# magnitude-prune 50% of the encoder's linear weights (one shot, no fine-tuning) before quantizing:
python benchmarks/quantization_check.py --model path/to/minilm-l6-sst2 --data path/to/sst2/validation.tsv \
    --sparsity 0.5
```

Latency is one forward of `--batch-size` real sentences padded to `--seq-len` tokens. The two models are timed in
alternation after `--warmup` forwards each, so load from other processes hits both alike; the speed-up is the median
of the per-repetition ratios fp32 / int8 (robust to load that drifts during the run, unlike a ratio of medians).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_compress import (
    magnitude_prune,
    make_permanent,
    predict_logits,
    quantize_dynamic_int8,
    read_data_file,
    sparsity_report,
)
from hf_compress.metrics import accuracy


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="A sequence-classification checkpoint (folder or Hub id).")
    parser.add_argument("--data", required=True, help="TSV with a `sentence\\tlabel` header.")
    parser.add_argument("--sparsity", type=float, default=0.0, help="Magnitude-prune this fraction first (global).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", help="Write the results as JSON here too.")
    return parser.parse_args()


def predict(model, batches: list[dict], desc: str) -> list[int]:
    return predict_logits(model, batches, desc=desc)[0].argmax(-1).tolist()


@torch.no_grad()
def time_alternating(models: dict, batch: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    for model in models.values():
        for _ in range(warmup):
            model(**batch)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(**batch)
            times[name].append(time.perf_counter() - start)
    return times


def file_sizes(fp32_model, int8_model, folder: str) -> dict[str, int]:
    fp32_dir = os.path.join(folder, "fp32")
    fp32_model.save_pretrained(fp32_dir)
    weights = os.path.join(fp32_dir, "model.safetensors")
    with open(weights, "rb") as source, gzip.open(weights + ".gz", "wb", compresslevel=6) as target:
        shutil.copyfileobj(source, target)
    # torch.save of the int8 state dict only measures its size: it pickles engine-specific packed weights and is not
    # a format to ship (see hf_compress.deploy.quantization).
    int8_file = os.path.join(folder, "int8.pt")
    torch.save(int8_model.state_dict(), int8_file)
    return {
        "fp32_safetensors": os.path.getsize(weights),
        "fp32_safetensors_gzip": os.path.getsize(weights + ".gz"),
        "int8_state_dict": os.path.getsize(int8_file),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    fp32 = AutoModelForSequenceClassification.from_pretrained(args.model).eval()

    #### Optional one-shot magnitude pruning
    if args.sparsity > 0:
        magnitude_prune(fp32, args.sparsity)
        make_permanent(fp32)
    sparsity = sparsity_report(fp32)
    int8 = quantize_dynamic_int8(fp32)

    #### Accuracy on the whole file
    data = read_data_file(args.data)
    sentences, labels = data["sentence"], data["label"]
    batches = [
        tokenizer(sentences[i : i + 64], truncation=True, max_length=args.seq_len, padding=True, return_tensors="pt")
        for i in range(0, len(sentences), 64)
    ]
    fp32_predictions = predict(fp32, batches, "fp32")
    int8_predictions = predict(int8, batches, "int8")

    #### Latency: real sentences padded to seq_len
    batch = tokenizer(
        sentences[: args.batch_size],
        truncation=True,
        max_length=args.seq_len,
        padding="max_length",
        return_tensors="pt",
    )
    times = time_alternating({"fp32": fp32, "int8": int8}, batch, args.warmup, args.repeats)
    ratios = [a / b for a, b in zip(times["fp32"], times["int8"], strict=True)]

    #### Size on disk
    with tempfile.TemporaryDirectory() as folder:
        sizes = file_sizes(fp32, int8, folder)

    results = {
        "model": args.model,
        "encoder_linear_sparsity": sparsity.total.sparsity,
        "model_sparsity": sparsity.model.sparsity,
        "examples": len(labels),
        "accuracy_fp32": accuracy(fp32_predictions, labels)["accuracy"],
        "accuracy_int8": accuracy(int8_predictions, labels)["accuracy"],
        "prediction_agreement": sum(a == b for a, b in zip(fp32_predictions, int8_predictions, strict=True))
        / len(labels),
        "latency_batch": [args.batch_size, args.seq_len],
        "threads": args.threads,
        "latency_fp32_ms_median": 1000 * statistics.median(times["fp32"]),
        "latency_int8_ms_median": 1000 * statistics.median(times["int8"]),
        "speedup_median_of_ratios": statistics.median(ratios),
        "speedup_quartiles": statistics.quantiles(ratios, n=4),
        "latency_ms": {name: [round(1000 * t, 1) for t in values] for name, values in times.items()},
        "size_bytes": sizes,
        "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
    }
    print(json.dumps(results, indent=2))
    print(
        f"\n| model | sparsity | accuracy | latency {args.batch_size}x{args.seq_len} (ms) | size (MB) |\n"
        f"|---|---|---|---|---|\n"
        f"| fp32 | {sparsity.total.sparsity:.0%} | {results['accuracy_fp32']:.4f} | "
        f"{results['latency_fp32_ms_median']:.0f} | {sizes['fp32_safetensors'] / 1e6:.1f} "
        f"(gzip {sizes['fp32_safetensors_gzip'] / 1e6:.1f}) |\n"
        f"| int8 | {sparsity.total.sparsity:.0%} | {results['accuracy_int8']:.4f} | "
        f"{results['latency_int8_ms_median']:.0f} ({results['speedup_median_of_ratios']:.2f}x) | "
        f"{sizes['int8_state_dict'] / 1e6:.1f} |"
    )
    if args.output:
        with open(args.output, "w") as file:
            json.dump(results, file, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
