"""prune_heads / prune_ffn_neurons / drop_layers: exact, composable, atomic on bad input, and the result trains."""

import copy

import pytest
import torch
from conftest import ARCHITECTURES, random_batch, tiny_model
from torch import nn

from hf_compress import drop_layers, get_spec, get_structure, prune_ffn_neurons, prune_heads, round_ffn_plan
from hf_compress.architectures import get_layers
from hf_compress.pruning.search import round_width
from hf_compress.pruning.structured import unit_feature_indices
from hf_compress.remote_code.modeling_hf_compress import EmptyAttention

# Tiny models have 4 layers, 4 heads of size 4 and 24 FFN neurons. Layer 1 loses every head, layer 2 every neuron.
HEAD_PLAN = {0: [1, 3], 1: [0, 1, 2, 3], 3: [2]}
FFN_PLAN = {0: [0, 5, 7], 2: list(range(24)), 3: [23]}


def _inputs(seed=0):
    batch = random_batch(padded=True, seed=seed)
    batch.pop("labels")
    return batch


def _outputs(model, batch):
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return out.logits, out.hidden_states


def _zero_contributions(model, heads, neurons):
    """The unpruned-model reference: zero the output-projection columns that read the removed heads and neurons."""
    spec = get_spec(model)
    head_dim = spec.head_dim(model.config)
    layers = get_layers(model)
    with torch.no_grad():
        for layer, removed in heads.items():
            weight = layers[layer].get_submodule(spec.attention_output).weight  # (hidden, heads * head_dim)
            for head in removed:
                weight[:, head * head_dim : (head + 1) * head_dim] = 0
        for layer, removed in neurons.items():
            layers[layer].get_submodule(spec.ffn_out).weight[:, removed] = 0  # (hidden, intermediate)


