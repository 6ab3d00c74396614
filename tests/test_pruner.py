"""`prune`: budgets met within one unit, least-squares rescaling that helps, plans that replay exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHITECTURES, random_batch, tiny_model
from transformers import AutoModelForSequenceClassification

from hf_compress import (
    PruningConfig,
    apply_plan,
    compute_importance,
    get_structure,
    load_plan,
    prune,
    prune_heads,
    save_plan,
)
from hf_compress.architectures import get_layers, get_spec
from hf_compress.pruning.search import Selection, UnitCosts, balance_kinds, unit_costs


def _batches(num: int = 4, **kwargs) -> list[dict]:
    return [random_batch(batch_size=8, seq_len=12, seed=i, **kwargs) for i in range(num)]


def _prunable_cost(model, target: str, seq_len: int = 128) -> float:
    """Cost of the heads and FFN neurons, computed from the module shapes (independently of mask_search)."""
    spec = get_spec(model)
    structure = get_structure(model)
    hidden, head_dim = spec.hidden_size(model.config), structure.head_dim
    total = 0.0
    for heads, ffn in zip(structure.heads, structure.ffn, strict=True):
        if target == "params":
            total += heads * (4 * hidden * head_dim + 3 * head_dim) + ffn * (2 * hidden + 1)
        else:
            total += heads * (8 * hidden * head_dim + 4 * seq_len * head_dim) + ffn * 4 * hidden
    return total


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("target", ["flops", "params"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("keep", [0.3, 0.55, 0.8])
def test_budget_met_within_one_unit(target, scope, keep):
    model = tiny_model("bert", intermediate_size=48)
    before = _prunable_cost(model, target)
    config = PruningConfig(target=target, keep=keep, scope=scope, importance="magnitude", rescale=False)
    report = prune(model, config, show_progress=False)
    after = _prunable_cost(model, target)
    costs = unit_costs(model, target, 128)
    # Never over budget, and less than one unit (per layer with scope="layer") below it.
    slack_limit = costs.head * (4 if scope == "layer" else 1)
    assert 0 <= keep * before - after < slack_limit
    if target == "flops":  # the report's independent FLOPs count agrees
        assert report.after.flops_per_token == pytest.approx(after)
        assert report.flops_ratio == pytest.approx(after / before)


def test_fisher_budget_uses_the_cheaper_unit():
    """With data-driven scores the search fills the budget up to less than one neuron (the smallest unit)."""
    model = tiny_model("bert", intermediate_size=48)
    before = _prunable_cost(model, "flops")
    prune(model, PruningConfig(keep=0.5, rescale=False), dataloader=_batches(), show_progress=False)
    assert 0 <= 0.5 * before - _prunable_cost(model, "flops") < unit_costs(model, "flops", 128).head
    structure = get_structure(model)
    assert sum(structure.ffn) < 4 * 48, "some neurons remain removable, so the slack must be below one neuron"
    assert 0.5 * before - _prunable_cost(model, "flops") < unit_costs(model, "flops", 128).neuron


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_plan_replays_to_identical_weights(tmp_path, model_type):
    model = tiny_model(model_type)
    fresh = copy.deepcopy(model)
    report = prune(model, PruningConfig(keep=0.5, layers=[2]), dataloader=_batches(), show_progress=False)
    assert report.plan["scales"]["heads"] or report.plan["scales"]["ffn"], "rescaling changed nothing"
    save_plan(report.plan, tmp_path / "plan.json")
    apply_plan(fresh, load_plan(tmp_path / "plan.json"))
    pruned, replayed = model.state_dict(), fresh.state_dict()
    assert pruned.keys() == replayed.keys()
    for name, tensor in pruned.items():
        assert torch.equal(tensor, replayed[name]), name
    batch = random_batch()
    torch.testing.assert_close(model(**batch).logits, fresh(**batch).logits, rtol=0, atol=0)
    assert get_structure(model).num_layers == 3 and report.removed_layers == [2]


def test_rescale_reduces_reconstruction_error():
    """The least-squares scales lower the error of the first pruned layer's output (residual + FFN, before its norm)."""
    reference = tiny_model("bert", intermediate_size=48)
    batches = _batches()
    config = PruningConfig(target="ratios", ffn_keep=0.5, scope="layer", rescale_damping=1e-3)
    plain, rescaled = copy.deepcopy(reference), copy.deepcopy(reference)
    scores = compute_importance(reference, batches, show_progress=False)
    prune(plain, PruningConfig(**{**config.to_dict(), "rescale": False}), batches, scores=scores, show_progress=False)
    prune(rescaled, config, batches, scores=scores, show_progress=False)

    def layer0_pre_norm_output(model) -> torch.Tensor:
        spec = get_spec(model)
        layer = get_layers(model)[0]
        captured = {}
        hooks = [
            layer.get_submodule(spec.ffn_in).register_forward_pre_hook(lambda m, a: captured.update(residual=a[0])),
            layer.get_submodule(spec.ffn_out).register_forward_hook(lambda m, a, o: captured.update(out=o)),
        ]
        outputs = []
        with torch.no_grad():
            for batch in batches:
                model(**batch)
                mask = batch["attention_mask"].bool()
                outputs.append((captured["residual"] + captured["out"])[mask])
        for hook in hooks:
            hook.remove()
        return torch.cat(outputs)

    target = layer0_pre_norm_output(reference)
    error_plain = (layer0_pre_norm_output(plain) - target).square().sum()
    error_rescaled = (layer0_pre_norm_output(rescaled) - target).square().sum()
    assert error_rescaled < 0.9 * error_plain
    logits = [torch.cat([m(**b).logits for b in batches]) for m in (reference, plain, rescaled)]
    assert (logits[2] - logits[0]).square().mean() < (logits[1] - logits[0]).square().mean()


