"""Progressive compression: prune the teacher, then distil it into a student that is pruned further while it learns.

Three stages, each evaluated on the validation split, then timed together on the same batch with `compare_latency`
(interleaved, one call of each model per round, so a change in machine load hits every stage alike; the speed-up over
the teacher is the median of the per-round ratios, shown with the range 80% of the rounds fall in, and a warning is
printed when the spread is too large to trust):

1. **Prune the teacher, no training** (`--teacher_keep`, e.g. 0.6): Fisher importance of heads and FFN neurons on a few
   hundred training sentences, the least important removed, the rest rescaled by least squares (Kwon et al. 2022). On
   SST-2 this keeps the teacher's accuracy at 40% fewer encoder FLOPs, in seconds, and makes stage 2 cheaper.
2. **Student**: a copy of the pruned teacher (`--student_layers` keeps fewer of its layers, spread evenly).
3. **Prune while distilling** (`--final_keep`, a fraction of the *original* teacher's encoder FLOPs): the student is
   trained with `DistillationTrainer` on the pruned teacher's soft predictions and the labels, while
   `GradualStructuredPruningCallback` removes heads and neurons on a cubic schedule, scored from the running gradients,
   so the student adapts between pruning steps. The last part of training recovers at the final size.

Offline, with the shared SST-2 teacher and data (60% of the encoder FLOPs removed in the end):

    python examples/progressive_compression.py --teacher ../shared/models/minilm-l6-sst2 \
        --dataset ../shared/data/sst2 --teacher_keep 0.6 --final_keep 0.4 --max_train_samples 8000 \
        --max_length 64 --output_dir out/minilm-progressive-sst2

The result is saved with `save_pretrained` in `--output_dir` (heads and widths differ per layer: load it with
`hf_compress.load_compressed`, or with stock transformers and `trust_remote_code=True`) together with
`stages.json`, the table this script prints. Every `DistillationTrainingArguments` field is a flag (`--help`).
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, HfArgumentParser
from transformers.utils import logging as hf_logging

from hf_compress import (
    DistillationTrainer,
    DistillationTrainingArguments,
    GradualStructuredPruningCallback,
    PruningConfig,
    compare_latency,
    compression_report,
    compute_classification_metrics,
    create_student,
    load_text_classification_dataset,
    model_inputs,
    predict_logits,
    prune,
    require_hub_or_local,
    select_layers,
)

logger = hf_logging.get_logger(__name__)


@dataclass
class ScriptArguments:
    teacher: str = field(
        default="textattack/bert-base-uncased-SST-2",
        metadata={"help": "The fine-tuned teacher: a Hub id or a local folder written by save_pretrained."},
    )
    dataset: str = field(
        default="glue",
        metadata={"help": "A Hub dataset id, or a local folder with train/validation .tsv (GLUE style), .csv, .json."},
    )
    dataset_config: str | None = field(default="sst2", metadata={"help": "The Hub dataset's configuration."})
    teacher_keep: float = field(
        default=0.6,
        metadata={
            "help": "Stage 1: fraction of the teacher's encoder FLOPs kept by retraining-free pruning (1 = skip)."
        },
    )
    student_layers: int | None = field(
        default=None, metadata={"help": "Stage 2: layers of the student; default all of the pruned teacher's."}
    )
    final_keep: float = field(
        default=0.4,
        metadata={"help": "Stage 3: fraction of the original teacher's encoder FLOPs the final student keeps."},
    )
    prune_end: float = field(
        default=0.7,
        metadata={"help": "Stage 3: fraction of training at which the final size is reached (then it recovers)."},
    )
    prune_frequency: int = field(default=10, metadata={"help": "Stage 3: optimizer steps between pruning steps."})
    calibration_samples: int = field(
        default=256, metadata={"help": "Stage 1: training sentences for the importance scores and rescaling."}
    )
    max_length: int = field(default=128, metadata={"help": "Truncate inputs to this length; FLOPs counted at it."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    latency_repeats: int = field(
        default=30,
        metadata={"help": "Timed rounds (>= 2); each round runs every stage's model once, interleaved."},
    )
    latency_warmup: int = field(default=3, metadata={"help": "Untimed rounds before the timed ones."})


def main(argv: list[str] | None = None) -> list[dict]:
    parser = HfArgumentParser((ScriptArguments, DistillationTrainingArguments))
    parser.set_defaults(
        output_dir="out/progressive-sst2",
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=1e-4,
        num_train_epochs=1,
        logging_steps=50,
        save_strategy="no",
    )
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if script_args.latency_repeats < 2 or script_args.latency_warmup < 0:
        raise ValueError(
            f"--latency_repeats {script_args.latency_repeats} --latency_warmup {script_args.latency_warmup}: the "
            "speed-ups need at least 2 timed rounds and no negative warm-up; e.g. --latency_repeats 30."
        )
    for name in ("teacher_keep", "final_keep", "prune_end"):
        if not 0 < getattr(script_args, name) <= 1:
            raise ValueError(f"--{name} {getattr(script_args, name)} must be in (0, 1].")
    if script_args.final_keep > script_args.teacher_keep:
        raise ValueError(
            f"--final_keep {script_args.final_keep} keeps more than the pruned teacher (--teacher_keep "
            f"{script_args.teacher_keep}); the student can only shrink: lower --final_keep or raise --teacher_keep."
        )
    # Show the INFO lines of this script and of hf-compress (their loggers come from transformers.utils.logging).
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    require_hub_or_local(
        models={"--teacher": script_args.teacher},
        datasets={"--dataset": script_args.dataset},
        argv=sys.argv if argv is None else [sys.argv[0], *argv],
    )

    #### Teacher, tokenizer, data
    teacher = AutoModelForSequenceClassification.from_pretrained(script_args.teacher)
    tokenizer = AutoTokenizer.from_pretrained(script_args.teacher)
    data = load_text_classification_dataset(
        script_args.dataset, script_args.dataset_config, label2id=teacher.config.label2id
    )
    train_dataset, eval_dataset = data.dataset["train"], data.dataset["validation"]
    if script_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
    latency_rows = eval_dataset[: training_args.per_device_eval_batch_size]
    latency_batch = tokenizer(
        *[latency_rows[column] for column in data.text_columns],
        padding="max_length",
        truncation=True,
        max_length=script_args.max_length,
        return_tensors="pt",
    )

    def tokenize(rows):
        return tokenizer(*[rows[c] for c in data.text_columns], truncation=True, max_length=script_args.max_length)

    train_dataset = train_dataset.map(tokenize, batched=True, remove_columns=list(data.text_columns))
    eval_dataset = eval_dataset.map(tokenize, batched=True, remove_columns=list(data.text_columns))
    collator = DataCollatorWithPadding(tokenizer)
    eval_loader = torch.utils.data.DataLoader(
        eval_dataset, batch_size=training_args.per_device_eval_batch_size, collate_fn=collator
    )

    def summary(model: torch.nn.Module):
        # Encoder FLOPs per token at max_length, as `PruningConfig(target="flops")` counts them, and parameters.
        return compression_report(model, seq_len=script_args.max_length).model

    reference_flops = summary(teacher).flops_per_token
    stages: list[dict] = []
    models: dict[str, torch.nn.Module] = {}  # timed together at the end

    def record(stage: str, model: torch.nn.Module, seconds: float) -> None:
        logits, labels = predict_logits(model, eval_loader)
        accuracy = compute_classification_metrics(logits.argmax(-1).numpy(), labels.numpy(), ("accuracy",))["accuracy"]
        size = summary(model)
        stages.append(
            {
                "stage": stage,
                "accuracy": accuracy,
                "flops_kept": size.flops_per_token / reference_flops,
                "parameters": size.parameters,
                "seconds": seconds,
            }
        )
        models[stage] = model
        logger.info("%s: accuracy %.4f", stage, accuracy)

    record("teacher", teacher, 0.0)

    #### Stage 1: prune the teacher without training
    pruned_teacher = copy.deepcopy(teacher)
    start = time.perf_counter()
    if script_args.teacher_keep < 1:
        calibration = train_dataset.select(range(min(script_args.calibration_samples, len(train_dataset))))
        loader = torch.utils.data.DataLoader(
            calibration, batch_size=training_args.per_device_train_batch_size, collate_fn=collator
        )
        config = PruningConfig(target="flops", keep=script_args.teacher_keep, seq_len=script_args.max_length)
        prune(pruned_teacher, config, dataloader=loader)
        record("teacher pruned, no training", pruned_teacher, time.perf_counter() - start)

    #### Stage 2: the student starts as (some layers of) the pruned teacher
    num_layers = pruned_teacher.config.num_hidden_layers
    kept = select_layers(num_layers, script_args.student_layers or num_layers)
    student = create_student(pruned_teacher, layers_to_keep=kept)

    #### Stage 3: distil from the pruned teacher while pruning to the final budget
    student_flops = summary(student).flops_per_token
    keep_of_student = script_args.final_keep * reference_flops / student_flops
    if keep_of_student >= 1:
        raise ValueError(
            f"The student already has {student_flops / reference_flops:.1%} of the teacher's encoder FLOPs, no more "
            f"than --final_keep {script_args.final_keep}: lower --final_keep or keep more student layers."
        )
    pruning = GradualStructuredPruningCallback(
        PruningConfig(target="flops", keep=keep_of_student, seq_len=script_args.max_length),
        begin_step=0,
        end_step=script_args.prune_end,
        frequency=script_args.prune_frequency,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=pruned_teacher,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[pruning],
    )
    start = time.perf_counter()
    trainer.train()
    record("student pruned while distilling", trainer.model, time.perf_counter() - start)

    #### Latency: every stage's model timed interleaved, relative to the teacher
    inputs = latency_batch
    for model in models.values():  # the inputs every model's forward takes
        inputs = model_inputs(model, inputs)
    timing = compare_latency(
        models, inputs, rounds=script_args.latency_repeats, warmup=script_args.latency_warmup, reference="teacher"
    )
    for row in stages:
        speedup = timing.speedups[row["stage"]]
        row.update(
            latency_ms=timing.stats[row["stage"]].median_ms,
            speedup=speedup.median,
            speedup_interval=[speedup.low, speedup.high],
        )

    #### Report and save
    teacher_row = stages[0]
    print(
        f"\n{'stage':<36}{'accuracy':>10}{'retained':>10}{'FLOPs':>8}{'params':>9}{'speed-up [10%-90%]':>22}"
        f"{'time':>8}"
    )
    for row in stages:
        low, high = row["speedup_interval"]
        speedup = f"{row['speedup']:.2f}x [{low:.2f}-{high:.2f}]"
        print(
            f"{row['stage']:<36}{row['accuracy']:>10.4f}{row['accuracy'] / teacher_row['accuracy']:>10.1%}"
            f"{row['flops_kept']:>8.0%}{row['parameters'] / 1e6:>8.1f}M{speedup:>22}{row['seconds']:>7.0f}s"
        )
    print(
        f"Latency: {timing.rounds} interleaved rounds after {timing.warmup} warm-up rounds, {timing.torch_threads} "
        "torch threads; speed-up = median of the per-round ratios to the teacher."
    )
    for warning in timing.warnings:
        print(f"WARNING: {warning}")
    trainer.save_model()
    output = Path(training_args.output_dir)
    (output / "stages.json").write_text(json.dumps(stages, indent=2) + "\n")
    return stages


if __name__ == "__main__":
    main()
