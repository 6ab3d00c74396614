"""Structured pruning: remove attention heads, FFN neurons and whole layers, leaving a smaller dense model.

transformers 5 dropped `prune_heads` and `config.pruned_heads`; these functions replace them for every registered
architecture (see `architectures.py`) and go further: FFN neurons, whole layers, and layers left with no heads or no
neurons at all. Every function edits the model in place, takes indices into the model's *current* heads / neurons /
layers (so calls compose), checks all its input before touching the model, and keeps the config and class in step
with the modules so that `save_pretrained` writes a checkpoint that loads (see `hf_compress.structure`).

Removing a head or neuron gives exactly the outputs of the unpruned model with that unit's contribution zeroed (the
matching input columns of the attention output / FFN down projection set to zero).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers import PreTrainedModel

from ..architectures import ArchitectureSpec, get_base_model, get_layers, get_spec
from ..remote_code.modeling_hf_compress import EmptyAttention, set_head_count, set_submodule
from ..structure import get_structure, record_structure
from .search import round_width


def prune_heads(model: PreTrainedModel, heads_to_prune: Mapping[int, Iterable[int]]) -> None:
    """Remove attention heads, in place.

    A layer may lose all its heads: its attention module is then replaced by an `EmptyAttention` and the layer adds
    only the attention output bias, at no attention cost.

    Args:
        model: A model of a registered architecture (any task head).
        heads_to_prune: Layer index -> indices of the heads to remove, both counted in the model as it is now (after
            any earlier pruning or dropped layers).

    Raises:
        ValueError: For an unknown layer, or a head index that is out of range, repeated or not an integer. The model
            is left untouched.

    Example:
    ```python
    prune_heads(model, {0: [1, 4], 2: [0]})
    prune_heads(model, {0: [1]})  # layer 0 now has the original heads 0, 2, 3, 5, ...: this removes original head 2
    ```
    """
    spec = get_spec(model)
    structure = get_structure(model)
    plan = _validate_plan(heads_to_prune, structure.heads, "head", "heads_to_prune")
    layers = get_layers(model)
    head_dim = structure.head_dim
    keeps_name = spec.attention_core_keeps
    # Build every new module first and swap them in only once all are built: a failure leaves the model untouched.
    edits: list[tuple[nn.Module, str, nn.Module]] = []
    head_counts: list[tuple[nn.Module, int]] = []
    for layer_index, removed in plan.items():
        if not removed:
            continue
        layer = layers[layer_index]
        num_heads = structure.heads[layer_index]
        kept = [h for h in range(num_heads) if h not in removed]
        index = unit_feature_indices(kept, head_dim)  # (kept * head_dim,)
        output = _keep_linear(layer.get_submodule(spec.attention_output), index, dim=1)
        if kept:
            for path in (spec.query, spec.key, spec.value):
                edits.append((layer, path, _keep_linear(layer.get_submodule(path), index, dim=0)))
            edits.append((layer, spec.attention_output, output))
            head_counts.append((layer.get_submodule(spec.attention_core), len(kept)))
        elif keeps_name is not None:
            # The output projection lives inside the attention module (DistilBERT): the empty module carries it.
            edits.append((layer, spec.attention_core, EmptyAttention(keeps_name, output)))
        else:
            edits.append((layer, spec.attention_core, EmptyAttention()))
            edits.append((layer, spec.attention_output, output))
    for root, path, module in edits:
        set_submodule(root, path, module)
    for core, num_heads in head_counts:
        set_head_count(core, num_heads, head_dim, spec.num_heads_attr)
    record_structure(model, get_structure(model))


def prune_ffn_neurons(model: PreTrainedModel, neurons_to_prune: Mapping[int, Iterable[int]]) -> None:
    """Remove FFN (intermediate) neurons, in place.

    A layer may lose all its neurons: its FFN then adds only the down projection's bias.

    Args:
        model: A model of a registered architecture (any task head).
        neurons_to_prune: Layer index -> indices of the intermediate neurons to remove, both counted in the model as
            it is now.

    Raises:
        ValueError: For an unknown layer, or a neuron index that is out of range, repeated or not an integer. The
            model is left untouched.

    Example:
    ```python
    prune_ffn_neurons(model, {0: [3, 17, 250], 5: list(range(1024))})
    ```
    """
    spec = get_spec(model)
    structure = get_structure(model)
    plan = _validate_plan(neurons_to_prune, structure.ffn, "FFN neuron", "neurons_to_prune")
    layers = get_layers(model)
    edits = []
    for layer_index, removed in plan.items():
        if not removed:
            continue
        layer = layers[layer_index]
        index = torch.tensor([n for n in range(structure.ffn[layer_index]) if n not in removed], dtype=torch.long)
        edits.append((layer, spec.ffn_in, _keep_linear(layer.get_submodule(spec.ffn_in), index, dim=0)))
        edits.append((layer, spec.ffn_out, _keep_linear(layer.get_submodule(spec.ffn_out), index, dim=1)))
    for root, path, module in edits:
        set_submodule(root, path, module)
    record_structure(model, get_structure(model))


def drop_layers(model: PreTrainedModel, layers_to_drop: Iterable[int]) -> None:
    """Remove whole transformer layers, in place.

    Args:
        model: A model of a registered architecture (any task head).
        layers_to_drop: Indices of the layers to remove, counted in the model as it is now. At least one layer must
            stay.

    Raises:
        ValueError: For a layer index that is out of range, repeated or not an integer, or when every layer would go.
            The model is left untouched.

    Example:
    ```python
    drop_layers(model, [1, 3])  # a 6-layer model keeps its layers 0, 2, 4, 5 as the new 0, 1, 2, 3
    ```
    """
    spec = get_spec(model)
    layers = get_layers(model)
    num_layers = len(layers)
    dropped = _validate_indices(layers_to_drop, num_layers, "layers_to_drop", "layer", "the model")
    if len(dropped) == num_layers:
        raise ValueError(
            f"drop_layers would remove all {num_layers} layers; keep at least one (drop at most {num_layers - 1})."
        )
    for index in sorted(dropped, reverse=True):
        del layers[index]  # nn.ModuleList re-numbers the layers after it
    # Layers know their position for KV caching (decoder use of BERT-like models): renumber them.
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    parent_path = spec.layers.rpartition(".")[0]
    parent = get_base_model(model).get_submodule(parent_path) if parent_path else get_base_model(model)
    if isinstance(getattr(parent, spec.num_layers_attr, None), int):  # DistilBERT's `Transformer.n_layers`
        setattr(parent, spec.num_layers_attr, len(layers))
    record_structure(model, get_structure(model))


def round_ffn_plan(
    model: PreTrainedModel,
    neurons_to_prune: Mapping[int, Iterable[int]],
    *,
    uniform: bool = False,
    round_to: int = 1,
    scores: Mapping[int, torch.Tensor] | None = None,
    multiple_of: int | None = None,
) -> dict[int, list[int]]:
    """Round an FFN pruning plan so the kept widths suit plain checkpoints and fast kernels.

    With `round_to`, kept widths are rounded to the nearest multiple (8 or 64 suit GPU matrix kernels), never above
    a layer's current width; a layer the plan leaves whole (or does not name) stays whole.

    With `uniform=True` every layer keeps the same number of neurons, so a model pruned with the result, and with no
    heads removed, saves as a plain stock checkpoint. That common width is the mean kept width of *all* layers
    (rounded to `round_to`, and no wider than the narrowest layer), so it changes layers beyond those the plan
    removes neurons from: a layer must lose neurons to reach it even if the plan removes none there. So that this
    never happens by accident, a uniform plan must name every layer: a plan that leaves a layer out raises a
    `ValueError`. List such a layer with an empty list (`{2: []}`) to say it takes part in the mean and may be cut to
    the common width, or use `uniform=False` to round only the layers the plan names.

    The plan changes as little as possible: a layer that must lose more neurons than planned loses the lowest-scored
    of the others, and one that must lose fewer keeps the highest-scored of the planned ones.

    Args:
        model: The model the plan is for (its current FFN widths).
        neurons_to_prune: Layer index -> FFN neuron indices to remove, as for `prune_ffn_neurons`. With
            `uniform=True` it must have an entry (possibly empty) for every layer.
        uniform: Give every layer the same FFN width: the mean kept width of all layers under the plan.
        round_to: Round kept widths to a multiple of this (1: no rounding), as `PruningConfig.round_to`.
        scores: Layer index -> importance of each current neuron (higher is more important), for layers whose
            planned set must change. Defaults to the neuron's weight norms, `|W_in[i, :]| * |W_out[:, i]|`.
        multiple_of: Deprecated name of `round_to`.

    Returns:
        The rounded plan, layer index -> sorted neuron indices to remove, for `prune_ffn_neurons`.

    Raises:
        ValueError: for a malformed plan or `round_to`, scores of the wrong shape, or `uniform=True` with a plan
            that does not name every layer.

    Example:
    ```python
    # A 2-layer model: every layer is named, and both end up with the same width.
    plan = round_ffn_plan(model, {0: list(range(100)), 1: list(range(300))}, uniform=True, round_to=64)
    prune_ffn_neurons(model, plan)
    ```
    """
    name = "round_to"
    if multiple_of is not None:
        if round_to != 1:
            raise ValueError(
                f"multiple_of={multiple_of!r} and round_to={round_to!r} were both given; pass only round_to."
            )
        warnings.warn(
            "round_ffn_plan(multiple_of=...) is deprecated: pass round_to=... (the name PruningConfig uses).",
            FutureWarning,
            stacklevel=2,
        )
        name, round_to = "multiple_of", multiple_of
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"{name}={round_to!r} must be a positive integer (1 disables rounding).")
    widths = get_structure(model).ffn
    plan = _validate_plan(neurons_to_prune, widths, "FFN neuron", "neurons_to_prune")
    planned_kept = [width - len(plan.get(i, ())) for i, width in enumerate(widths)]
    if uniform:
        missing = [i for i in range(len(widths)) if i not in plan]
        if missing:
            raise ValueError(
                f"uniform=True gives every layer the same FFN width, the mean kept width of all {len(widths)} layers, "
                f"so it can also cut layers {missing}, which neurons_to_prune does not name. Name every layer (e.g. "
                f"{{{missing[0]}: []}} for a layer that may be cut to the common width), or use uniform=False to round "
                "only the named layers."
            )
        kept = [round_width(sum(planned_kept) / len(widths), round_to, min(widths))] * len(widths)
    else:
        kept = [
            width if planned == width else round_width(planned, round_to, width)
            for planned, width in zip(planned_kept, widths, strict=True)
        ]
    layers = get_layers(model)
    spec = get_spec(model)
    rounded = {}
    for index, (width, keep) in enumerate(zip(widths, kept, strict=True)):
        planned = plan.get(index, set())
        if width - keep == len(planned):
            if planned:
                rounded[index] = sorted(planned)
            continue
        layer_scores = _neuron_scores(layers[index], spec, scores, index, width)
        # Planned neurons go first, each group from the least important up.
        order = sorted(range(width), key=lambda n: (n not in planned, layer_scores[n]))
        rounded[index] = sorted(order[: width - keep])
    return rounded


def unit_feature_indices(units: torch.Tensor | list[int], unit_size: int) -> torch.Tensor:
    """The feature indices of `units` in a projection where unit `u` owns the `unit_size` features from `u * unit_size`.

    A head owns `head_dim` contiguous features of q/k/v's outputs and of the attention output projection's inputs; an
    FFN neuron (`unit_size=1`) owns one.

    Example:
    ```python
    >>> unit_feature_indices([0, 2], 3)
    tensor([0, 1, 2, 6, 7, 8])
    ```
    """
    units = torch.as_tensor(units, dtype=torch.long)
    return (
        units[:, None] * unit_size + torch.arange(unit_size, device=units.device)
    ).flatten()  # (units * unit_size,)


def _neuron_scores(
    layer: nn.Module, spec: ArchitectureSpec, scores: Mapping[int, torch.Tensor] | None, index: int, width: int
) -> list[float]:
    if scores is None:
        up = layer.get_submodule(spec.ffn_in).weight  # (width, hidden)
        down = layer.get_submodule(spec.ffn_out).weight  # (hidden, width)
        return (up.detach().norm(dim=1) * down.detach().norm(dim=0)).tolist()
    if index not in scores:
        raise ValueError(f"scores has no entry for layer {index}, whose planned FFN neurons must change; add it.")
    layer_scores = torch.as_tensor(scores[index]).flatten().tolist()
    if len(layer_scores) != width:
        raise ValueError(
            f"scores[{index}] has {len(layer_scores)} values but layer {index} has {width} FFN neurons; give one score "
            "per current neuron."
        )
    return layer_scores


def _keep_linear(layer: nn.Module, index: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of `layer` keeping only the output (`dim=0`) or input (`dim=1`) features in `index`.

    Like `transformers.pytorch_utils.prune_linear_layer`, but it keeps the weights' dtype and `requires_grad` (that
    one builds float32 trainable layers) and allocates nothing for the weights it drops.
    """
    if type(layer) is not nn.Linear:
        raise ValueError(
            f"hf-compress prunes torch.nn.Linear projections, but found {type(layer).__name__}. Prune before "
            "quantizing the model or wrapping its layers (adapters), then apply those again."
        )
    index = index.to(layer.weight.device)
    weight = layer.weight.detach().index_select(dim, index)
    with warnings.catch_warnings():
        # An emptied layer is a zero-size Linear; torch warns that initialising it is a no-op (nothing is used here).
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    if layer.bias is not None:
        # Dropping inputs leaves every output, so the bias is kept whole.
        bias = layer.bias.detach().clone() if dim == 1 else layer.bias.detach().index_select(0, index)
        new.bias = nn.Parameter(bias, requires_grad=layer.bias.requires_grad)
    return new


