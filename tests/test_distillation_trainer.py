"""DistillationTrainer and DistillationTrainingArguments on tiny models: the loss is the formula, training is exact under
gradient accumulation and resume, the teacher stays frozen and out of checkpoints, and bad inputs get clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB_SIZE, tiny_model
from datasets import Dataset
from safetensors import safe_open
from transformers import (
    AlbertConfig,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    BertForTokenClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

from hf_compress import DistillationTrainer, DistillationTrainingArguments, l1_penalty
from hf_compress.distillation.projections import PROJECTIONS_NAME

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
SEQ_LEN = 8


def make_batch(task: str = "sequence-classification", num_rows: int = 4, seed: int = 0, labels: bool = True) -> dict:
    """Rows of different padded lengths; token labels are -100 on padding and on some real tokens too."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB_SIZE, (num_rows, SEQ_LEN), generator=generator)
    lengths = torch.randint(3, SEQ_LEN + 1, (num_rows,), generator=generator)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()  # (rows, SEQ_LEN)
    batch = {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask}
    if not labels:
        return batch
    if task == "sequence-classification":
        batch["labels"] = torch.randint(0, 2, (num_rows,), generator=generator)
    elif task == "regression":
        batch["labels"] = torch.randn(num_rows, generator=generator)
    else:
        if task == "token-classification":
            token_labels = torch.randint(0, 2, (num_rows, SEQ_LEN), generator=generator)
        else:  # masked-lm: predict the original token at some positions
            token_labels = batch["input_ids"].clone()
        unlabelled = (torch.rand(num_rows, SEQ_LEN, generator=generator) < 0.4) | ~attention_mask.bool()
        batch["labels"] = token_labels.masked_fill(unlabelled, -100)
    return batch


def to_dataset(batch: dict) -> Dataset:
    return Dataset.from_dict({name: tensor.tolist() for name, tensor in batch.items()})


def student_and_teacher(task: str = "sequence-classification", student_kwargs=None, teacher_kwargs=None):
    """A 2-layer hidden-16 BERT student and a 4-layer hidden-24 BERT teacher (both 4 heads, 2 labels)."""
    model_task, num_labels = ("sequence-classification", 1) if task == "regression" else (task, 2)
    student_kwargs = {"num_labels": num_labels, "num_hidden_layers": 2, **NO_DROPOUT, **(student_kwargs or {})}
    teacher_kwargs = {"num_labels": num_labels, "hidden_size": 24, **(teacher_kwargs or {})}
    student = tiny_model("bert", model_task, seed=0, **student_kwargs)
    teacher = tiny_model("bert", model_task, seed=1, **teacher_kwargs)
    return student, teacher


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


def kl_per_row(student_logits, teacher_logits, temperature):
    """KL(softmax(teacher / T) || softmax(student / T)) per row, written out."""
    teacher_probs = F.softmax(teacher_logits / temperature, -1)
    return (teacher_probs * (teacher_probs.log() - F.log_softmax(student_logits / temperature, -1))).sum(-1)


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


# ---- Arguments ----


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"temperature": 0.0}, r"temperature=0\.0.*> 0"),
        ({"temperature": -1.0}, r"temperature=-1\.0.*> 0"),
        ({"temperature": float("inf")}, r"temperature=inf.*finite"),
        ({"alpha": -0.1}, r"alpha=-0\.1.*\[0, 1\]"),
        ({"alpha": 1.5}, r"alpha=1\.5.*\[0, 1\]"),
        ({"hidden_loss_weight": -1.0}, r"hidden_loss_weight=-1\.0.*>= 0"),
        ({"attention_loss_weight": float("nan")}, r"attention_loss_weight=nan.*>= 0"),
        ({"l1_weight": -1e-5}, r"l1_weight=-1e-05.*>= 0"),
        ({"hidden_loss_type": "l2"}, r"hidden_loss_type='l2'.*'mse', 'cosine'"),
        ({"layer_mapping": "{1: 2"}, r"not valid JSON.*student layer -> teacher layer"),
        ({"layer_mapping": {}}, r"non-empty dict"),
        ({"layer_mapping": {"a": 1}}, r"'a': 1 is invalid.*non-negative integer"),
        ({"layer_mapping": {1: -2}}, r"1: -2 is invalid"),
        ({"layer_mapping": {1: 1.5}}, r"1: 1\.5 is invalid"),
        ({"teacher_model_init_kwargs": "{oops"}, r"teacher_model_init_kwargs=.*not valid JSON"),
    ],
)
def test_invalid_arguments_raise_naming_value_and_range(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_arguments_parse_from_the_command_line(tmp_path):
    parser = HfArgumentParser(DistillationTrainingArguments)
    help_text = parser.format_help()
    for flag in ("--temperature", "--alpha", "--hidden_loss_weight", "--layer_mapping", "--teacher_model_init_kwargs"):
        assert flag in help_text
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--temperature", "4", "--alpha", "0.3", "--hidden_loss_weight", "1"]
        + ["--hidden_loss_type", "cosine", "--layer_mapping", json.dumps({"1": 2, "2": 4}), "--report_to", "none"]
    )
    assert (args.temperature, args.alpha, args.hidden_loss_type) == (4.0, 0.3, "cosine")
    assert args.layer_mapping == {1: 2, 2: 4}
    assert args.learning_rate == TrainingArguments(output_dir=str(tmp_path)).learning_rate  # inherited fields too


