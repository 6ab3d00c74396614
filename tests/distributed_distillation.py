"""Tiny distillation runs, launched on 2 CPU processes by `tests/test_distributed.py` and in-process as reference.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_distillation.py OUTPUT_DIR 4

Each process trains a sequence classifier and a token classifier and writes `OUTPUT_DIR/rank{rank}.pt`: per task, its
student weights, hidden-state projections and log history.
"""

from __future__ import annotations

import os
import sys

import torch
from datasets import Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import VOCAB_SIZE, tiny_model  # noqa: E402

from hf_compress import DistillationTrainer, DistillationTrainingArguments  # noqa: E402

GLOBAL_BATCH_SIZE = 8
MAX_STEPS = 3
SEQ_LEN = 10


TASKS = ("sequence-classification", "token-classification")


def build_dataset(task: str, num_steps: int = MAX_STEPS) -> Dataset:
    """Fixed rows of different padded lengths, `num_steps` global batches; token labels are -100 on padding and on
    some real tokens, so each process's shard holds a different number of labelled tokens."""
    generator = torch.Generator().manual_seed(3)
    num_rows = GLOBAL_BATCH_SIZE * num_steps
    input_ids = torch.randint(5, VOCAB_SIZE, (num_rows, SEQ_LEN), generator=generator)
    lengths = torch.randint(3, SEQ_LEN + 1, (num_rows,), generator=generator)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()  # (rows, SEQ_LEN)
    if task == "sequence-classification":
        labels = torch.randint(0, 2, (num_rows,), generator=generator)
    else:
        unlabelled = (torch.rand(num_rows, SEQ_LEN, generator=generator) < 0.3) | ~attention_mask.bool()
        labels = torch.randint(0, 2, (num_rows, SEQ_LEN), generator=generator).masked_fill(unlabelled, -100)
    columns = {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask, "labels": labels}
    return Dataset.from_dict({name: tensor.tolist() for name, tensor in columns.items()})


def run(output_dir: str, per_device_batch_size: int, task: str) -> dict:
    """Distil a 4-layer hidden-24 BERT into a 2-layer hidden-16 one (soft, hard and projected hidden losses)."""
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    student = tiny_model("bert", task, seed=0, num_hidden_layers=2, **no_dropout)
    teacher = tiny_model("bert", task, seed=1, hidden_size=24, **no_dropout)
    args = DistillationTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch_size,
        max_steps=MAX_STEPS,
        learning_rate=0.05,
        optim="sgd",
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        ddp_find_unused_parameters=False,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        temperature=2.0,
        alpha=0.5,
        hidden_loss_weight=1.0,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=build_dataset(task))
    trainer.train()
    return {
        "world_size": args.world_size,
        "student": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
        "projections": {k: v.detach().cpu().clone() for k, v in trainer.hidden_projections.state_dict().items()},
        "log_history": trainer.state.log_history,
    }


if __name__ == "__main__":
    output_dir, per_device_batch_size = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    results = {task: run(os.path.join(output_dir, task), per_device_batch_size, task) for task in TASKS}
    torch.save(results, os.path.join(output_dir, f"rank{int(os.environ.get('RANK', 0))}.pt"))
