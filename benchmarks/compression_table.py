"""The compression benchmark: every variant of the teacher, over seeds, in every runtime: accuracy, size and speed.

One command builds the variants (`compression_recipes.py`: distilled students, retraining-free pruning, pruning while
distilling, pruning to a measured latency budget then distilling), each for every `--seeds` value (retraining-free
pruning draws its calibration sentences with the seed, distillation also its order and initialisation). Each built
model is then run in every `--runtimes` (`compression_runtimes.py`: PyTorch fp32 and dynamic int8, ONNX Runtime fp32
and int8), evaluated on the whole validation split, and timed with `compare_latency`: every model of every seed in
every runtime interleaved in one run against the PyTorch fp32 teacher, at a batch of 32 x `--seq-len` tokens and at
batch 1 on `--num-real` validation sentences at their own lengths (the serving case). The results go to JSON, into the
README (between `<!-- compression-table:begin -->` and `<!-- compression-table:end -->`, mean +- standard deviation
over the seeds) and into a plot (one frontier per runtime, with error bars):

```bash
python benchmarks/compression_table.py          # defaults: the SST-2 teacher and data in ../shared
python benchmarks/compression_table.py --render-only   # README table and plot again, from the JSON
```

Built models are kept in `--work-dir` (not committed) and reused by later runs with the same settings, so a second
run only re-times them (`--rebuild` makes them again); the timing always covers every model in one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from compression_recipes import Context, Variant, build, default_variants, encoder_flops
from compression_render import check_markers, markdown, plot, update_readme
from compression_runtimes import RUNTIMES, accuracy, check_runtimes, make_runtimes, one_at_a_time, runtime_size
from repo_paths import shown_path
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
from transformers.utils import logging as hf_logging

from hf_compress import compare_latency, device_name, load_compressed, load_text_classification_dataset

logger = hf_logging.get_logger("compression_table")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNTIMES = ["pytorch-fp32", "pytorch-int8", "onnx-fp32", "onnx-int8-dynamic"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=str(ROOT.parent / "shared/models/minilm-l6-sst2"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/sst2"), help="Folder or Hub dataset id.")
    parser.add_argument("--data-config", default=None, help="Hub dataset configuration (e.g. sst2 for glue).")
    parser.add_argument(
        "--text-columns", nargs="+", default=None, help="Text column (two for pairs); detected by default."
    )
    parser.add_argument("--label-column", default="label", help="Label column (ids or strings).")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/sst2.json"))
    parser.add_argument("--plot", default=str(ROOT / "benchmarks/results/sst2.png"))
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="'' leaves the README alone.")
    parser.add_argument("--work-dir", default=str(ROOT / "benchmarks/.work"), help="Built models (not committed).")
    parser.add_argument("--variants", nargs="*", help="Only these variants (names); default all.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Build every variant once per seed.")
    parser.add_argument(
        "--runtimes",
        nargs="+",
        default=DEFAULT_RUNTIMES,
        help=f"Runtimes every model is measured in, from {list(RUNTIMES)}.",
    )
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
        "--latency-table",
        default=str(ROOT / "benchmarks/results/latency_table.json"),
        help="Latency table of the latency-budgeted variants: read when measured for this machine and setting, "
        "else give a new path and it is measured there.",
    )
    parser.add_argument(
        "--seq-len", type=int, default=128, help="FLOPs are counted and batches padded at this length."
    )
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (recorded).")
    parser.add_argument("--num-real", type=int, default=32, help="Validation sentences timed one at a time.")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20, help="Timed rounds (every model once per round).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Show the INFO lines of the benchmark and of hf-compress; other libraries' (ONNX Runtime's quantizer logs every
    # tensor at INFO on the root logger) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("compression_table", "hf_compress"):
        logging.getLogger(name).setLevel(logging.INFO)
    if args.render_only:
        results = json.loads(Path(args.output).read_text())
    else:
        check_runtimes(args.runtimes)
        if args.readme:
            check_markers(Path(args.readme))
        if len(set(args.seeds)) != len(args.seeds):
            raise ValueError(f"--seeds {args.seeds} repeats a seed; give each once, e.g. --seeds 0 1 2.")
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
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    data = load_text_classification_dataset(
        args.data,
        args.data_config,
        text_columns=args.text_columns,
        label_column=args.label_column,
        label2id=teacher.config.label2id,
    )
    columns = list(data.text_columns)

    def tokenize(max_length: int):
        return lambda rows: tokenizer(*[rows[c] for c in columns], truncation=True, max_length=max_length)

    train_text = data.dataset["train"]
    if args.train_samples is not None:
        train_text = train_text.select(range(min(args.train_samples, len(train_text))))
    train = train_text.map(tokenize(args.max_length), batched=True, remove_columns=columns)
    validation_text = data.dataset["validation"]
    validation = validation_text.map(tokenize(args.seq_len), batched=True, remove_columns=columns)
    collator = DataCollatorWithPadding(tokenizer)
    evaluation = _evaluation_batches(validation, collator)
    # Static int8 calibration: training sentences (first text column), the same for every model.
    calibration = train_text.shuffle(seed=0).select(range(min(args.num_calibration, len(train_text))))
    calibration_texts = list(calibration[columns[0]])
    training = {
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "hidden_loss_weight": args.hidden_loss_weight,
        "hidden_loss_type": args.hidden_loss_type,
        "logging_steps": 50,
        "disable_tqdm": False,
    }
    variants = _selected_variants(default_variants(teacher.config.num_hidden_layers), args.variants)
    settings = {
        k: getattr(args, k)
        for k in (
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
        )
    }
    settings.update(teacher=shown_path(args.teacher), data=shown_path(args.data))

    #### Build (or reuse) every variant for every seed; the teacher once
    jobs = [(v, seed) for v in variants for seed in (args.seeds[:1] if v.recipe == "teacher" else args.seeds)]
    built: dict[tuple[str, int], dict[str, Any]] = {}
    for variant, seed in tqdm(jobs, desc="Variants x seeds", unit="model"):
        context = Context(
            teacher=teacher,
            train_dataset=train,
            collator=collator,
            seq_len=args.seq_len,
            work_dir=str(Path(args.work_dir) / f"seed-{seed}"),
            seed=seed,
            num_calibration=args.num_calibration,
            teacher_cache_dir=_teacher_cache_dir(args),
            training=training,
            latency_table=args.latency_table,
            threads=args.threads,
        )
        built[variant.name, seed] = build_or_load(variant, context, {**settings, "seed": seed}, args.rebuild)

    #### Every model in every runtime: accuracy, then all timed together
    runnables: dict[str, Any] = {}
    measured: dict[tuple[str, int], dict[str, Any]] = {}
    for variant, seed in tqdm(jobs, desc="Runtimes (export, accuracy)", unit="model"):
        record = built[variant.name, seed]
        model = load_compressed(record["path"]).eval()
        forms = make_runtimes(
            model,
            args.runtimes,
            Path(record["path"]) / "onnx",
            tokenizer,
            calibration_texts,
            args.threads,
            export=record["fresh"],
        )
        measured[variant.name, seed] = {}
        for runtime, runnable in forms.items():
            runnables[f"{variant.name} | seed {seed} | {runtime}"] = runnable
            measured[variant.name, seed][runtime] = {
                "accuracy": accuracy(runnable, evaluation),
                "size_bytes": runtime_size(runtime, runnable, record["size_bytes"]),
            }
    timing = time_all(runnables, tokenizer, validation_text, columns, args)

    teacher_accuracy = measured["teacher", args.seeds[0]]["pytorch-fp32"]["accuracy"]
    teacher_flops = built["teacher", args.seeds[0]]["flops_per_token"]
    rows = []
    for variant in variants:
        seeds = {}
        for seed in args.seeds if variant.recipe != "teacher" else args.seeds[:1]:
            record = {k: v for k, v in built[variant.name, seed].items() if k not in ("path", "fresh")}
            record["flops_reduction"] = teacher_flops / record["flops_per_token"]
            record["flops_per_sequence"] = record.pop("flops_per_token") * args.seq_len
            runtimes = {}
            for runtime, values in measured[variant.name, seed].items():
                key = f"{variant.name} | seed {seed} | {runtime}"
                runtimes[runtime] = {
                    **values,
                    "retained": values["accuracy"] / teacher_accuracy,
                    **{setting: result[key] for setting, result in timing["settings"].items()},
                }
            seeds[str(seed)] = {**record, "runtimes": runtimes}
        rows.append({**variant.to_dict(), "seeds": seeds})
    return {
        "setup": {
            **settings,
            "seeds": args.seeds,
            "runtimes": args.runtimes,
            "dataset": Path(args.data).name if Path(args.data).exists() else args.data,
            "num_train": len(train),
            "num_eval": len(validation),
            "teacher_cache": _teacher_cache_dir(args) is not None,
            "device_name": device_name(torch.device("cpu")),
            "threads": torch.get_num_threads(),
            "warmup": args.warmup,
            "rounds": args.rounds,
            "num_real": min(args.num_real, len(validation_text)),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "noisy": timing["noisy"],
        "variants": rows,
    }


def build_or_load(variant: Variant, context: Context, settings: dict, rebuild: bool) -> dict:
    """Build, save and measure `variant`, or reuse what an earlier run with the same settings saved.

    The record has `fresh=True` when the model was built now (its ONNX export, if any, is then stale).
    """
    folder = Path(context.work_dir) / variant.name
    record = folder / "variant.json"
    wanted = {"variant": variant.to_dict(), "settings": settings}
    if record.exists() and not rebuild:
        saved = json.loads(record.read_text())
        if {k: saved.get(k) for k in wanted} == wanted:
            logger.info("Reusing %s (seed %d) from %s.", variant.name, context.seed, folder)
            return {**saved["result"], "fresh": False}
    logger.info("Building %s (%s), seed %d.", variant.name, variant.label, context.seed)
    torch.manual_seed(context.seed)
    start = time.perf_counter()
    built = build(variant, context)
    seconds = time.perf_counter() - start - built.teacher_cache_seconds
    model = built.model
    model.save_pretrained(folder)
    result = {
        "path": str(folder),
        "compression_seconds": seconds,
        "teacher_cache_seconds": built.teacher_cache_seconds,
        "teacher_cache_built": built.teacher_cache_built,
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "flops_per_token": encoder_flops(model, context.seq_len),
    }
    record.write_text(json.dumps({**wanted, "result": result}, indent=2) + "\n")
    return {**result, "fresh": True}


def time_all(runnables: dict[str, Any], tokenizer, validation, columns: list[str], args) -> dict[str, Any]:
    """Every runnable timed in one interleaved run per setting, against the PyTorch fp32 teacher."""
    reference = f"teacher | seed {args.seeds[0]} | pytorch-fp32"
    n = min(32, len(validation))
    texts = [validation[c][:n] for c in columns]
    fixed = tokenizer(*texts, padding="max_length", truncation=True, max_length=args.seq_len, return_tensors="pt")
    real = [
        dict(tokenizer(*[t[i] for t in texts], truncation=True, max_length=args.seq_len, return_tensors="pt"))
        for i in range(min(args.num_real, n))
    ]
    settings, noisy = {}, {}
    for setting, models, inputs in (
        (f"b32x{args.seq_len}", runnables, dict(fixed)),
        ("b1_real", {name: one_at_a_time(r, real) for name, r in runnables.items()}, {}),
    ):
        logger.info("Timing %d models at %s, %d rounds.", len(models), setting, args.rounds)
        comparison = compare_latency(
            models, inputs, rounds=args.rounds, warmup=args.warmup, reference=reference, threads=args.threads
        )
        settings[setting] = {
            name: {"median_ms": comparison.stats[name].median_ms, **vars(comparison.speedups[name])} for name in models
        }
        noisy[setting] = comparison.warnings
    return {"settings": settings, "noisy": noisy}


def _selected_variants(variants: list[Variant], names: list[str] | None) -> list[Variant]:
    if not names:
        return variants
    unknown = set(names) - {v.name for v in variants}
    if unknown:
        raise ValueError(f"Unknown variants {sorted(unknown)}; choose from {[v.name for v in variants]}.")
    return [v for v in variants if v.name in names or v.name == "teacher"]


def _evaluation_batches(validation, collator) -> list[tuple[dict, torch.Tensor]]:
    """The validation split as padded batches of 64 and their labels."""
    batches = []
    for start in range(0, len(validation), 64):
        batch = collator([validation[i] for i in range(start, min(start + 64, len(validation)))])
        labels = batch.pop("labels")
        batches.append((dict(batch), labels))
    return batches


def _teacher_cache_dir(args: argparse.Namespace) -> str | None:
    if args.teacher_cache_dir is None:
        return str(Path(args.work_dir) / "teacher-cache")
    return args.teacher_cache_dir or None


if __name__ == "__main__":
    main()
