"""Distil a BERT teacher fine-tuned on SST-2 into a smaller student, compare the two, and save (or push) the student.

The student keeps some of the teacher's layers (one in teacher/student from the bottom by default) and is trained with
`DistillationTrainer` on the teacher's soft predictions and the labels. Teacher and student are then evaluated on the
validation split and timed on the current device with `compare_latency`: interleaved, one call of each per round, so a
change in machine load hits both (timed one after the other, a busy spell during the student's turn once showed a 2x
student as "0.72x"). The speed-up is the median of the per-round ratios, printed with the range 80% of the rounds fall
in, and a warning when the spread is too large to trust. The script prints a comparison table and saves the student,
its tokenizer, `comparison.json` and a model card (`README.md`) in `--output_dir`.

From the Hub (teacher `textattack/bert-base-uncased-SST-2`, dataset GLUE SST-2):

    python examples/distill_bert_sst2.py --student_layers 6 --output_dir out/bert-6l-sst2

Offline, with a local teacher (a `save_pretrained` folder) and a folder with GLUE-style `train.tsv`/`validation.tsv`:

    python examples/distill_bert_sst2.py --teacher ../shared/models/minilm-l6-sst2 --dataset ../shared/data/sst2 \
        --student_layers 3 --max_train_samples 8000 --num_train_epochs 1 --per_device_train_batch_size 32 \
        --max_length 64 --output_dir out/minilm-l3-sst2

A real DistilBERT student from a BERT teacher: add `--student_type distilbert`. Prune the student too (heads and FFN
neurons, before distillation): add `--prune_keep 0.6` (and `--prune_uniform` for a stock checkpoint). Publish: add
`--push_to_hub --hub_model_id you/minilm-l3-sst2` (plus `--hub_private_repo true`, `--hub_revision branch`).
Every `DistillationTrainingArguments` field (`--temperature`, `--alpha`, `--learning_rate`, ...) is a flag; see `--help`.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
)
from transformers.utils import logging as hf_logging

from hf_compress import (
    DistillationTrainer,
    DistillationTrainingArguments,
    PruningConfig,
    build_comparison,
    build_compute_metrics,
    compare_latency,
    compute_classification_metrics,
    create_model_card,
    create_student,
    describe_latency,
    describe_model,
    format_bytes,
    load_text_classification_dataset,
    model_inputs,
    predict_logits,
    prune,
    push_compressed_to_hub,
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
        metadata={
            "help": "A Hub dataset id, or a local folder with train/validation .tsv (GLUE style), .csv or .json."
        },
    )
    dataset_config: str | None = field(default="sst2", metadata={"help": "The Hub dataset's configuration."})
    text_columns: list[str] | None = field(
        default=None, metadata={"help": "The text column (two for sentence pairs); detected by default."}
    )
    label_column: str = field(default="label", metadata={"help": "The label column."})
    student_layers: int | None = field(
        default=None, metadata={"help": "Layers of the student; default half of the teacher's (rounded up)."}
    )
    layers_to_keep: list[int] | None = field(
        default=None, metadata={"help": "Explicit teacher layers for the student (overrides --student_layers)."}
    )
    layer_strategy: str = field(
        default="strided",
        metadata={
            "help": "Which teacher layers the student keeps: 'strided' (one in teacher/student from the bottom: 0, 2, "
            "4 of 6), 'uniform' (the first and last always, like DistilBERT: 0, 3, 5 of 6), 'first' or 'last'.",
            "choices": ["strided", "uniform", "first", "last"],
        },
    )
    student_type: str = field(
        default="same",
        metadata={
            "help": "'same': the teacher's architecture; 'distilbert': a DistilBERT student (BERT teachers).",
            "choices": ["same", "distilbert"],
        },
    )
    prune_keep: float | None = field(
        default=None,
        metadata={
            "help": "Also prune the student before distilling: keep this fraction of its encoder FLOPs (e.g. 0.6), "
            "removing the heads and FFN neurons with the lowest Fisher importance on calibration examples."
        },
    )
    prune_uniform: bool = field(
        default=False,
        metadata={
            "help": "Prune FFN neurons only, to one width in every layer: the student stays a stock checkpoint."
        },
    )
    prune_calibration_samples: int = field(
        default=256, metadata={"help": "Training examples used to score heads and neurons for pruning."}
    )
    max_length: int = field(default=128, metadata={"help": "Truncate (and, for timing, pad) inputs to this length."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation examples."})
    latency_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size for the latency measurement; default the eval batch size."}
    )
    latency_repeats: int = field(
        default=30,
        metadata={
            "help": "Timed rounds (>= 2); each round runs teacher and student once, interleaved. The median is "
            "reported, with the spread."
        },
    )
    latency_warmup: int = field(default=3, metadata={"help": "Untimed rounds before the timed ones."})
    metrics: list[str] = field(
        default_factory=lambda: ["accuracy", "f1"],
        metadata={"help": "Metrics: names (packaged implementations) or paths to local evaluate metric scripts."},
    )


#### Printing


def print_comparison(comparison: dict) -> None:
    teacher, student = comparison["teacher"], comparison["student"]
    rows = [(name, f"{teacher['metrics'][name]:.4f}", f"{value:.4f}") for name, value in student["metrics"].items()]
    rows += [
        ("parameters", f"{teacher['parameters'] / 1e6:.1f}M", f"{student['parameters'] / 1e6:.1f}M"),
        ("size on disk", format_bytes(teacher["size_bytes"]), format_bytes(student["size_bytes"])),
        ("latency per batch", f"{teacher['latency_ms']:.1f} ms", f"{student['latency_ms']:.1f} ms"),
    ]
    latency = comparison["latency"]
    print(
        f"\nTeacher vs student on {comparison['dataset']['num_examples']} validation examples; latency: batch "
        f"{latency['batch_size']} x {latency['sequence_length']} tokens on {latency['device_name']}, "
        f"{latency['torch_threads']} threads"
    )
    print(f"{'':<20}{'teacher':>12}{'student':>12}")
    for name, teacher_value, student_value in rows:
        print(f"{name:<20}{teacher_value:>12}{student_value:>12}")
    interval = comparison.get("speedup_interval")
    speedup = f"{comparison['speedup']:.2f}x"
    print(
        f"{'speed-up':<20}{'':>12}{speedup:>12}"
        + (f"  ({interval[0]:.2f}-{interval[1]:.2f}x in 80% of rounds)" if interval else "")
    )
    for name, retained in comparison["metrics_retained"].items():
        shown = "n/a" if retained is None else f"{retained:.1%}"  # None: the teacher scored 0
        print(f"{name + ' retained':<20}{'':>12}{shown:>12}")
    if latency.get("noisy"):
        print(
            "WARNING: the latency spread is too large to trust the speed-up (the middle half of some model's rounds "
            f"spans more than {latency['max_relative_iqr']:.0%} of its median). Rerun on an idle machine, with more "
            "--latency_repeats or a larger --latency_batch_size."
        )


def main(argv: list[str] | None = None) -> dict:
    #### Arguments
    parser = HfArgumentParser((ScriptArguments, DistillationTrainingArguments))
    # Defaults suited to distilling on SST-2; any flag overrides them. With --layer_strategy strided, T=4 and 2 epochs
    # the quick-start's 3-layer student kept 97.7 +- 0.6% of the teacher over seeds 0-2, where uniform layers with T=2
    # and 3 epochs kept 96.2 +- 0.6% (benchmarks/results/example_defaults.json): the layer choice made the difference.
    parser.set_defaults(
        output_dir="out/distilled-sst2",
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=1e-4,
        temperature=4.0,
        num_train_epochs=2,
        logging_steps=50,
        save_strategy="no",
    )
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if script_args.latency_repeats < 2 or script_args.latency_warmup < 0:
        raise ValueError(
            f"--latency_repeats {script_args.latency_repeats} --latency_warmup {script_args.latency_warmup}: the "
            "speed-up needs at least 2 timed rounds and no negative warm-up; e.g. --latency_repeats 30."
        )
    # Show the INFO lines of this script and of hf-compress (their loggers come from transformers.utils.logging).
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # Before any download: without the Hub, say at once how to run the same command from local folders.
    require_hub_or_local(
        models={"--teacher": script_args.teacher},
        datasets={"--dataset": script_args.dataset},
        argv=sys.argv if argv is None else [sys.argv[0], *argv],
    )

    #### Teacher, tokenizer and data
    teacher = AutoModelForSequenceClassification.from_pretrained(script_args.teacher)
    # DistilBERT has no segment embeddings: its tokenizer must not produce token_type_ids (pipelines pass them on).
    input_names = ["input_ids", "attention_mask"] if script_args.student_type == "distilbert" else None
    tokenizer = AutoTokenizer.from_pretrained(
        script_args.teacher, **({"model_input_names": input_names} if input_names else {})
    )
    data = load_text_classification_dataset(
        script_args.dataset,
        script_args.dataset_config,
        text_columns=script_args.text_columns,
        label_column=script_args.label_column,
        label2id=teacher.config.label2id,
    )
    missing = {"train", "validation"} - set(data.dataset)
    if missing:
        raise ValueError(f"{script_args.dataset} has no {' or '.join(sorted(missing))} split; the example needs both.")
    train_dataset, eval_dataset = data.dataset["train"], data.dataset["validation"]
    if script_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
    if script_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(script_args.max_eval_samples, len(eval_dataset))))

    # A fixed-shape batch of real sentences, padded to max_length, times both models on identical work.
    latency_rows = eval_dataset[: script_args.latency_batch_size or training_args.per_device_eval_batch_size]
    latency_texts = [latency_rows[column] for column in data.text_columns]

    def tokenize(rows):
        texts = [rows[column] for column in data.text_columns]
        return tokenizer(*texts, truncation=True, max_length=script_args.max_length)

    with training_args.main_process_first(desc="tokenization"):
        train_dataset = train_dataset.map(tokenize, batched=True, remove_columns=list(data.text_columns))
        eval_dataset = eval_dataset.map(tokenize, batched=True, remove_columns=list(data.text_columns))
    collator = DataCollatorWithPadding(tokenizer)

    #### Student
    num_teacher_layers = teacher.config.num_hidden_layers
    kept = select_layers(
        num_teacher_layers,
        script_args.student_layers or (None if script_args.layers_to_keep else -(-num_teacher_layers // 2)),
        script_args.layers_to_keep,
        script_args.layer_strategy,
    )
    target = "distilbert" if script_args.student_type == "distilbert" else None
    student = create_student(teacher, layers_to_keep=kept, target=target)
    logger.info("Student: %s with teacher layers %s", type(student).__name__, kept)
    pruning_report = None
    if script_args.prune_keep is not None:
        # Prune before distilling, so that distillation recovers what pruning cost (Fisher scores need the labels).
        calibration = train_dataset.select(range(min(script_args.prune_calibration_samples, len(train_dataset))))
        loader = torch.utils.data.DataLoader(
            calibration, batch_size=training_args.per_device_train_batch_size, collate_fn=collator
        )
        accepted = inspect.signature(student.forward).parameters
        batches = [{key: value for key, value in batch.items() if key in accepted} for batch in loader]
        config = PruningConfig(
            target="flops",
            keep=script_args.prune_keep,
            uniform=script_args.prune_uniform,
            seq_len=script_args.max_length,
        )
        pruning_report = prune(student, config, dataloader=batches)
    intermediate = training_args.hidden_loss_weight > 0 or training_args.attention_loss_weight > 0
    if intermediate and training_args.layer_mapping is None:
        # Compare each student layer with the teacher layer it was copied from; hidden-state index 0 is the
        # embeddings, so layer i is index i + 1.
        training_args.layer_mapping = {new + 1: old + 1 for new, old in enumerate(kept)}

    #### Distillation
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=build_compute_metrics(script_args.metrics, teacher.config.num_labels),
    )
    train_result = trainer.train()
    student = trainer.model

    #### Compare teacher and student (main process)
    comparison = None
    if trainer.is_world_process_zero():
        latency_batch = tokenizer(
            *latency_texts,
            padding="max_length",
            truncation=True,
            max_length=script_args.max_length,
            return_tensors="pt",
        )
        eval_loader = torch.utils.data.DataLoader(
            eval_dataset, batch_size=training_args.per_device_eval_batch_size, collate_fn=collator
        )
        models = {"teacher": teacher, "student": student}
        sides = {}
        for side, model in models.items():
            model.to(training_args.device)
            logits, labels = predict_logits(model, eval_loader)
            predictions = logits.argmax(-1).numpy()
            sides[side] = {
                **describe_model(model),
                "name_or_path": script_args.teacher if side == "teacher" else training_args.output_dir,
                "metrics": compute_classification_metrics(
                    predictions, labels.numpy(), script_args.metrics, teacher.config.num_labels
                ),
            }
        # Both models on the same batch (the inputs both forwards take), timed round-robin in one run.
        shared_inputs = model_inputs(student, model_inputs(teacher, latency_batch))
        timing = compare_latency(
            models, shared_inputs, rounds=script_args.latency_repeats, warmup=script_args.latency_warmup
        )
        for side in models:
            sides[side]["latency_ms"] = timing.stats[side].median_ms
        setup = describe_latency(timing, shared_inputs, device=training_args.device)
        from_hub = "name" in data.source
        dataset_info = {
            "name": script_args.dataset if from_hub else Path(script_args.dataset).name,
            "hub_id": script_args.dataset if from_hub else None,
            "config": script_args.dataset_config if from_hub else None,
            "split": "validation",
            "num_examples": len(eval_dataset),
        }
        comparison = build_comparison(
            sides["teacher"],
            sides["student"],
            dataset=dataset_info,
            latency=setup,
            speedup=timing.speedups["student"],  # the median of per-round ratios, with its 10%-90% interval
        )
        comparison["train_runtime_s"] = train_result.metrics.get("train_runtime")
        comparison["train_examples"] = len(train_dataset)
        if pruning_report is not None:
            comparison["pruning"] = pruning_report.to_dict()
        print_comparison(comparison)

    #### Save (and push)
    trainer.save_model()  # the student and its tokenizer
    if comparison is not None:
        output_dir = Path(training_args.output_dir)
        (output_dir / "comparison.json").write_text(json.dumps(comparison, indent=2, sort_keys=True) + "\n")
        distillation = {
            "temperature": training_args.temperature,
            "alpha": training_args.alpha,
            "loss": "alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy with the labels",
        }
        if training_args.hidden_loss_weight > 0:
            distillation["hidden_state_loss"] = (
                f"{training_args.hidden_loss_type}, weight {training_args.hidden_loss_weight}"
            )
        if training_args.attention_loss_weight > 0:
            distillation["attention_loss"] = f"KL, weight {training_args.attention_loss_weight}"
        if intermediate:
            distillation["layer_mapping"] = training_args.layer_mapping
        distillation.update(
            teacher_layers_kept=kept,
            training_examples=len(train_dataset),
            epochs=training_args.num_train_epochs,
            learning_rate=training_args.learning_rate,
        )
        pruning = None
        if pruning_report is not None:
            pruning = {
                "budget": f"{script_args.prune_keep:.0%} of the encoder FLOPs per token at {script_args.max_length} "
                "tokens" + (", one FFN width in every layer" if script_args.prune_uniform else ""),
                "importance": f"{pruning_report.config.importance}, on {len(calibration)} training examples",
                "heads_removed": sum(map(len, pruning_report.removed_heads.values())),
                "ffn_neurons_removed": sum(map(len, pruning_report.removed_ffn.values())),
                "applied": "before distillation",
            }
        card = create_model_card(
            output_dir,
            student,
            base_model=script_args.teacher,
            comparison=comparison,
            distillation=distillation,
            pruning=pruning,
            repo_id=trainer.hub_model_id,  # set by the Trainer with --push_to_hub, for the card's loading snippets
            language="en",
        )
        if training_args.push_to_hub:
            # Not trainer.push_to_hub(): it rewrites README.md from the Trainer's own summary, replacing this card.
            push_compressed_to_hub(
                student,
                trainer.hub_model_id,
                tokenizer=tokenizer,
                card=card,
                comparison=comparison,
                private=bool(training_args.hub_private_repo),
                revision=training_args.hub_revision,
                token=training_args.hub_token,
                commit_message="Distilled student, model card and comparison (hf-compress)",
            )
    return comparison


if __name__ == "__main__":
    main()
