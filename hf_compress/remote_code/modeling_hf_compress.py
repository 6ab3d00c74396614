"""Modeling code for encoders pruned by hf-compress: layers with their own number of attention heads and FFN width.

Checkpoints that hf-compress prunes carry this file and name it in the `auto_map` of their `config.json`, so stock
transformers loads them without hf-compress installed:

```python
from transformers import AutoModelForSequenceClassification, pipeline

model = AutoModelForSequenceClassification.from_pretrained("pruned", trust_remote_code=True)
classifier = pipeline("text-classification", model="pruned", trust_remote_code=True)
```

It is self-contained on purpose (it imports only torch and transformers, and needs no network). The per-layer structure
is plain data in the config, under `hf_compress`:

```json
"num_attention_heads": 12,
"intermediate_size": 3072,
"hf_compress": {
  "format_version": 1,
  "head_dim": 64,
  "num_attention_heads_per_layer": [12, 8, 0, 12],
  "intermediate_size_per_layer": [3072, 1536, 3072, 0],
  "modules": {"layers": "encoder.layer", "query": "attention.self.query", ...}
}
```

`num_attention_heads` keeps the unpruned head count (the stock modules derive the head size from it, and so can
anyone reading the config) and `intermediate_size` is the widest layer's. `modules` says where the projections live
below the base model, so any registered architecture works, not only the five hf-compress ships.

Every stock transformers model class has a pruned twin of the same name here, created on first access (so the
`auto_map` reads `"modeling_hf_compress.BertForSequenceClassification"`): a subclass that builds the stock model, then
resizes each layer's projections to the recorded structure before the weights are loaded. Keeping the stock name keeps
everything that dispatches on class names (pipelines' supported-model checks, loss selection) working unchanged.
"""

from __future__ import annotations

import warnings

import transformers
from torch import nn

CONFIG_KEY = "hf_compress"
FORMAT_VERSION = 1

# The Auto classes a pruned checkpoint registers in its `auto_map`. Order matters where one stock class serves two of
# them (DistilBertForMaskedLM is also DistilBERT's AutoModelForPreTraining): a class saves under its first match.
AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForMaskedLM",
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMultipleChoice",
    "AutoModelForNextSentencePrediction",
    "AutoModelForPreTraining",
)

_CLASSES: dict[str, type] = {}


class EmptyAttention(nn.Module):
    """Stands in for the attention of a layer that has lost all its heads.

    With no heads there is nothing to attend with: the module returns an empty `(batch, seq_len, 0)` head output and no
    attention weights, at no cost, so the layer adds only its output projection's bias. When the output projection
    lives inside the attention module (DistilBERT's `out_lin`), it is kept as a child under its own name and applied
    here, so the weights keep their checkpoint names.

    Args:
        kept_name: Name of the child to keep (the output projection), or `None` when it lives outside.
        kept_module: That child, an `nn.Linear` with `in_features=0`.
    """

    def __init__(self, kept_name: str | None = None, kept_module: nn.Module | None = None):
        super().__init__()
        self.kept_name = kept_name
        if kept_name is not None:
            self.add_module(kept_name, kept_module)

    def forward(self, hidden_states, *args, **kwargs):
        output = hidden_states.new_zeros((*hidden_states.shape[:-1], 0))  # (batch, seq_len, 0)
        if self.kept_name is not None:
            output = getattr(self, self.kept_name)(output)  # (batch, seq_len, hidden): the bias
        return output, None

    def extra_repr(self) -> str:
        return "num_heads=0"


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `path` below `root`, keeping the old one's train/eval mode."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    module.train(getattr(parent, name).training)
    setattr(parent, name, module)


def set_head_count(attention_core: nn.Module, num_heads: int, head_dim: int, num_heads_attr: str) -> None:
    """Keep the head-count attributes of an attention module true after its projections changed size.

    The stock forward passes do not read them (they reshape with `view(..., -1, head_dim)`), but other code may.
    """
    if hasattr(attention_core, num_heads_attr):
        setattr(attention_core, num_heads_attr, num_heads)
    if hasattr(attention_core, "all_head_size"):
        attention_core.all_head_size = num_heads * head_dim


def _resized_linear(old: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    """An uninitialised `nn.Linear` like `old` (device, dtype, bias) with new sizes; weights come from the checkpoint."""
    in_features = old.in_features if in_features is None else in_features
    out_features = old.out_features if out_features is None else out_features
    if (in_features, out_features) == (old.in_features, old.out_features):
        return old
    with warnings.catch_warnings():
        # A layer pruned empty is a zero-size Linear; torch warns that initialising it is a no-op, which is fine.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return nn.Linear(
            in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
        )


