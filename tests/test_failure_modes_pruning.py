"""Pruning that used to fail silently (or late, leaving a half-loaded model) now does the right thing or refuses early.

Each test names the issue item it covers ("Nothing silently wrong": 2, 6, 7, 8, 9).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import random_batch, tiny_model
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from transformers import AutoModelForSequenceClassification, Trainer, TrainerControl, TrainerState, TrainingArguments

from hf_compress import (
    GradualStructuredPruningCallback,
    PruningConfig,
    from_pretrained_int8,
    get_structure,
    load_compressed,
    prune_ffn_neurons,
    prune_heads,
    push_compressed_to_hub,
    quantize_dynamic_int8,
)
from hf_compress.pruning.unstructured import magnitude_prune, sparsity_report

MAX_STEPS = 24


def _dataset(size: int = 32, seq_len: int = 8) -> list[dict]:
    """A learnable task: the label is whether the second token id is even."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 99, (size, seq_len), generator=generator)
    labels = (input_ids[:, 1] % 2 == 0).long()
    return [
        {"input_ids": ids, "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": label}
        for ids, label in zip(input_ids, labels, strict=True)
    ]


def _args(output_dir, **kwargs) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(**{**settings, **kwargs})


def _callback(**kwargs) -> GradualStructuredPruningCallback:
    steps = dict(begin_step=2, end_step=14, frequency=4)
    config = PruningConfig(target="flops", keep=0.5, importance="fisher", seq_len=8)
    return GradualStructuredPruningCallback(config, **{**steps, **kwargs})


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _assert_same_state(model, snapshot) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for name, tensor in snapshot.items():
        assert torch.equal(state[name], tensor), name


#### 2. magnitude_prune, then save through every route without make_permanent


def test_2_save_pretrained_of_a_masked_model_reloads_the_same_model(tmp_path):
    model = tiny_model("bert")
    magnitude_prune(model, 0.7)
    batch = random_batch()
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)

    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert torch.equal(_logits(stock, batch), expected)
    assert torch.equal(_logits(load_compressed(tmp_path), batch), expected)
    assert sparsity_report(stock).total.sparsity == pytest.approx(0.7, abs=1e-3)
    # The masks are still live: the model keeps training weight_orig under its mask.
    assert hasattr(model.bert.encoder.layer[0].attention.self.query, "weight_mask")


def test_2_trainer_save_model_and_resume_of_a_masked_model(tmp_path):
    batch = random_batch()

    def masked_trainer(output_dir):
        model = tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
        magnitude_prune(model, 0.6)
        args = _args(output_dir, max_steps=4, save_strategy="steps", save_steps=2)
        return Trainer(model=model, args=args, train_dataset=_dataset())

    uninterrupted = masked_trainer(tmp_path / "a")
    uninterrupted.train()
    uninterrupted.save_model(tmp_path / "final")
    expected = _logits(uninterrupted.model, batch)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert torch.equal(_logits(reloaded, batch), expected)
    checkpoint = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a" / "checkpoint-2")
    assert sparsity_report(checkpoint).total.sparsity == pytest.approx(0.6, abs=1e-3)

    # The checkpoint holds folded weights; a masked model resumes from it (its masks taken from the zeros).
    resumed = masked_trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    torch.testing.assert_close(_logits(resumed.model, batch), expected, rtol=0, atol=1e-6)


def test_2_push_compressed_to_hub_uploads_the_masked_weights(tmp_path, monkeypatch):
    model = tiny_model("bert")
    magnitude_prune(model, 0.5)
    batch = random_batch()
    expected = _logits(model, batch)
    uploaded = tmp_path / "uploaded"

    def upload_folder(self, **kwargs):
        shutil.copytree(kwargs["folder_path"], uploaded)
        return CommitInfo(
            commit_url="https://huggingface.co/me/x/commit/abc", commit_message="", commit_description="", oid="abc"
        )

    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kwargs: RepoUrl(f"https://huggingface.co/{repo_id}")
    )
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    push_compressed_to_hub(model, "me/sparse", card="---\nlicense: apache-2.0\n---\n# Sparse\n")
    stock = AutoModelForSequenceClassification.from_pretrained(uploaded)
    assert torch.equal(_logits(stock, batch), expected)


#### 6. load_best_model_at_end with a checkpoint saved mid-pruning


