"""Keep a training optimizer consistent when structured pruning replaces the parameters it holds.

`prune_heads` and `prune_ffn_neurons` build new, smaller `nn.Linear`s, so the optimizer a `Trainer` built holds
parameters the model no longer has. Before pruning, `parameter_slices` records for every projection parameter which
rows or columns the selection keeps; after pruning, `rewire_optimizer` puts the new parameters in the old ones' places
in their parameter groups and slices their per-element state (Adam's `exp_avg` / `exp_avg_sq`, momentum buffers) to
the kept rows / columns. Any other state of a shrunk parameter (e.g. factored second moments) is reset, with a
warning. The learning-rate scheduler keeps working, as it only holds the optimizer.

```python
slices = parameter_slices(model, selection)  # before pruning
prune_heads(model, remove_heads)
prune_ffn_neurons(model, remove_ffn)
rewire_optimizer(optimizer, slices)  # after
```
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers.utils import logging

from ..architectures import get_layers, get_spec
from ..structure import get_structure
from .search import Selection
from .structured import unit_feature_indices

logger = logging.get_logger(__name__)


class ParameterSlice(NamedTuple):
    """Where a projection parameter lives and what of it a selection keeps."""

    layer: nn.Module  # the transformer layer that owns the parameter
    path: str  # the projection's path inside the layer (e.g. "attention.self.query")
    name: str  # "weight" or "bias"
    layer_index: int
    dim: int | None  # the dimension pruning slices (None: the parameter is kept whole)
    kept: torch.Tensor  # the kept indices along `dim`


def parameter_slices(model: nn.Module, selection: Selection) -> dict[int, ParameterSlice]:
    """For every q/k/v/output and FFN parameter of `model`: what `selection` keeps of it, by `id(parameter)`.

    Take it before pruning (the ids are those of the parameters pruning replaces) and pass it to `rewire_optimizer`.
    """
    spec = get_spec(model)
    head_dim = get_structure(model).head_dim
    slices = {}
    for index, layer in enumerate(get_layers(model)):
        head_features = unit_feature_indices(selection.heads[index], head_dim)
        neurons = torch.tensor(selection.ffn[index], dtype=torch.long)
        for path, dim, kept in (
            (spec.query, 0, head_features),
            (spec.key, 0, head_features),
            (spec.value, 0, head_features),
            (spec.attention_output, 1, head_features),
            (spec.ffn_in, 0, neurons),
            (spec.ffn_out, 1, neurons),
        ):
            try:
                module = layer.get_submodule(path)
            except AttributeError:  # q/k/v of a layer that has already lost all its heads
                continue
            for name, parameter in module.named_parameters(recurse=False):
                # A bias follows its layer's output features; input pruning leaves it whole.
                sliced = dim if name == "weight" else (0 if dim == 0 else None)
                slices[id(parameter)] = ParameterSlice(layer, path, name, index, sliced, kept)
    return slices


def rewire_optimizer(optimizer, slices: dict[int, ParameterSlice]) -> None:
    """Swap shrunk parameters into the optimizer's groups and slice their state to the kept rows / columns, in place.

    Args:
        optimizer: A torch optimizer, or accelerate's wrapper of one (as `Trainer.optimizer` is).
        slices: `parameter_slices(model, selection)`, taken before pruning.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    for group in inner.param_groups:
        new_params = []
        for parameter in group["params"]:
            if id(parameter) not in slices:
                new_params.append(parameter)
                continue
            layer, path, name, index, dim, kept = slices[id(parameter)]
            try:
                new = getattr(layer.get_submodule(path), name)
            except AttributeError:  # the whole module went (a layer that lost all its heads)
                inner.state.pop(parameter, None)
                continue
            new_params.append(new)
            if new is parameter:  # a module that pruning left alone
                continue
            state = inner.state.pop(parameter, None)
            if state is None:
                continue
            new_state = {}
            for key, value in state.items():
                if not isinstance(value, torch.Tensor) or value.dim() == 0 or dim is None:
                    new_state[key] = value
                elif value.shape == parameter.shape:
                    new_state[key] = value.index_select(dim, kept.to(value.device))
                else:
                    logger.warning(
                        "Optimizer state %r of layer %d's %s.%s does not match the parameter's shape; resetting this "
                        "parameter's state after pruning.",
                        key,
                        index,
                        path,
                        name,
                    )
                    new_state = {}
                    break
            if new_state:
                inner.state[new] = new_state
        group["params"] = new_params
