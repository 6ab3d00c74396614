"""Pruned checkpoints that load: the config and class bookkeeping behind `save_pretrained`, and `load_compressed`.

After every structural edit, `record_structure` makes the model's config and class describe its modules, so the
ordinary `model.save_pretrained(dir)` writes a checkpoint that loads three ways:

1. `hf_compress.load_compressed(dir_or_hub_id)`, which picks the task head the checkpoint was saved with.
2. Stock transformers without hf-compress: `AutoModelFor...from_pretrained(dir, trust_remote_code=True)`. A model with
   per-layer widths becomes an instance of its stock class's pruned twin (a subclass of the same name defined in
   `remote_code/modeling_hf_compress.py`), whose `_auto_class` makes `save_pretrained` copy that file beside the
   weights, and the config gets an `auto_map` naming it for every Auto class of the architecture.
3. When every layer has all its heads and the same FFN width (layers may have been dropped), the model stays (or
   becomes again) its stock class with `intermediate_size` / `num_hidden_layers` updated: a plain checkpoint with no
   custom code at all.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import transformers
from transformers import AutoConfig, PreTrainedModel

from .architectures import ArchitectureSpec, get_spec
from .remote_code import modeling_hf_compress as remote

if TYPE_CHECKING:
    from .structured import ModelStructure

# `from_pretrained` arguments that say where the files are; `load_compressed` also needs them to read the config.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def _stock_class(model_class: type) -> type:
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


def record_structure(model: PreTrainedModel, structure: ModelStructure) -> None:
    """Make `model.config` and `type(model)` describe `structure` (the model's modules, after an edit).

    Never leaves the config stale: the number of layers is always current; a stock-shaped model gets the stock class,
    its uniform `intermediate_size` and no hf-compress keys; any other model gets the per-layer structure under
    `config.hf_compress`, the widest layer as `intermediate_size`, an `auto_map` and the pruned twin class.
    """
    spec = get_spec(model)
    config = model.config
    setattr(config, spec.num_layers_attr, structure.num_layers)
    base_class = _stock_class(type(model))
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
    setattr(
        config,
        remote.CONFIG_KEY,
        {
            "format_version": remote.FORMAT_VERSION,
            "head_dim": structure.head_dim,
            "num_attention_heads_per_layer": list(structure.heads),
            "intermediate_size_per_layer": list(structure.ffn),
            "modules": _module_paths(spec),
        },
    )
    config.auto_map = {**other_auto_map, **remote.auto_map(base_class)}
    _set_class(model, remote.compressed_class(base_class))


def _set_class(model: PreTrainedModel, model_class: type) -> None:
    if type(model) is model_class:
        return
    # The class is all that differs between a stock model and its pruned twin (the twin only resizes modules in
    # `post_init`, which this model's modules already have), so the instance changes class in place.
    model.__class__ = model_class
    # transformers looks up which outputs a model can record by class name, registered in `PreTrainedModel.__init__`
    # (which a class change skips); without this, a pruned base model would ignore `output_hidden_states`.
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # transformers versions without the registry record by class, not by name
        return
    _CAN_RECORD_REGISTRY[model] = model._can_record_outputs


def _model_class(config: transformers.PretrainedConfig) -> type:
    """The class to load a checkpoint with: its saved architecture, as the pruned twin when it has a structure."""
    architectures = getattr(config, "architectures", None) or []
    name = architectures[0] if architectures else None
    model_class = getattr(transformers, name, None) if name is not None else None
    if model_class is None:
        if name is not None:
            raise ValueError(
                f"The checkpoint was saved from {name!r}, which transformers {transformers.__version__} does not "
                "define. Load it with the library that defines that class."
            )
        # No architecture recorded: the base model, as `AutoModel` would load it.
        model_class = transformers.AutoModel._model_mapping[type(config)]
    if hasattr(config, remote.CONFIG_KEY):
        return remote.compressed_class(model_class)
    return model_class


def load_compressed(pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """Load a model pruned (or not) by hf-compress, with the task head it was saved with.

    Works for pruned checkpoints with per-layer structure (using the modeling code installed with hf-compress, so no
    `trust_remote_code` is needed), for plain stock checkpoints, and for checkpoints whose heads transformers 4 pruned
    (`config.pruned_heads`), which transformers 5 cannot load by itself.

    Args:
        pretrained_model_name_or_path: A local directory written by `save_pretrained`, or a Hub model id.
        **kwargs: Passed to `from_pretrained` (`dtype`, `attn_implementation`, `device_map`, `revision`, `token`, ...).

    Returns:
        The model, of the class recorded in the checkpoint's `config.architectures` (for a checkpoint with per-layer
        structure, that class's pruned twin: a subclass of the same name that resizes the layers).

    Example:
    ```python
    from hf_compress import load_compressed, prune_heads

    prune_heads(model, {0: [1, 4], 2: [0]})
    model.save_pretrained("pruned")
    model = load_compressed("pruned")
    ```

    Raises:
        ValueError: when the weights file lacks tensors of the saved class. Stock `from_pretrained` initialises them
            at random with only a log line; a compressed checkpoint with a hole in it is damaged, not a new head.
    """
    return_info = kwargs.pop("output_loading_info", False)
    model, info = _from_pretrained(pretrained_model_name_or_path, None, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(
            f"The checkpoint {os.fspath(pretrained_model_name_or_path)!r} lacks {len(missing)} tensors of its own "
            f"{type(model).__name__} (e.g. {missing[:3]}), which would start from random values. The weights file is "
            "incomplete or from another model: save the model again, or download the checkpoint again."
        )
    return (model, info) if return_info else model


def _from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike, model_class: type | None, **kwargs
) -> PreTrainedModel:
    """`from_pretrained` that reads hf-compress structures: `load_compressed`, or with the class the caller chose.

    Args:
        pretrained_model_name_or_path: A local directory or a Hub model id.
        model_class: The class to load with (an Auto class or a model class; a checkpoint with per-layer structure
            loads with the pruned twin of the class it stands for), or None for the class the checkpoint recorded.
        **kwargs: Passed to `from_pretrained`.
    """
    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
    config = kwargs.get("config")
    if config is None:
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
    if getattr(config, "pruned_heads", None) and not hasattr(config, remote.CONFIG_KEY):
        _upgrade_pruned_heads(config)
        kwargs["config"] = config
    if model_class is None:
        model_class = _model_class(config)
    elif hasattr(config, remote.CONFIG_KEY):
        # Stock classes build the unpruned shapes and refuse the checkpoint's (`ignore_mismatched_sizes`); the pruned
        # twin of the class the caller asked for builds the recorded ones.
        mapping = getattr(model_class, "_model_mapping", None)
        if mapping is not None:  # an Auto class: the model class it picks for this config
            if type(config) not in mapping:
                raise ValueError(
                    f"{model_class.__name__} has no model class for {type(config).__name__} (the checkpoint at "
                    f"{pretrained_model_name_or_path}); pass another class, or use hf_compress.load_compressed."
                )
            model_class = mapping[type(config)]
        model_class = remote.compressed_class(_stock_class(model_class))
    return model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)


def _upgrade_pruned_heads(config: transformers.PretrainedConfig) -> None:
    """Turn a transformers 4 `config.pruned_heads` ({layer: original head indices}) into `config.hf_compress`.

    transformers 5 ignores `pruned_heads` and so cannot load such checkpoints; their weights hold the kept heads in
    order, which is exactly what the per-layer structure describes.
    """
    spec = get_spec(config)
    num_heads, num_layers = spec.num_heads(config), spec.num_layers(config)
    pruned = {int(layer): set(heads) for layer, heads in config.pruned_heads.items()}
    setattr(
        config,
        remote.CONFIG_KEY,
        {
            "format_version": remote.FORMAT_VERSION,
            "head_dim": spec.head_dim(config),
            "num_attention_heads_per_layer": [num_heads - len(pruned.get(i, ())) for i in range(num_layers)],
            "intermediate_size_per_layer": [spec.intermediate_size(config)] * num_layers,
            "modules": _module_paths(spec),
        },
    )
    # The structure replaces it; its indices count heads of a model that no longer exists.
    delattr(config, "pruned_heads")
