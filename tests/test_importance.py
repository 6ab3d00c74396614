"""Head, neuron and layer importance: dead units score lowest, per-example gradients are exact, hooks never leak."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHITECTURES, random_batch, tiny_model
from safetensors.torch import save_file

from hf_compress import ImportanceScores, compute_importance, compute_layer_importance, drop_layers, prune_heads
from hf_compress.architectures import get_layers, get_spec
from hf_compress.pruning.unit_masks import UnitMasks

DEAD_LAYER, DEAD_HEAD, DEAD_NEURON = 1, 2, 5


def _batches(num: int = 3, **kwargs) -> list[dict]:
    return [random_batch(seed=i, **kwargs) for i in range(num)]


def _kill_units(model) -> None:
    """Zero one head's and one neuron's output-projection columns: they can no longer affect anything."""
    spec = get_spec(model)
    layer = get_layers(model)[DEAD_LAYER]
    head_dim = spec.head_dim(model.config)
    with torch.no_grad():
        layer.get_submodule(spec.attention_output).weight[:, DEAD_HEAD * head_dim : (DEAD_HEAD + 1) * head_dim] = 0
        layer.get_submodule(spec.ffn_out).weight[:, DEAD_NEURON] = 0


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("method", ["magnitude", "taylor", "fisher"])
def test_dead_units_score_lowest(model_type, method):
    model = tiny_model(model_type)
    _kill_units(model)
    scores = compute_importance(model, _batches(), method=method, show_progress=False)
    heads, ffn = scores.heads[DEAD_LAYER], scores.ffn[DEAD_LAYER]
    assert heads[DEAD_HEAD] == 0 and ffn[DEAD_NEURON] == 0
    assert int(heads.argmin()) == DEAD_HEAD and int(ffn.argmin()) == DEAD_NEURON
    others = torch.cat([heads[torch.arange(len(heads)) != DEAD_HEAD], ffn[torch.arange(len(ffn)) != DEAD_NEURON]])
    assert (others > 0).all()
    assert [len(s) for s in scores.heads] == [4] * 4 and [len(s) for s in scores.ffn] == [24] * 4


def test_per_example_gradients_match_batches_of_one():
    """One backward per batch yields each example's own mask gradient: scoring a batch equals scoring its rows."""
    model = tiny_model("bert")
    batch = random_batch(batch_size=4)
    rows = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(4)]
    for method in ("fisher", "taylor"):
        together = compute_importance(model, [batch], method=method, show_progress=False)
        one_by_one = compute_importance(model, rows, method=method, show_progress=False)
        assert together.num_examples == one_by_one.num_examples == 4
        for a, b in zip(together.heads + together.ffn, one_by_one.heads + one_by_one.ffn, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=0)


def test_taylor_score_is_the_loss_derivative():
    """|dL/dm| of a head equals the finite-difference derivative of the loss when its output is scaled by m."""
    model = tiny_model("bert").double()
    batch = random_batch(batch_size=1)
    scores = compute_importance(model, [batch], method="taylor", show_progress=False)
    spec, layer, head = get_spec(model), 2, 1
    head_dim = spec.head_dim(model.config)
    weight = get_layers(model)[layer].get_submodule(spec.attention_output).weight

    def loss_with_scale(scale: float) -> float:
        probe = copy.deepcopy(model)
        probe_weight = get_layers(probe)[layer].get_submodule(spec.attention_output).weight
        with torch.no_grad():
            probe_weight[:, head * head_dim : (head + 1) * head_dim] = (
                weight[:, head * head_dim : (head + 1) * head_dim] * scale
            )
        with torch.no_grad():
            return float(probe(**batch).loss)

    eps = 1e-4
    derivative = (loss_with_scale(1 + eps) - loss_with_scale(1 - eps)) / (2 * eps)
    assert scores.heads[layer][head].item() == pytest.approx(abs(derivative), rel=1e-4)


def test_without_labels_uses_own_predictions():
    model = tiny_model("bert")
    labelled = random_batch()
    unlabelled = {k: v for k, v in labelled.items() if k != "labels"}
    predicted = {**unlabelled, "labels": model(**unlabelled).logits.argmax(-1)}
    a = compute_importance(model, [unlabelled], method="fisher", show_progress=False)
    b = compute_importance(model, [predicted], method="fisher", show_progress=False)
    for x, y in zip(a.heads + a.ffn, b.heads + b.ffn, strict=True):
        torch.testing.assert_close(x, y)


