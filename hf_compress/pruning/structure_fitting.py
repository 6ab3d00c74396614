"""Fit a model to the pruned structure of a state dict before it loads: resuming gradual structured pruning.

A Trainer resuming a run of `GradualStructuredPruningCallback` builds a fresh, unpruned model and loads a checkpoint of
a smaller structure into it. torch copies tensors one by one and reports size mismatches only at the end, so the
model would be left half overwritten. `add_structure_fitting_hook` puts `fit_structure_load_pre_hook` on the model:
before any tensor loads, it reads the heads and FFN widths from the tensors' shapes and prunes the model to them, or
refuses a structure the model cannot be pruned to before anything changes.

Pruning replaces parameters; an optimizer built before the fit would train the replaced ones while the model's own
would not train at all. `check_optimizer_is_current` refuses such an optimizer when training begins.
"""

from __future__ import annotations

import weakref

from torch import nn
from transformers.utils import logging

from ..architectures import get_layers, get_spec
from ..structure import get_structure
from .structured import prune_ffn_neurons, prune_heads

logger = logging.get_logger(__name__)


# model -> weak references to the parameters `fit_structure_load_pre_hook` replaced (weak: they are garbage unless an
# optimizer still holds them, which is exactly what `check_optimizer_is_current` looks for).
_REPLACED_BY_FIT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_optimizer_is_current(model: nn.Module, optimizer) -> None:
    """Refuse an optimizer that holds parameters `fit_structure_load_pre_hook` replaced in `model`.

    An optimizer given to the Trainer (`optimizers=`) before a resume fitted the model to a pruned checkpoint would
    keep training the parameters pruning replaced, while the model's own would not train at all. (Other parameters
    an optimizer may hold, e.g. DistillationTrainer's hidden-state projections, are fine.)

    Raises:
        ValueError: naming how many stale parameters the optimizer holds and how to build a current one.
    """
    if optimizer is None:
        return
    replaced = {id(ref()) for ref in _REPLACED_BY_FIT.get(model, ()) if ref() is not None}
    inner = getattr(optimizer, "optimizer", optimizer)
    stale = sum(id(p) in replaced for group in inner.param_groups for p in group["params"])
    if stale:
        raise ValueError(
            f"The optimizer holds {stale} parameters that are no longer the model's (the model was pruned after the "
            "optimizer was built, e.g. to fit a pruned checkpoint being resumed). Let the Trainer build the optimizer "
            "(do not pass `optimizers=`), or build it from the model as it is now."
        )


def _layer_keys(model: nn.Module, prefix: str) -> tuple[str, list[dict[str, str]]]:
    """The layers' key prefix and each layer's projection weight keys, for a state dict loaded under `prefix`."""
    spec = get_spec(model)
    layers = get_layers(model)
    path = prefix + next(name for name, module in model.named_modules() if module is layers)
    keys = [
        {
            name: f"{path}.{index}.{getattr(spec, name)}.weight"
            for name in ("query", "attention_output", "ffn_in", "ffn_out")
        }
        for index in range(len(layers))
    ]
    return path, keys


def fit_structure_load_pre_hook(
    model: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook on the model: prune it to the heads and FFN widths of the state dict before any tensor loads.

    torch copies tensors one by one and reports size mismatches only at the end, so a checkpoint of a pruned structure
    (a Trainer resuming a run of `GradualStructuredPruningCallback` with a fresh model) would leave the model half
    overwritten. Here the structure is read from the tensors' shapes first; the model is pruned to it (the trailing
    heads and neurons go: every kept weight is then overwritten by the checkpoint, so which ones does not matter) or,
    when it cannot be (a bigger checkpoint, another layer count), the load is refused before anything changes.
    """
    current = get_structure(model)
    head_dim = current.head_dim
    path, layer_keys = _layer_keys(model, prefix)
    heads, ffn = list(current.heads), list(current.ffn)
    problems = []
    for index, keys in enumerate(layer_keys):
        query, output = state_dict.get(keys["query"]), state_dict.get(keys["attention_output"])
        ffn_in, ffn_out = state_dict.get(keys["ffn_in"]), state_dict.get(keys["ffn_out"])
        # A layer without heads has no query (its output projection has 0 input features); a sharded checkpoint's
        # shard may hold only some of a layer's tensors: any one of them tells the size.
        if query is not None and query.dim() == 2:
            heads[index] = query.shape[0] // head_dim
        elif output is not None and output.dim() == 2:
            heads[index] = output.shape[1] // head_dim
        if ffn_in is not None and ffn_in.dim() == 2:
            ffn[index] = ffn_in.shape[0]
        elif ffn_out is not None and ffn_out.dim() == 2:
            ffn[index] = ffn_out.shape[1]
        if heads[index] > current.heads[index] or ffn[index] > current.ffn[index]:
            problems.append(index)
    extra = [key for key in state_dict if key.startswith(f"{path}.{len(layer_keys)}.")]
    if problems or extra:
        what = (
            f"layer(s) {problems} have more heads or FFN neurons in it than in the model"
            if problems
            else f"it has more than the model's {len(layer_keys)} layers"
        )
        raise ValueError(
            f"The state dict being loaded holds a structure this model cannot be pruned to ({what}: heads per layer "
            f"{heads} and FFN widths {ffn} against the model's {list(current.heads)} and {list(current.ffn)}). "
            "Nothing was loaded. Build the model from the checkpoint instead: "
            "`model = hf_compress.load_compressed(checkpoint_dir)`, and pass that model to the Trainer."
        )
    remove_heads = {i: list(range(h, current.heads[i])) for i, h in enumerate(heads) if h < current.heads[i]}
    remove_ffn = {i: list(range(n, current.ffn[i])) for i, n in enumerate(ffn) if n < current.ffn[i]}
    if not remove_heads and not remove_ffn:
        return
    before = list(model.parameters())
    prune_heads(model, remove_heads)
    prune_ffn_neurons(model, remove_ffn)
    kept = {id(p) for p in model.parameters()}
    _REPLACED_BY_FIT.setdefault(model, []).extend(weakref.ref(p) for p in before if id(p) not in kept)
    logger.warning(
        "The state dict being loaded has a pruned structure; the model was pruned to it before loading (heads per "
        "layer %s, FFN widths %s).",
        heads,
        ffn,
    )


def add_structure_fitting_hook(model: nn.Module) -> None:
    """Put `fit_structure_load_pre_hook` on `model`, once (a module-level function: deep copies keep working).

    The hook stays on the model: a later `model.load_state_dict` of a smaller pruned structure prunes it likewise.
    """
    hooks = model._load_state_dict_pre_hooks
    if not any(getattr(hook, "hook", None) is fit_structure_load_pre_hook for hook in hooks.values()):
        model.register_load_state_dict_pre_hook(fit_structure_load_pre_hook)