def _assert_same_outputs(a, b, batch, atol=1e-5):
    logits_a, hidden_a = _outputs(a, batch)
    logits_b, hidden_b = _outputs(b, batch)
    torch.testing.assert_close(logits_a, logits_b, atol=atol, rtol=0)
    assert len(hidden_a) == len(hidden_b)
    for x, y in zip(hidden_a, hidden_b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def _snapshot(model):
    return (
        type(model),
        model.config.to_dict(),
        {name: tensor.clone() for name, tensor in model.state_dict().items()},
    )


def _assert_unchanged(model, snapshot):
    model_class, config, state = snapshot
    assert type(model) is model_class
    assert model.config.to_dict() == config
    now = model.state_dict()
    assert now.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(now[name], tensor), name


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_pruning_equals_zeroing_the_removed_units(model_type, attn_implementation):
    model = tiny_model(model_type, attn_implementation=attn_implementation)
    reference = copy.deepcopy(model)
    _zero_contributions(reference, HEAD_PLAN, FFN_PLAN)
    parameters = sum(p.numel() for p in model.parameters())

    prune_heads(model, HEAD_PLAN)
    prune_ffn_neurons(model, FFN_PLAN)

    assert model.config._attn_implementation == attn_implementation
    assert get_structure(model).heads == (2, 0, 4, 3)
    assert get_structure(model).ffn == (21, 24, 0, 23)
    spec = get_spec(model)
    assert isinstance(get_layers(model)[1].get_submodule(spec.attention_core), EmptyAttention)
    removed = 7 * (3 * (16 * 4 + 4) + 16 * 4) + 28 * (16 + 1 + 16)  # 7 heads, 28 neurons: weights and biases
    assert sum(p.numel() for p in model.parameters()) == parameters - removed
    _assert_same_outputs(model, reference, _inputs())


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_repeated_calls_compose(model_type):
    once, twice = tiny_model(model_type), tiny_model(model_type)
    prune_heads(once, {0: [0, 1], 2: [1, 2, 3]})
    prune_ffn_neurons(once, {1: [0, 1, 2, 10]})
    prune_heads(twice, {0: [0], 2: [2]})
    prune_heads(twice, {0: [0], 2: [1, 2]})  # the old heads 1 (layer 0) and 1, 3 (layer 2), renumbered
    prune_ffn_neurons(twice, {1: [10]})
    prune_ffn_neurons(twice, {1: [0, 1, 2]})
    assert get_structure(once) == get_structure(twice)
    _assert_same_outputs(once, twice, _inputs(), atol=0)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_drop_layers_equals_skipping_them(model_type):
    class Skip(nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    model = tiny_model(model_type)
    reference = copy.deepcopy(model)
    for index in (1, 3):
        get_layers(reference)[index] = Skip()
    spec = get_spec(model)

    drop_layers(model, [3, 1])

    assert len(get_layers(model)) == spec.num_layers(model.config) == 2
    batch = _inputs()
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=1e-6, rtol=0)
    # Indices refer to the current layers: the old layer 2 is now layer 1.
    prune_heads(model, {1: [0]})
    assert get_structure(model).heads == (4, 3)
    layer_indices = {
        m.layer_idx for m in get_layers(model)[1].modules() if isinstance(getattr(m, "layer_idx", None), int)
    }
    assert layer_indices in (set(), {1})  # BERT-likes number their layers for KV caching; DistilBERT does not


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_config_follows_the_structure(model_type):
    model = tiny_model(model_type)
    spec = get_spec(model)
    stock_class = type(model)
    prune_heads(model, {2: [0, 1, 2, 3]})
    prune_ffn_neurons(model, {0: [1, 2]})
    structure = model.config.hf_compress
    assert structure["num_attention_heads_per_layer"] == [4, 4, 0, 4]
    assert structure["intermediate_size_per_layer"] == [22, 24, 24, 24]
    # The head size stays derivable from the config, as the stock modules derive it.
    assert spec.head_dim(model.config) == structure["head_dim"] == 4
    assert spec.intermediate_size(model.config) == 24  # the widest layer
    assert type(model) is not stock_class and isinstance(model, stock_class)
    assert type(model).__name__ == stock_class.__name__

    drop_layers(model, [2])  # the head-less layer goes: heads are all there again, FFN widths not yet uniform
    assert model.config.hf_compress["num_attention_heads_per_layer"] == [4, 4, 4]
    prune_ffn_neurons(model, {1: [0, 1], 2: [3, 4]})  # now uniform: a stock model again
    assert type(model) is stock_class
    assert not hasattr(model.config, "hf_compress") and not hasattr(model.config, "auto_map")
    assert spec.num_layers(model.config) == 3 and spec.intermediate_size(model.config) == 22


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_pruned_base_model_still_returns_hidden_states(model_type):
    model = tiny_model(model_type).base_model
    prune_heads(model, {0: [0]})
    out = model(**_inputs(), output_hidden_states=True)
    assert len(out.hidden_states) == 5


def test_pruning_keeps_dtype_and_frozen_parameters():
    model = tiny_model("bert").to(torch.bfloat16)
    spec = get_spec(model)
    layer = get_layers(model)[0]
    layer.get_submodule(spec.query).weight.requires_grad_(False)
    prune_heads(model, {0: [0]})
    prune_ffn_neurons(model, {0: [0]})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not layer.get_submodule(spec.query).weight.requires_grad
    assert layer.get_submodule(spec.key).weight.requires_grad


BAD_CALLS = [
    (prune_heads, {4: [0]}, r"layer 4.*4 layers.*0\.\.3"),
    (prune_heads, {-1: [0]}, r"layer -1.*0\.\.3"),
    (prune_heads, {"0": [0]}, r"layer '0'.*0\.\.3"),
    (prune_heads, {0: [1], 1: [4]}, r"heads_to_prune\[1\]: head index 4 is out of range.*4 heads.*0\.\.3"),
    (prune_heads, {0: [-1]}, r"head index -1 is out of range.*0\.\.3"),
    (prune_heads, {0: [1, 2, 1]}, r"heads_to_prune\[0\]: head index 1 is listed twice"),
    (prune_heads, {0: [1.0]}, r"heads_to_prune\[0\]: head index 1\.0 is not an integer.*0\.\.3"),
    (prune_heads, {0: [True]}, r"head index True is not an integer"),
    (prune_heads, {0: 1}, r"heads_to_prune\[0\] must be a list"),
    (prune_heads, [[0, 1]], r"must be a dict"),
    (prune_ffn_neurons, {2: [24]}, r"neurons_to_prune\[2\]: FFN neuron index 24 is out of range.*24.*0\.\.23"),
    (prune_ffn_neurons, {0: [3], 2: [3, 3]}, r"FFN neuron index 3 is listed twice"),
    (drop_layers, [4], r"layer index 4 is out of range.*4 layers.*0\.\.3"),
    (drop_layers, [0, 0], r"layer index 0 is listed twice"),
    (drop_layers, [0.5], r"layer index 0\.5 is not an integer"),
    (drop_layers, [0, 1, 2, 3], r"all 4 layers; keep at least one"),
]


@pytest.mark.parametrize("function, argument, message", BAD_CALLS)
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_bad_indices_raise_and_leave_the_model_untouched(model_type, function, argument, message):
    model = tiny_model(model_type)
    prune_heads(model, {3: [0]})  # start from a pruned model, whose class and config must not change either
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        function(model, argument)
    _assert_unchanged(model, snapshot)


def test_failure_while_building_leaves_the_model_untouched():
    class QuantizedLinear(nn.Linear):
        pass

    model = tiny_model("bert")
    spec = get_spec(model)
    old = get_layers(model)[3].get_submodule(spec.ffn_in)
    layer = get_layers(model)[3].get_submodule(spec.ffn_in.rpartition(".")[0])
    layer.dense = QuantizedLinear(old.in_features, old.out_features)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="prunes torch.nn.Linear projections, but found QuantizedLinear"):
        prune_ffn_neurons(model, {0: [1], 3: [1]})  # layer 0 is fine, layer 3 is not: neither changes
    _assert_unchanged(model, snapshot)


