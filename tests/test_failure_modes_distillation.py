"""DistillationTrainer's failure modes ("Nothing silently wrong"): every case is either right, checked against a hand
computation, or a ValueError raised at construction that names the value and the fix and leaves the models untouched."""

from __future__ import annotations

import copy
import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB_SIZE, random_batch, tiny_model
from datasets import Dataset

from hf_compress import (
    DistillationTrainer,
    DistillationTrainingArguments,
    GradualStructuredPruningCallback,
    PruningConfig,
    get_structure,
    prune_ffn_neurons,
    prune_heads,
)
from hf_compress.architectures import get_layers, get_spec

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
SEQ_LEN = 8


def make_batch(task: str = "sequence-classification", num_rows: int = 4, seed: int = 0) -> dict:
    """Rows of different padded lengths; token labels are -100 on padding and on some real tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB_SIZE, (num_rows, SEQ_LEN), generator=generator)
    lengths = torch.randint(3, SEQ_LEN + 1, (num_rows,), generator=generator)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()  # (rows, SEQ_LEN)
    batch = {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask}
    if task == "sequence-classification":
        batch["labels"] = torch.randint(0, 2, (num_rows,), generator=generator)
    else:
        labels = torch.randint(0, 2, (num_rows, SEQ_LEN), generator=generator)
        unlabelled = (torch.rand(num_rows, SEQ_LEN, generator=generator) < 0.4) | ~attention_mask.bool()
        batch["labels"] = labels.masked_fill(unlabelled, -100)
    return batch


def to_dataset(batch: dict) -> Dataset:
    return Dataset.from_dict({name: tensor.tolist() for name, tensor in batch.items()})


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def make_args(output_dir, **overrides) -> DistillationTrainingArguments:
    defaults = dict(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
    )
    return DistillationTrainingArguments(**{**defaults, **overrides})


def student_and_teacher(task: str = "sequence-classification", student_layers: int = 2, **teacher_kwargs):
    """A hidden-16 BERT student and a 4-layer hidden-24 BERT teacher, both 4 heads per layer and 2 labels."""
    student = tiny_model("bert", task, seed=0, num_hidden_layers=student_layers, **NO_DROPOUT)
    teacher = tiny_model("bert", task, seed=1, hidden_size=24, **NO_DROPOUT, **teacher_kwargs)
    return student, teacher


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def soft_and_hard(student, teacher, batch, temperature: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The soft (T^2 * KL) and hard (CE) losses of a sequence-classification batch, written out."""
    with torch.no_grad():
        student_logits = student(**model_inputs(batch)).logits
        teacher_logits = teacher(**model_inputs(batch)).logits
    teacher_probs = F.softmax(teacher_logits / temperature, -1)
    kl = (teacher_probs * (teacher_probs.log() - F.log_softmax(student_logits / temperature, -1))).sum(-1)
    return temperature**2 * kl.mean(), F.cross_entropy(student_logits, batch["labels"])


