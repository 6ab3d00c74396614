"""Unstructured (element-wise) magnitude pruning and its sparsity report, on `torch.nn.utils.prune`.

Unstructured pruning zeroes individual weights: the matrices keep their shapes, so a dense kernel runs exactly as
fast as before and the checkpoint is exactly as large. The zeros pay off only when the weights are stored compressed
(e.g. `gzip` of the safetensors file, or a sparse format) or run on sparse kernels. For speed, use the structured
pruning of hf-compress (whole heads, neurons, layers).

Which weights are pruned: by default every `nn.Linear` weight inside the transformer layers; `include` / `exclude`
module-name patterns change that (the rules are in `hf_compress.pruning.module_selection`).

```python
from hf_compress import magnitude_prune, make_permanent, sparsity_report

magnitude_prune(model, amount=0.8)  # 80% of the selected weights become zero, smallest |w| first
print(sparsity_report(model))
make_permanent(model)  # plain weights with zeros, and no pruning hooks left
```

Saving while the masks are live: `magnitude_prune` makes the pruned model's `save_pretrained` write the masked weights
(`weight = weight_orig * weight_mask`), an ordinary checkpoint that stock `from_pretrained` loads, before or after
`make_permanent`; see `hf_compress.pruning.mask_folding`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune
from transformers.utils import logging

from .constants import SCOPES
from .mask_folding import add_mask_folding_hooks, remove_mask_folding_hooks
from .module_selection import effective_weight, select_linear_modules

logger = logging.get_logger(__name__)


def target_zeros(modules: Mapping[str, nn.Module], amount: float, scope: str) -> dict[str | None, int]:
    """How many weights `amount` zeroes in `modules`: `{None: count}` over all of them (`scope="global"`), or one
    count per module name (`scope="layer"`).
    """
    if scope == "global":
        return {None: round(amount * sum(module.weight.numel() for module in modules.values()))}
    return {name: round(amount * module.weight.numel()) for name, module in modules.items()}


def _num_masked(module: nn.Module) -> int:
    return int((module.weight_mask == 0).sum()) if hasattr(module, "weight_mask") else 0


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
    masks into `weight` (see `hf_compress.pruning.mask_folding`), so it writes an ordinary checkpoint with zeros
    whether or not `make_permanent` was called first.

    Pruning again (with a larger `amount`) keeps the existing masks and prunes the smallest of the remaining weights,
    so `amount` is always the total fraction of zeros that results, not an increment.

    Args:
        model: The model to prune (any `nn.Module`; the default selection needs a registered architecture).
        amount: Fraction of the selected weights to zero, in [0, 1). With `scope="global"` this is reached over all
            selected weights together (layers that matter less lose more); with `scope="layer"`, in every module.
        scope: `"global"` (one magnitude threshold for all selected weights) or `"layer"` (one per module).
        include: Module-name patterns selecting the `nn.Linear` modules to prune instead of the default (every
            linear layer inside the transformer layers); the rules are in `hf_compress.pruning.module_selection`.
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
    modules = select_linear_modules(model, include, exclude)

    # All checks run before the first mask is applied, so a refused call leaves the model as it was.
    masked = {name: _num_masked(module) for name, module in modules.items()}
    to_prune = {  # weights still to mask: None counts over all modules (global scope), a name one module's
        name: count - (sum(masked.values()) if name is None else masked[name])
        for name, count in target_zeros(modules, amount, scope).items()
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
    add_mask_folding_hooks(model, modules.values())
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
        remove_mask_folding_hooks(module)
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
            name: ModuleSparsity(int((effective_weight(module) == 0).sum()), module.weight.numel())
            for name, module in select_linear_modules(model, include, exclude).items()
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