def apply_structure(model: nn.Module, structure: dict) -> None:
    """Resize the layers of a freshly built stock `model` to `structure` (the config's `hf_compress` entry).

    New projections are uninitialised (`from_pretrained` fills them from the checkpoint; `from_config` initialises
    them in `post_init`).
    """
    if structure.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(
            f"This checkpoint was pruned by a newer hf-compress (structure format {structure['format_version']}); "
            f"this modeling code reads format {FORMAT_VERSION}. Upgrade hf-compress or the checkpoint's code."
        )
    paths = structure["modules"]
    heads = structure["num_attention_heads_per_layer"]
    widths = structure["intermediate_size_per_layer"]
    head_dim = structure["head_dim"]
    base = getattr(model, model.base_model_prefix, model)
    layers = base.get_submodule(paths["layers"])
    if not len(heads) == len(widths) == len(layers):
        raise ValueError(
            f"The config's hf_compress structure describes {len(heads)} / {len(widths)} layers (heads / FFN) but the "
            f"model has {len(layers)}; the config's number of layers and the structure must agree."
        )
    for layer, num_heads, width in zip(layers, heads, widths, strict=True):
        inner = num_heads * head_dim
        if num_heads == 0:
            kept_name = paths.get("attention_core_keeps")
            core = layer.get_submodule(paths["attention_core"])
            kept_module = getattr(core, kept_name) if kept_name is not None else None
            set_submodule(layer, paths["attention_core"], EmptyAttention(kept_name, kept_module))
        else:
            for name in ("query", "key", "value"):
                old = layer.get_submodule(paths[name])
                set_submodule(layer, paths[name], _resized_linear(old, out_features=inner))
            core = layer.get_submodule(paths["attention_core"])
            set_head_count(core, num_heads, head_dim, paths["num_heads_attr"])
        old = layer.get_submodule(paths["attention_output"])
        set_submodule(layer, paths["attention_output"], _resized_linear(old, in_features=inner))
        old = layer.get_submodule(paths["ffn_in"])
        set_submodule(layer, paths["ffn_in"], _resized_linear(old, out_features=width))
        old = layer.get_submodule(paths["ffn_out"])
        set_submodule(layer, paths["ffn_out"], _resized_linear(old, in_features=width))


class HFCompressMixin:
    """Mixed into a stock model class: build the stock model, then resize its layers to `config.hf_compress`.

    Stock `__init__`s end by calling `post_init` once every module exists, so resizing there (before the weights are
    initialised or loaded) works for every head class without repeating any of their constructors.
    """

    hf_compress_stock_class: type | None = None

    def post_init(self):
        structure = getattr(self.config, CONFIG_KEY, None)
        if structure is not None:
            apply_structure(self, structure)
        super().post_init()

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers decides whether `set_attn_implementation` may switch a class by reading the source of the
        # class's module; for a twin that is this file (whose `EmptyAttention` defeats the check), but the attention
        # code that runs is the stock class's, so its answer is the one that holds.
        return cls.hf_compress_stock_class._can_set_attn_implementation()


def auto_model_mapping(auto_class: type | str) -> dict[type, type] | None:
    """Config class -> model class of a transformers Auto class (given as the class or its name); None for others.

    The one read of `_model_mapping`, a private attribute of transformers' Auto classes (it lives here because this
    file must not import hf-compress; `hf_compress.deploy.checkpoint` imports it from here). If transformers renames
    or removes it, pruned checkpoints get no `auto_map` (no `trust_remote_code` loading), and `load_compressed` of a
    checkpoint without `architectures` or with an Auto class fails: this raises instead of returning None for an Auto
    class, and tests/test_transformers_internals.py fails first.
    """
    if isinstance(auto_class, str):
        auto_class = getattr(transformers, auto_class)
    mapping = getattr(auto_class, "_model_mapping", None)
    if mapping is None and auto_class.__module__.startswith("transformers.models.auto."):
        raise RuntimeError(
            f"transformers {transformers.__version__} has no {auto_class.__name__}._model_mapping, which hf-compress "
            "reads to find the model class of a config. Install the transformers version hf-compress supports."
        )
    return mapping


def auto_class_names(stock_class: type) -> dict[str, str]:
    """Auto class name -> stock class name, for every Auto class in `AUTO_CLASSES` that loads `stock_class`'s config."""
    names = {}
    config_class = getattr(stock_class, "config_class", None)
    for auto_name in AUTO_CLASSES:
        mapping = auto_model_mapping(auto_name)
        if config_class is not None and config_class in mapping:
            names[auto_name] = mapping[config_class].__name__
    return names


def auto_map(stock_class: type) -> dict[str, str]:
    """The `auto_map` a pruned checkpoint of `stock_class` writes: every Auto class of its config, mapped to our twin."""
    module = __name__.rpartition(".")[2]
    return {auto: f"{module}.{name}" for auto, name in auto_class_names(stock_class).items()}


def compressed_class(stock_class: type) -> type:
    """The pruned twin of a stock model class, a subclass of the same name (the class itself if it is a twin)."""
    if issubclass(stock_class, HFCompressMixin):
        return stock_class
    name = stock_class.__name__
    cached = _CLASSES.get(name)
    if cached is not None and cached.hf_compress_stock_class is stock_class:
        return cached
    # `_auto_class` makes `save_pretrained` copy this file beside the weights; it is the Auto class that maps to the
    # stock class, so the `auto_map` entry it writes agrees with `auto_map()`.
    auto_class = next((a for a, n in auto_class_names(stock_class).items() if n == stock_class.__name__), None)
    cls = type(
        name,
        (HFCompressMixin, stock_class),
        {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"`transformers.{name}` with per-layer attention heads and FFN widths (hf-compress).",
            "hf_compress_stock_class": stock_class,
            "_auto_class": auto_class,
        },
    )
    _CLASSES[name] = cls
    return cls


def __getattr__(name: str) -> type:
    # `auto_map` entries name classes of this module ("modeling_hf_compress.BertForSequenceClassification");
    # transformers resolves them with getattr, which lands here for any stock model class.
    stock_class = getattr(transformers, name, None) if not name.startswith("_") else None
    if isinstance(stock_class, type) and issubclass(stock_class, transformers.PreTrainedModel):
        return compressed_class(stock_class)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
