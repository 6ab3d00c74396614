import pytest
import torch
from conftest import random_batch, tiny_model
from datasets import Dataset
from torch.nn.utils import prune
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from hf_compress import get_spec
from hf_compress.architectures import get_layers
from hf_compress.pruning.magnitude_callback import GradualMagnitudePruningCallback
from hf_compress.pruning.schedules import cubic_sparsity

# Prune at steps 2, 4, 6 of 8: targets 0 (s_i), 0.6125, 0.7.
PRUNING = dict(final_sparsity=0.7, begin_step=2, end_step=6, frequency=2)


def encoder_linears(model):
    spec = get_spec(model)
    paths = (spec.query, spec.key, spec.value, spec.attention_output, spec.ffn_in, spec.ffn_out)
    return [layer.get_submodule(path) for layer in get_layers(model) for path in paths]


def num_zeros(model):
    return sum(int((module.weight == 0).sum()) for module in encoder_linears(model))


class Recorder(TrainerCallback):
    """Runs after the pruning callback: the zeros and weights the model has at the end of every step."""

    def __init__(self):
        self.zeros, self.weights = {}, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.zeros[state.global_step] = num_zeros(model)
        self.weights[state.global_step] = [module.weight.detach().clone() for module in encoder_linears(model)]


def dataset(size=32):
    return Dataset.from_dict({k: v.tolist() for k, v in random_batch(size, seq_len=8, padded=False).items()})


def make_trainer(output_dir, callbacks, max_steps=8, **kwargs):
    model = tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    settings = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,  # AdamW's decay and momentum would move pruned weights off zero if masks were not kept
        save_strategy="steps",
        save_steps=4,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    args = TrainingArguments(**{**settings, **kwargs})
    return Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)


def test_callback_prunes_on_schedule_and_training_continues(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, [GradualMagnitudePruningCallback(**PRUNING), recorder])
    trainer.train()
    model = trainer.model
    total = sum(module.weight.numel() for module in encoder_linears(model))

    expected = {step: round(cubic_sparsity(step, 0.7, 0.0, 2, 2, 2) * total) for step in range(1, 9)}
    assert recorder.zeros == expected
    assert expected[4] == round(0.6125 * total) and expected[8] == round(0.7 * total)

    # Weights kept at step 6 (the last pruning) still train afterwards, pruned ones stay exactly zero.
    for at_6, final in zip(recorder.weights[6], [m.weight for m in encoder_linears(model)], strict=True):
        kept = at_6 != 0
        assert torch.all(final[~kept] == 0)
        assert not torch.equal(final[kept], at_6[kept])
    # Zeros only ever grow: a weight pruned at step 4 is still zero at step 8.
    for at_4, final in zip(recorder.weights[4], recorder.weights[8], strict=True):
        assert torch.all(final[at_4 == 0] == 0)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))

    # The optimizer trains exactly the model's parameters (no stale tensors left behind by the reparametrisation).
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    # The final model is plain, and its checkpoint loads with stock from_pretrained.
    assert not any(prune.is_pruned(module) for module in model.modules())
    trainer.save_model(str(tmp_path / "final"))
    reloaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert num_zeros(reloaded) == expected[8]
    batch = {k: v for k, v in random_batch().items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**batch).logits, model.eval()(**batch).logits)


def test_masks_survive_checkpoint_save_and_resume(tmp_path):
    full = Recorder()
    make_trainer(tmp_path / "full", [GradualMagnitudePruningCallback(**PRUNING), full]).train()

    # Every intermediate checkpoint is an ordinary sparse checkpoint.
    checkpoint = tmp_path / "full" / "checkpoint-4"
    at_4, info = AutoModelForSequenceClassification.from_pretrained(checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert num_zeros(at_4) == full.zeros[4]

    # A fresh model resumed from step 4 rebuilds the masks and ends exactly where the uninterrupted run ended.
    resumed = Recorder()
    trainer = make_trainer(tmp_path / "resumed", [GradualMagnitudePruningCallback(**PRUNING), resumed])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert list(resumed.zeros) == [5, 6, 7, 8]
    assert resumed.zeros == {step: full.zeros[step] for step in (5, 6, 7, 8)}
    for step in (5, 8):
        for expected, actual in zip(full.weights[step], resumed.weights[step], strict=True):
            assert torch.equal(actual == 0, expected == 0)
            torch.testing.assert_close(actual, expected)


def test_bad_patterns_fail_when_the_trainer_is_built(tmp_path):
    with pytest.raises(ValueError, match="'querry' matches no module"):
        make_trainer(tmp_path, [GradualMagnitudePruningCallback(0.5, include="querry")])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(final_sparsity=1.0), r"final_sparsity.*\[0, 1\)"),
        (dict(final_sparsity=0.5, initial_sparsity=0.6), "initial_sparsity"),
        (dict(final_sparsity=0.5, frequency=0), "frequency"),
        (dict(final_sparsity=0.5, end_step=-2), "end_step"),
        (dict(final_sparsity=0.5, scope="local"), "scope"),
        (dict(final_sparsity=0.5, exclude=[]), "exclude"),
    ],
)
def test_bad_callback_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradualMagnitudePruningCallback(**kwargs)


def test_fractional_steps_resolve_against_max_steps(tmp_path):
    recorder = Recorder()
    callback = GradualMagnitudePruningCallback(0.5, begin_step=0.25, end_step=0.75, frequency=2)
    make_trainer(tmp_path, [callback, recorder], save_strategy="no").train()
    assert (callback.schedule.begin_step, callback.schedule.end_step) == (2, 6)
    total = sum(module.weight.numel() for module in encoder_linears(tiny_model("bert")))
    assert recorder.zeros[8] == round(0.5 * total)


def test_callback_prunes_the_student_of_a_distillation_trainer(tmp_path):
    from hf_compress import DistillationTrainer, DistillationTrainingArguments

    teacher = tiny_model("bert", seed=1)
    teacher_state = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    student = tiny_model("bert", num_hidden_layers=2).train()
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    pruning = GradualMagnitudePruningCallback(0.5, begin_step=1, end_step=3, frequency=1)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset(), callbacks=[pruning]
    )
    trainer.train()
    total = sum(module.weight.numel() for module in encoder_linears(trainer.model))
    assert num_zeros(trainer.model) == round(0.5 * total)
    assert not any(prune.is_pruned(module) for module in trainer.model.modules())
    assert all(torch.equal(tensor, teacher_state[name]) for name, tensor in teacher.state_dict().items())
