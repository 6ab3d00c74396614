"""The variants of the compression benchmark and how each is made from the teacher (see `compression_table.py`).

Every recipe takes the teacher (never modified), the tokenized data and the benchmark's settings, and returns the
compressed fp32 model (the runtimes, int8 among them, are made from it in `compression_runtimes.py`). Distilled
variants read the teacher's outputs from one teacher cache (`teacher_cache_dir`), built by the first of them and
reused by the others; the time spent preparing it is returned apart from the training time.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedModel

from hf_compress import (
    DistillationTrainer,
    DistillationTrainingArguments,
    GradualStructuredPruningCallback,
    PruningConfig,
    compression_report,
    create_student,
    prune,
    select_layers,
)


@dataclass(frozen=True)
class Variant:
    """One row of the table.

    Args:
        name: Short identifier (folder name in the work directory, key in the JSON).
        label: What the README and the plot call it.
        recipe: `"teacher"`, `"retraining_free"` (one-shot pruning), `"distil"` (a student, optionally pruned
            while it is distilled) or `"prune_then_distil"` (one-shot pruning, then the pruned model is distilled).
        layers: Student layers (`"distil"`); `None` keeps all of the teacher's.
        keep: Fraction of the teacher's encoder FLOPs (`target="flops"`) or measured latency (`target="latency"`)
            kept by pruning.
        target: What `keep` budgets: `"flops"` or `"latency"` (from the benchmark's latency table).
        epochs: Training epochs of a distilled variant, instead of the benchmark's `--epochs`.
    """

    name: str
    label: str
    recipe: str
    layers: int | None = None
    keep: float | None = None
    target: str = "flops"
    epochs: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def default_variants(num_layers: int) -> list[Variant]:
    """The table's rows for a teacher with `num_layers` layers."""
    half, third = -(-num_layers // 2), -(-num_layers // 3)
    variants = [
        Variant("teacher", "teacher", "teacher"),
        Variant(f"student-{half}l", f"student, {half} layers, distilled", "distil", layers=half),
        # With the teacher's outputs cached, epochs after the first cost what plain fine-tuning does.
        Variant(
            f"student-{half}l-3ep", f"student, {half} layers, distilled 3 epochs", "distil", layers=half, epochs=3
        ),
        Variant(f"student-{third}l", f"student, {third} layers, distilled", "distil", layers=third),
        Variant("pruned-2x", "pruned to 1/2 FLOPs, no training", "retraining_free", keep=0.5),
        Variant("pruned-4x", "pruned to 1/4 FLOPs, no training", "retraining_free", keep=0.25),
        Variant("pruned-2x-distilled", "pruned to 1/2 FLOPs while distilling", "distil", keep=0.5),
        Variant("pruned-4x-distilled", "pruned to 1/4 FLOPs while distilling", "distil", keep=0.25),
        Variant(
            f"student-{half}l-pruned-4x",
            f"student, {half} layers, pruned to 1/4 FLOPs while distilling",
            "distil",
            layers=half,
            keep=0.25,
        ),
        # The frontier: pruned to a measured latency budget (depth and width together), then distilled; the
        # smallest model gets a second epoch, which costs little at its size and is what it needs most.
        *(
            Variant(
                f"latency-{speedup:g}x-distilled",
                f"pruned to 1/{speedup:g} of its latency, then distilled" + (f" {epochs} epochs" if epochs else ""),
                "prune_then_distil",
                keep=1 / speedup,
                target="latency",
                epochs=epochs,
            )
            for speedup, epochs in ((3.3, None), (7, None), (12, 2))
        ),
    ]
    names = [variant.name for variant in variants]
    return [variant for i, variant in enumerate(variants) if variant.name not in names[:i]]  # half == third: once


@dataclass
class Context:
    """What every recipe needs: the teacher, the tokenized training data and the benchmark's settings."""

    teacher: PreTrainedModel
    train_dataset: Any  # tokenized, with labels
    collator: DataCollatorWithPadding
    seq_len: int  # FLOPs are counted at this length
    work_dir: str
    seed: int = 0
    num_calibration: int = 256
    training: dict[str, Any] = field(default_factory=dict)  # DistillationTrainingArguments fields
    teacher_cache_dir: str | None = None  # None: every distilled variant runs the teacher live
    latency_table: str | None = None  # target="latency": the table's JSON (measured there when missing)
    threads: int | None = None  # target="latency": torch threads the budget is measured with


@dataclass
class Built:
    """A variant's fp32 model and the seconds spent loading or building the teacher cache it trained from."""

    model: PreTrainedModel
    teacher_cache_seconds: float = 0.0
    teacher_cache_built: bool = False


def build(variant: Variant, context: Context) -> Built:
    """Make `variant`'s fp32 model from `context.teacher` (left unchanged)."""
    if variant.recipe == "teacher":
        return Built(copy.deepcopy(context.teacher))
    if variant.recipe in ("retraining_free", "prune_then_distil"):
        # A DistillationTrainer freezes its teacher: the copy must be trainable again before it is distilled.
        model = copy.deepcopy(context.teacher).requires_grad_(True)
        prune(model, _pruning_config(variant.keep, variant.target, context), dataloader=_calibration(context))
        return Built(model) if variant.recipe == "retraining_free" else _distil(variant, context, model)
    if variant.recipe == "distil":
        return _distil(variant, context)
    raise ValueError(
        f"Variant {variant.name!r} has recipe {variant.recipe!r}; buildable: teacher, retraining_free, distil, "
        "prune_then_distil."
    )


def _pruning_config(keep: float, target: str, context: Context) -> PruningConfig:
    if target == "latency":
        # Widths and depth chosen against the measured latency table (the widths it measured fast).
        return PruningConfig(
            target="latency",
            keep=keep,
            importance="fisher",
            seq_len=context.seq_len,
            latency_batch_size=context.training.get("per_device_train_batch_size", 32),
            latency_threads=context.threads,
            latency_table=context.latency_table,
        )
    # FFN widths in multiples of 8: odd widths (a 29-neuron layer) run slower per FLOP; measured on the SST-2 teacher
    # at 1/4 of its FLOPs, batch 32 x 128, 2 threads: 3.76x with round_to=1, 4.03x with 8.
    return PruningConfig(target=target, keep=keep, importance="fisher", seq_len=context.seq_len, round_to=8)


def _calibration(context: Context) -> DataLoader:
    """`num_calibration` random training sentences with their labels, batched like training."""
    rows = random.Random(context.seed).sample(range(len(context.train_dataset)), context.num_calibration)
    batch_size = context.training.get("per_device_train_batch_size", 32)
    return DataLoader(context.train_dataset.select(rows), batch_size=batch_size, collate_fn=context.collator)


def encoder_flops(model: torch.nn.Module, seq_len: int) -> int:
    """Encoder FLOPs per token at `seq_len` tokens (what `PruningConfig(target="flops")` budgets)."""
    return compression_report(model, seq_len=seq_len).model.flops_per_token


def _distil(variant: Variant, context: Context, student: PreTrainedModel | None = None) -> Built:
    """Distil `student` (already pruned), or a student of `variant.layers` teacher layers, pruned while it learns
    when `variant.keep` is set."""
    teacher = context.teacher
    num_layers = teacher.config.num_hidden_layers
    kept = select_layers(num_layers, variant.layers or num_layers)
    training = dict(context.training)
    if variant.epochs is not None:
        training["num_train_epochs"] = variant.epochs
    if student is None:
        student = create_student(teacher, layers_to_keep=kept)
        if training.get("hidden_loss_weight"):
            # Each student layer to the teacher layer it was initialised from (hidden-state indices: 0 = embeddings).
            training["layer_mapping"] = {new + 1: old + 1 for new, old in enumerate(kept)}
    callbacks = []
    if variant.keep is not None and variant.recipe == "distil":
        # The budget is a fraction of the teacher's; the callback counts from the student's own.
        if variant.target == "latency" and len(kept) != num_layers:
            raise ValueError(
                f"Variant {variant.name!r}: a latency budget is pruned from the whole teacher; for a student of "
                f"{variant.layers} layers use target='flops', or recipe='prune_then_distil' to let the search drop layers."
            )
        keep = variant.keep
        if variant.target == "flops":
            keep *= encoder_flops(teacher, context.seq_len) / encoder_flops(student, context.seq_len)
        if keep >= 1:
            raise ValueError(f"Variant {variant.name!r}: the student is already within keep={variant.keep}.")
        config = _pruning_config(keep, variant.target, context)
        callbacks.append(GradualStructuredPruningCallback(config, begin_step=0, end_step=0.7, frequency=10))
    args = DistillationTrainingArguments(
        output_dir=f"{context.work_dir}/trainer-{variant.name}",
        seed=context.seed,
        save_strategy="no",
        report_to="none",
        teacher_cache_dir=context.teacher_cache_dir,
        **training,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=context.train_dataset,
        data_collator=context.collator,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    cache = trainer.prepare_teacher_cache()  # train() would prepare it too: timed apart, it is shared by the variants
    cache_seconds = time.perf_counter() - start if cache is not None else 0.0
    trainer.train()
    return Built(trainer.model.eval(), cache_seconds, cache is not None and cache.built)