def test_6_load_best_model_with_checkpoints_before_end_step_is_refused_before_training(tmp_path):
    model = tiny_model("bert").train()
    snapshot = _snapshot(model)
    args = _args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=4,
        load_best_model_at_end=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(8), callbacks=[_callback()]
    )
    with pytest.raises(ValueError, match=r"load_best_model_at_end.*step 4.*save_steps=14.*load_compressed"):
        trainer.train()
    assert trainer.state.global_step == 0
    _assert_same_state(model, snapshot)
    assert not any(tmp_path.glob("checkpoint-*"))


def test_6_load_best_model_with_checkpoints_from_end_step_on_works(tmp_path):
    model = tiny_model("bert").train()
    args = _args(
        tmp_path,
        max_steps=16,
        eval_strategy="steps",
        eval_steps=14,
        save_strategy="steps",
        save_steps=14,
        load_best_model_at_end=True,
    )
    callback = _callback()
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(8), callbacks=[callback])
    trainer.train()
    assert trainer.state.best_model_checkpoint is not None
    assert get_structure(trainer.model) == get_structure(load_compressed(trainer.state.best_model_checkpoint))


#### 7. and 8. resuming: a fresh model, a checkpoint mid-pruning or before pruning, the running importance


def _train_and_resume(tmp_path, save_steps: int, resume_step: int, **callback_kwargs):
    """Train MAX_STEPS uninterrupted, then again from a fresh model resuming at `resume_step`; both trainers."""
    dataset = _dataset()

    def trainer(output_dir):
        args = _args(output_dir, save_strategy="steps", save_steps=save_steps)
        callback = _callback(**callback_kwargs)
        return Trainer(model=tiny_model("bert").train(), args=args, train_dataset=dataset, callbacks=[callback])

    uninterrupted = trainer(tmp_path / "a")
    uninterrupted.train()
    resumed = trainer(tmp_path / "b")
    shutil.copytree(tmp_path / "a" / f"checkpoint-{resume_step}", tmp_path / "b" / f"checkpoint-{resume_step}")
    resumed.train(resume_from_checkpoint=True)
    return uninterrupted, resumed


def _assert_same_run(uninterrupted, resumed) -> None:
    first, second = (
        next(c for c in t.callback_handler.callbacks if isinstance(c, GradualStructuredPruningCallback))
        for t in (uninterrupted, resumed)
    )
    assert get_structure(resumed.model) == get_structure(uninterrupted.model)
    assert second.history == first.history
    assert second.reference_cost == first.reference_cost
    for kind in ("heads", "ffn"):
        for a, b in zip(first._scores[kind], second._scores[kind], strict=True):
            assert torch.equal(a, b), kind
    _assert_same_state(resumed.model, _snapshot(uninterrupted.model))


def test_7_resume_mid_pruning_with_a_fresh_model_fits_it_to_the_checkpoint(tmp_path):
    # Pruning at steps 6, 10, 14; the checkpoint of step 8 is mid-pruning and smaller than the fresh model.
    uninterrupted, resumed = _train_and_resume(tmp_path, save_steps=8, resume_step=8)
    checkpoint_structure = get_structure(load_compressed(tmp_path / "a" / "checkpoint-8"))
    assert sum(checkpoint_structure.heads) + sum(checkpoint_structure.ffn) < 4 * 4 + 4 * 24
    _assert_same_run(uninterrupted, resumed)


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_7_the_load_hook_fits_layers_emptied_of_heads_or_neurons(tmp_path, model_type):
    pruned = tiny_model(model_type, seed=1)
    prune_heads(pruned, {0: [0, 1, 2, 3], 2: [1]})
    prune_ffn_neurons(pruned, {1: list(range(24)), 3: [0, 5]})
    model = tiny_model(model_type).train()
    Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[_callback()])
    model.load_state_dict(pruned.state_dict())
    assert get_structure(model) == get_structure(pruned)
    batch = random_batch()
    assert torch.equal(_logits(model, batch), _logits(pruned, batch))


