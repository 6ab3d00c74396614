"""Unstructured (element-wise) magnitude pruning, its sparsity report, and an L1 penalty, on `torch.nn.utils.prune`.

Unstructured pruning zeroes individual weights: the matrices keep their shapes, so a dense kernel runs exactly as
fast as before and the checkpoint is exactly as large. The zeros pay off only when the weights are stored compressed
(e.g. `gzip` of the safetensors file, or a sparse format) or run on sparse kernels. For speed, use the structured
pruning of hf-compress (whole heads, neurons, layers).

Which weights are pruned (the same rules for `magnitude_prune`, `sparsity_report` and `l1_penalty`):

- Only the `weight` of `nn.Linear` modules (and subclasses) is pruned; biases never are.
- Default (`include=None`): every `nn.Linear` inside the transformer layers, found through the architecture registry
  (`ArchitectureSpec.layers`: `bert.encoder.layer`, `distilbert.transformer.layer`, ...). This is the attention
  q/k/v/output projections and the FFN of every layer. Embeddings, LayerNorms, the pooler and the task head
  (`classifier`, `lm_head`, `qa_outputs`, ...) lie outside the layers and are therefore excluded.
- `include`: module-name patterns; when given, it replaces the default and selects every `nn.Linear` whose name
  matches (the task head only if you include it). `exclude`: patterns removed from the selection.
- A pattern matches a module if it matches the module's full dotted name or the name of one of its parents, where
  "matches" means equal (`"bert.encoder.layer.0.attention.self.query"`), a dotted suffix (`"query"`, `"attention"`,
  `"layer.0"` — so `"attention"` selects all four attention projections of every layer) or a `fnmatch` glob
  (`"*.layer.1?.*"`). A pattern that matches no module, or no `nn.Linear`, is an error listing close names.

```python
from hf_compress import magnitude_prune, make_permanent, sparsity_report

magnitude_prune(model, amount=0.8)  # 80% of the selected weights become zero, smallest |w| first
print(sparsity_report(model))
make_permanent(model)  # plain weights with zeros, and no pruning hooks left
```

Saving while the masks are live: `magnitude_prune` makes the pruned model's `save_pretrained` write
`weight = weight_orig * weight_mask` instead of the two reparametrisation tensors (which `from_pretrained` would
ignore, silently re-initialising every pruned weight), and gives every pruned module a load hook that accepts such a
folded state dict back. So `save_pretrained`, `Trainer.save_model`, Trainer checkpoints, `push_to_hub` and
`push_compressed_to_hub` write an ordinary checkpoint (the pruned weights as 0.0) that stock `from_pretrained` loads,
before or after `make_permanent`. A masked model loading a folded state dict (a Trainer resuming, or
`load_best_model_at_end`) takes the loaded weights as they are and its masks from their zeros, so it computes exactly
what was saved. `model.state_dict()` itself keeps torch's `weight_orig` / `weight_mask` (prune the model you save: a
parent of the pruned module does not fold).
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune
from transformers.utils import logging

from ..architectures import get_layers

logger = logging.get_logger(__name__)

SCOPES = ("global", "layer")


def _normalize_patterns(patterns: str | Iterable[str] | None, arg_name: str) -> list[str] | None:
    if patterns is None:
        return None
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f"`{arg_name}` must be a module-name pattern or a non-empty list of them (non-empty strings), got "
            f"{patterns!r}. Pass None to use the default selection."
        )
    return patterns


def _pattern_matches(pattern: str, module_name: str) -> bool:
    """Whether `pattern` matches `module_name` or one of its parents (equal, dotted suffix or fnmatch glob)."""
    parts = module_name.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if prefix == pattern or prefix.endswith("." + pattern) or fnmatch.fnmatchcase(prefix, pattern):
            return True
    return False


def _no_match_error(pattern: str, arg_name: str, names: list[str], why: str) -> ValueError:
    short_names = sorted({name.rsplit(".", 1)[-1] for name in names})
    candidates = difflib.get_close_matches(pattern, short_names + names, n=5, cutoff=0.5)
    hint = f" Close module names: {', '.join(candidates)}." if candidates else ""
    return ValueError(
        f"The {arg_name} pattern {pattern!r} {why}.{hint} Patterns match a module's full dotted name (as in "
        "`model.named_modules()`), a dotted suffix of it, or an fnmatch glob."
    )


def _default_selection(model: nn.Module) -> dict[str, nn.Linear]:
    try:
        layers = get_layers(model)
    except ValueError as error:
        raise ValueError(f"{error} Or select the modules to prune yourself with `include=[...]`.") from error
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefix + ".")
    }


def _select_linear_modules(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules whose weights are pruned or penalised, by name (rules in the module docstring)."""
    include = _normalize_patterns(include, "include")
    exclude = _normalize_patterns(exclude, "exclude")
    names = [name for name, _ in model.named_modules() if name]
    linears = {name: module for name, module in model.named_modules() if name and isinstance(module, nn.Linear)}

    if include is None:
        selected = _default_selection(model)
    else:
        selected = {}
        for pattern in include:
            matched = {name: module for name, module in linears.items() if _pattern_matches(pattern, name)}
            if not matched:
                matches_other = any(_pattern_matches(pattern, name) for name in names)
                why = (
                    "matches modules but no nn.Linear among them or below them"
                    if matches_other
                    else "matches no module"
                )
                raise _no_match_error(pattern, "include", names, why)
            selected.update(matched)
    for pattern in exclude or []:
        if not any(_pattern_matches(pattern, name) for name in names):
            raise _no_match_error(pattern, "exclude", names, "matches no module")
        selected = {name: module for name, module in selected.items() if not _pattern_matches(pattern, name)}
    if not selected:
        raise ValueError(
            f"No nn.Linear module is left to prune with include={include!r} and exclude={exclude!r}; loosen `exclude` "
            "or widen `include`."
        )
    _check_not_shared(model, selected)
    order = {name: index for index, name in enumerate(names)}
    return dict(sorted(selected.items(), key=lambda item: order[item[0]]))