def test_indices_may_be_numpy_or_tensors():
    numpy = pytest.importorskip("numpy")
    model = tiny_model("bert")
    prune_heads(model, {numpy.int64(0): torch.tensor([1, 2]), 1: numpy.array([0])})
    prune_ffn_neurons(model, {torch.tensor(2): [numpy.int32(5)]})
    drop_layers(model, torch.tensor([3]))
    assert get_structure(model).heads == (2, 3, 4) and get_structure(model).ffn == (24, 24, 23)


def test_indices_count_current_units():
    model = tiny_model("bert")
    prune_heads(model, {0: [0, 1, 2]})
    with pytest.raises(
        ValueError, match=r"head index 1 is out of range: layer 0 has 1 heads \(valid indices: 0\.\.0\)"
    ):
        prune_heads(model, {0: [1]})
    prune_heads(model, {0: [0]})
    with pytest.raises(ValueError, match="layer 0 has 0 heads .it has no heads left"):
        prune_heads(model, {0: [0]})
    assert get_structure(model).heads[0] == 0


def test_unsupported_model_lists_supported_types():
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
    with pytest.raises(ValueError, match="gpt2.*bert.*register_architecture"):
        prune_heads(model, {0: [0]})


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_round_ffn_plan_uniform_gives_a_stock_model(model_type):
    model = tiny_model(model_type)
    stock_class = type(model)
    # Keeps 20, 14, 24, 12; a uniform plan names every layer, even one it leaves whole.
    plan = {0: list(range(4)), 1: list(range(10)), 2: [], 3: [0, 1, 2, 3, 5, 6, 7, 8, 9, 11, 13, 15]}
    rounded = round_ffn_plan(model, plan, uniform=True, round_to=8)  # mean 17.5 -> 16 for every layer
    prune_ffn_neurons(model, rounded)
    assert get_structure(model).ffn == (16, 16, 16, 16)
    assert type(model) is stock_class and get_spec(model).intermediate_size(model.config) == 16
    # As little of the plan changes as possible: layers that must lose more lose all their planned neurons, layers
    # that must lose fewer lose only planned ones.
    assert set(plan[0]) < set(rounded[0]) and len(rounded[2]) == 8
    assert set(rounded[1]) < set(plan[1]) and set(rounded[3]) < set(plan[3])


def test_round_ffn_plan_uses_scores_and_multiples():
    model = tiny_model("bert")
    scores = {0: torch.arange(24.0), 1: -torch.arange(24.0)}
    # Layer 0 plans to keep 19 -> 16, so it also loses the 3 lowest-scored other neurons (0, 1, 2). Layer 1 plans to
    # keep 13 -> 16, so 3 planned neurons stay: the highest-scored, 13, 14, 15. Layers 2 and 3 lose nothing.
    plan = {0: [10, 11, 12, 13, 14], 1: list(range(13, 24))}
    rounded = round_ffn_plan(model, plan, round_to=8, scores=scores)
    assert rounded == {0: [0, 1, 2, 10, 11, 12, 13, 14], 1: list(range(16, 24))}
    assert round_ffn_plan(model, plan) == {0: plan[0], 1: plan[1]}  # round_to=1: the plan as it is
    with pytest.raises(ValueError, match="round_to=0 must be a positive integer"):
        round_ffn_plan(model, plan, round_to=0)
    with pytest.raises(ValueError, match=r"scores\[0\] has 3 values but layer 0 has 24"):
        round_ffn_plan(model, plan, round_to=8, scores={0: torch.ones(3), 1: torch.ones(24)})