def test_7_an_optimizer_built_before_the_model_was_fitted_is_refused(tmp_path):
    pruned = tiny_model("bert", seed=1)
    prune_heads(pruned, {0: [0, 1]})
    model = tiny_model("bert").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # as `Trainer(optimizers=(optimizer, None))` gets it
    callback = _callback()
    Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[callback])
    model.load_state_dict(pruned.state_dict())
    with pytest.raises(ValueError, match="optimizer holds 8 parameters"):
        callback.on_train_begin(
            _args(tmp_path), TrainerState(max_steps=MAX_STEPS), TrainerControl(), model=model, optimizer=optimizer
        )
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    callback.on_train_begin(
        _args(tmp_path), TrainerState(max_steps=MAX_STEPS), TrainerControl(), model=model, optimizer=fresh
    )


def test_7_a_checkpoint_the_model_cannot_be_pruned_to_is_refused_touching_nothing(tmp_path):
    full = tiny_model("bert", seed=1).state_dict()
    model = tiny_model("bert").train()
    Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[_callback()])
    prune_heads(model, {0: [0, 1]})
    prune_ffn_neurons(model, {1: list(range(8))})
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"cannot be pruned to.*layer\(s\) \[0, 1\].*load_compressed"):
        model.load_state_dict(full, strict=False)
    _assert_same_state(model, snapshot)


def test_8_resume_before_begin_step_is_exact(tmp_path):
    uninterrupted, resumed = _train_and_resume(tmp_path, save_steps=4, resume_step=4, begin_step=6, end_step=14)
    _assert_same_run(uninterrupted, resumed)


@pytest.mark.parametrize(
    "steps, message",
    [
        (dict(begin_step=2, end_step=30), r"end_step=30 \(step 30\) is beyond the end of training \(max_steps=24\)"),
        (dict(begin_step=24, end_step=40), r"begin_step=24 \(step 24\) is not before the end of training"),
        (dict(begin_step=0.5, end_step=12, frequency=2), r"end_step=12 \(step 12\) must come after .*frequency=2\)"),
    ],
)
def test_8_step_range_training_cannot_complete_is_refused_before_training(tmp_path, steps, message):
    model = tiny_model("bert").train()
    snapshot = _snapshot(model)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[_callback(**steps)])
    with pytest.raises(ValueError, match=message) as error:
        trainer.train()
    assert "frequency=1" not in str(error.value)
    assert trainer.state.global_step == 0
    _assert_same_state(model, snapshot)


def test_8_second_train_does_not_compound_the_pruning(tmp_path):
    model = tiny_model("bert").train()
    callback = _callback()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[callback])
    trainer.train()
    structure, reference, history = get_structure(trainer.model), callback.reference_cost, list(callback.history)
    assert history[-1][1] / reference <= 0.5
    trainer.train()
    assert get_structure(trainer.model) == structure
    assert callback.reference_cost == reference and callback.history == history


#### 9. int8 from a pruned checkpoint


def test_9_from_pretrained_int8_loads_a_pruned_checkpoint(tmp_path):
    model = tiny_model("bert")
    prune_heads(model, {0: [1, 2], 2: [0, 1, 2, 3]})
    prune_ffn_neurons(model, {1: list(range(10))})
    model.save_pretrained(tmp_path)
    batch = random_batch()

    loaded = from_pretrained_int8(tmp_path, AutoModelForSequenceClassification)
    assert get_structure(loaded) == get_structure(model)
    assert torch.equal(_logits(loaded, batch), _logits(quantize_dynamic_int8(model), batch))


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
@pytest.mark.parametrize("callback_class", ["structured", "magnitude"])
def test_pruning_callbacks_refuse_sharded_runs_before_any_step(engine, callback_class, monkeypatch):
    # Under FSDP / DeepSpeed ZeRO each process holds shards: the callbacks would score and cut a slice of each weight.
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from hf_compress import GradualMagnitudePruningCallback, GradualStructuredPruningCallback, PruningConfig

    if engine == "fsdp":
        args = SimpleNamespace(fsdp=True, deepspeed=None)
    else:
        args = SimpleNamespace(fsdp=False, deepspeed=None)
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    callback = (
        GradualStructuredPruningCallback(PruningConfig(keep=0.5, importance="magnitude"), 0.1, 0.5, 1)
        if callback_class == "structured"
        else GradualMagnitudePruningCallback(final_sparsity=0.5, begin_step=0.1, end_step=0.5, frequency=1)
    )
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = TrainerState(max_steps=10)
    with pytest.raises(
        ValueError, match=f"cannot prune a model sharded by {'FSDP' if engine == 'fsdp' else 'DeepSpeed'}"
    ):
        callback.on_train_begin(args, state, TrainerControl(), model=model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