def test_uniform_gives_a_stock_checkpoint(tmp_path):
    model = tiny_model("bert")
    prune(
        model,
        PruningConfig(target="params", keep=0.8, uniform=True, round_to=4),
        dataloader=_batches(),
        show_progress=False,
    )
    structure = get_structure(model)
    assert structure.is_stock and structure.ffn[0] % 4 == 0 and structure.ffn[0] < 24
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = random_batch()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_round_to_keeps_multiples():
    model = tiny_model("bert", intermediate_size=48)
    prune(model, PruningConfig(keep=0.5, round_to=8, rescale=False), dataloader=_batches(), show_progress=False)
    assert all(width % 8 == 0 for width in get_structure(model).ffn)


def test_already_pruned_model_and_layer_count():
    model = tiny_model("bert")
    prune_heads(model, {1: [0, 1, 2, 3], 3: [0]})
    before = _prunable_cost(model, "flops")
    report = prune(model, PruningConfig(keep=0.6, layers=1), dataloader=_batches(), show_progress=False)
    assert len(report.removed_layers) == 1 and get_structure(model).num_layers == 3
    assert _prunable_cost(model, "flops") <= 0.6 * before


def test_ratios():
    model = tiny_model("bert")
    prune(model, PruningConfig(target="ratios", head_keep=0.75, ffn_keep=0.5), _batches(), show_progress=False)
    structure = get_structure(model)
    assert sum(structure.heads) == 12 and sum(structure.ffn) == 48


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_deprecated_ratio_names_prune_exactly_as_the_fractions_kept(scope):
    """`head_ratio` / `ffn_ratio` (fractions removed) still work, with a FutureWarning, and remove the same units."""
    with pytest.warns(FutureWarning, match=r"head_ratio=\.\.\.\) is deprecated: pass head_keep=0\.75"):
        old = PruningConfig(target="ratios", head_ratio=0.25, ffn_ratio=0.5, scope=scope, rescale=False)
    new = PruningConfig(target="ratios", head_keep=0.75, ffn_keep=0.5, scope=scope, rescale=False)
    assert old == new and old.to_dict() == new.to_dict()
    models = [tiny_model("bert") for _ in range(2)]
    plans = [prune(m, c, _batches(), show_progress=False).plan for m, c in zip(models, (old, new), strict=True)]
    assert plans[0] == plans[1]
    assert all(torch.equal(a, b) for a, b in zip(_state(models[0]).values(), _state(models[1]).values(), strict=True))