def test_round_ffn_plan_multiple_of_is_a_deprecated_round_to():
    model = tiny_model("bert")
    scores = {0: torch.arange(24.0), 1: -torch.arange(24.0)}
    plan = {0: [10, 11, 12, 13, 14], 1: list(range(13, 24))}
    with pytest.warns(FutureWarning, match=r"multiple_of=\.\.\.\) is deprecated: pass round_to"):
        rounded = round_ffn_plan(model, plan, multiple_of=8, scores=scores)
    assert rounded == round_ffn_plan(model, plan, round_to=8, scores=scores)
    with pytest.raises(ValueError, match="multiple_of=0 must be a positive integer"), pytest.warns(FutureWarning):
        round_ffn_plan(model, plan, multiple_of=0)
    with pytest.raises(ValueError, match="were both given; pass only round_to"):
        round_ffn_plan(model, plan, multiple_of=8, round_to=4)


@pytest.mark.parametrize(
    ("width", "round_to", "limit", "down", "expected"),
    [
        (37.5, 8, 64, False, 40),  # nearest multiple
        (36, 8, 64, False, 40),  # a tie goes up, as int(x + 0.5) does
        (37.5, 8, 64, True, 32),  # down: budgets are met from below
        (70, 8, 64, False, 64),  # never above the limit
        (70, 8, 60, False, 56),  # nor above the limit's own multiple
        (13, 1, 24, False, 13),  # round_to=1: no rounding
        (3, 8, 24, True, 0),
    ],
)
def test_round_width(width, round_to, limit, down, expected):
    assert round_width(width, round_to, limit, down=down) == expected


def test_unit_feature_indices():
    assert unit_feature_indices([0, 2], 3).tolist() == [0, 1, 2, 6, 7, 8]
    assert unit_feature_indices([5, 1], 1).tolist() == [5, 1]
    assert unit_feature_indices([], 4).shape == (0,)


def _learnable_dataset():
    """32 sequences; the label says whether token 7 is in the sequence."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(8, 99, (32, 8), generator=generator)
    input_ids[::2, 3] = 7
    labels = (input_ids == 7).any(dim=1).long()
    return Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})


def _train_and_check(trainer, model):
    """Train; the loss must fall and every (non-empty) parameter change."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    for name, value in before.items():
        if value.numel():
            assert not torch.equal(value, trainer.model.get_parameter(name)), f"Parameter {name} has not changed."


_TRAINING = dict(
    max_steps=30,
    per_device_train_batch_size=32,
    learning_rate=3e-3,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    disable_tqdm=True,
)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_pruned_model_trains_with_trainer(model_type, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model(model_type)
    prune_heads(model, HEAD_PLAN)
    prune_ffn_neurons(model, FFN_PLAN)
    model.train()
    args = TrainingArguments(output_dir=str(tmp_path), **_TRAINING)
    _train_and_check(Trainer(model=model, args=args, train_dataset=_learnable_dataset()), model)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_pruned_model_trains_with_distillation_trainer(model_type, tmp_path):
    from hf_compress import DistillationTrainer, DistillationTrainingArguments

    teacher = tiny_model(model_type)
    model = tiny_model(model_type)
    prune_heads(model, HEAD_PLAN)
    prune_ffn_neurons(model, FFN_PLAN)
    model.train()
    args = DistillationTrainingArguments(output_dir=str(tmp_path), alpha=0.5, temperature=2.0, **_TRAINING)
    trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=_learnable_dataset())
    teacher_state = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    _train_and_check(trainer, model)
    assert all(torch.equal(teacher.state_dict()[name], tensor) for name, tensor in teacher_state.items())
    assert any("soft_loss" in log for log in trainer.state.log_history)