# ---- The loss is the formula ----


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.5), (2.0, 0.1), (4.0, 0.9), (0.5, 1.0)])
def test_sequence_classification_loss_equals_the_formula(tmp_path, temperature, alpha):
    student, teacher = student_and_teacher()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path, temperature=temperature, alpha=alpha)
    )
    batch = make_batch()
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        student_logits, teacher_logits = student(**model_inputs(batch)).logits, teacher(**model_inputs(batch)).logits
    soft = temperature**2 * kl_per_row(student_logits, teacher_logits, temperature).mean()
    hard = F.cross_entropy(student_logits, batch["labels"])
    torch.testing.assert_close(loss.detach(), alpha * soft + (1 - alpha) * hard)


@pytest.mark.parametrize("task", ["sequence-classification", "regression", "token-classification", "masked-lm"])
def test_alpha_zero_is_exactly_the_stock_trainer_loss_and_skips_the_teacher(tmp_path, task):
    student, teacher = student_and_teacher(task)
    teacher_calls = []
    teacher.register_forward_hook(lambda *_: teacher_calls.append(1))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, alpha=0.0))
    stock = Trainer(model=student, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    batch = make_batch(task)
    assert torch.equal(trainer.compute_loss(student, dict(batch)), stock.compute_loss(student, dict(batch)))
    assert teacher_calls == []


def test_alpha_zero_trains_exactly_like_the_stock_trainer(tmp_path):
    data = to_dataset(make_batch(num_rows=8, seed=4))
    distilled_student, teacher = student_and_teacher()
    stock_student, _ = student_and_teacher()
    common = dict(report_to="none", use_cpu=True, disable_tqdm=True, max_steps=2, per_device_train_batch_size=4)
    DistillationTrainer(
        model=distilled_student,
        teacher_model=teacher,
        args=make_args(tmp_path / "distil", alpha=0.0),
        train_dataset=data,
    ).train()
    Trainer(
        model=stock_student, args=TrainingArguments(output_dir=str(tmp_path / "stock"), **common), train_dataset=data
    ).train()
    for name, value in stock_student.state_dict().items():
        assert torch.equal(distilled_student.state_dict()[name], value), name


def test_alpha_zero_matches_the_stock_label_smoothing(tmp_path):
    student, teacher = student_and_teacher()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path, alpha=0.0, label_smoothing_factor=0.1)
    )
    stock_args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, label_smoothing_factor=0.1
    )
    stock = Trainer(model=student, args=stock_args)
    batch = make_batch()
    torch.testing.assert_close(trainer.compute_loss(student, dict(batch)), stock.compute_loss(student, dict(batch)))