def _check_not_shared(model: nn.Module, selected: dict[str, nn.Linear]) -> None:
    # A weight tied to another module (an MLM decoder tied to the word embeddings) cannot be pruned in one place only.
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append(f"{name}.{param_name}")
    for name, module in selected.items():
        shared = owners.get(id(_weight_parameter(module)), [])
        if len(set(shared)) > 1:
            raise ValueError(
                f"The weight of {name!r} is tied to {', '.join(sorted(set(shared)))}; pruning it would prune the "
                f"tied tensors too. Exclude it (`exclude=[{name!r}]`) or untie the weights first."
            )


def _weight_parameter(module: nn.Module) -> nn.Parameter:
    """The trainable weight tensor: `weight_orig` while torch.nn.utils.prune reparametrises the module."""
    return module.weight_orig if hasattr(module, "weight_orig") else module.weight


def _effective_weight(module: nn.Module) -> torch.Tensor:
    # Recomputed from weight_orig * weight_mask: the `weight` attribute prune leaves is only refreshed at forward time.
    if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
        return module.weight_orig * module.weight_mask
    return module.weight


def _num_masked(module: nn.Module) -> int:
    return int((module.weight_mask == 0).sum()) if hasattr(module, "weight_mask") else 0


def _pruned_tensor_names(module: nn.Module) -> list[str]:
    """The tensors `torch.nn.utils.prune` reparametrises on `module` (`["weight"]` after `magnitude_prune`)."""
    return [
        hook._tensor_name for hook in module._forward_pre_hooks.values() if isinstance(hook, prune.BasePruningMethod)
    ]


def _folded_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict:
    """`model`'s state dict (or `state_dict`) with each `name_orig` / `name_mask` pair folded into `name`.

    The folded tensor `name_orig * name_mask` is what the model computes with: the pruned entries are 0.0, and the
    keys are the ones stock `from_pretrained` knows. Key order is kept (`name` takes `name_orig`'s place).
    """
    state_dict = model.state_dict() if state_dict is None else state_dict
    folded_keys = {}  # key of name_orig -> key of name
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name in _pruned_tensor_names(module):
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