def _validate_plan(
    plan: Mapping[int, Iterable[int]], sizes: tuple[int, ...], unit: str, argument: str
) -> dict[int, set[int]]:
    """Check a {layer: [indices]} plan against the current per-layer sizes; return layer -> set of indices."""
    if not isinstance(plan, Mapping):
        raise ValueError(
            f"{argument} must be a dict mapping a layer index to a list of {unit} indices, e.g. {{0: [1, 4]}}; got "
            f"{type(plan).__name__}."
        )
    checked = {}
    for layer, indices in plan.items():
        layer_index = _as_index(layer)
        if layer_index is None or not 0 <= layer_index < len(sizes):
            raise ValueError(
                f"{argument} names layer {layer!r}, but the model has {len(sizes)} layers (valid layer indices: "
                f"0..{len(sizes) - 1}). Layer indices count the current layers, after any dropped ones."
            )
        if layer_index in checked:
            raise ValueError(f"{argument} names layer {layer_index} twice; merge its {unit} lists.")
        checked[layer_index] = _validate_indices(
            indices, sizes[layer_index], argument, unit, f"layer {layer_index}", layer_index
        )
    return checked


def _validate_indices(
    indices: Iterable[int], size: int, argument: str, unit: str, owner: str, layer: int | None = None
) -> set[int]:
    where = f"{argument}[{layer}]" if layer is not None else argument
    if isinstance(indices, torch.Tensor):
        indices = indices.flatten().tolist()
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise ValueError(f"{where} must be a list of {unit} indices, got {type(indices).__name__}.")
    valid = f"valid indices: 0..{size - 1}" if size else f"it has no {unit}s left"
    seen = set()
    for value in indices:
        index = _as_index(value)
        if index is None:
            raise ValueError(
                f"{where}: {unit} index {value!r} is not an integer ({owner} has {size} {unit}s; {valid})."
            )
        if not 0 <= index < size:
            raise ValueError(
                f"{where}: {unit} index {index} is out of range: {owner} has {size} {unit}s ({valid}). Indices count "
                f"the current {unit}s, after any earlier pruning."
            )
        if index in seen:
            raise ValueError(f"{where}: {unit} index {index} is listed twice; list each {unit} once.")
        seen.add(index)
    return seen


def _as_index(value) -> int | None:
    """`value` as an int if it is an integer (Python, NumPy or a one-element integer tensor), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