@pytest.mark.parametrize("task", ["token-classification", "masked-lm"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_token_level_loss_averages_over_labelled_or_unpadded_tokens(tmp_path, task, with_labels):
    student, teacher = student_and_teacher(task)
    alpha, temperature = (0.7 if with_labels else 1.0), 3.0
    args = make_args(tmp_path, alpha=alpha, temperature=temperature)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    batch = make_batch(task, labels=with_labels)
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        student_logits, teacher_logits = student(**model_inputs(batch)).logits, teacher(**model_inputs(batch)).logits
    positions = batch["labels"].ne(-100) if with_labels else batch["attention_mask"].bool()
    expected = (
        alpha * temperature**2 * kl_per_row(student_logits[positions], teacher_logits[positions], temperature).mean()
    )
    if with_labels:
        # Some real tokens carry no label: averaging over the attention mask instead would give another number.
        assert positions.sum() < batch["attention_mask"].sum()
        num_classes = student_logits.shape[-1]
        expected += (1 - alpha) * F.cross_entropy(student_logits.view(-1, num_classes), batch["labels"].view(-1))
    torch.testing.assert_close(loss.detach(), expected)


def test_regression_distils_with_mse_to_the_teacher_prediction(tmp_path):
    student, teacher = student_and_teacher("regression")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, alpha=0.3))
    batch = make_batch("regression")
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        student_pred = student(**model_inputs(batch)).logits.squeeze(-1)
        teacher_pred = teacher(**model_inputs(batch)).logits.squeeze(-1)
    expected = 0.3 * F.mse_loss(student_pred, teacher_pred) + 0.7 * F.mse_loss(student_pred, batch["labels"])
    torch.testing.assert_close(loss.detach(), expected)


@pytest.mark.parametrize("hidden_loss_type", ["mse", "cosine"])
@pytest.mark.parametrize("layer_mapping", [None, {0: 0, 2: 3}])
def test_intermediate_losses_equal_the_formula(tmp_path, hidden_loss_type, layer_mapping):
    student, teacher = student_and_teacher()
    args = make_args(
        tmp_path,
        alpha=0.5,
        hidden_loss_weight=0.3,
        hidden_loss_type=hidden_loss_type,
        attention_loss_weight=0.2,
        layer_mapping=layer_mapping,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    expected_mapping = layer_mapping or {1: 2, 2: 4}  # 2 student layers spread over 4 teacher layers
    assert trainer.layer_mapping == expected_mapping
    assert student.config._attn_implementation == teacher.config._attn_implementation == "eager"
    batch = make_batch()
    loss = trainer.compute_loss(trainer.model, batch)

    flags = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        student_out, teacher_out = student(**model_inputs(batch), **flags), teacher(**model_inputs(batch), **flags)
    valid = batch["attention_mask"].bool()
    hidden, attention = [], []
    for s, t in expected_mapping.items():
        with torch.no_grad():
            projected = trainer.hidden_projections[str(s)](student_out.hidden_states[s])  # 16 -> 24
        target = teacher_out.hidden_states[t]
        if hidden_loss_type == "mse":
            per_token = ((projected - target) ** 2).mean(-1)
        else:
            per_token = 1 - F.cosine_similarity(projected, target, dim=-1)
        hidden.append(torch.stack([per_token[b][valid[b]].mean() for b in range(len(valid))]).mean())
        if s > 0 and t > 0:  # hidden_states[i] is the output of layer i, whose attention is attentions[i - 1]
            per_example = []
            for b in range(len(valid)):
                keys = valid[b]
                p_t = teacher_out.attentions[t - 1][b][:, keys][:, :, keys]  # (heads, valid queries, valid keys)
                p_s = student_out.attentions[s - 1][b][:, keys][:, :, keys]
                per_example.append((p_t * (p_t.log() - p_s.log())).sum(-1).mean())
            attention.append(torch.stack(per_example).mean())
    soft = 4.0 * kl_per_row(student_out.logits, teacher_out.logits, 2.0).mean()  # T = 2 by default
    hard = F.cross_entropy(student_out.logits, batch["labels"])
    expected = 0.5 * soft + 0.5 * hard + 0.3 * torch.stack(hidden).mean() + 0.2 * torch.stack(attention).mean()
    torch.testing.assert_close(loss.detach(), expected)


# ---- Training ----


def test_training_changes_the_student_and_projections_but_not_the_teacher(tmp_path):
    student, teacher = student_and_teacher()
    args = make_args(tmp_path, hidden_loss_weight=1.0, attention_loss_weight=1.0)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=to_dataset(make_batch(num_rows=8))
    )
    previous = {n: p.clone() for n, p in trainer.model.named_parameters()}
    previous_teacher = {n: p.clone() for n, p in teacher.named_parameters()}
    previous_projections = {n: p.clone() for n, p in trainer.hidden_projections.named_parameters()}
    trainer.train()
    for name, value in previous.items():
        assert not torch.equal(value, trainer.model.get_parameter(name)), f"Parameter {name} has not changed."
    for name, value in previous_projections.items():
        assert not torch.equal(value, trainer.hidden_projections.get_parameter(name)), f"Projection {name} unchanged."
    for name, value in previous_teacher.items():
        assert torch.equal(value, teacher.get_parameter(name)), f"Teacher parameter {name} changed."
    assert trainer.teacher_model is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert trainer.model_wrapped is trainer.model  # single process: nothing wrapped, and the teacher never is