def layer_attentions(model, batch) -> dict[int, torch.Tensor]:
    """Transformer layer (1-based, as in `layer_mapping`) -> its attention probabilities `(B, heads, L, L)`, read from
    each layer's own attention module, so independent of how the model orders its returned `attentions`."""
    spec, captured, handles = get_spec(model), {}, []
    for index, layer in enumerate(get_layers(model)):
        core = layer.get_submodule(spec.attention_core)

        def hook(module, args, output, layer_number=index + 1):
            if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                captured[layer_number] = output[1].detach()

        handles.append(core.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**model_inputs(batch), output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def attention_kl(p_student, p_teacher, attention_mask, average_heads: bool = False) -> torch.Tensor:
    """KL(teacher || student) per query over the valid keys, averaged over heads, valid queries, then examples."""
    per_example = []
    for b in range(len(attention_mask)):
        keys = attention_mask[b].bool()
        p_s = p_student[b][:, keys][:, :, keys]  # (heads, valid queries, valid keys)
        p_t = p_teacher[b][:, keys][:, :, keys]
        if average_heads:
            p_s, p_t = p_s.mean(0, keepdim=True), p_t.mean(0, keepdim=True)
        per_example.append((p_t * (p_t.log() - p_s.log())).sum(-1).mean())
    return torch.stack(per_example).mean()


def empty_layer(model, layer_index: int) -> None:
    """Prune every head of one layer (0-based), which then returns no attention map at all."""
    prune_heads(model, {layer_index: list(range(get_structure(model).heads[layer_index]))})


# ---- 1. Attention loss on head-pruned models ----


@pytest.mark.parametrize(
    ("pruned", "student_layers", "layer_mapping", "compared"),
    [
        # Student layer 1 has no heads: its pair is left out; layers 2 and 3 are compared with teacher 2 and 4 (the
        # original code compared the student's layers 3 and (out of range) 4 instead).
        ("student", 3, {1: 1, 2: 2, 3: 4}, [(2, 2), (3, 4)]),
        # Teacher layer 1 has no heads: teacher layers 2 and 4 are its attentions[0] and [2], not [1] and [3].
        ("teacher", 2, None, [(1, 2), (2, 4)]),
        # The student loses a layer's heads after construction, as under GradualStructuredPruningCallback.
        ("student_after_construction", 3, {1: 1, 2: 2, 3: 4}, [(2, 2), (3, 4)]),
    ],
)
def test_attention_loss_with_head_pruned_layer_compares_the_right_layers(
    tmp_path, caplog, pruned, student_layers, layer_mapping, compared
):
    student, teacher = student_and_teacher(student_layers=student_layers)
    if pruned == "student":
        empty_layer(student, 0)
    elif pruned == "teacher":
        empty_layer(teacher, 0)
    args = make_args(tmp_path, alpha=0.5, attention_loss_weight=1.0, layer_mapping=layer_mapping)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    if pruned == "student_after_construction":
        empty_layer(student, 0)
    # Pruned models change class (hf-compress's pruned twin); they must still be switched to eager attention.
    assert student.config._attn_implementation == teacher.config._attn_implementation == "eager"

    batch = make_batch()
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        loss = trainer.compute_loss(student, batch)
    if pruned != "teacher":
        assert "1 -> 1" in caplog.text  # the left-out pair is reported, not silently dropped

    soft, hard = soft_and_hard(student, teacher, batch)
    student_maps, teacher_maps = layer_attentions(student, batch), layer_attentions(teacher, batch)
    attention = torch.stack(
        [attention_kl(student_maps[s], teacher_maps[t], batch["attention_mask"]) for s, t in compared]
    ).mean()
    torch.testing.assert_close(loss.detach(), 0.5 * soft + 0.5 * hard + attention)


def test_attention_loss_with_fewer_student_heads_is_refused_at_construction(tmp_path):
    student, teacher = student_and_teacher()
    prune_heads(student, {1: [0]})  # student layer 2 keeps 3 heads; config.num_attention_heads still says 4
    assert student.config.num_attention_heads == teacher.config.num_attention_heads == 4
    before_student, before_teacher = snapshot(student), snapshot(teacher)
    with pytest.raises(
        ValueError, match=r"2 -> 4.*student has 3 attention heads and the teacher 4.*average_heads=True"
    ):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, attention_loss_weight=1.0))
    assert_same_state(student, before_student)
    assert_same_state(teacher, before_teacher)
    assert all(p.requires_grad for p in teacher.parameters())
    assert student.config._attn_implementation == teacher.config._attn_implementation == "sdpa"


def test_attention_loss_with_fewer_student_heads_and_average_heads_equals_head_averaged_kl(tmp_path):
    student, teacher = student_and_teacher()
    prune_heads(student, {0: [1], 1: [0, 2]})  # 3 and 2 heads against the teacher's 4
    args = make_args(tmp_path, alpha=0.5, attention_loss_weight=0.7, attention_average_heads=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    batch = make_batch()
    loss = trainer.compute_loss(student, batch)

    soft, hard = soft_and_hard(student, teacher, batch)
    student_maps, teacher_maps = layer_attentions(student, batch), layer_attentions(teacher, batch)
    mask = batch["attention_mask"]
    attention = torch.stack(
        [attention_kl(student_maps[s], teacher_maps[t], mask, average_heads=True) for s, t in {1: 2, 2: 4}.items()]
    ).mean()
    torch.testing.assert_close(loss.detach(), 0.5 * soft + 0.5 * hard + 0.7 * attention)


def _pruning_callback() -> GradualStructuredPruningCallback:
    config = PruningConfig(target="ratios", head_keep=0.5, ffn_keep=0.5, importance="magnitude")
    return GradualStructuredPruningCallback(config, begin_step=1, end_step=3, frequency=1)


def test_attention_loss_with_gradual_pruning_callback_is_refused_before_training(tmp_path):
    student, teacher = student_and_teacher()
    before = snapshot(student)
    args = make_args(tmp_path, attention_loss_weight=1.0, max_steps=4)
    with pytest.raises(ValueError, match=r"GradualStructuredPruningCallback.*attention_average_heads=True"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, callbacks=[_pruning_callback()])
    assert_same_state(student, before)
    assert all(p.requires_grad for p in teacher.parameters())

    # Added after construction: refused when training starts, before any step.
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=to_dataset(make_batch(num_rows=8))
    )
    trainer.add_callback(_pruning_callback())
    with pytest.raises(ValueError, match=r"GradualStructuredPruningCallback.*attention_average_heads=True"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert_same_state(student, before)


def test_attention_loss_with_gradual_pruning_callback_and_average_heads_trains(tmp_path):
    student, teacher = student_and_teacher()
    args = make_args(tmp_path, attention_loss_weight=1.0, attention_average_heads=True, max_steps=5)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=to_dataset(make_batch(num_rows=8)),
        callbacks=[_pruning_callback()],
    )
    trainer.train()
    assert sum(get_structure(trainer.model).heads) == 4  # half of the student's 8 heads went during training
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 5 and all(math.isfinite(entry["attention_loss"]) for entry in logs)

    # After pruning, the loss is still the head-averaged KL between the mapped layers.
    batch = make_batch(seed=1)
    student.eval()
    loss = trainer.compute_loss(student, batch)
    soft, hard = soft_and_hard(student, teacher, batch)
    student_maps, teacher_maps = layer_attentions(student, batch), layer_attentions(teacher, batch)
    pairs = [(s, t) for s, t in {1: 2, 2: 4}.items() if s in student_maps]
    attention = torch.stack(
        [attention_kl(student_maps[s], teacher_maps[t], batch["attention_mask"], average_heads=True) for s, t in pairs]
    ).mean()
    torch.testing.assert_close(loss.detach(), 0.5 * soft + 0.5 * hard + attention)


