"""Where each supported architecture keeps its layers, attention projections and FFN.

Everything in hf-compress that edits a model (pruning, student construction, importance hooks) finds modules through
this registry instead of hard-coding attribute names, so supporting a new encoder is one `register_architecture` call:

```python
from hf_compress import ArchitectureSpec, register_architecture

register_architecture(
    ArchitectureSpec(
        model_type="my-bert",
        layers="encoder.layer",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attention_output="attention.output.dense",
        attention_core="attention.self",
        ffn_in="intermediate.dense",
        ffn_out="output.dense",
    )
)
```
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths of one encoder family. Layer-relative paths are dotted attribute names below one layer.

    Args:
        model_type: The `config.model_type` this spec serves.
        layers: Path of the `nn.ModuleList` of transformer layers, relative to the base model.
        query, key, value: The attention input projections (`nn.Linear`, output features = heads * head_dim).
        attention_output: The attention output projection (`nn.Linear`, input features = heads * head_dim).
        attention_core: The module that turns hidden states into per-head attention outputs. A layer that loses all
            its heads gets this module replaced by an empty one (there is nothing left to attend with).
        attention_core_keeps: Child of `attention_core` to keep inside the empty replacement, when the output
            projection lives inside the core (DistilBERT's `out_lin`); `None` when it lives outside (BERT).
        ffn_in: The FFN up projection (`nn.Linear`, output features = intermediate size).
        ffn_out: The FFN down projection (`nn.Linear`, input features = intermediate size).
        num_layers_attr, num_heads_attr, intermediate_size_attr, hidden_size_attr: Config field names.
    """

    model_type: str
    layers: str
    query: str
    key: str
    value: str
    attention_output: str
    attention_core: str
    ffn_in: str
    ffn_out: str
    attention_core_keeps: str | None = None
    num_layers_attr: str = "num_hidden_layers"
    num_heads_attr: str = "num_attention_heads"
    intermediate_size_attr: str = "intermediate_size"
    hidden_size_attr: str = "hidden_size"

    def num_layers(self, config: PretrainedConfig) -> int:
        return getattr(config, self.num_layers_attr)

    def num_heads(self, config: PretrainedConfig) -> int:
        return getattr(config, self.num_heads_attr)

    def head_dim(self, config: PretrainedConfig) -> int:
        return getattr(config, self.hidden_size_attr) // getattr(config, self.num_heads_attr)

    def intermediate_size(self, config: PretrainedConfig) -> int:
        return getattr(config, self.intermediate_size_attr)

    def hidden_size(self, config: PretrainedConfig) -> int:
        return getattr(config, self.hidden_size_attr)


_BERT_LIKE = dict(
    layers="encoder.layer",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attention_output="attention.output.dense",
    attention_core="attention.self",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
)

_REGISTRY: dict[str, ArchitectureSpec] = {}


def register_architecture(spec: ArchitectureSpec, overwrite: bool = False) -> None:
    """Make `spec.model_type` known to every hf-compress operation.

    Raises:
        ValueError: if the model type is already registered and `overwrite` is False.
    """
    if spec.model_type in _REGISTRY and not overwrite:
        raise ValueError(
            f"Architecture {spec.model_type!r} is already registered; pass overwrite=True to replace its spec."
        )
    _REGISTRY[spec.model_type] = spec


def supported_model_types() -> list[str]:
    """The registered `model_type`s, sorted."""
    return sorted(_REGISTRY)


def get_spec(model_or_config: PreTrainedModel | PretrainedConfig) -> ArchitectureSpec:
    """The spec of a model (or config), or a `ValueError` listing what is supported and how to add more."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"hf-compress does not know the architecture {model_type!r}. Supported model types: "
            f"{', '.join(supported_model_types())}. To add one, describe where its layers live with "
            "`hf_compress.register_architecture(ArchitectureSpec(model_type=..., layers=..., query=..., ...))`."
        )
    return _REGISTRY[model_type]


def get_base_model(model: PreTrainedModel) -> nn.Module:
    """The encoder below any task head (`model.bert` for `BertForSequenceClassification`, or the model itself)."""
    return getattr(model, model.base_model_prefix, model)


def get_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's `nn.ModuleList` of transformer layers."""
    return get_base_model(model).get_submodule(get_spec(model).layers)


for _model_type in ("bert", "roberta", "xlm-roberta", "electra"):
    register_architecture(ArchitectureSpec(model_type=_model_type, **_BERT_LIKE))

register_architecture(
    ArchitectureSpec(
        model_type="distilbert",
        layers="transformer.layer",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attention_output="attention.out_lin",
        attention_core="attention",
        attention_core_keeps="out_lin",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        num_layers_attr="n_layers",
        num_heads_attr="n_heads",
        intermediate_size_attr="hidden_dim",
        hidden_size_attr="dim",
    )
)