def _train(output_dir, task, batch_size, accumulation, data, **overrides) -> DistillationTrainer:
    student, teacher = student_and_teacher(task)
    args = make_args(
        output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        optim="sgd",  # plain SGD: Adam's first steps would hide a wrongly scaled gradient
        learning_rate=0.1,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        **overrides,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    trainer.train()
    return trainer


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification", "masked-lm"])
def test_gradient_accumulation_equals_the_big_batch(tmp_path, task):
    batch = make_batch(task, num_rows=16, seed=5)
    if task != "sequence-classification":  # micro-batches with different label counts make the check meaningful
        counts = batch["labels"].ne(-100).view(4, 4, SEQ_LEN).sum((1, 2))  # (micro-batches,)
        assert counts[0] != counts[1] and counts[2] != counts[3]
    extra = {"hidden_loss_weight": 0.5, "attention_loss_weight": 0.5} if task == "sequence-classification" else {}
    data = to_dataset(batch)
    accumulated = _train(tmp_path / "accumulated", task, 4, 2, data, **extra)
    big = _train(tmp_path / "big", task, 8, 1, data, **extra)
    for name, value in big.model.state_dict().items():
        torch.testing.assert_close(accumulated.model.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    if big.hidden_projections is not None:
        for name, value in big.hidden_projections.state_dict().items():
            torch.testing.assert_close(accumulated.hidden_projections.state_dict()[name], value, msg=name)
    accumulated_logs = [e for e in accumulated.state.log_history if "loss" in e]
    big_logs = [e for e in big.state.log_history if "loss" in e]
    for accumulated_entry, big_entry in zip(accumulated_logs, big_logs, strict=True):
        for key in (
            "loss",
            "soft_loss",
            "hard_loss",
            *(k for k in ("hidden_loss", "attention_loss") if k in big_entry),
        ):
            assert accumulated_entry[key] == pytest.approx(big_entry[key], rel=1e-5), key


def test_logs_carry_each_part_averaged_over_the_interval_like_loss(tmp_path):
    data = to_dataset(make_batch(num_rows=8, seed=2))
    weights = {"alpha": 0.4, "hidden_loss_weight": 0.3, "attention_loss_weight": 0.2, "hidden_loss_type": "cosine"}
    task = "sequence-classification"
    every_step = _train(tmp_path / "every", task, 2, 2, data, logging_steps=1, **weights)
    every_two = _train(tmp_path / "two", task, 2, 2, data, logging_steps=2, **weights)
    parts = ("soft_loss", "hard_loss", "hidden_loss", "attention_loss")
    per_step = [e for e in every_step.state.log_history if "loss" in e]
    (interval,) = [e for e in every_two.state.log_history if "loss" in e]
    assert len(per_step) == 2 and interval["step"] == 2
    for entry in (*per_step, interval):
        combined = 0.4 * entry["soft_loss"] + 0.6 * entry["hard_loss"]
        combined += 0.3 * entry["hidden_loss"] + 0.2 * entry["attention_loss"]
        assert entry["loss"] == pytest.approx(combined, rel=1e-5)
    for key in ("loss", *parts):
        assert per_step[0][key] != per_step[1][key]
        assert interval[key] == pytest.approx((per_step[0][key] + per_step[1][key]) / 2, rel=1e-5), key

    metrics = every_two.evaluate(data)
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_l1_term_equals_its_formula_and_is_logged(tmp_path):
    student, teacher = student_and_teacher()
    batch = make_batch()
    plain = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path / "plain"))
    args = make_args(tmp_path / "l1", l1_weight=1e-3, l1_modules=["query"])
    with_l1 = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=to_dataset(batch))
    student.train()
    expected = plain.compute_loss(student, batch) + 1e-3 * l1_penalty(student, include=["query"])
    penalty = sum(layer.attention.self.query.weight.abs().sum() for layer in student.bert.encoder.layer)
    torch.testing.assert_close(l1_penalty(student, include=["query"]), penalty)
    torch.testing.assert_close(with_l1.compute_loss(student, batch), expected)

    with_l1.train()
    logs = [e for e in with_l1.state.log_history if "loss" in e]
    assert logs and all(e["l1_loss"] > 0 for e in logs)
    for entry in logs:
        combined = 0.5 * entry["soft_loss"] + 0.5 * entry["hard_loss"] + 1e-3 * entry["l1_loss"]
        assert entry["loss"] == pytest.approx(combined, rel=1e-5)


