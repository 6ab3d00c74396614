"""The private transformers internals hf-compress relies on: each test fails loudly when transformers moves one.

Each internal is read in one place, whose comment says what breaks without it:

- `<AutoClass>._model_mapping`: `remote_code/modeling_hf_compress.py: auto_model_mapping` (the `auto_map` of pruned
  checkpoints, and `hf_compress.deploy.checkpoint` loading with an Auto class or without `architectures`).
- `transformers.utils.output_capturing._CAN_RECORD_REGISTRY` and `PreTrainedModel._can_record_outputs`:
  `hf_compress.structure.register_recordable_outputs` (outputs of a model whose class `record_structure` changed).
- `PreTrainedModel._can_set_attn_implementation`: overridden by the pruned twins in the remote code, so that
  `set_attn_implementation` judges the stock class's attention code, not the twin's module.
- `PretrainedConfig._attn_implementation`: read by the distillation trainer and the teacher cache (which attention a
  model runs; transformers has no public getter).
- `PreTrainedModel._auto_class`: set on the pruned twins, so that `save_pretrained` copies the modeling code.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_config, tiny_model
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    PreTrainedModel,
)

from hf_compress import prune_heads
from hf_compress.remote_code import modeling_hf_compress as remote
from hf_compress.remote_code.modeling_hf_compress import auto_model_mapping
from hf_compress.structure import register_recordable_outputs


@pytest.mark.parametrize("auto_name", remote.AUTO_CLASSES)
def test_every_auto_class_has_a_model_mapping(auto_name):
    # `auto_model_mapping` reads this attribute; its absence would leave pruned checkpoints without an `auto_map`.
    auto_class = getattr(transformers, auto_name)
    assert hasattr(auto_class, "_model_mapping"), (
        f"transformers {transformers.__version__}: {auto_name}._model_mapping"
    )
    assert auto_model_mapping(auto_class) is auto_class._model_mapping
    assert auto_model_mapping(auto_name) is auto_class._model_mapping


def test_auto_model_mapping_maps_configs_to_model_classes():
    assert auto_model_mapping(AutoModelForSequenceClassification)[BertConfig] is BertForSequenceClassification
    assert auto_model_mapping(transformers.AutoModel)[BertConfig] is BertModel
    assert auto_model_mapping(BertForSequenceClassification) is None  # a model class is not an Auto class
    assert remote.auto_class_names(BertForSequenceClassification)["AutoModelForSequenceClassification"] == (
        "BertForSequenceClassification"
    )


def test_auto_model_mapping_fails_loudly_when_the_attribute_is_gone(monkeypatch):
    monkeypatch.delattr(transformers.AutoModel, "_model_mapping")
    with pytest.raises(RuntimeError, match="has no AutoModel._model_mapping"):
        auto_model_mapping(transformers.AutoModel)


def test_can_record_registry_is_where_structure_registers_outputs():
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY  # moved or renamed: this import fails

    model = BertModel(tiny_config("bert")).eval()
    assert hasattr(model, "_can_record_outputs")
    register_recordable_outputs(model)
    assert _CAN_RECORD_REGISTRY.get(model) == model._can_record_outputs


def test_a_model_whose_class_changed_still_returns_hidden_states():
    model = BertModel(tiny_config("bert")).eval()
    prune_heads(model, {0: [0]})  # becomes its pruned twin: the class changes in place
    assert type(model) is not BertModel
    batch = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    outputs = model(**batch, output_hidden_states=True)
    assert outputs.hidden_states is not None and len(outputs.hidden_states) == model.config.num_hidden_layers + 1


def test_can_set_attn_implementation_is_the_hook_the_twins_override():
    # transformers must still ask this classmethod; if it is renamed, the twins' override is dead code and
    # `set_attn_implementation` may silently refuse to switch a pruned model.
    assert callable(getattr(PreTrainedModel, "_can_set_attn_implementation", None))
    twin = remote.compressed_class(BertForSequenceClassification)
    assert "_can_set_attn_implementation" in vars(remote.HFCompressMixin)
    assert twin._can_set_attn_implementation() == BertForSequenceClassification._can_set_attn_implementation()


def test_config_attn_implementation_tells_which_attention_runs():
    model = tiny_model("bert")
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"


def test_auto_class_is_what_save_pretrained_reads_to_copy_custom_code():
    # `compressed_class` sets `_auto_class` directly; `register_for_auto_class` is the public setter of the same field.
    twin = remote.compressed_class(BertForSequenceClassification)
    assert twin._auto_class == "AutoModelForSequenceClassification"

    class Registered(BertForSequenceClassification):
        pass

    Registered.register_for_auto_class("AutoModelForSequenceClassification")
    assert Registered._auto_class == "AutoModelForSequenceClassification"