# ---- 9. A teacher saved by hf-compress after pruning ----


def test_teacher_from_a_pruned_checkpoint_path_loads_with_its_structure(tmp_path):
    student, teacher = student_and_teacher()
    prune_heads(teacher, {0: [0, 1, 2, 3], 2: [1]})
    prune_ffn_neurons(teacher, {1: [0, 5, 7]})
    teacher.save_pretrained(tmp_path / "pruned_teacher")
    args = make_args(tmp_path / "out", teacher_model_init_kwargs={"hidden_dropout_prob": 0.25})
    trainer = DistillationTrainer(model=student, teacher_model=str(tmp_path / "pruned_teacher"), args=args)

    loaded = trainer.teacher_model
    assert get_structure(loaded) == get_structure(teacher)
    assert loaded.config.hidden_dropout_prob == 0.25  # teacher_model_init_kwargs reach from_pretrained
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    batch = make_batch()
    soft, hard = soft_and_hard(student, teacher.eval(), batch)
    torch.testing.assert_close(trainer.compute_loss(student, batch).detach(), 0.5 * soft + 0.5 * hard)


# ---- 10. The teacher object, vocabularies, teacher paths ----


def test_student_copied_from_a_frozen_teacher_is_refused_at_construction(tmp_path):
    _, teacher = student_and_teacher()
    first = tiny_model("bert", seed=0, num_hidden_layers=2, **NO_DROPOUT)
    DistillationTrainer(model=first, teacher_model=teacher, args=make_args(tmp_path))
    assert not any(p.requires_grad for p in teacher.parameters())  # documented: the teacher is frozen in place
    student = copy.deepcopy(teacher)  # inherits requires_grad=False
    before = snapshot(student)
    with pytest.raises(ValueError, match=r"no parameter with requires_grad=True.*student.requires_grad_\(True\)"):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    assert_same_state(student, before)
    student.requires_grad_(True)  # the fix the message names
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=to_dataset(make_batch())
    )
    trainer.train()


def test_student_sharing_parameters_with_the_teacher_is_refused_and_teacher_untouched(tmp_path):
    student = tiny_model("bert", seed=0, num_hidden_layers=2, hidden_size=24, **NO_DROPOUT)
    teacher = tiny_model("bert", seed=1, hidden_size=24, **NO_DROPOUT)
    student.bert.embeddings = teacher.bert.embeddings  # shared, not copied
    before = snapshot(teacher)
    with pytest.raises(ValueError, match=r"shares 5 parameters with the teacher.*embeddings.*copy\.deepcopy"):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    assert all(p.requires_grad for p in teacher.parameters()) and all(p.requires_grad for p in student.parameters())
    assert_same_state(teacher, before)


def test_sequence_classification_teacher_with_smaller_vocab_is_refused(tmp_path):
    student = tiny_model("bert", seed=0, num_hidden_layers=2, vocab_size=120, **NO_DROPOUT)
    teacher = tiny_model("bert", seed=1, hidden_size=24, **NO_DROPOUT)  # vocab_size 99
    before = snapshot(teacher)
    with pytest.raises(ValueError, match=r"student has vocab_size 120 but the teacher only 99.*vocab_size=99"):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    assert all(p.requires_grad for p in teacher.parameters())
    assert_same_state(teacher, before)
    # A teacher with the larger vocabulary reads every student id: allowed (with a warning about the tokenizer).
    DistillationTrainer(model=tiny_model("bert", num_hidden_layers=2), teacher_model=student, args=make_args(tmp_path))