def test_l1_modules_matching_nothing_fail_at_construction(tmp_path):
    student, teacher = student_and_teacher()
    args = make_args(tmp_path, l1_weight=1e-3, l1_modules=["no_such_module"])
    with pytest.raises(ValueError, match="no_such_module"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args)


def test_alpha_one_distils_without_labels(tmp_path):
    student, teacher = student_and_teacher()
    data = to_dataset(make_batch(num_rows=8, labels=False))
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path, alpha=1.0), train_dataset=data
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and all("soft_loss" in e and "hard_loss" not in e for e in logs)
    assert all(e["loss"] == pytest.approx(e["soft_loss"]) for e in logs)


def test_each_model_gets_the_inputs_its_forward_takes(tmp_path):
    """A BERT teacher needs token_type_ids; the DistilBERT student must not receive them."""
    student = tiny_model("distilbert", seed=0, dropout=0.0, attention_dropout=0.0)
    teacher = tiny_model("bert", seed=1)
    batch = make_batch(num_rows=8)
    batch["token_type_ids"] = (torch.arange(SEQ_LEN) >= 3).long().expand(8, SEQ_LEN).contiguous()
    data = to_dataset(batch).add_column("text", ["unused"] * 8)
    args = make_args(tmp_path, max_steps=1, remove_unused_columns=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    kept = trainer._remove_unused_columns(data).column_names
    assert "token_type_ids" in kept and "text" not in kept

    received = {}

    def recorder(name):
        def hook(module, args, kwargs):
            received.setdefault(name, set(kwargs))

        return hook

    student.register_forward_pre_hook(recorder("student"), with_kwargs=True)
    teacher.register_forward_pre_hook(recorder("teacher"), with_kwargs=True)
    trainer.train()
    assert "token_type_ids" in received["teacher"] and "token_type_ids" not in received["student"]
    assert "labels" not in received["student"] | received["teacher"]

    inputs = model_inputs(make_batch(num_rows=8)) | {"token_type_ids": batch["token_type_ids"]}
    with torch.no_grad():
        with_types = teacher(**inputs).logits
        without_types = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(trainer._teacher_outputs(inputs).logits, with_types)
    assert not torch.allclose(with_types, without_types)  # dropping them would change the soft targets


def test_teacher_from_a_local_path_uses_the_student_auto_class(tmp_path):
    teacher = tiny_model("bert", "token-classification", seed=1, num_labels=3)
    teacher.save_pretrained(tmp_path / "teacher")
    student = tiny_model("distilbert", "token-classification", num_labels=3)
    args = make_args(tmp_path / "out", teacher_model_init_kwargs={"hidden_dropout_prob": 0.0})
    trainer = DistillationTrainer(model=student, teacher_model=str(tmp_path / "teacher"), args=args)
    loaded = trainer.teacher_model
    assert type(loaded) is BertForTokenClassification and loaded.config.hidden_dropout_prob == 0.0
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_bf16_runs_the_teacher_in_bf16(tmp_path):
    student, teacher = student_and_teacher()
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, bf16=True),
        train_dataset=to_dataset(make_batch(num_rows=8)),
    )
    assert teacher.dtype == torch.bfloat16 and teacher.device == trainer.args.device
    assert student.dtype == torch.float32  # the student trains in mixed precision, with float32 weights
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_model_init_student_is_checked_and_gets_eager_attention(tmp_path):
    _, teacher = student_and_teacher()

    def model_init():
        return tiny_model("bert", seed=0, num_hidden_layers=2, **NO_DROPOUT)

    args = make_args(tmp_path, attention_loss_weight=1.0, max_steps=1)
    trainer = DistillationTrainer(
        model_init=model_init, teacher_model=teacher, args=args, train_dataset=to_dataset(make_batch(num_rows=8))
    )
    trainer.train()
    assert trainer.model.config._attn_implementation == "eager"
    assert "attention_loss" in next(e for e in trainer.state.log_history if "loss" in e)


