"""What a teacher costs per training step: stock `Trainer`, `DistillationTrainer` with a live teacher, and with cached
teacher outputs (`teacher_cache_dir`), on the same student and data, in one run.

```bash
python benchmarks/distillation_cost.py   # defaults: the SST-2 teacher and data in ../shared, 2 threads
python benchmarks/distillation_cost.py --teacher textattack/bert-base-uncased-SST-2 --data glue --data-config sst2
```

The student is `create_student(teacher, num_layers=--student-layers)`, trained from the same initial weights in every
mode on the first `--train-samples` training sentences, padded to `--max-length` tokens (every batch
`--batch-size` x `--max-length`). The cache is built once before any timing (build time reported separately; later
cached runs only re-fingerprint the data and reuse the file, reported as load time).

Timing: each round trains every mode for `--steps` optimizer steps, in a rotating order so that load from other
processes hits all alike; a mode's step time is the median interval between consecutive step ends after
`--warmup-steps` steps (data loading, forward, backward and optimizer step included). The teacher's forward is timed
twice: alone on three training batches each round, under `torch.no_grad()` and `torch.inference_mode()` in turn, and
inside the live run's steps (`DistillationTrainer._teacher_outputs`). Reported: medians over rounds of steps/s, of the
per-round ratios to the stock Trainer, and of "live overhead minus teacher forward" (live step time minus stock step
time minus the teacher's forward, alone or in training: 0 means nothing is wasted around the teacher).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from repo_paths import shown_path
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.utils import logging as hf_logging

from hf_compress import (
    DistillationTrainer,
    DistillationTrainingArguments,
    create_student,
    device_name,
    load_text_classification_dataset,
)

logger = hf_logging.get_logger("distillation_cost")
ROOT = Path(__file__).resolve().parent.parent
MODES = ("stock", "live", "cached")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=str(ROOT.parent / "shared/models/minilm-l6-sst2"), help="Path or Hub id.")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/sst2"), help="Folder or Hub dataset id.")
    parser.add_argument("--data-config", default=None, help="Hub dataset configuration (e.g. sst2 for glue).")
    parser.add_argument("--student-layers", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=2048, help="Training sentences (the cache covers all).")
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per mode and round.")
    parser.add_argument("--warmup-steps", type=int, default=2, help="Steps left out of each run's timing.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/distillation_cost.json"))
    parser.add_argument("--work-dir", default=None, help="Trainer output and cache folder (default: a temp folder).")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup_steps + 1:
        parser.error(f"--steps {args.steps} must exceed --warmup-steps {args.warmup_steps} + 1 to time any interval.")
    return args


class _StepTimer(TrainerCallback):
    """Timestamps of every step end, and of `on_train_begin` (what happens before it: the cache build or load)."""

    def __init__(self):
        self.started = time.perf_counter()  # just before `train()`
        self.step_ends: list[float] = []
        self.train_begin: float | None = None
        self.teacher_calls: list[float] = []  # durations of `_teacher_outputs` in training (live mode)

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.perf_counter())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Show the benchmark's INFO lines (its logger comes from transformers.utils.logging), not transformers' own.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    hf_logging.set_verbosity_warning()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    initial_student = create_student(teacher, num_layers=args.student_layers)
    data = load_text_classification_dataset(args.data, args.data_config, splits=("train",))
    train = data.dataset["train"].select(range(min(args.train_samples, len(data.dataset["train"]))))
    columns = list(data.text_columns)

    def tokenize(batch):
        texts = [batch[column] for column in columns]
        return tokenizer(*texts, truncation=True, max_length=args.max_length, padding="max_length")

    train = train.map(tokenize, batched=True, remove_columns=columns).rename_column(data.label_column, "labels")
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="distillation_cost_")
    cache_dir = os.path.join(work_dir, "teacher_cache")

    def run(mode: str, cache_dir_for_run: str | None = None, steps: int = args.steps) -> _StepTimer:
        """Train a fresh copy of the initial student for `steps` steps in `mode`."""
        student = copy.deepcopy(initial_student).train()
        common = dict(
            output_dir=os.path.join(work_dir, mode),
            per_device_train_batch_size=args.batch_size,
            max_steps=steps,
            learning_rate=5e-5,
            logging_steps=10**6,  # no logging inside the timed steps
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
        )
        timer = _StepTimer()
        if mode == "stock":
            trainer = Trainer(
                model=student,
                args=TrainingArguments(**common),
                train_dataset=train,
                data_collator=default_data_collator,
                callbacks=[timer],
            )
        else:
            distillation_args = DistillationTrainingArguments(**common, teacher_cache_dir=cache_dir_for_run)
            trainer = DistillationTrainer(
                model=student,
                teacher_model=teacher,
                args=distillation_args,
                train_dataset=train,
                data_collator=default_data_collator,
                callbacks=[timer],
            )
        if mode == "live":
            trainer._teacher_outputs = _timed(trainer._teacher_outputs, timer.teacher_calls)
        timer.started = time.perf_counter()
        trainer.train()
        return timer

    logger.info("Building the teacher cache over %d examples (not timed as training).", len(train))
    build = run("cached", cache_dir, steps=1)
    cache_build_s = build.train_begin - build.started
    cache_files = [f for f in os.listdir(cache_dir) if f.endswith(".safetensors")]
    cache_mb = sum(os.path.getsize(os.path.join(cache_dir, f)) for f in cache_files) / 1e6

    # The teacher's own forward, timed on three training batches (labels dropped: no loss inside the model).
    starts = range(0, min(3 * args.batch_size, len(train) - args.batch_size + 1), args.batch_size)
    batches = [default_data_collator([train[i] for i in range(start, start + args.batch_size)]) for start in starts]
    batches = [{k: v for k, v in batch.items() if k != "labels"} for batch in batches]
    step_s = {mode: [] for mode in MODES}
    teacher_in_training_s = []
    teacher_s = {"no_grad": [], "inference_mode": []}
    cache_load_s = []
    for round_index in range(args.rounds):
        order = MODES[round_index % 3 :] + MODES[: round_index % 3]
        for mode in order:
            timer = run(mode, cache_dir if mode == "cached" else None)
            intervals = [b - a for a, b in itertools.pairwise(timer.step_ends)][args.warmup_steps :]
            step_s[mode].append(statistics.median(intervals))
            if mode == "cached":
                cache_load_s.append(timer.train_begin - timer.started)
            if mode == "live":
                teacher_in_training_s.append(statistics.median(timer.teacher_calls[args.warmup_steps :]))
            logger.info("round %d %s: %.3f s/step", round_index, mode, step_s[mode][-1])
        contexts = [("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)]
        for context_name, context in contexts[round_index % 2 :] + contexts[: round_index % 2]:
            times = []
            for batch in batches:
                start = time.perf_counter()
                with context():
                    teacher(**batch)
                times.append(time.perf_counter() - start)
            teacher_s[context_name].append(statistics.median(times))

    def median_ratio(numerator: str, denominator: str) -> float:
        # Per-round ratios, then the median: robust to load that drifts during the run.
        return statistics.median(n / d for n, d in zip(step_s[numerator], step_s[denominator], strict=True))

    def median_overhead(teacher_times: list[float]) -> float:
        # What a live step costs over a stock step, beyond the teacher's forward (ms; 0 = nothing wasted around it).
        triples = zip(step_s["live"], step_s["stock"], teacher_times, strict=True)
        return 1000 * statistics.median(live - stock - teacher for live, stock, teacher in triples)

    results = {
        "settings": {
            "teacher": shown_path(args.teacher),
            "data": shown_path(args.data),
            "student_layers": args.student_layers,
            "train_samples": len(train),
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "rounds": args.rounds,
        },
        "environment": {
            "threads": args.threads,
            "cpu": device_name("cpu"),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "steps_per_second": {mode: 1 / statistics.median(times) for mode, times in step_s.items()},
        "step_seconds_per_round": step_s,
        "live_vs_stock_speed": 1 / median_ratio("live", "stock"),
        "cached_vs_stock_speed": 1 / median_ratio("cached", "stock"),
        "cached_vs_live_speed": 1 / median_ratio("cached", "live"),
        "teacher_forward_ms": {name: 1000 * statistics.median(times) for name, times in teacher_s.items()},
        "teacher_forward_ms_per_round": {name: [1000 * t for t in times] for name, times in teacher_s.items()},
        # The teacher's forward as the live trainer runs it, inside training steps (`_teacher_outputs`, no_grad).
        "teacher_forward_in_training_ms": 1000 * statistics.median(teacher_in_training_s),
        "teacher_forward_in_training_ms_per_round": [1000 * t for t in teacher_in_training_s],
        "live_overhead_minus_teacher_forward_ms": median_overhead(teacher_s["no_grad"]),
        "live_overhead_minus_teacher_forward_in_training_ms": median_overhead(teacher_in_training_s),
        "cache_build_s": cache_build_s,
        "cache_load_s": statistics.median(cache_load_s),
        "cache_mb": cache_mb,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    logger.info(
        "Wrote %s:\n%s", args.output, json.dumps({k: v for k, v in results.items() if "round" not in k}, indent=2)
    )
    return results


def _timed(method, durations: list[float]):
    """`method`, recording the duration of each call in `durations`."""

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = method(*args, **kwargs)
        durations.append(time.perf_counter() - start)
        return result

    return timed


if __name__ == "__main__":
    main()
