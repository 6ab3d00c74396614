import pytest
import torch
from conftest import ARCHITECTURES, random_batch, tiny_model
from torch import nn
from torch.nn.utils import prune
from transformers import AutoModelForSequenceClassification

from hf_compress import get_spec
from hf_compress.architectures import get_layers
from hf_compress.distillation.losses import l1_penalty
from hf_compress.pruning.unstructured import magnitude_prune, make_permanent, sparsity_report


def encoder_linears(model):
    """The default selection, found independently through the architecture spec: q/k/v/o + FFN of every layer."""
    spec = get_spec(model)
    paths = (spec.query, spec.key, spec.value, spec.attention_output, spec.ffn_in, spec.ffn_out)
    return [layer.get_submodule(path) for layer in get_layers(model) for path in paths]


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_global_pruning_reaches_the_amount_on_the_encoder_linears_only(model_type):
    model = tiny_model(model_type)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pruned = magnitude_prune(model, 0.6)

    modules = encoder_linears(model)
    assert sorted(pruned) == sorted(name for name, m in model.named_modules() if any(m is x for x in modules))
    total = sum(m.weight.numel() for m in modules)
    assert sum(int((m.weight == 0).sum()) for m in modules) == round(0.6 * total)
    # One global threshold: every pruned weight is no larger than every kept one.
    originals = torch.cat([m.weight_orig.detach().abs().flatten() for m in modules])
    masks = torch.cat([m.weight_mask.flatten() for m in modules]).bool()
    assert originals[~masks].max() <= originals[masks].min()
    # Embeddings, LayerNorms, biases and the task head are untouched.
    for name, tensor in model.state_dict().items():
        if not name.endswith(("weight_orig", "weight_mask")):
            assert torch.equal(tensor, before[name]), name


def test_layer_scope_prunes_every_module_to_the_amount():
    model = tiny_model("bert")
    magnitude_prune(model, 0.35, scope="layer")
    for module in encoder_linears(model):
        assert int((module.weight == 0).sum()) == round(0.35 * module.weight.numel())
        kept = module.weight_orig.detach().abs()[module.weight_mask.bool()]
        dropped = module.weight_orig.detach().abs()[~module.weight_mask.bool()]
        assert dropped.max() <= kept.min()


def test_pruning_again_counts_the_total_and_keeps_earlier_zeros():
    model = tiny_model("bert")
    magnitude_prune(model, 0.3)
    first_masks = [m.weight_mask.clone() for m in encoder_linears(model)]
    magnitude_prune(model, 0.7)
    report = sparsity_report(model)
    assert report.total.zeros == round(0.7 * report.total.numel)
    for module, first in zip(encoder_linears(model), first_masks, strict=True):
        assert torch.all(module.weight_mask <= first)


def test_pruning_to_less_than_the_current_sparsity_raises_and_leaves_the_model_untouched():
    model = tiny_model("bert")
    magnitude_prune(model, 0.5)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot restore weights"):
        magnitude_prune(model, 0.2)
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5, True, "0.5", None])
def test_bad_amount_raises(amount):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        magnitude_prune(tiny_model("bert"), amount)


def test_bad_scope_raises():
    with pytest.raises(ValueError, match="scope.*'global', 'layer'.*'local'"):
        magnitude_prune(tiny_model("bert"), 0.5, scope="local")


