"""The per-layer structure of an encoder, and the bookkeeping that keeps its config and class describing it.

`ModelStructure` / `get_structure` read what pruning has left of a model (heads and FFN neurons per layer) from its
modules. `record_structure` writes that structure into the model's config (`config.hf_compress`, the one entry the
checkpoint's modeling code reads) and gives the model the class that can rebuild it, so the ordinary
`model.save_pretrained(dir)` writes a checkpoint that loads three ways (see `hf_compress.deploy.checkpoint`):

1. `hf_compress.load_compressed(dir_or_hub_id)`, which picks the task head the checkpoint was saved with.
2. Stock transformers without hf-compress: `AutoModelFor...from_pretrained(dir, trust_remote_code=True)`. A model with
   per-layer widths becomes an instance of its stock class's pruned twin (a subclass of the same name defined in
   `remote_code/modeling_hf_compress.py`), whose `_auto_class` makes `save_pretrained` copy that file beside the
   weights, and the config gets an `auto_map` naming it for every Auto class of the architecture.
3. When every layer has all its heads and the same FFN width (layers may have been dropped), the model stays (or
   becomes again) its stock class with `intermediate_size` / `num_hidden_layers` updated: a plain checkpoint with no
   custom code at all.

A leaf: it depends on the architecture registry and the remote code only, so modules that read a structure never
import the modules that edit models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from transformers import PreTrainedModel

from .architectures import ArchitectureSpec, get_layers, get_spec
from .remote_code import modeling_hf_compress as remote
from .remote_code.modeling_hf_compress import EmptyAttention


@dataclass(frozen=True)
class ModelStructure:
    """The per-layer shape of an encoder: what pruning has left of it.

    Args:
        heads: Attention heads of each layer.
        ffn: FFN neurons (intermediate size) of each layer.
        head_dim: Size of one attention head (pruning never changes it).
        max_heads: Heads of an unpruned layer (`config.num_attention_heads`, which pruning leaves as it was).
    """

    heads: tuple[int, ...]
    ffn: tuple[int, ...]
    head_dim: int
    max_heads: int

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    @property
    def is_stock(self) -> bool:
        """Whether stock transformers can build this shape: every head kept and one FFN width for all layers."""
        return all(h == self.max_heads for h in self.heads) and len(set(self.ffn)) <= 1

    def to_dict(self) -> dict:
        """Plain data: `{"heads": [...], "ffn": [...], "head_dim": ..., "max_heads": ...}`."""
        return {**asdict(self), "heads": list(self.heads), "ffn": list(self.ffn)}


def get_structure(model: PreTrainedModel) -> ModelStructure:
    """Read the current per-layer structure (heads and FFN neurons per layer) from the model's modules.

    Args:
        model: A model of a registered architecture, pruned or not.

    Returns:
        A `ModelStructure`; `structure.heads[i]` and `structure.ffn[i]` are layer `i`'s heads and FFN neurons.

    Example:
    ```python
    structure = get_structure(model)
    print(structure.heads, structure.ffn)  # (12, 10, 0, 12) (3072, 3072, 1024, 3072)
    ```
    """
    spec = get_spec(model)
    head_dim = spec.head_dim(model.config)
    heads, ffn = [], []
    for layer in get_layers(model):
        if isinstance(layer.get_submodule(spec.attention_core), EmptyAttention):
            heads.append(0)
        else:
            heads.append(layer.get_submodule(spec.query).out_features // head_dim)
        ffn.append(layer.get_submodule(spec.ffn_in).out_features)
    return ModelStructure(tuple(heads), tuple(ffn), head_dim, spec.num_heads(model.config))


def stock_class(model_class: type) -> type:
    """The stock transformers class behind `model_class` (itself unless it is a pruned twin)."""
    return getattr(model_class, "hf_compress_stock_class", None) or model_class


def _module_paths(spec: ArchitectureSpec) -> dict[str, Any]:
    """Where the projections live, as recorded in the config for the checkpoint's modeling code."""
    return {
        "layers": spec.layers,
        "query": spec.query,
        "key": spec.key,
        "value": spec.value,
        "attention_output": spec.attention_output,
        "attention_core": spec.attention_core,
        "attention_core_keeps": spec.attention_core_keeps,
        "ffn_in": spec.ffn_in,
        "ffn_out": spec.ffn_out,
        "num_heads_attr": spec.num_heads_attr,
    }


def structure_entry(spec: ArchitectureSpec, structure: ModelStructure) -> dict[str, Any]:
    """The `config.hf_compress` entry that describes `structure`: what the checkpoint's modeling code rebuilds.

    The one place this entry is written, for pruned models (`record_structure`) and for transformers 4 checkpoints
    with `pruned_heads` (`hf_compress.deploy.checkpoint`).
    """
    return {
        "format_version": remote.FORMAT_VERSION,
        "head_dim": structure.head_dim,
        "num_attention_heads_per_layer": list(structure.heads),
        "intermediate_size_per_layer": list(structure.ffn),
        "modules": _module_paths(spec),
    }


def record_structure(model: PreTrainedModel, structure: ModelStructure) -> None:
    """Make `model.config` and `type(model)` describe `structure` (the model's modules, after an edit).

    Never leaves the config stale: the number of layers is always current; a stock-shaped model gets the stock class,
    its uniform `intermediate_size` and no hf-compress keys; any other model gets the per-layer structure under
    `config.hf_compress`, the widest layer as `intermediate_size`, an `auto_map` and the pruned twin class.
    """
    spec = get_spec(model)
    config = model.config
    setattr(config, spec.num_layers_attr, structure.num_layers)
    base_class = stock_class(type(model))
    ours = set(remote.auto_map(base_class).values())
    # Entries another tool put in the auto_map stay; ours are rewritten below (or dropped for a stock model).
    other_auto_map = {k: v for k, v in (getattr(config, "auto_map", None) or {}).items() if v not in ours}
    if structure.is_stock:
        setattr(config, spec.intermediate_size_attr, structure.ffn[0])
        if hasattr(config, remote.CONFIG_KEY):
            delattr(config, remote.CONFIG_KEY)
        if other_auto_map:
            config.auto_map = other_auto_map
        elif hasattr(config, "auto_map"):
            delattr(config, "auto_map")
        _set_class(model, base_class)
        return
    setattr(config, spec.intermediate_size_attr, max(structure.ffn))
    setattr(config, remote.CONFIG_KEY, structure_entry(spec, structure))
    config.auto_map = {**other_auto_map, **remote.auto_map(base_class)}
    _set_class(model, remote.compressed_class(base_class))


def _set_class(model: PreTrainedModel, model_class: type) -> None:
    if type(model) is model_class:
        return
    # The class is all that differs between a stock model and its pruned twin (the twin only resizes modules in
    # `post_init`, which this model's modules already have), so the instance changes class in place.
    model.__class__ = model_class
    register_recordable_outputs(model)


def register_recordable_outputs(model: PreTrainedModel) -> None:
    """Tell transformers which outputs (hidden states, attentions) `model` can record, after its class changed.

    transformers registers this in `PreTrainedModel.__init__`, which a class change skips. The one use of two private
    transformers internals: `transformers.utils.output_capturing._CAN_RECORD_REGISTRY` and the model's
    `_can_record_outputs`. If transformers moves or renames them, a model whose class `record_structure` changed
    silently ignores `output_hidden_states` / `output_attentions` (distillation losses on hidden states get nothing);
    tests/test_transformers_internals.py fails first.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # transformers versions without the registry record by class, not by name
        return
    _CAN_RECORD_REGISTRY[model] = model._can_record_outputs