def test_failures_leave_the_model_untouched():
    model = tiny_model("bert")
    before = _state(model)
    with pytest.raises(ValueError, match="needs calibration data"):
        prune(model, PruningConfig(keep=0.5), show_progress=False)
    with pytest.raises(ValueError, match="uniform=True keeps every attention head"):
        prune(model, PruningConfig(keep=0.1, uniform=True), dataloader=_batches(), show_progress=False)
    other = tiny_model("bert")
    prune_heads(other, {0: [1]})
    scores = compute_importance(other, _batches(), show_progress=False)
    with pytest.raises(ValueError, match="scores are for heads"):
        prune(model, PruningConfig(keep=0.5, rescale=False), scores=scores, show_progress=False)
    plan = prune(copy.deepcopy(other), PruningConfig(keep=0.5), _batches(), show_progress=False).plan
    with pytest.raises(ValueError, match="was made for"):
        apply_plan(model, plan)
    broken = copy.deepcopy(prune(copy.deepcopy(model), PruningConfig(keep=0.5), _batches(), show_progress=False).plan)
    broken["remove"]["ffn"]["3"] = [0, 0]
    with pytest.raises(ValueError, match="each once"):
        apply_plan(model, broken)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": 0}, r"keep=0 must be in \(0, 1\]"),
        ({"keep": 1.5}, r"keep=1.5"),
        ({"target": "time"}, "'time' is not supported; choose one of flops, params, ratios, latency"),
        ({"importance": "l1"}, "importance='l1'"),
        ({"scope": "model"}, "scope='model'"),
        ({"head_ratio": 0.5}, "only applies with target='ratios'"),
        ({"head_keep": 0.5}, "head_keep=0.5 only applies with target='ratios'"),
        ({"target": "ratios"}, "needs at least one of head_keep or ffn_keep below 1, or layers"),
        ({"target": "ratios", "head_keep": 1.0, "ffn_keep": 1}, "needs at least one of head_keep or ffn_keep"),
        ({"target": "ratios", "ffn_ratio": 1.0}, r"ffn_ratio=1.0 must be in \[0, 1\)"),
        ({"target": "ratios", "ffn_keep": 0.0}, r"ffn_keep=0.0 must be in \(0, 1\]: the fraction of FFN neurons"),
        ({"target": "ratios", "head_keep": 1.5}, r"head_keep=1.5 must be in \[0, 1\]: the fraction of attention"),
        ({"target": "ratios", "head_ratio": 0.5, "uniform": True}, "uniform=True keeps every attention head"),
        ({"target": "ratios", "head_keep": 0.5, "uniform": True}, "uniform=True keeps every attention head"),
        ({"target": "ratios", "head_ratio": 0.5, "head_keep": 0.5}, "were both given; pass only head_keep"),
        ({"round_to": 0}, "round_to=0"),
        ({"layers": [1, 1]}, "more than once"),
        ({"layers": -1}, "layers=-1"),
        ({"seq_len": 0}, "seq_len=0"),
        ({"rescale_damping": -1.0}, "rescale_damping=-1.0"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)


def test_report_contents():
    model = tiny_model("bert")
    report = prune(model, PruningConfig(keep=0.5), dataloader=_batches(), show_progress=False)
    data = report.to_dict()
    assert data["flops_ratio"] == pytest.approx(report.flops_ratio) and report.flops_ratio <= 0.5
    assert data["after"]["heads_per_layer"] == list(get_structure(model).heads)
    removed = sum(len(v) for v in report.removed_heads.values())
    assert sum(data["before"]["heads_per_layer"]) - sum(data["after"]["heads_per_layer"]) == removed
    assert "encoder FLOPs/token" in str(report)


def test_balance_kinds_gives_both_kinds_the_same_mean_importance_per_cost():
    heads = [torch.tensor([1.0, 3.0]), torch.tensor([2.0])]
    ffn = [torch.tensor([1e-6, 5e-6, 3e-6]), torch.tensor([2e-6])]
    balanced_heads, balanced_ffn = balance_kinds(heads, ffn, UnitCosts(head=100.0, neuron=2.0))
    assert torch.cat(balanced_heads).mean() / 100 == pytest.approx(1.0)
    assert torch.cat(balanced_ffn).mean() / 2 == pytest.approx(1.0)
    for before, after in zip(heads + ffn, balanced_heads + balanced_ffn, strict=True):
        assert torch.equal(before.argsort(), after.argsort())  # ranks within a kind are unchanged


def test_magnitude_prunes_heads_and_neurons_alike():
    """Unbalanced weight norms would favour one kind wholesale (e.g. remove every head)."""
    model = tiny_model("bert", intermediate_size=48)
    prune(model, PruningConfig(keep=0.5, importance="magnitude", rescale=False), show_progress=False)
    structure = get_structure(model)
    assert 0 < sum(structure.heads) < 16 and 0 < sum(structure.ffn) < 4 * 48


def test_selection_removed_lists_what_each_kept_layer_loses():
    structure = get_structure(tiny_model("bert"))  # 4 layers of 4 heads and 24 neurons
    selection = Selection(
        heads=[[0, 2, 3], [], [0, 1, 2, 3], []],
        ffn=[list(range(24)), list(range(1, 24)), list(range(12)), []],
        layers=[3],
    )
    heads, ffn = selection.removed(structure)
    # Layer 1 loses every head, layer 3 goes whole (not listed), untouched layers are left out.
    assert heads == {0: [1], 1: [0, 1, 2, 3]}
    assert ffn == {1: [0], 2: list(range(12, 24))}
