"""Gradual structured pruning while training: the schedule's budget on time, a consistent optimizer, training goes on."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import random_batch, tiny_model
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

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
from hf_compress.pruning.optimizer_surgery import parameter_slices, rewire_optimizer
from hf_compress.pruning.search import Selection, unit_costs

BEGIN, END, FREQUENCY, MAX_STEPS = 2, 14, 4, 24


def _dataset(size: int = 32, seq_len: int = 8) -> list[dict]:
    """A learnable task: the label is whether the second token id is even."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 99, (size, seq_len), generator=generator)
    labels = (input_ids[:, 1] % 2 == 0).long()
    return [
        {"input_ids": ids, "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": label}
        for ids, label in zip(input_ids, labels, strict=True)
    ]


def _args(tmp_path, cls=TrainingArguments, **kwargs):
    return cls(
        output_dir=str(tmp_path),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **kwargs,
    )


def _check_optimizer(trainer) -> None:
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    model_params = {id(p) for p in trainer.model.parameters()}
    assert all(id(p) in model_params for p in in_optimizer), "the optimizer holds a parameter the model lost"
    assert {id(p) for p in in_optimizer} == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    for p in in_optimizer:
        state = optimizer.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_reaches_flops_target_on_schedule_and_keeps_training(tmp_path, model_type):
    model = tiny_model(model_type).train()
    config = PruningConfig(target="flops", keep=0.5, importance="fisher", seq_len=8)
    callback = GradualStructuredPruningCallback(config, begin_step=BEGIN, end_step=END, frequency=FREQUENCY)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[callback])
    trainer.train()

    head_cost = unit_costs(model, "flops", 8).head
    reference = callback.reference_cost
    # Cubic schedule from 0 to the target over steps 2..14, pruning every 4 steps (nothing is due at step 2).
    assert [step for step, _ in callback.history] == [6, 10, 14]
    for step, cost in callback.history:
        progress = 1 - (1 - (step - BEGIN) / (END - BEGIN)) ** 3
        target = (1 - progress * (1 - config.keep)) * reference
        assert 0 <= target - cost < head_cost, f"step {step}: cost {cost} vs target {target}"
    structure = get_structure(trainer.model)
    assert sum(structure.heads) < 16 or sum(structure.ffn) < 96
    _check_optimizer(trainer)
    losses = _losses(trainer)
    assert len(losses) == MAX_STEPS and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    # The hooks are gone and the pruned model is a plain one.
    assert sum(len(m._forward_pre_hooks) for m in trainer.model.modules()) == 0


def test_ratios_with_distillation_trainer(tmp_path):
    student = tiny_model("bert").train()
    teacher = copy.deepcopy(student).eval()
    config = PruningConfig(target="ratios", head_keep=0.5, ffn_keep=0.5, importance="taylor")
    callback = GradualStructuredPruningCallback(config, begin_step=BEGIN, end_step=END, frequency=FREQUENCY)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path, DistillationTrainingArguments),
        train_dataset=_dataset(),
        callbacks=[callback],
    )
    trainer.train()
    structure = get_structure(trainer.model)
    assert sum(structure.heads) == 8 and sum(structure.ffn) == 48
    _check_optimizer(trainer)
    assert all(math.isfinite(loss) for loss in _losses(trainer))


@pytest.mark.parametrize(
    "kwargs",
    [{"head_keep": 0.5}, {"head_keep": 0.5, "ffn_keep": 1.0}, {"head_ratio": 0.5, "ffn_ratio": 0.0}],
    ids=["head_keep", "ffn_keep=1", "deprecated_ffn_ratio=0"],
)
def test_ratios_of_heads_only_reach_the_target(tmp_path, kwargs):
    """A step that removes nothing (here the last: 8 heads are already gone) once built an invalid PruningConfig."""
    model = tiny_model("bert").train()
    config = PruningConfig(target="ratios", importance="taylor", **kwargs)
    callback = GradualStructuredPruningCallback(config, begin_step=BEGIN, end_step=END, frequency=FREQUENCY)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[callback])
    trainer.train()
    structure = get_structure(trainer.model)
    assert sum(structure.heads) == 8 and sum(structure.ffn) == 96
    assert [step for step, _ in callback.history] == [6, 10, 14]
    assert callback.history[-1][1] == callback.history[-2][1]  # nothing left to remove at step 14
    _check_optimizer(trainer)


