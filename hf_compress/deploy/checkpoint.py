"""`load_compressed`: load what hf-compress saved, with the task head it was saved with (`from_pretrained_compressed`:
with the class the caller chooses).

`hf_compress.structure.record_structure` keeps a pruned model's config and class describing its modules, so
`save_pretrained` needs nothing from this module; loading does: the class the checkpoint recorded (as its pruned twin
when it has per-layer structure), transformers 4 `pruned_heads` upgraded, and holes in the weights refused.
"""

from __future__ import annotations

import os

import transformers
from transformers import AutoConfig, PreTrainedModel

from ..architectures import get_spec
from ..remote_code import modeling_hf_compress as remote
from ..remote_code.modeling_hf_compress import auto_model_mapping
from ..structure import ModelStructure, stock_class, structure_entry

# `from_pretrained` arguments that say where the files are; `load_compressed` also needs them to read the config.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


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
        model_class = auto_model_mapping(transformers.AutoModel)[type(config)]
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
    model, info = from_pretrained_compressed(pretrained_model_name_or_path, None, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(
            f"The checkpoint {os.fspath(pretrained_model_name_or_path)!r} lacks {len(missing)} tensors of its own "
            f"{type(model).__name__} (e.g. {missing[:3]}), which would start from random values. The weights file is "
            "incomplete or from another model: save the model again, or download the checkpoint again."
        )
    return (model, info) if return_info else model


def from_pretrained_compressed(
    pretrained_model_name_or_path: str | os.PathLike, model_class: type | None = None, **kwargs
) -> PreTrainedModel:
    """`model_class.from_pretrained` that reads what hf-compress saved (per-layer structure, transformers 4 heads).

    The loader behind `load_compressed` (which also refuses holes in the weights) and `from_pretrained_int8`.

    Args:
        pretrained_model_name_or_path: A local directory or a Hub model id.
        model_class: The class to load with (an Auto class or a model class; a checkpoint with per-layer structure
            loads with the pruned twin of the class it stands for), or None for the class the checkpoint recorded.
        **kwargs: Passed to `from_pretrained`.

    Returns:
        The model (and the loading info with `output_loading_info=True`, as `from_pretrained` returns them).

    Example:
    ```python
    from transformers import AutoModelForSequenceClassification

    model = from_pretrained_compressed("pruned", AutoModelForSequenceClassification)
    ```
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
        mapping = auto_model_mapping(model_class)
        if mapping is not None:  # an Auto class: the model class it picks for this config
            if type(config) not in mapping:
                raise ValueError(
                    f"{model_class.__name__} has no model class for {type(config).__name__} (the checkpoint at "
                    f"{pretrained_model_name_or_path}); pass another class, or use hf_compress.load_compressed."
                )
            model_class = mapping[type(config)]
        model_class = remote.compressed_class(stock_class(model_class))
    return model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)


def _upgrade_pruned_heads(config: transformers.PretrainedConfig) -> None:
    """Turn a transformers 4 `config.pruned_heads` ({layer: original head indices}) into `config.hf_compress`.

    transformers 5 ignores `pruned_heads` and so cannot load such checkpoints; their weights hold the kept heads in
    order, which is exactly what the per-layer structure describes.
    """
    spec = get_spec(config)
    num_heads, num_layers = spec.num_heads(config), spec.num_layers(config)
    pruned = {int(layer): set(heads) for layer, heads in config.pruned_heads.items()}
    structure = ModelStructure(
        heads=tuple(num_heads - len(pruned.get(i, ())) for i in range(num_layers)),
        ffn=(spec.intermediate_size(config),) * num_layers,
        head_dim=spec.head_dim(config),
        max_heads=num_heads,
    )
    setattr(config, remote.CONFIG_KEY, structure_entry(spec, structure))
    # The structure replaces it; its indices count heads of a model that no longer exists.
    delattr(config, "pruned_heads")
