import dataclasses

import pytest
from conftest import ARCHITECTURES, tiny_model

from hf_compress import get_spec, register_architecture, supported_model_types
from hf_compress.architectures import _REGISTRY, get_layers


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_spec_paths_resolve_to_linear_layers(model_type):
    model = tiny_model(model_type)
    spec = get_spec(model)
    layers = get_layers(model)
    assert len(layers) == spec.num_layers(model.config) == 4
    hidden = spec.hidden_size(model.config)
    for layer in layers:
        for path in (spec.query, spec.key, spec.value):
            assert layer.get_submodule(path).weight.shape == (hidden, hidden)
        assert layer.get_submodule(spec.attention_output).weight.shape == (hidden, hidden)
        assert layer.get_submodule(spec.ffn_in).out_features == spec.intermediate_size(model.config)
        assert layer.get_submodule(spec.ffn_out).in_features == spec.intermediate_size(model.config)


def test_unsupported_model_lists_supported_types():
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
    with pytest.raises(ValueError, match="gpt2.*bert.*register_architecture"):
        get_spec(model)


def test_register_refuses_silent_overwrite():
    spec = get_spec(tiny_model("bert").config)
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(spec)
    register_architecture(dataclasses.replace(spec, model_type="my-bert"))
    try:
        assert "my-bert" in supported_model_types()
    finally:
        _REGISTRY.pop("my-bert")