def test_scoring_leaves_model_untouched():
    model = tiny_model("bert").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hook_count(model)
    compute_importance(model, _batches(), method="fisher", show_progress=False)
    compute_layer_importance(model, _batches(), method="loss", show_progress=False)
    assert model.training
    assert _hook_count(model) == hooks
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hooks_removed_after_exception():
    model = tiny_model("bert")
    hooks = _hook_count(model)

    def failing_batches():
        yield random_batch()
        raise RuntimeError("the dataloader broke")

    with pytest.raises(RuntimeError, match="dataloader broke"):
        compute_importance(model, failing_batches(), method="taylor", show_progress=False)
    assert _hook_count(model) == hooks
    with pytest.raises(RuntimeError, match="inside"):
        with UnitMasks(model, per_example=True, skip_layers=[0]):
            assert _hook_count(model) > hooks
            raise RuntimeError("inside")
    assert _hook_count(model) == hooks
    with pytest.raises(ValueError, match="input_ids"):
        compute_importance(model, [{"labels": torch.tensor([0])}], method="fisher", show_progress=False)
    assert _hook_count(model) == hooks


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_pruned_model_with_empty_layer(model_type):
    model = tiny_model(model_type)
    prune_heads(model, {0: [0, 1, 2, 3], 2: [1]})
    for method in ("magnitude", "fisher"):
        scores = compute_importance(model, _batches(), method=method, show_progress=False)
        assert [len(s) for s in scores.heads] == [0, 4, 3, 4]
        assert all(len(s) == 24 for s in scores.ffn)


def test_save_load_roundtrip(tmp_path):
    model = tiny_model("bert")
    prune_heads(model, {0: [0, 1, 2, 3]})
    scores = compute_importance(model, _batches(), method="fisher", show_progress=False)
    scores.layers = compute_layer_importance(model, _batches(), show_progress=False)
    scores.save(tmp_path / "scores.safetensors")
    loaded = ImportanceScores.load(tmp_path / "scores.safetensors")
    assert loaded.method == "fisher" and loaded.num_examples == scores.num_examples == 12
    for a, b in zip(
        scores.heads + scores.ffn + [scores.layers], loaded.heads + loaded.ffn + [loaded.layers], strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    save_file({"heads.0": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not an hf-compress importance file"):
        ImportanceScores.load(tmp_path / "other.safetensors")


def test_layer_importance_loss_is_the_loss_increase_when_skipped():
    model = tiny_model("bert")
    batch = random_batch()
    scores = compute_layer_importance(model, [batch], method="loss", show_progress=False)
    with torch.no_grad():
        base = float(model(**batch).loss)
        for index in range(4):
            shallower = copy.deepcopy(model)
            drop_layers(shallower, [index])
            assert scores[index].item() == pytest.approx(float(shallower(**batch).loss) - base, abs=1e-5)


def test_layer_importance_cosine_finds_a_dead_layer():
    model = tiny_model("bert")
    spec = get_spec(model)
    layer = get_layers(model)[2]
    with torch.no_grad():  # the layer adds nothing to its input; its (default) LayerNorm keeps the normalised input
        for path in (spec.attention_output, spec.ffn_out):
            layer.get_submodule(path).weight.zero_()
            layer.get_submodule(path).bias.zero_()
    scores = compute_layer_importance(model, _batches(), method="cosine", show_progress=False)
    assert int(scores.argmin()) == 2 and scores[2] < 1e-4


def test_bad_arguments():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="'fishr'.*magnitude, taylor, fisher"):
        compute_importance(model, _batches(), method="fishr")
    with pytest.raises(ValueError, match="needs data"):
        compute_importance(model, None, method="fisher")
    with pytest.raises(ValueError, match="no batches"):
        compute_importance(model, [], method="fisher", show_progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        compute_importance(model, _batches(), num_batches=0)
    with pytest.raises(ValueError, match="'cos'"):
        compute_layer_importance(model, _batches(), method="cos")