@pytest.mark.parametrize(
    "name",
    ["./missing/teacher", "../missing_teacher", "{tmp}/missing_teacher", "~/missing_hf_compress_teacher/x", "a/b/c"],
)
def test_missing_teacher_path_names_the_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    name = name.format(tmp=tmp_path)
    student = tiny_model("bert", num_hidden_layers=2)
    with pytest.raises(ValueError, match=rf"teacher_model='{name}'.*does not exist.*save_pretrained"):
        DistillationTrainer(model=student, teacher_model=name, args=make_args(tmp_path / "out"))


def test_missing_teacher_path_with_an_existing_parent_or_a_file_names_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs")  # `runs/teacher` is a valid Hub id, but a folder under runs/ that was never written
    student = tiny_model("bert", num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"teacher_model='runs/teacher' is neither an existing folder.*runs/teacher"):
        DistillationTrainer(model=student, teacher_model="runs/teacher", args=make_args(tmp_path / "out"))
    (tmp_path / "runs" / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"teacher_model='runs/weights\.bin' is a file, not a folder"):
        DistillationTrainer(model=student, teacher_model="runs/weights.bin", args=make_args(tmp_path / "out"))


# ---- 15. Evaluation reports each part of the loss ----


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_evaluation_reports_each_loss_part_averaged_over_the_eval_set(tmp_path, task):
    student, teacher = student_and_teacher(task)
    with torch.no_grad():  # confident teacher: a soft loss far from 0, so averaging errors would show
        teacher.classifier.weight.mul_(40.0)
    # 5 rows in batches of 2, 2 and 1, with different numbers of labelled tokens: batch means would be biased.
    eval_batch = make_batch(task, num_rows=5, seed=3)
    args = make_args(tmp_path, alpha=0.3, temperature=3.0, per_device_eval_batch_size=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, eval_dataset=to_dataset(eval_batch))
    metrics = trainer.evaluate()

    with torch.no_grad():
        student_logits = student(**model_inputs(eval_batch)).logits
        teacher_logits = teacher(**model_inputs(eval_batch)).logits
    labels = eval_batch["labels"]
    if task == "token-classification":  # per labelled token, over the whole set
        valid = labels.ne(-100)
        student_logits, teacher_logits, labels = student_logits[valid], teacher_logits[valid], labels[valid]
    teacher_probs = F.softmax(teacher_logits / 3.0, -1)
    kl = (teacher_probs * (teacher_probs.log() - F.log_softmax(student_logits / 3.0, -1))).sum(-1)
    assert metrics["eval_soft_loss"] == pytest.approx(9.0 * kl.mean().item(), rel=1e-5)
    assert metrics["eval_hard_loss"] == pytest.approx(F.cross_entropy(student_logits, labels).item(), rel=1e-5)
    assert "eval_loss" in metrics
    logged = next(entry for entry in trainer.state.log_history if "eval_soft_loss" in entry)
    assert logged["eval_soft_loss"] == metrics["eval_soft_loss"]
    assert logged["eval_hard_loss"] == metrics["eval_hard_loss"]


def test_evaluation_hard_loss_can_select_the_best_model(tmp_path):
    student, teacher = student_and_teacher()
    args = make_args(
        tmp_path,
        max_steps=3,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="hard_loss",  # the loss on the labels alone, not the whole distillation loss
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=to_dataset(make_batch(num_rows=8)),
        eval_dataset=to_dataset(make_batch(num_rows=5, seed=3)),
    )
    trainer.train()
    hard_losses = [entry["eval_hard_loss"] for entry in trainer.state.log_history if "eval_hard_loss" in entry]
    assert len(hard_losses) == 3
    assert trainer.state.best_metric == min(hard_losses)


def test_pruned_twin_can_switch_to_eager_attention():
    # transformers judges whether a class may switch attention from the source of its module; for a pruned twin that
    # is hf-compress's modeling file, which used to make `set_attn_implementation("eager")` a silent no-op.
    model = tiny_model("bert")
    prune_heads(model, {0: [0]})
    assert type(model).__module__.endswith("modeling_hf_compress")
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    outputs = model(**{k: v for k, v in random_batch().items() if k != "labels"}, output_attentions=True)
    assert outputs.attentions[0].shape[1] == 3