def test_pruning_keeps_the_parameter_objects_so_an_optimizer_keeps_training_them():
    model = tiny_model("bert").train()
    originals = {name: p for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    magnitude_prune(model, 0.5)
    query = model.bert.encoder.layer[0].attention.self.query
    assert query.weight_orig is originals["bert.encoder.layer.0.attention.self.query.weight"]

    before = query.weight_orig.detach().clone()
    for step in range(2):
        model(**random_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model(**random_batch())  # the forward pre-hook recomputes weight = weight_orig * weight_mask
    mask = query.weight_mask.bool()
    assert not torch.equal(query.weight_orig[mask], before[mask])  # the kept weights train
    assert torch.all(query.weight[~mask] == 0)  # the pruned ones stay zero in the weights the model uses

    make_permanent(model)
    assert query.weight is originals["bert.encoder.layer.0.attention.self.query.weight"]


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_make_permanent_leaves_a_plain_model_with_the_same_outputs(model_type):
    model = tiny_model(model_type)
    names = sorted(name for name, _ in model.named_parameters())
    magnitude_prune(model, 0.5, exclude="layer.1")
    batch = random_batch()
    pruned_logits = logits(model, batch)
    report = sparsity_report(model)

    assert len(make_permanent(model)) == 18
    assert sorted(name for name, _ in model.named_parameters()) == names  # `weight` again, not `weight_orig`
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    assert not any(prune.is_pruned(module) for module in model.modules())
    assert not any(
        isinstance(hook, prune.BasePruningMethod)
        for module in model.modules()
        for hook in module._forward_pre_hooks.values()
    )
    assert torch.equal(logits(model, batch), pruned_logits)
    assert sparsity_report(model).to_dict() == report.to_dict()
    assert make_permanent(model) == []


def test_sparse_checkpoint_reloads_with_stock_from_pretrained(tmp_path):
    model = tiny_model("bert")
    magnitude_prune(model, 0.8)
    make_permanent(model)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    batch = random_batch()
    assert torch.equal(logits(reloaded.eval(), batch), logits(model, batch))
    assert sparsity_report(reloaded).total.zeros == round(0.8 * sparsity_report(reloaded).total.numel)


def test_include_and_exclude_patterns_select_modules():
    model = tiny_model("bert")
    pruned = magnitude_prune(model, 0.5, include="attention", exclude=["*.layer.3.*", "key"])
    assert len(pruned) == 3 * 3  # q, v, o of layers 0-2
    assert all(".attention." in name and ".key" not in name and ".layer.3." not in name for name in pruned)

    head = tiny_model("bert")
    assert magnitude_prune(head, 0.5, include="classifier") == ["classifier"]  # the head only when asked for
    assert int((head.classifier.weight == 0).sum()) == head.classifier.weight.numel() // 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(include="querry"), r"'querry' matches no module.*query"),
        (dict(exclude=["layer.0", "attention.self.kee"]), r"exclude pattern 'attention.self.kee'.*key"),
        (dict(include="LayerNorm"), "no nn.Linear"),
        (dict(include=[]), "non-empty list"),
        (dict(include="attention.self.query", exclude="query"), "No nn.Linear module is left"),
    ],
)
def test_unknown_or_empty_patterns_raise_with_candidates(kwargs, message):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=message):
        magnitude_prune(model, 0.5, **kwargs)
    assert not any(prune.is_pruned(module) for module in model.modules())


def test_tied_weights_are_refused():
    model = tiny_model("bert", task="masked-lm")
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="tied"):
        magnitude_prune(model, 0.5, include="decoder")


def test_unregistered_architecture_needs_include():
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(ValueError, match="gpt2.*include="):
        magnitude_prune(GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)), 0.5)


def test_sparsity_report_counts_module_and_model_zeros():
    model = tiny_model("bert")
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[:3] = 0.0
    magnitude_prune(model, 0.4, scope="layer")
    report = sparsity_report(model)

    assert list(report.modules) == [n for n, m in model.named_modules() if any(m is x for x in encoder_linears(model))]
    query = report.modules["bert.encoder.layer.0.attention.self.query"]
    assert (query.zeros, query.numel) == (round(0.4 * 256), 256)
    assert report.total.zeros == sum(entry.zeros for entry in report.modules.values())
    plain = tiny_model("bert")
    with torch.no_grad():
        plain.bert.embeddings.word_embeddings.weight[:3] = 0.0
    magnitude_prune(plain, 0.4, scope="layer")
    make_permanent(plain)
    expected_zeros = sum(int((p == 0).sum()) for p in plain.parameters())
    assert (report.model.zeros, report.model.numel) == (expected_zeros, sum(p.numel() for p in plain.parameters()))
    assert report.model.zeros >= report.total.zeros + 3 * 16  # the zeroed embedding rows count too

    table = str(report)
    assert "bert.encoder.layer.3.output.dense" in table and "total (selected weights)" in table
    assert report.to_dict()["total"] == {
        "zeros": report.total.zeros,
        "numel": report.total.numel,
        "sparsity": report.total.zeros / report.total.numel,
    }


def test_l1_penalty_equals_the_sum_of_absolute_weights():
    model = tiny_model("bert")
    expected = sum(module.weight.abs().sum() for module in encoder_linears(model))
    assert torch.allclose(l1_penalty(model), expected)
    assert torch.allclose(l1_penalty(model, include="classifier"), model.classifier.weight.abs().sum())

    magnitude_prune(model, 0.5)
    pruned = sum((module.weight_orig * module.weight_mask).abs().sum() for module in encoder_linears(model))
    penalty = l1_penalty(model)
    assert torch.allclose(penalty, pruned) and penalty < expected

    penalty.backward()
    query = model.bert.encoder.layer[0].attention.self.query
    assert torch.equal(query.weight_orig.grad, torch.sign(query.weight_orig.detach()) * query.weight_mask)
    assert query.bias.grad is None and model.classifier.weight.grad is None


def test_l1_penalty_rejects_unknown_modules():
    with pytest.raises(ValueError, match="matches no module"):
        l1_penalty(tiny_model("bert"), include="not_a_module")


def test_only_linear_weights_are_selected():
    model = tiny_model("bert")
    magnitude_prune(model, 0.5, include="encoder")
    pruned = {module for module in model.modules() if prune.is_pruned(module) and not list(module.children())}
    assert pruned and all(isinstance(module, nn.Linear) for module in pruned)
    assert all(module.bias is not None and not hasattr(module, "bias_mask") for module in pruned)