def test_magnitude_uniform_keeps_stock_shape(tmp_path):
    model = tiny_model("bert").train()
    config = PruningConfig(target="params", keep=0.6, importance="magnitude", uniform=True)
    callback = GradualStructuredPruningCallback(config, begin_step=0.1, end_step=0.5, frequency=3)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[callback])
    trainer.train()
    structure = get_structure(trainer.model)
    assert structure.is_stock and structure.ffn[0] < 24
    _check_optimizer(trainer)


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_optimizer_state_follows_the_kept_rows_and_columns(model_type):
    model = tiny_model(model_type).train()
    spec = get_spec(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**random_batch()).loss.backward()
    optimizer.step()
    layer0, layer1 = get_layers(model)[0], get_layers(model)[1]
    query, down = layer0.get_submodule(spec.query).weight, layer0.get_submodule(spec.ffn_out).weight
    untouched = get_layers(model)[2].get_submodule(spec.query).weight
    before = {name: optimizer.state[p]["exp_avg"].clone() for name, p in (("query", query), ("down", down))}
    untouched_state = optimizer.state[untouched]["exp_avg"]
    removed_query = layer1.get_submodule(spec.query).weight

    # Layer 0 keeps heads 0, 2, 3 and neurons 1..23; layer 1 loses every head.
    selection = Selection(
        heads=[[0, 2, 3], [], [0, 1, 2, 3], [0, 1, 2, 3]],
        ffn=[list(range(1, 24))] + [list(range(24))] * 3,
        layers=[],
    )
    slices = parameter_slices(model, selection)
    prune_heads(model, {0: [1], 1: [0, 1, 2, 3]})
    prune_ffn_neurons(model, {0: [0]})
    rewire_optimizer(optimizer, slices)

    head_dim = spec.head_dim(model.config)
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in (0, 2, 3)])
    new_query, new_down = layer0.get_submodule(spec.query).weight, layer0.get_submodule(spec.ffn_out).weight
    assert torch.equal(optimizer.state[new_query]["exp_avg"], before["query"][rows])
    assert torch.equal(optimizer.state[new_down]["exp_avg"], before["down"][:, 1:])
    assert optimizer.state[untouched]["exp_avg"] is untouched_state
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(p is not removed_query and p is not query for p in params)
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}
    model(**random_batch()).loss.backward()
    optimizer.step()  # Adam runs on the shrunk parameters with the sliced state
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in params)


def test_resume_mid_pruning_is_refused():
    model = tiny_model("bert")
    callback = GradualStructuredPruningCallback(PruningConfig(keep=0.5), begin_step=10, end_step=30, frequency=5)
    state = TrainerState(max_steps=40, global_step=20)
    with pytest.raises(ValueError, match="mid-pruning is not supported"):
        callback.on_train_begin(None, state, TrainerControl(), model=model)
    for step in (5, 30):  # before pruning starts, or once it is over: fine
        callback.on_train_begin(None, TrainerState(max_steps=40, global_step=step), TrainerControl(), model=model)
        callback.on_train_end(None, state, TrainerControl())


def test_bad_arguments():
    with pytest.raises(ValueError, match="layers"):
        GradualStructuredPruningCallback(PruningConfig(layers=1))
    with pytest.raises(ValueError, match="frequency=0"):
        GradualStructuredPruningCallback(PruningConfig(), frequency=0)
    with pytest.raises(ValueError, match="beta=1"):
        GradualStructuredPruningCallback(PruningConfig(), beta=1)
    with pytest.raises(ValueError, match="PruningConfig"):
        GradualStructuredPruningCallback({"keep": 0.5})
