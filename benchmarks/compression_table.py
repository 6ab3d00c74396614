"""The compression benchmark: every variant of the teacher, its accuracy, size, FLOPs, latency and compression time.

One command builds the variants (`compression_recipes.py`: distilled students, retraining-free pruning, pruning while
distilling, int8), evaluates them on the validation split, times all of them in one run next to the teacher, writes
the results as JSON, and renders them into the README (between `<!-- compression-table:begin -->` and
`<!-- compression-table:end -->`) and a plot:

```bash
python benchmarks/compression_table.py          # defaults: the SST-2 teacher and data in ../shared
python benchmarks/compression_table.py --render-only   # README table and plot again, from the JSON
```

Built models are kept in `--work-dir` (not committed) and reused by later runs with the same settings, so a second
run only re-times them (`--rebuild` makes them again); the timing always covers every variant in one run.
Latency: `--warmup` untimed rounds, then `--repeats` rounds; each round times every model on every input in turn, so
load from other processes hits all alike; the speed-up is the median over rounds of teacher time / variant time.
Inputs: 32 validation sentences padded to `--seq-len` tokens (`b32_seq`), the first of them alone (`b1_seq`), the same
32 padded only to their longest (`b32_real`) and each of them alone at its own length (`b1_real`, time per sentence).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from compression_recipes import Context, Variant, build, default_variants, encoder_flops
from compression_render import markdown, plot, update_readme
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
from transformers.utils import logging as hf_logging

from hf_compress import (
    device_name,
    load_compressed,
    load_text_classification_dataset,
    predict_logits,
    quantize_dynamic_int8,
)
from hf_compress.metrics import accuracy

logger = hf_logging.get_logger("compression_table")
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=str(ROOT.parent / "shared/models/minilm-l6-sst2"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/sst2"), help="Folder or Hub dataset id.")
    parser.add_argument("--data-config", default=None, help="Hub dataset configuration (e.g. sst2 for glue).")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/sst2.json"))
    parser.add_argument("--plot", default=str(ROOT / "benchmarks/results/sst2.png"))
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="'' leaves the README alone.")
    parser.add_argument("--work-dir", default=str(ROOT / "benchmarks/.work"), help="Built models (not committed).")
    parser.add_argument("--variants", nargs="*", help="Only these variants (names); default all.")
    parser.add_argument("--rebuild", action="store_true", help="Build the variants again even if saved.")
    parser.add_argument("--render-only", action="store_true", help="Only render --output into README and plot.")
    parser.add_argument(
        "--train-samples", type=int, default=None, help="Training sentences for distillation (default: all)."
    )
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=2.0, help="Distillation softmax temperature.")
    parser.add_argument("--alpha", type=float, default=0.5, help="Weight of the soft loss (1 - alpha: labels).")
    parser.add_argument(
        "--hidden-loss-weight", type=float, default=0.0, help="Weight of the hidden-state loss (0: logits only)."
    )
    parser.add_argument("--hidden-loss-type", default="mse", choices=["mse", "cosine"])
    parser.add_argument("--max-length", type=int, default=64, help="Truncation length for training.")
    parser.add_argument("--num-calibration", type=int, default=256, help="Sentences for pruning importance.")
    parser.add_argument(
        "--teacher-cache-dir",
        default=None,
        help="Teacher-output cache of the distilled variants (default: <work-dir>/teacher-cache; '' runs it live).",
    )
    parser.add_argument(
        "--seq-len", type=int, default=128, help="FLOPs are counted and batches padded at this length."
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads for everything (recorded).")
    parser.add_argument("--device", default="cpu", help="Where models are timed ('cuda' syncs; int8 is CPU only).")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Show the INFO lines of the benchmark and of hf-compress (their loggers come from transformers.utils.logging).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.render_only:
        results = json.loads(Path(args.output).read_text())
    else:
        results = run(args)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    render(results, args)
    return results


def render(results: dict[str, Any], args: argparse.Namespace) -> None:
    section = markdown(results)
    print(section)
    if args.readme:
        update_readme(Path(args.readme), section)
    if args.plot:
        plot(results, Path(args.plot))


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    data = load_text_classification_dataset(args.data, args.data_config, label2id=teacher.config.label2id)
    columns = list(data.text_columns)

    def tokenize(max_length: int):
        return lambda rows: tokenizer(*[rows[c] for c in columns], truncation=True, max_length=max_length)

    train = data.dataset["train"]
    if args.train_samples is not None:
        train = train.select(range(min(args.train_samples, len(train))))
    train = train.map(tokenize(args.max_length), batched=True, remove_columns=columns)
    validation_text = data.dataset["validation"]
    validation = validation_text.map(tokenize(args.seq_len), batched=True, remove_columns=columns)
    collator = DataCollatorWithPadding(tokenizer)
    context = Context(
        teacher=teacher,
        train_dataset=train,
        collator=collator,
        seq_len=args.seq_len,
        work_dir=args.work_dir,
        seed=args.seed,
        num_calibration=args.num_calibration,
        teacher_cache_dir=_teacher_cache_dir(args),
        training={
            "num_train_epochs": args.epochs,
            "per_device_train_batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "temperature": args.temperature,
            "alpha": args.alpha,
            "hidden_loss_weight": args.hidden_loss_weight,
            "hidden_loss_type": args.hidden_loss_type,
            "logging_steps": 50,
            "disable_tqdm": False,
        },
    )
    variants = default_variants(teacher.config.num_hidden_layers)
    if args.variants:
        unknown = set(args.variants) - {v.name for v in variants}
        if unknown:
            raise ValueError(f"Unknown variants {sorted(unknown)}; choose from {[v.name for v in variants]}.")
        variants = [v for v in variants if v.name in args.variants or v.name == "teacher"]
    settings = {
        k: getattr(args, k)
        for k in (
            "teacher",
            "data",
            "train_samples",
            "epochs",
            "batch_size",
            "learning_rate",
            "temperature",
            "alpha",
            "hidden_loss_weight",
            "hidden_loss_type",
            "max_length",
            "num_calibration",
            "seq_len",
            "seed",
        )
    }

    #### Build (or reuse) and evaluate every variant
    built: dict[str, dict[str, Any]] = {}
    for variant in variants:
        if variant.recipe == "int8":
            continue
        built[variant.name] = build_or_load(variant, context, settings, args.rebuild, validation, collator)

    #### Load every model, int8 ones quantized from their base, and time them together
    models, rows = {}, []
    for variant in variants:
        if variant.recipe == "int8":
            if device.type != "cpu" or variant.base not in built:
                logger.info("Skipping %s (int8 runs on CPU, after its base %s).", variant.name, variant.base)
                continue
            start = time.perf_counter()
            model = quantize_dynamic_int8(load_compressed(built[variant.base]["path"]))
            seconds = built[variant.base]["compression_seconds"] + time.perf_counter() - start
            base = built[variant.base]
            info = {
                "accuracy": validation_accuracy(model, validation, collator),
                "compression_seconds": seconds,
                "parameters": base["parameters"],
                "size_bytes": len(_state_dict_bytes(model)),
                "flops_per_token": base["flops_per_token"],
            }
        else:
            info = built[variant.name]
            model = load_compressed(info["path"]).to(device).eval()
        models[variant.name] = model
        rows.append({**variant.to_dict(), **{k: v for k, v in info.items() if k != "path"}})
    inputs = latency_inputs(tokenizer, validation_text, columns, args.seq_len)
    latency, speedup = time_models(models, inputs, device, args.warmup, args.repeats)

    teacher_row = rows[0]
    for row in rows:
        row["retained"] = row["accuracy"] / teacher_row["accuracy"]
        row["flops_per_sequence"] = row.pop("flops_per_token") * args.seq_len
        row["latency_ms"], row["speedup"] = latency[row["name"]], speedup[row["name"]]
        flops_cut = teacher_row["flops_per_sequence"] / row["flops_per_sequence"]
        # Realised / FLOPs is for models whose FLOPs fell; int8 speed comes from precision, not fewer FLOPs.
        if row["recipe"] != "int8" and flops_cut > 1.01:
            row["flops_reduction"] = flops_cut
            row["realised_over_flops"] = row["speedup"]["b32_seq"] / flops_cut
    return {
        "setup": {
            **settings,
            "dataset": Path(args.data).name if Path(args.data).exists() else args.data,
            "num_train": len(train),
            "num_eval": len(validation),
            "teacher_cache": context.teacher_cache_dir is not None,
            "device": str(device),
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "variants": rows,
    }


def build_or_load(variant: Variant, context: Context, settings: dict, rebuild: bool, validation, collator) -> dict:
    """Build, save and evaluate `variant`, or reuse what an earlier run with the same settings saved."""
    folder = Path(context.work_dir) / variant.name
    record = folder / "variant.json"
    wanted = {"variant": variant.to_dict(), "settings": settings}
    if record.exists() and not rebuild:
        saved = json.loads(record.read_text())
        if {k: saved[k] for k in wanted} == wanted:
            logger.info("Reusing %s from %s.", variant.name, folder)
            return saved["result"]
    logger.info("Building %s (%s).", variant.name, variant.label)
    torch.manual_seed(context.seed)
    start = time.perf_counter()
    built = build(variant, context)
    seconds = time.perf_counter() - start - built.teacher_cache_seconds
    model = built.model
    model.save_pretrained(folder)
    result = {
        "path": str(folder),
        "accuracy": validation_accuracy(model, validation, collator),
        "compression_seconds": seconds,
        "teacher_cache_seconds": built.teacher_cache_seconds,
        "teacher_cache_built": built.teacher_cache_built,
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "flops_per_token": encoder_flops(model, context.seq_len),
    }
    record.write_text(json.dumps({**wanted, "result": result}, indent=2) + "\n")
    return result


def validation_accuracy(model: torch.nn.Module, dataset, collator) -> float:
    logits, labels = predict_logits(model, DataLoader(dataset, batch_size=64, collate_fn=collator))
    return accuracy(logits.argmax(-1), labels)["accuracy"]


def latency_inputs(tokenizer, validation, columns: list[str], seq_len: int) -> dict[str, list[dict]]:
    """Per setting, the list of batches one timed call runs."""
    texts = [validation[c][:32] for c in columns]

    def encode(rows: slice, padding):
        return dict(
            tokenizer(
                *[t[rows] for t in texts], padding=padding, truncation=True, max_length=seq_len, return_tensors="pt"
            )
        )

    return {
        "b32_seq": [encode(slice(0, 32), "max_length")],
        "b1_seq": [encode(slice(0, 1), "max_length")],
        "b32_real": [encode(slice(0, 32), "longest")],
        "b1_real": [encode(slice(i, i + 1), "longest") for i in range(len(texts[0]))],
    }


@torch.inference_mode()
def time_models(
    models: dict[str, torch.nn.Module], inputs: dict[str, list[dict]], device: torch.device, warmup: int, repeats: int
) -> tuple[dict, dict]:
    """Median milliseconds per batch and median speed-up over the teacher, per model and input setting."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timings = {name: {setting: [] for setting in inputs} for name in models}
    for round_index in range(warmup + repeats):
        for name, model in models.items():
            model_device = next(model.parameters()).device
            for setting, batches in inputs.items():
                moved = [{k: v.to(model_device) for k, v in b.items()} for b in batches]
                sync()
                start = time.perf_counter()
                for batch in moved:
                    model(**batch)
                sync()  # CUDA runs asynchronously: stop the clock when the work is done, not queued
                if round_index >= warmup:
                    timings[name][setting].append((time.perf_counter() - start) * 1000 / len(batches))
    reference = timings["teacher"]
    latency = {n: {s: statistics.median(t) for s, t in per.items()} for n, per in timings.items()}
    speedup = {
        n: {s: statistics.median(r / t for r, t in zip(reference[s], per[s], strict=True)) for s in per}
        for n, per in timings.items()
    }
    return latency, speedup


def _teacher_cache_dir(args: argparse.Namespace) -> str | None:
    if args.teacher_cache_dir is None:
        return str(Path(args.work_dir) / "teacher-cache")
    return args.teacher_cache_dir or None


def _state_dict_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


if __name__ == "__main__":
    main()