def _save_pretrained_folded(model: nn.Module, save_directory, *args, state_dict: dict | None = None, **kwargs):
    """`save_pretrained` of a model with live pruning masks: the masks are folded into the weights it writes.

    `magnitude_prune` puts this (bound to the model with `functools.partial`) in place of the model's
    `save_pretrained`, which `Trainer.save_model`, Trainer checkpoints, `push_to_hub` and `push_compressed_to_hub`
    all call. Without it the checkpoint holds `weight_orig`/`weight_mask`, which `from_pretrained` ignores: it would
    silently re-initialise every pruned weight. `make_permanent` removes it.
    """
    return type(model).save_pretrained(
        model, save_directory, *args, state_dict=_folded_state_dict(model, state_dict), **kwargs
    )


def _is_folding_save(function) -> bool:
    return isinstance(function, functools.partial) and function.func is _save_pretrained_folded


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
    """Load pre-hook: let a still-masked module load a folded state dict (as `_save_pretrained_folded` writes).

    The loaded values become `name_orig` and the mask is taken from their zeros, so that `name_orig * name_mask`
    equals the loaded tensor exactly (a Trainer resuming, or loading its best checkpoint, computes what was saved).
    A state dict that still has `name_orig`/`name_mask` loads as before.
    """
    for name in _pruned_tensor_names(module):
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


def _add_save_hooks(model: nn.Module, modules: Iterable[nn.Module]) -> None:
    """Make every save of `model` fold the masks, and every pruned module accept a folded state dict back.

    Module-level functions (and a `functools.partial` of one), so a deep copy or a pickle of the model keeps working.
    """
    if callable(getattr(type(model), "save_pretrained", None)) and not _is_folding_save(
        model.__dict__.get("save_pretrained")
    ):
        model.save_pretrained = functools.partial(_save_pretrained_folded, model)
    for module in modules:
        if not _registered(module._load_state_dict_pre_hooks, _unfold_masks_load_pre_hook):
            module.register_load_state_dict_pre_hook(_unfold_masks_load_pre_hook)
            module.register_load_state_dict_post_hook(_refresh_masked_weights_load_post_hook)


def _remove_save_hooks(module: nn.Module) -> None:
    if _is_folding_save(module.__dict__.get("save_pretrained")):
        del module.__dict__["save_pretrained"]
    for attribute, function in _LOAD_HOOKS:
        hooks = getattr(module, attribute)
        for key in _registered(hooks, function):
            del hooks[key]


def _check_amount(amount: float) -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
        raise ValueError(
            f"`amount` is the fraction of the selected weights to set to zero and must be a float in [0, 1), got "
            f"{amount!r}. For example amount=0.9 keeps the largest 10% of the weights."
        )