def test_attention_loss_switches_off_the_student_attention_dropout(tmp_path):
    student, teacher = student_and_teacher(student_kwargs={"attention_probs_dropout_prob": 0.3})
    DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, attention_loss_weight=1.0))
    student.train()
    attentions = student(**model_inputs(make_batch()), output_attentions=True).attentions
    for layer_attention in attentions:  # (B, heads, L, L): undropped rows are distributions
        torch.testing.assert_close(layer_attention.sum(-1), torch.ones(layer_attention.shape[:-1]))
    assert student.config.attention_probs_dropout_prob == 0.3  # the saved config keeps the user's value


# ---- Checkpoints ----


def test_checkpoints_and_save_model_hold_only_the_student(tmp_path):
    student, teacher = student_and_teacher()
    args = make_args(tmp_path / "out", hidden_loss_weight=1.0, save_strategy="steps", save_steps=2)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=to_dataset(make_batch(num_rows=8))
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    student_state = trainer.model.state_dict()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    for folder in (tmp_path / "final", checkpoint):
        with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
            assert set(weights.keys()) == set(student_state)
            num_saved = sum(weights.get_tensor(k).numel() for k in weights.keys())
        assert num_saved == sum(v.numel() for v in student_state.values())  # no teacher weights under other names
    # The projection is training state: beside the optimizer in checkpoints, absent from the saved model.
    assert (checkpoint / PROJECTIONS_NAME).is_file() and not (tmp_path / "final" / PROJECTIONS_NAME).exists()

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert type(reloaded) is type(student)
    for name, value in student_state.items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    batch = model_inputs(make_batch())
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, trainer.model.eval()(**batch).logits)


def test_resume_from_a_mid_checkpoint_matches_the_uninterrupted_run(tmp_path):
    data = to_dataset(make_batch(num_rows=16, seed=7))

    def make_trainer(output_dir: Path) -> DistillationTrainer:
        # Dropout on: resuming must also restore the RNG state.
        student, teacher = student_and_teacher(student_kwargs={"hidden_dropout_prob": 0.1})
        args = make_args(
            output_dir, max_steps=6, save_strategy="steps", save_steps=3, hidden_loss_weight=0.5, learning_rate=1e-2
        )
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)

    uninterrupted = make_trainer(tmp_path / "full")
    initial_projections = {k: v.clone() for k, v in uninterrupted.hidden_projections.state_dict().items()}
    uninterrupted.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    with safe_open(str(checkpoint / PROJECTIONS_NAME), framework="pt") as saved:
        assert any(not torch.equal(saved.get_tensor(k), v) for k, v in initial_projections.items())

    resumed = make_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in uninterrupted.model.state_dict().items():
        assert torch.allclose(resumed.model.state_dict()[name], value, atol=1e-6), name
    for name, value in uninterrupted.hidden_projections.state_dict().items():
        assert torch.allclose(resumed.hidden_projections.state_dict()[name], value, atol=1e-6), name
    resumed_logs = [e for e in resumed.state.log_history if "loss" in e and e["step"] > 3]
    full_logs = [e for e in uninterrupted.state.log_history if "loss" in e and e["step"] > 3]
    for resumed_entry, full_entry in zip(resumed_logs, full_logs, strict=True):
        assert resumed_entry["hidden_loss"] == pytest.approx(full_entry["hidden_loss"], rel=1e-5)


# ---- Errors ----


def _albert_student():
    """An architecture outside the registry, whose attention dropout hf-compress cannot switch off."""
    config = AlbertConfig(
        vocab_size=VOCAB_SIZE,
        embedding_size=16,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        attention_probs_dropout_prob=0.1,
    )
    return AutoModelForSequenceClassification.from_config(config)


def _multi_label(student, teacher):
    student.config.problem_type = teacher.config.problem_type = "multi_label_classification"
    return student, teacher


