"""Masks on attention heads and FFN neurons, through forward pre-hooks: prune (or rescale) without editing the model.

transformers 5 removed `head_mask`, so `UnitMasks` multiplies the *input* of the attention output projection (heads
are contiguous blocks of `head_dim` columns there) and of the FFN down projection by a mask per unit. Removing a unit
is a mask of 0, rescaling it a mask of any other value; a per-example mask that requires grad gives each example's
`dL/dm`, from which importance scores are computed. Every hook is removed on exit, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers import PreTrainedModel

from ..architectures import get_layers, get_spec
from ..structure import get_structure


class UnitMasks:
    """Context manager that multiplies each head's / FFN neuron's output by a mask, through forward pre-hooks.

    The hooks sit on the input of the attention output projection (viewed as `(..., heads, head_dim)`) and of the FFN
    down projection, and are all removed on exit, also when the body raises.

    Who uses it: `compute_importance` (per-example masks whose gradients are the Taylor / Fisher scores),
    `compute_layer_importance` (skipped layers), `fit_rescale` (fixed masks that simulate pruning and rescaling) and
    `GradualStructuredPruningCallback` (per-example masks during training, through `on_mask`).

    Args:
        model: A model of a registered architecture.
        head_masks: Optional fixed mask per layer, shape `(num_heads_in_layer,)` (`None` entries leave a layer alone).
            Values other than 0/1 scale the head's output.
        ffn_masks: The same for FFN neurons, shape `(ffn_neurons_in_layer,)`.
        per_example: Also multiply by a fresh all-ones mask of shape `(batch, units)` that requires grad, created in
            every forward pass with autograd on; its gradient is each example's `dL/dm`. Created masks are collected
            in `self.created` as `(kind, layer, mask)` with kind `"heads"` or `"ffn"` (the caller clears it).
        on_mask: Called with `(kind, layer, mask)` for every per-example mask created, instead of collecting them
            (a training loop registers a gradient hook on it and keeps nothing).
        skip_layers: Layers whose output is replaced by their input (the layer is skipped).

    Example:
    ```python
    with UnitMasks(model, head_masks=[torch.tensor([1.0, 0.0, 1.0, 1.0]), None]):
        outputs = model(**batch)  # as if head 1 of layer 0 were pruned
    ```
    """

    def __init__(
        self,
        model: PreTrainedModel,
        head_masks: list[torch.Tensor | None] | None = None,
        ffn_masks: list[torch.Tensor | None] | None = None,
        per_example: bool = False,
        on_mask: Callable[[str, int, torch.Tensor], None] | None = None,
        skip_layers: Iterable[int] = (),
    ):
        self.model = model
        self.spec = get_spec(model)
        self.head_dim = self.spec.head_dim(model.config)
        structure = get_structure(model)
        self.heads, self.ffn = structure.heads, structure.ffn
        self.head_masks = head_masks or [None] * len(self.heads)
        self.ffn_masks = ffn_masks or [None] * len(self.ffn)
        self.per_example = per_example
        self.on_mask = on_mask
        self.skip_layers = set(skip_layers)
        self.created: list[tuple[str, int, torch.Tensor]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> UnitMasks:
        return self.attach()

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def attach(self) -> UnitMasks:
        """Register the hooks (what entering the context does); `remove` takes them off."""
        try:
            for index, layer in enumerate(get_layers(self.model)):
                if index in self.skip_layers:
                    self._handles.append(layer.register_forward_hook(_skip_layer_hook, with_kwargs=True))
                    continue
                for kind, count, path, unit, fixed in (
                    ("heads", self.heads[index], self.spec.attention_output, self.head_dim, self.head_masks[index]),
                    ("ffn", self.ffn[index], self.spec.ffn_out, 1, self.ffn_masks[index]),
                ):
                    if count == 0 or (fixed is None and not self.per_example):
                        continue
                    hook = self._make_hook(kind, index, count, unit, fixed)
                    module = layer.get_submodule(path)
                    self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, kind: str, layer: int, count: int, unit: int, fixed: torch.Tensor | None):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            x = args[0] if args else kwargs["input"]
            mask = None if fixed is None else fixed.to(device=x.device, dtype=x.dtype)  # (units,)
            # Outside autograd (evaluation) a per-example mask could not receive a gradient: skip it.
            if self.per_example and torch.is_grad_enabled():
                example_mask = torch.ones(x.shape[0], count, device=x.device, dtype=x.dtype, requires_grad=True)
                if self.on_mask is not None:
                    self.on_mask(kind, layer, example_mask)
                else:
                    self.created.append((kind, layer, example_mask))
                # (batch, units) -> (batch, 1, ..., 1, units), broadcasting over the token dimensions.
                example_mask = example_mask.view(x.shape[0], *([1] * (x.dim() - 2)), count)
                mask = example_mask if mask is None else example_mask * mask
            if mask is None:
                return None
            # (..., units * unit) -> (..., units, unit): heads are contiguous blocks of head_dim features.
            grouped = x.view(*x.shape[:-1], count, unit) * mask.unsqueeze(-1)
            x = grouped.view(x.shape)
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "input": x})

        return hook


def _skip_layer_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    hidden_states = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden_states, *output[1:])
    return hidden_states