def magnitude_prune(
    model: nn.Module,
    amount: float,
    scope: str = "global",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[str]:
    """Zero the smallest-magnitude weights of the selected `nn.Linear` modules (L1 unstructured pruning), in place.

    The model is reparametrised by `torch.nn.utils.prune`: each pruned module holds `weight_orig` (the same
    `nn.Parameter` object as before, so an existing optimizer keeps training it) and a `weight_mask` buffer, and a
    forward pre-hook computes `weight = weight_orig * weight_mask`. The model's `save_pretrained` then folds the
    masks into `weight` (see the module docstring), so it writes an ordinary checkpoint with zeros whether or not
    `make_permanent` was called first.

    Pruning again (with a larger `amount`) keeps the existing masks and prunes the smallest of the remaining weights,
    so `amount` is always the total fraction of zeros that results, not an increment.

    Args:
        model: The model to prune (any `nn.Module`; the default selection needs a registered architecture).
        amount: Fraction of the selected weights to zero, in [0, 1). With `scope="global"` this is reached over all
            selected weights together (layers that matter less lose more); with `scope="layer"`, in every module.
        scope: `"global"` (one magnitude threshold for all selected weights) or `"layer"` (one per module).
        include: Module-name patterns selecting the `nn.Linear` modules to prune instead of the default (every
            linear layer inside the transformer layers). See the module docstring for the matching rules.
        exclude: Module-name patterns removed from the selection.

    Returns:
        The names of the pruned modules, in model order.

    Raises:
        ValueError: if `amount` or `scope` is invalid, a pattern matches nothing, or the selected weights already
            have more pruned entries than `amount` asks for (pruning never restores weights). The model is left
            untouched in all these cases.

    Example:

    ```python
    magnitude_prune(model, 0.5, exclude=["layer.0"])  # half the weights of every layer but the first, globally
    make_permanent(model)
    model.save_pretrained("sparse-model")
    ```
    """
    _check_amount(amount)
    if scope not in SCOPES:
        raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}.")
    modules = _select_linear_modules(model, include, exclude)

    # All checks run before the first mask is applied, so a refused call leaves the model as it was.
    if scope == "global":
        total = sum(module.weight.numel() for module in modules.values())
        to_prune = {None: round(amount * total) - sum(_num_masked(module) for module in modules.values())}
    else:
        to_prune = {
            name: round(amount * module.weight.numel()) - _num_masked(module) for name, module in modules.items()
        }
    for name, count in to_prune.items():
        if count < 0:
            where = "The selected weights already have" if name is None else f"Module {name!r} already has"
            raise ValueError(
                f"{where} {-count} more pruned entries than amount={amount} asks for; magnitude pruning "
                "cannot restore weights. Pass an amount at least as large as the current sparsity (see "
                "`sparsity_report`), or reload the model to start over."
            )

    if scope == "global":
        # An int amount counts the weights to prune among those not yet masked (torch's PruningContainer).
        prune.global_unstructured(
            [(module, "weight") for module in modules.values()],
            pruning_method=prune.L1Unstructured,
            amount=to_prune[None],
        )
    else:
        for name, module in modules.items():
            prune.l1_unstructured(module, "weight", amount=to_prune[name])
    _add_save_hooks(model, modules.values())
    logger.info("Magnitude-pruned %d modules to %.1f%% sparsity (%s scope).", len(modules), 100 * amount, scope)
    return list(modules)


def make_permanent(model: nn.Module) -> list[str]:
    """Turn every `torch.nn.utils.prune` reparametrisation of `model` into a plain weight holding the zeros, in place.

    Afterwards the model has no `*_orig` parameters, `*_mask` buffers, pruning forward pre-hooks, nor the save and
    load hooks `magnitude_prune` added: it is an ordinary model (and computes exactly what it computed before). The
    parameter objects are kept (only their values change), so an optimizer built before the call still trains the
    same tensors.

    Args:
        model: A model pruned with `magnitude_prune` or `torch.nn.utils.prune` (an unpruned model is left as is).

    Returns:
        The names of the modules that were made permanent, in model order.

    Example:

    ```python
    magnitude_prune(model, 0.7)
    make_permanent(model)
    model.save_pretrained("sparse-model")
    ```
    """
    made_permanent = []
    for name, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
                made_permanent.append(name)
        _remove_save_hooks(module)
    return made_permanent


@dataclass
class ModuleSparsity:
    """Zeros in one tensor: `zeros` of `numel` entries."""

    zeros: int
    numel: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {"zeros": self.zeros, "numel": self.numel, "sparsity": self.sparsity}


