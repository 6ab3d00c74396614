"""Saving a model whose magnitude-pruning masks are still live, and loading such a checkpoint back into it.

`torch.nn.utils.prune` reparametrises a pruned module: its state dict holds `weight_orig` and `weight_mask` instead of
`weight`, which stock `from_pretrained` ignores (it would silently re-initialise every pruned weight). So
`magnitude_prune` calls `add_mask_folding_hooks`, which

- puts `save_pretrained_folded` in place of the model's `save_pretrained`: every save (`save_pretrained`,
  `Trainer.save_model`, Trainer checkpoints, `push_to_hub`, `push_compressed_to_hub`) writes
  `weight = weight_orig * weight_mask` (the pruned weights as 0.0), an ordinary checkpoint that stock `from_pretrained`
  loads, before or after `make_permanent`;
- gives every pruned module a load hook that accepts such a folded state dict back: a masked model loading one (a
  Trainer resuming, or `load_best_model_at_end`) takes the loaded weights as they are and its masks from their zeros,
  so it computes exactly what was saved.

`model.state_dict()` itself keeps torch's `weight_orig` / `weight_mask` (prune the model you save: a parent of the
pruned module does not fold). `make_permanent` removes the hooks with `remove_mask_folding_hooks`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from torch import nn
from torch.nn.utils import prune


def pruned_tensor_names(module: nn.Module) -> list[str]:
    """The tensors `torch.nn.utils.prune` reparametrises on `module` (`["weight"]` after `magnitude_prune`)."""
    return [
        hook._tensor_name for hook in module._forward_pre_hooks.values() if isinstance(hook, prune.BasePruningMethod)
    ]


def folded_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict:
    """`model`'s state dict (or `state_dict`) with each `name_orig` / `name_mask` pair folded into `name`.

    The folded tensor `name_orig * name_mask` is what the model computes with: the pruned entries are 0.0, and the
    keys are the ones stock `from_pretrained` knows. Key order is kept (`name` takes `name_orig`'s place).
    """
    state_dict = model.state_dict() if state_dict is None else state_dict
    folded_keys = {}  # key of name_orig -> key of name
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name in pruned_tensor_names(module):
            key = prefix + name
            if f"{key}_orig" in state_dict and f"{key}_mask" in state_dict:
                folded_keys[f"{key}_orig"] = key
    masks = {f"{key}_mask" for key in folded_keys.values()}
    folded = {}
    for key, value in state_dict.items():
        if key in folded_keys:
            folded[folded_keys[key]] = (value * state_dict[f"{folded_keys[key]}_mask"]).detach()
        elif key not in masks:
            folded[key] = value
    return folded


def save_pretrained_folded(model: nn.Module, save_directory, *args, state_dict: dict | None = None, **kwargs):
    """`save_pretrained` of a model with live pruning masks: the masks are folded into the weights it writes.

    `magnitude_prune` puts this (bound to the model with `functools.partial`) in place of the model's
    `save_pretrained`, which `Trainer.save_model`, Trainer checkpoints, `push_to_hub` and `push_compressed_to_hub`
    all call. Without it the checkpoint holds `weight_orig`/`weight_mask`, which `from_pretrained` ignores: it would
    silently re-initialise every pruned weight. `make_permanent` removes it.
    """
    return type(model).save_pretrained(
        model, save_directory, *args, state_dict=folded_state_dict(model, state_dict), **kwargs
    )


def _is_folding_save(function) -> bool:
    return isinstance(function, functools.partial) and function.func is save_pretrained_folded


def _unfold_masks_load_pre_hook(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook: let a still-masked module load a folded state dict (as `save_pretrained_folded` writes).

    The loaded values become `name_orig` and the mask is taken from their zeros, so that `name_orig * name_mask`
    equals the loaded tensor exactly (a Trainer resuming, or loading its best checkpoint, computes what was saved).
    A state dict that still has `name_orig`/`name_mask` loads as before.
    """
    for name in pruned_tensor_names(module):
        key = prefix + name
        if key in state_dict and f"{key}_orig" not in state_dict and f"{key}_mask" not in state_dict:
            value = state_dict.pop(key)
            state_dict[f"{key}_orig"] = value
            mask = getattr(module, f"{name}_mask", None)
            state_dict[f"{key}_mask"] = (value != 0).to(mask.dtype if mask is not None else value.dtype)


def _refresh_masked_weights_load_post_hook(module: nn.Module, incompatible_keys) -> None:
    # `weight` is a plain attribute that prune refreshes at each forward; refresh it now so that code reading it
    # before the next forward (e.g. `module.weight == 0`) sees the loaded values.
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            setattr(module, hook._tensor_name, hook.apply_mask(module))


_LOAD_HOOKS = (
    ("_load_state_dict_pre_hooks", _unfold_masks_load_pre_hook),
    ("_load_state_dict_post_hooks", _refresh_masked_weights_load_post_hook),
)


def _registered(hooks: dict, function) -> list:
    # `_load_state_dict_pre_hooks` wraps each hook in a `_WrappedHook` that keeps it as `.hook`.
    return [key for key, hook in hooks.items() if getattr(hook, "hook", hook) is function]


def add_mask_folding_hooks(model: nn.Module, modules: Iterable[nn.Module]) -> None:
    """Make every save of `model` fold the masks, and every pruned module accept a folded state dict back (once).

    Module-level functions (and a `functools.partial` of one), so a deep copy or a pickle of the model keeps working.

    Args:
        model: The model whose `save_pretrained` should fold the masks (a model without one is left as is).
        modules: Its masked modules, which get the load hooks.
    """
    if callable(getattr(type(model), "save_pretrained", None)) and not _is_folding_save(
        model.__dict__.get("save_pretrained")
    ):
        model.save_pretrained = functools.partial(save_pretrained_folded, model)
    for module in modules:
        if not _registered(module._load_state_dict_pre_hooks, _unfold_masks_load_pre_hook):
            module.register_load_state_dict_pre_hook(_unfold_masks_load_pre_hook)
            module.register_load_state_dict_post_hook(_refresh_masked_weights_load_post_hook)


def remove_mask_folding_hooks(module: nn.Module) -> None:
    """Take off what `add_mask_folding_hooks` put on `module` (its folding `save_pretrained`, its load hooks)."""
    if _is_folding_save(module.__dict__.get("save_pretrained")):
        del module.__dict__["save_pretrained"]
    for attribute, function in _LOAD_HOOKS:
        hooks = getattr(module, attribute)
        for key in _registered(hooks, function):
            del hooks[key]