@pytest.mark.parametrize(
    ("build", "overrides", "message"),
    [
        (
            lambda: student_and_teacher(student_kwargs={"num_labels": 3}),
            {},
            r"num_labels=3.*num_labels=2.*num_labels=2",
        ),
        (
            lambda: student_and_teacher("token-classification", teacher_kwargs={"vocab_size": 120}),
            {},
            r"vocab_size 99 but the teacher model has vocab_size 120.*same tokenizer",
        ),
        (
            lambda: student_and_teacher("masked-lm", teacher_kwargs={"vocab_size": 120}),
            {},
            r"vocab_size 99.*vocab_size 120",
        ),
        (
            lambda: (student_and_teacher()[0], tiny_model("bert", "masked-lm")),
            {},
            r"sequence classification.*masked language modeling.*AutoModelForSequenceClassification",
        ),
        (
            lambda: (AutoModelForQuestionAnswering.from_config(tiny_model().config), tiny_model()),
            {},
            r"BertForQuestionAnswering.*AutoModelForSequenceClassification",
        ),
        (lambda: _multi_label(*student_and_teacher()), {}, r"multi_label_classification"),
        (student_and_teacher, {"hidden_loss_weight": 1.0, "layer_mapping": {3: 1}}, r"3: 1.*0\.\.\.2.*0\.\.\.4"),
        (student_and_teacher, {"hidden_loss_weight": 1.0, "layer_mapping": {1: 5}}, r"1: 5.*0\.\.\.2.*0\.\.\.4"),
        (
            lambda: student_and_teacher(teacher_kwargs={"num_attention_heads": 2}),
            {"attention_loss_weight": 1.0},
            r"student has 4 attention heads and the teacher 2.*attention_loss_weight=0",
        ),
        (
            lambda: (_albert_student(), student_and_teacher()[1]),
            {"attention_loss_weight": 1.0},
            r"attention_probs_dropout_prob=0\.1.*model_type 'albert'.*attention_probs_dropout_prob=0\.0",
        ),
        (student_and_teacher, {"attention_loss_weight": 1.0, "layer_mapping": {0: 0}}, r"maps no transformer layer"),
    ],
)
def test_incompatible_models_fail_at_construction_and_stay_untouched(tmp_path, build, overrides, message):
    student, teacher = build()
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, **overrides))
    assert all(p.requires_grad for p in teacher.parameters())
    assert teacher.config._attn_implementation == student.config._attn_implementation == "sdpa"


def test_bad_trainer_arguments_raise(tmp_path):
    student, teacher = student_and_teacher()
    with pytest.raises(ValueError, match=r"DistillationTrainingArguments, got TrainingArguments"):
        DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"needs a teacher_model"):
        DistillationTrainer(model=student, args=make_args(tmp_path))
    with pytest.raises(ValueError, match=r"PreTrainedModel or a Hub id / local path, got int"):
        DistillationTrainer(model=student, teacher_model=3, args=make_args(tmp_path))


def test_bad_batches_raise(tmp_path):
    student, teacher = student_and_teacher()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, alpha=0.5))
    with pytest.raises(ValueError, match=r"alpha=0\.5.*no 'labels'.*alpha=1\.0"):
        trainer.compute_loss(student, make_batch(labels=False))
    float_labels = make_batch() | {"labels": torch.rand(4, 2)}
    with pytest.raises(ValueError, match=r"labels are floats.*num_labels=2.*multi-label"):
        trainer.compute_loss(student, float_labels)


def test_push_to_hub_uploads_the_student_with_the_hf_compress_card(tmp_path, monkeypatch):
    import transformers.trainer
    from huggingface_hub import ModelCard

    student, teacher = student_and_teacher()
    args = make_args(tmp_path / "out", temperature=3.0, alpha=0.7, hub_model_id="me/tiny-student")
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=to_dataset(make_batch())
    )
    trainer.train()
    uploads = []

    class OfflineApi:  # stands in for the network calls only
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, **kwargs):
            folder = Path(folder_path)
            files = sorted(p.name for p in folder.iterdir() if not p.name.startswith(("_", "checkpoint-")))
            uploads.append({"repo_id": repo_id, "files": files, "card": (folder / "README.md").read_text()})

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: OfflineApi())
    trainer.push_to_hub()

    (upload,) = uploads
    assert upload["repo_id"] == "me/tiny-student"
    assert {"README.md", "config.json", "model.safetensors"} <= set(upload["files"])
    card = ModelCard(upload["card"])
    assert "hf-compress" in card.data.tags and "distillation" in card.data.tags
    assert "- Temperature: 3\n" in card.text and "- Alpha: 0.7\n" in card.text  # the distillation settings
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as weights:
        assert set(weights.keys()) == set(student.state_dict())  # the student only, no teacher weights