@dataclass
class SparsityReport:
    """Zeros per selected module, over all selected weights (`total`) and over every parameter (`model`).

    `str(report)` is a printable table; `report.to_dict()` the same numbers as plain data (e.g. for JSON).
    """

    modules: dict[str, ModuleSparsity] = field(default_factory=dict)
    total: ModuleSparsity = field(default_factory=lambda: ModuleSparsity(0, 0))
    model: ModuleSparsity = field(default_factory=lambda: ModuleSparsity(0, 0))

    def to_dict(self) -> dict[str, dict]:
        return {
            "modules": {name: entry.to_dict() for name, entry in self.modules.items()},
            "total": self.total.to_dict(),
            "model": self.model.to_dict(),
        }

    def __str__(self) -> str:
        rows = [(name, entry) for name, entry in self.modules.items()]
        rows += [("total (selected weights)", self.total), ("model (all parameters)", self.model)]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'module':<{width}}  {'zeros':>12}  {'numel':>12}  {'sparsity':>8}"]
        for index, (name, entry) in enumerate(rows):
            if index == len(self.modules):
                lines.append("-" * len(lines[0]))
            lines.append(f"{name:<{width}}  {entry.zeros:>12,}  {entry.numel:>12,}  {entry.sparsity:>8.2%}")
        return "\n".join(lines)


def sparsity_report(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> SparsityReport:
    """Count the zero weights of the modules `magnitude_prune` selects, and of the whole model.

    Zeros are counted in the weights the model computes with (`weight_orig * weight_mask` while pruning is not yet
    permanent), so the report is the same before and after `make_permanent`.

    Args:
        model: The model to inspect.
        include: Module-name patterns, as in `magnitude_prune` (default: the linear layers of the transformer layers).
        exclude: Module-name patterns removed from the selection.

    Returns:
        A `SparsityReport`: `.modules` (name -> zeros/numel/sparsity of its weight), `.total` over those weights and
        `.model` over every parameter of the model (embeddings, biases, LayerNorms included).
        `print(report)` shows it as a table, `report.to_dict()` as plain data.

    Example:

    ```python
    magnitude_prune(model, 0.9)
    report = sparsity_report(model)
    print(report)  # one row per module, then the totals
    assert abs(report.total.sparsity - 0.9) < 1e-3
    ```
    """
    with torch.no_grad():
        modules = {
            name: ModuleSparsity(int((_effective_weight(module) == 0).sum()), module.weight.numel())
            for name, module in _select_linear_modules(model, include, exclude).items()
        }
        seen: set[int] = set()
        model_zeros = model_numel = 0
        for module in model.modules():
            for param_name, param in module._parameters.items():
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
                # While reparametrised, count `weight` (masked), not the unmasked `weight_orig` parameter.
                masked_name = param_name.removesuffix("_orig")
                has_mask = param_name.endswith("_orig") and hasattr(module, masked_name + "_mask")
                tensor = param * getattr(module, masked_name + "_mask") if has_mask else param
                model_zeros += int((tensor == 0).sum())
                model_numel += tensor.numel()
    return SparsityReport(
        modules=modules,
        total=ModuleSparsity(sum(m.zeros for m in modules.values()), sum(m.numel for m in modules.values())),
        model=ModuleSparsity(model_zeros, model_numel),
    )


def l1_penalty(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> torch.Tensor:
    """Sum of the absolute values of the selected weights, `sum_m sum_ij |W_m[i, j]|`, as a differentiable scalar.

    Add `weight * l1_penalty(model)` to a training loss to push weights towards zero before magnitude pruning. Only the
    `weight` of the selected `nn.Linear` modules counts (no biases, embeddings, LayerNorms or task head by default);
    pruned entries are zero and add nothing.

    Args:
        model: The model whose weights are penalised.
        include: Module-name patterns, as in `magnitude_prune` (default: the linear layers of the transformer layers).
        exclude: Module-name patterns removed from the selection.

    Returns:
        A 0-dim float32 tensor on the weights' device, with gradient to the weights.

    Example:

    ```python
    loss = outputs.loss + 1e-5 * l1_penalty(model)
    loss.backward()
    ```
    """
    weights = [_effective_weight(module) for module in _select_linear_modules(model, include, exclude).values()]
    return torch.stack([weight.abs().sum(dtype=torch.float32) for weight in weights]).sum()
