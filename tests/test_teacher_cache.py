"""Teacher-output caching: the cached loss is the live loss, training matches live training, the file is reused for the
same teacher and data and rebuilt when either changes, and inputs that change between passes are refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from datasets import Dataset
from safetensors import safe_open
from test_distillation_trainer import make_args, make_batch, student_and_teacher, to_dataset
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    HfArgumentParser,
)

from hf_compress import DistillationTrainer, DistillationTrainingArguments, TeacherCache


def ragged_dataset(task: str = "sequence-classification", num_rows: int = 12, seed: int = 0) -> Dataset:
    """Unpadded rows of 3 to 9 tokens, so that each batch is padded to its own longest row."""
    generator = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": []}
    for _ in range(num_rows):
        length = int(torch.randint(3, 10, (1,), generator=generator))
        rows["input_ids"].append(torch.randint(5, 99, (length,), generator=generator).tolist())
        if task == "token-classification":
            rows["labels"].append(torch.randint(0, 2, (length,), generator=generator).tolist())
        elif task == "masked-lm":  # predict the token itself at about half of the positions
            labelled = torch.rand(length, generator=generator) < 0.5
            rows["labels"].append(torch.tensor(rows["input_ids"][-1]).masked_fill(~labelled, -100).tolist())
        else:
            rows["labels"].append(int(torch.randint(0, 2, (1,), generator=generator)))
    return Dataset.from_dict(rows)


def collator_for(task: str, tokenizer):
    if task in ("token-classification", "masked-lm"):
        return DataCollatorForTokenClassification(tokenizer)  # pads labels with -100
    return DataCollatorWithPadding(tokenizer)


def cached_trainer(tmp_path, task="sequence-classification", data=None, tokenizer=None, teacher=None, **overrides):
    student, default_teacher = student_and_teacher(task)
    args = make_args(tmp_path / "out", teacher_cache_dir=str(tmp_path / "cache"), **overrides)
    return DistillationTrainer(
        model=student,
        teacher_model=teacher if teacher is not None else default_teacher,
        args=args,
        train_dataset=data if data is not None else ragged_dataset(task),
        data_collator=collator_for(task, tokenizer) if tokenizer is not None else None,
    )


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def cached_and_live_losses(trainer, batch) -> tuple[torch.Tensor, torch.Tensor]:
    trainer.model.train()
    cached = trainer.compute_loss(trainer.model, batch).detach()
    cache, trainer.teacher_cache = trainer.teacher_cache, None
    live = trainer.compute_loss(trainer.model, batch).detach()
    trainer.teacher_cache = cache
    return cached, live


def cache_files(tmp_path) -> list[str]:
    folder = tmp_path / "cache"
    return sorted(os.listdir(folder)) if folder.exists() else []


# ---- The cached loss is the live loss ----

INTERMEDIATE = {"hidden_loss_weight": 0.5, "attention_loss_weight": 0.5}


@pytest.mark.parametrize(
    ("task", "overrides"),
    [
        ("sequence-classification", {}),
        ("token-classification", {}),
        ("masked-lm", {}),
        ("sequence-classification", {"hidden_loss_weight": 0.5, "layer_mapping": {0: 0, 2: 3}}),
        ("sequence-classification", {"attention_loss_weight": 0.5}),
        ("sequence-classification", INTERMEDIATE),
        ("token-classification", {**INTERMEDIATE, "hidden_loss_type": "cosine"}),
    ],
)
def test_cached_loss_equals_the_live_loss(tmp_path, tiny_tokenizer, task, overrides):
    trainer = cached_trainer(tmp_path, task, tokenizer=tiny_tokenizer, max_steps=1, **overrides)
    trainer.train()
    assert isinstance(trainer.teacher_cache, TeacherCache)
    assert trainer.teacher_cache.built and trainer.teacher_cache.num_examples == 12
    # The batches the cache was built from (in order, batch size 4): the teacher saw exactly these, so bitwise equal.
    loader = trainer._teacher_cache_batches()
    for batch in loader:
        cached, live = cached_and_live_losses(trainer, batch)
        assert torch.equal(cached, live), (cached, live)
    # Other batches of the same examples, padded to other lengths: the teacher's outputs at non-padding positions
    # differ from the build's by float rounding only (different matmul shapes), hence not bitwise.
    collate, dataset = loader.collate_fn, loader.dataset
    for rows in ([11, 0, 5], [3, 1, 7, 9, 2]):
        batch = collate([dataset[i] for i in rows])
        cached, live = cached_and_live_losses(trainer, batch)
        torch.testing.assert_close(cached, live, rtol=0, atol=1e-6)


def test_regression_and_bf16_cache_reproduce_the_live_loss(tmp_path):
    data = to_dataset(make_batch("regression", num_rows=8))
    for name, overrides in (("fp32", {}), ("bf16", {"bf16": True})):
        student, teacher = student_and_teacher("regression")
        args = make_args(tmp_path / name, teacher_cache_dir=str(tmp_path / name / "cache"), max_steps=1, **overrides)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
        trainer.train()
        with safe_open(trainer.teacher_cache.path, "pt") as file:
            assert file.get_slice("logits").get_dtype() == ("BF16" if overrides else "F32")  # the teacher's dtype
        for batch in trainer._teacher_cache_batches():
            cached, live = cached_and_live_losses(trainer, batch)
            assert torch.equal(cached, live)


def test_the_file_is_safetensors_holding_the_teacher_outputs_at_non_padding_positions(tmp_path, tiny_tokenizer):
    trainer = cached_trainer(tmp_path, "token-classification", tokenizer=tiny_tokenizer, max_steps=1, **INTERMEDIATE)
    trainer.train()
    teacher = trainer.teacher_model
    with safe_open(trainer.teacher_cache.path, "pt") as file:
        stored = {name: file.get_tensor(name) for name in file.keys()}
        metadata = file.metadata()
    assert metadata["teacher_fingerprint"] == trainer.teacher_cache.teacher_fingerprint
    # 2 student layers over 4 teacher layers map to hidden states 2 and 4, attentions 1 and 3 (0-based tuple index).
    assert {n for n in stored if "." in n} == {"hidden_states.2", "hidden_states.4", "attentions.1", "attentions.3"}
    offsets, position = stored["token_offsets"], 0
    for example in trainer._teacher_cache_batches().dataset:
        ids = torch.tensor([example["input_ids"]])
        with torch.no_grad():
            out = teacher(input_ids=ids, output_hidden_states=True, output_attentions=True)
        n = ids.shape[1]
        assert offsets[position + 1] - offsets[position] == n
        tokens = slice(int(offsets[position]), int(offsets[position + 1]))
        torch.testing.assert_close(stored["logits"][tokens], out.logits[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(stored["hidden_states.4"][tokens], out.hidden_states[4][0], rtol=0, atol=1e-6)
        start = int(stored["attention_offsets"][position])
        attention = stored["attentions.3"][start : start + 4 * n * n].view(4, n, n)  # 4 heads
        torch.testing.assert_close(attention, out.attentions[3][0], rtol=0, atol=1e-6)
        position += 1


def test_cache_dtype_stores_intermediate_outputs_compactly(tmp_path, tiny_tokenizer):
    trainer = cached_trainer(
        tmp_path, tokenizer=tiny_tokenizer, max_steps=1, teacher_cache_dtype="float16", **INTERMEDIATE
    )
    trainer.train()
    with safe_open(trainer.teacher_cache.path, "pt") as file:
        dtypes = {name: file.get_slice(name).get_dtype() for name in file.keys()}
    assert dtypes["logits"] == "F32" and dtypes["hidden_states.4"] == dtypes["attentions.3"] == "F16"
    for batch in trainer._teacher_cache_batches():
        cached, live = cached_and_live_losses(trainer, batch)
        torch.testing.assert_close(cached, live, rtol=1e-3, atol=1e-3)  # half-precision targets


# ---- Training ----


def test_two_epochs_with_the_cache_train_the_live_weights(tmp_path, tiny_tokenizer):
    trained = {}
    for mode in ("live", "cached"):
        student, teacher = student_and_teacher()
        overrides = {"teacher_cache_dir": str(tmp_path / "cache")} if mode == "cached" else {}
        args = make_args(
            tmp_path / mode,
            max_steps=-1,
            num_train_epochs=2,
            per_device_train_batch_size=3,
            **INTERMEDIATE,
            **overrides,
        )
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=ragged_dataset(),
            data_collator=DataCollatorWithPadding(tiny_tokenizer),
        )
        calls = count_forwards(teacher)
        trainer.train()
        # Live: once per step (8 steps); cached: once per build batch (4 batches of 3), never in training.
        assert calls[0] == (4 if mode == "cached" else 8)
        trained[mode] = trainer
    live, cached = trained["live"], trained["cached"]
    for name, value in live.model.named_parameters():
        torch.testing.assert_close(cached.model.get_parameter(name), value, rtol=0, atol=1e-5)
    for name, value in live.hidden_projections.named_parameters():
        torch.testing.assert_close(cached.hidden_projections.get_parameter(name), value, rtol=0, atol=1e-5)
    live_losses = [e["loss"] for e in live.state.log_history if "loss" in e]
    cached_losses = [e["loss"] for e in cached.state.log_history if "loss" in e]
    assert len(live_losses) == 8 and cached_losses == pytest.approx(live_losses, abs=1e-5)


def test_evaluation_runs_the_live_teacher_on_inputs_outside_the_cache(tmp_path):
    trainer = cached_trainer(tmp_path, data=to_dataset(make_batch(num_rows=8)), max_steps=1)
    trainer.train()
    unseen = make_batch(num_rows=5, seed=7)
    trainer.model.eval()
    metrics = trainer.evaluate(eval_dataset=to_dataset(unseen))
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    trainer.model.train()
    with pytest.raises(ValueError, match=r"Row 0 of this training batch is not in the teacher cache"):
        trainer.compute_loss(trainer.model, unseen)


# ---- Reuse and invalidation ----


def test_a_second_trainer_reuses_the_file_without_running_the_teacher(tmp_path):
    data = to_dataset(make_batch(num_rows=8))
    first = cached_trainer(tmp_path, data=data)
    first.train()
    assert first.teacher_cache.built and len(cache_files(tmp_path)) == 1

    student, _ = student_and_teacher()
    teacher = first.teacher_model
    calls = count_forwards(teacher)
    args = make_args(tmp_path / "out2", teacher_cache_dir=str(tmp_path / "cache"))
    second = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    second.train()
    assert calls[0] == 0 and not second.teacher_cache.built
    assert second.teacher_cache.path == first.teacher_cache.path and len(cache_files(tmp_path)) == 1
    assert "soft_loss" in second.state.log_history[0]  # the teacher's targets came from the file


def test_prepare_teacher_cache_builds_ahead_of_training_and_train_reuses_it(tmp_path):
    trainer = cached_trainer(tmp_path, data=to_dataset(make_batch(num_rows=8)), max_steps=1)
    calls = count_forwards(trainer.teacher_model)
    cache = trainer.prepare_teacher_cache()
    assert cache is trainer.teacher_cache and cache.built and calls[0] == 2  # 8 rows in batches of 4
    assert trainer.state.global_step == 0  # nothing trained yet
    trainer.train()
    assert calls[0] == 2 and not trainer.teacher_cache.built and trainer.state.global_step == 1
    assert trainer.teacher_cache.path == cache.path


def test_prepare_teacher_cache_is_none_without_a_cache_dir_or_a_teacher_to_run(tmp_path):
    student, teacher = student_and_teacher()
    data = to_dataset(make_batch(num_rows=4))
    uncached = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path / "a"), train_dataset=data
    )
    assert uncached.prepare_teacher_cache() is None
    fine_tuning = cached_trainer(tmp_path, data=data, alpha=0.0)
    assert fine_tuning.prepare_teacher_cache() is None and cache_files(tmp_path) == []


def test_a_changed_dataset_gets_a_new_file(tmp_path):
    batch = make_batch(num_rows=8)
    first = cached_trainer(tmp_path, data=to_dataset(batch))
    first.train()
    batch["input_ids"][3, 1] = (batch["input_ids"][3, 1] + 1) % 90 + 5  # one token of one example
    second = cached_trainer(tmp_path, data=to_dataset(batch), teacher=first.teacher_model)
    calls = count_forwards(first.teacher_model)
    second.train()
    assert second.teacher_cache.built and calls[0] > 0
    assert second.teacher_cache.teacher_fingerprint == first.teacher_cache.teacher_fingerprint
    assert second.teacher_cache.data_fingerprint != first.teacher_cache.data_fingerprint
    assert len(cache_files(tmp_path)) == 2


def test_changed_teacher_weights_rebuild_the_cache(tmp_path):
    data = to_dataset(make_batch(num_rows=8))
    first = cached_trainer(tmp_path, data=data)
    first.train()
    teacher = first.teacher_model
    with torch.no_grad():
        teacher.classifier.bias[0] += 1e-3
    second = cached_trainer(tmp_path, data=data, teacher=teacher)
    second.train()
    assert second.teacher_cache.built
    assert second.teacher_cache.data_fingerprint == first.teacher_cache.data_fingerprint
    assert second.teacher_cache.teacher_fingerprint != first.teacher_cache.teacher_fingerprint
    batch = next(iter(second._teacher_cache_batches()))
    cached, live = cached_and_live_losses(second, batch)
    assert torch.equal(cached, live)  # the new weights' outputs, not the old file's


def test_repeated_examples_are_stored_once(tmp_path):
    batch = make_batch(num_rows=6)
    repeated = {name: torch.cat([tensor, tensor[:4]]) for name, tensor in batch.items()}  # 10 rows, 6 distinct
    trainer = cached_trainer(tmp_path, data=to_dataset(repeated), max_steps=1)
    trainer.train()
    assert trainer.teacher_cache.num_examples == 6
    for batch in trainer._teacher_cache_batches():
        cached, live = cached_and_live_losses(trainer, batch)
        assert torch.equal(cached, live)


# ---- Inputs that change between passes are refused ----


class Augmenting:
    """Pads like DataCollatorWithPadding, then replaces one random token per row from its `start`-th call on."""

    def __init__(self, tokenizer, start: int = 0):
        self.pad, self.start, self.calls = DataCollatorWithPadding(tokenizer), start, 0

    def __call__(self, features):
        batch = self.pad(features)
        self.calls += 1
        if self.calls > self.start:
            position = torch.randint(1, 3, (len(batch["input_ids"]),))
            batch["input_ids"][torch.arange(len(position)), position] = torch.randint(5, 99, (len(position),))
        return batch


def test_a_random_collator_is_refused_before_any_file_is_written(tmp_path, tiny_tokenizer):
    student, teacher = student_and_teacher()
    args = make_args(tmp_path / "out", teacher_cache_dir=str(tmp_path / "cache"))
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=ragged_dataset(),
        data_collator=Augmenting(tiny_tokenizer),
    )
    with pytest.raises(ValueError, match=r"Two in-order passes .* different teacher inputs.*teacher_cache_dir=None"):
        trainer.train()
    assert cache_files(tmp_path) == []


def test_inputs_that_change_after_the_build_raise_at_the_first_mismatching_batch(tmp_path, tiny_tokenizer):
    student, teacher = student_and_teacher()
    args = make_args(tmp_path / "out", teacher_cache_dir=str(tmp_path / "cache"), max_steps=6)
    collator = Augmenting(tiny_tokenizer, start=3 + 3 + 2)  # two build passes of 3 batches, then 2 clean steps
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=ragged_dataset(), data_collator=collator
    )
    with pytest.raises(ValueError, match=r"not in the teacher cache .* changes the inputs between passes"):
        trainer.train()
    assert trainer.state.global_step == 2


def test_known_random_collators_and_iterable_datasets_are_refused_upfront(tmp_path, tiny_tokenizer):
    student, teacher = student_and_teacher("masked-lm")
    args = make_args(tmp_path / "out", teacher_cache_dir=str(tmp_path / "cache"), alpha=1.0)
    data = ragged_dataset("masked-lm").remove_columns("labels")
    with pytest.raises(ValueError, match=r"DataCollatorForLanguageModeling masks random tokens.*teacher_cache_dir"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=data,
            data_collator=DataCollatorForLanguageModeling(tiny_tokenizer, mlm=True),
        )
    with pytest.raises(ValueError, match=r"IterableDataset, which cannot be enumerated"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data.to_iterable_dataset())
    assert not student.training and next(student.parameters()).requires_grad  # untouched: refused before setup


def test_an_interrupted_build_leaves_no_file(tmp_path):
    trainer = cached_trainer(tmp_path, data=to_dataset(make_batch(num_rows=12)))
    calls = count_forwards(trainer.teacher_model)

    def fail_on_second_batch(*_):
        if calls[0] == 2:
            raise KeyboardInterrupt

    trainer.teacher_model.register_forward_hook(fail_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert cache_files(tmp_path) == []  # neither a cache file nor its temporary


def test_token_labels_on_padding_are_refused_with_the_cache(tmp_path):
    trainer = cached_trainer(tmp_path, "token-classification", data=to_dataset(make_batch("token-classification")))
    trainer.train()
    batch = next(iter(trainer._teacher_cache_batches()))
    padded = batch["attention_mask"].eq(0).nonzero()[0]
    batch["labels"][padded[0], padded[1]] = 1
    trainer.model.train()
    with pytest.raises(ValueError, match=r"labels at positions whose attention_mask is 0"):
        trainer.compute_loss(trainer.model, batch)


# ---- Arguments ----


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teacher_cache_dir": ""}, r"teacher_cache_dir='' is invalid"),
        ({"teacher_cache_dir": "cache", "teacher_cache_dtype": "int8"}, r"teacher_cache_dtype='int8'.*'float16'"),
    ],
)
def test_invalid_cache_arguments_raise(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_a_file_as_cache_dir_is_refused_and_the_cli_takes_the_flags(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"is a file; pass a folder"):
        make_args(tmp_path, teacher_cache_dir=str(tmp_path / "file"))
    (args,) = HfArgumentParser(DistillationTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--teacher_cache_dir", str(tmp_path / "c"), "--teacher_cache_dtype", "float16"]
    )
    assert (args.teacher_cache_dir, args.teacher_cache_dtype) == (str(tmp_path / "c"), "float16")


# ---- The cost benchmark, end to end on a tiny teacher ----


def test_cost_benchmark_times_every_mode_and_writes_json(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import distillation_cost

    teacher = tiny_model("bert", num_hidden_layers=4)
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    (tmp_path / "data").mkdir()
    sentences = ["a good movie", "a bad film", "great fun", "dull and awful", "not very good"]
    rows = [f"{sentence} {i}\t{i % 2}" for i, sentence in enumerate(sentences * 4)]
    (tmp_path / "data" / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    output = tmp_path / "cost.json"
    results = distillation_cost.main(
        ["--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "data"), "--student-layers", "2",
         "--steps", "4", "--warmup-steps", "1", "--batch-size", "4", "--max-length", "12", "--threads", "1",
         "--rounds", "2", "--output", str(output), "--work-dir", str(tmp_path / "work")]
    )  # fmt: skip
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    assert results["settings"]["train_samples"] == 20 and results["environment"]["threads"] == 1
    for mode in ("stock", "live", "cached"):
        assert len(results["step_seconds_per_round"][mode]) == 2 and results["steps_per_second"][mode] > 0
    assert results["cache_mb"] > 0 and results["cache_build_s"] > 0
    assert set(results["teacher_forward_ms"]) == {"no_grad", "inference_mode"}
