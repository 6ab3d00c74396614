"""Which `nn.Linear` modules unstructured pruning touches: module-name patterns and the default selection.

The same rules serve `magnitude_prune`, `sparsity_report`, `GradualMagnitudePruningCallback` and `l1_penalty`:

- Only the `weight` of `nn.Linear` modules (and subclasses) is selected; biases never are.
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
- A weight tied to another module (an MLM decoder tied to the word embeddings) cannot be selected: pruning it in one
  place would prune it everywhere.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from ..architectures import get_layers


def normalize_patterns(patterns: str | Iterable[str] | None, arg_name: str) -> list[str] | None:
    """Check module-name patterns and return them as a list (`None` stays `None`: the default selection).

    Args:
        patterns: One pattern, an iterable of patterns, or `None`.
        arg_name: The argument's name (`"include"` or `"exclude"`), for the error message.

    Returns:
        The patterns as a list of non-empty strings, or `None`.

    Raises:
        ValueError: for an empty list, or a pattern that is not a non-empty string.
    """
    if patterns is None:
        return None
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f"`{arg_name}` must be a module-name pattern or a non-empty list of them (non-empty strings), got "
            f"{patterns!r}. Pass None to use the default selection."
        )
    return patterns


def select_linear_modules(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules whose weights are pruned or penalised (rules in the module docstring).

    Args:
        model: The model to select from (the default selection needs a registered architecture).
        include: Module-name patterns replacing the default selection.
        exclude: Module-name patterns removed from the selection.

    Returns:
        Module name -> module, in model order.

    Raises:
        ValueError: for a pattern that matches nothing (the message lists close names), an empty selection, or a
            selected weight tied to another module.

    Example:
    ```python
    modules = select_linear_modules(model, exclude=["layer.0"])  # every layer's projections but the first layer's
    ```
    """
    include = normalize_patterns(include, "include")
    exclude = normalize_patterns(exclude, "exclude")
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


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight `module` computes with: `weight_orig * weight_mask` while `torch.nn.utils.prune` masks it.

    Recomputed from the two tensors (differentiable), as the `weight` attribute prune leaves is only refreshed at
    forward time.
    """
    if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
        return module.weight_orig * module.weight_mask
    return module.weight


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
