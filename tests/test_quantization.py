import pytest
import torch
from conftest import ARCHITECTURES, random_batch, tiny_model
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from transformers import AutoModelForSequenceClassification

from hf_compress.deploy.quantization import from_pretrained_int8, quantize_dynamic_int8
from hf_compress.pruning.structured import prune_ffn_neurons, prune_heads
from hf_compress.pruning.unstructured import magnitude_prune, make_permanent

# The stated tolerance on these tiny random models: int8 outputs differ from fp32 by at most 5% of the largest fp32
# output (measured: 1.1-3.3%). On the real SST-2 MiniLM teacher the benchmark measures accuracy instead.
RELATIVE_TOLERANCE = 0.05


def outputs(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def assert_close_to_fp32(quantized, reference):
    assert not torch.equal(quantized, reference)  # the int8 kernels really ran
    assert (quantized - reference).abs().max() <= RELATIVE_TOLERANCE * reference.abs().max()


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("task", ["sequence-classification", "masked-lm"])
def test_int8_outputs_stay_within_tolerance_and_the_fp32_model_is_untouched(model_type, task):
    model = tiny_model(model_type, task=task)
    batch = random_batch()
    reference = outputs(model, batch)

    quantized = quantize_dynamic_int8(model)
    assert not any(type(module) is nn.Linear for module in quantized.modules())
    int8_linears = [module for module in quantized.modules() if isinstance(module, DynamicQuantizedLinear)]
    assert int8_linears and all(m.weight().qscheme() == torch.per_channel_affine for m in int8_linears)
    assert_close_to_fp32(outputs(quantized, batch), reference)

    assert all(type(module) is not DynamicQuantizedLinear for module in model.modules())
    assert torch.equal(outputs(model, batch), reference)


def test_magnitude_pruned_model_quantizes_without_its_pruning_hooks():
    model = tiny_model("bert")
    magnitude_prune(model, 0.7)
    batch = random_batch()
    reference = outputs(model, batch)

    quantized = quantize_dynamic_int8(model)
    assert not any(name.endswith("_mask") for name, _ in quantized.named_buffers())
    assert all(not module._forward_pre_hooks for module in quantized.modules())
    assert_close_to_fp32(outputs(quantized, batch), reference)
    assert hasattr(model.bert.encoder.layer[0].attention.self.query, "weight_mask")  # the input keeps its masks


def test_quantized_model_refuses_save_pretrained(tmp_path):
    quantized = quantize_dynamic_int8(tiny_model("bert"))
    with pytest.raises(ValueError, match="from_pretrained_int8"):
        quantized.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


def test_fp32_checkpoint_loads_as_the_identical_int8_model(tmp_path):
    model = tiny_model("bert")
    magnitude_prune(model, 0.5)
    make_permanent(model)
    model.save_pretrained(tmp_path)
    batch = random_batch()

    loaded = from_pretrained_int8(tmp_path, AutoModelForSequenceClassification)
    quantized = quantize_dynamic_int8(model)
    assert not loaded.training
    assert torch.equal(outputs(loaded, batch), outputs(quantized, batch))
    for name, module in quantized.named_modules():
        if isinstance(module, DynamicQuantizedLinear):
            assert torch.equal(loaded.get_submodule(name).weight().int_repr(), module.weight().int_repr()), name


def test_bad_model_class_raises(tmp_path):
    with pytest.raises(ValueError, match="AutoModelForSequenceClassification"):
        from_pretrained_int8(tmp_path, nn.Linear)


def test_model_off_cpu_raises():
    model = tiny_model("bert").to("meta")
    with pytest.raises(ValueError, match=r"CPU.*meta.*model.to\('cpu'\)"):
        quantize_dynamic_int8(model)


def test_structurally_emptied_layers_stay_fp32_and_the_rest_is_int8():
    model = tiny_model("bert").eval()
    prune_heads(model, {1: [0, 1, 2, 3]})  # layer 1 keeps no attention head
    prune_ffn_neurons(model, {2: list(range(model.config.intermediate_size))})  # layer 2 keeps no FFN neuron
    batch = random_batch()
    quantized = quantize_dynamic_int8(model)
    layers = quantized.bert.encoder.layer
    assert type(layers[1].attention.output.dense) is nn.Linear  # empty: left as it is
    assert type(layers[2].output.dense) is nn.Linear
    assert isinstance(layers[0].attention.output.dense, DynamicQuantizedLinear)
    assert isinstance(layers[1].intermediate.dense, DynamicQuantizedLinear)
    with torch.no_grad():
        torch.testing.assert_close(quantized(**batch).logits, model(**batch).logits, atol=0.05, rtol=0)
