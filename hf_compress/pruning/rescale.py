"""Retraining-free recovery: rescale the kept heads and neurons so each layer reproduces the unpruned model's output.

This is the mask tuning of Kwon et al. 2022 ("A Fast Post-Training Pruning Framework for Transformers"). Removing a
head or neuron is multiplying its output by 0; the kept units keep a mask of 1. Mask tuning replaces those ones by
real-valued scales chosen by least squares, sublayer by sublayer, so that what each attention output projection and
FFN down projection adds to the residual stream matches the unpruned model on the calibration tokens:

    min_s  sum_t || r'(t) + sum_{k kept} s_k W_k x'_k(t)  -  r(t) - sum_{j all} W_j x_j(t) ||^2  +  lambda ||s - 1||^2

where `x'` is the projection's input in the model pruned (and rescaled) up to this point and `x` in the unpruned
model, `W_k` the projection's input columns of unit `k`, `r'` and `r` the residual stream the projection's output is
added to (the layer's input for attention, the FFN's input for the FFN; the registered encoders are post-LN, so this
sum is what the following LayerNorm sees), and `t` runs over the real (non-padding) tokens. Because the inputs come
from the pruned model, each sublayer also makes up for the error that earlier ones leave. The normal equations only
need `x'^T x'` over the kept units' features and `W^T W`, so the solve has one unknown per kept unit whatever the
amount of calibration data. The damping `lambda` (relative to the Gram matrix's mean diagonal) pulls the scales
towards 1, "leave the unit as it is", where the data cannot determine them; with any `lambda` the fitted scales never
do worse on the objective than no rescaling.

Calibration activations are propagated layer by layer, for the unpruned and for the pruned model, so each layer runs
about four times per batch in all and only one layer's inputs per batch are held in memory. The scales are folded
into the projections' input columns when the plan is applied (`apply_plan`): the pruned model is an ordinary dense
model.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.utils import logging

from ..architectures import get_layers, get_spec
from ..structure import get_structure
from .search import Selection
from .structured import unit_feature_indices
from .unit_masks import UnitMasks

logger = logging.get_logger(__name__)

_MAX_SCALE = 10.0


class _StopForward(Exception):
    """Raised by a capture hook: nothing after the captured module is needed."""


def _layer_inputs(model: PreTrainedModel, batch: dict) -> tuple[torch.Tensor, tuple, dict]:
    """What the encoder passes to its first layer for `batch`: hidden states, the other arguments, keyword arguments."""
    captured: dict = {}

    def hook(module, args, kwargs):
        captured["call"] = (args, kwargs)
        raise _StopForward

    handle = get_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**batch)
    except _StopForward:
        pass
    finally:
        handle.remove()
    args, kwargs = captured["call"]
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _run_layer(
    layer: nn.Module, call: tuple[torch.Tensor, tuple, dict], capture: dict[str, nn.Module], stop: str | None = None
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Run one layer, capturing the inputs of the modules in `capture` (by name); stop after capturing `stop`."""
    hidden, args, kwargs = call
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make(name: str):
        def hook(module, hook_args, hook_kwargs):
            captured[name] = (hook_args[0] if hook_args else hook_kwargs["input"]).detach()
            if name == stop:
                raise _StopForward

        return hook

    for name, module in capture.items():
        handles.append(module.register_forward_pre_hook(make(name), with_kwargs=True))
    try:
        output = layer(hidden, *args, **kwargs)
        output = output[0] if isinstance(output, tuple) else output
    except _StopForward:
        output = None
    finally:
        for handle in handles:
            handle.remove()
    return output, captured


def _tokens(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """`(batch, seq, features)` -> `(real tokens, features)`."""
    if token_mask is not None and x.dim() == 3:
        return x[token_mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _solve(gram: torch.Tensor, target: torch.Tensor, damping: float) -> torch.Tensor:
    """Solve `(gram + lambda I) s = target + lambda` with `lambda = damping * mean(diag(gram))`."""
    lam = damping * gram.diagonal().mean().clamp(min=torch.finfo(gram.dtype).tiny)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    # lstsq stays well-defined when an undamped Gram matrix is singular (dead units); the pivoted-QR driver does so
    # in a fraction of the time of the SVD-based default (seconds instead of minutes for thousands of neurons).
    return torch.linalg.lstsq(gram + lam * eye, (target + lam).unsqueeze(-1), driver="gelsy").solution.squeeze(-1)


def _mask_values(kept: list[int], count: int) -> torch.Tensor:
    mask = torch.zeros(count)
    mask[kept] = 1.0
    return mask


def _reference_pass(layer: nn.Module, modules: dict[str, nn.Module], calls: list, token_masks: list) -> tuple:
    """Run the unpruned layer: its outputs, and per sublayer and batch the target that the pruned one should add.

    The target of a sublayer is its projection's output without bias plus the residual it joins, over real tokens.
    """
    outputs, targets = [], {"heads": [], "ffn": []}
    for call, token_mask in zip(calls, token_masks, strict=True):
        output, captured = _run_layer(layer, call, modules)
        outputs.append((output, call[1], call[2]))
        # A layer with no heads (or neurons) left may skip its projection; nothing to fit there.
        for kind, residual in (("heads", call[0]), ("ffn", captured.get("ffn_in"))):
            if kind in captured:
                projected = _tokens(captured[kind], token_mask) @ modules[kind].weight.T  # (tokens, hidden)
                targets[kind].append(projected + _tokens(residual, token_mask))
    return outputs, targets


def _fit_sublayer(
    model: PreTrainedModel,
    layer_index: int,
    modules: dict[str, nn.Module],
    kind: str,
    unit: int,
    kept: list[int],
    calls: list,
    token_masks: list,
    targets: list[torch.Tensor],
    masks: dict[str, list[torch.Tensor | None]],
    damping: float,
) -> torch.Tensor:
    """Least-squares scales of the `kept` units of one projection (`kind` "heads" or "ffn") of a layer.

    `calls` are the layer's inputs in the pruned model, `targets` what the unpruned sublayer adds to its residual,
    `masks` the current masks (scales) of every layer.
    """
    layer = get_layers(model)[layer_index]
    lifted = {name: list(values) for name, values in masks.items()}
    lifted[kind][layer_index] = None  # the fit needs the raw projection input
    weight = modules[kind].weight.detach().float()
    # Input features of the kept units: a head owns a contiguous block of `unit` features.
    features = unit_feature_indices(kept, unit).to(weight.device)
    weight = weight[:, features]  # (hidden, kept features)
    gram = torch.zeros(len(features), len(features), dtype=torch.float64, device=weight.device)
    rhs = torch.zeros(len(features), dtype=torch.float64, device=weight.device)
    for call, token_mask, target in zip(calls, token_masks, targets, strict=True):
        with UnitMasks(model, head_masks=lifted["heads"], ffn_masks=lifted["ffn"]):
            _, captured = _run_layer(layer, call, {"ffn_in": modules["ffn_in"], kind: modules[kind]}, stop=kind)
        x = _tokens(captured[kind], token_mask).float()[:, features]  # (tokens, kept features)
        residual = _tokens(call[0] if kind == "heads" else captured["ffn_in"], token_mask)
        # float32 products, float64 sums; Grams only over kept features, so heavy pruning is cheap.
        gram += (x.T @ x).double()
        rhs += (x * ((target - residual) @ weight)).sum(0).double()
    gram *= (weight.T @ weight).double()
    # (kept * unit, kept * unit) -> (kept, unit, kept, unit): sum each unit's block of features.
    gram = gram.view(len(kept), unit, len(kept), unit).sum((1, 3))
    return _solve(gram, rhs.view(len(kept), unit).sum(1), damping).cpu()


@torch.no_grad()
def fit_rescale(
    model: PreTrainedModel,
    batches: list[dict],
    selection: Selection,
    damping: float = 1e-2,
    show_progress: bool = True,
) -> tuple[list[list[float] | None], list[list[float] | None]]:
    """Least-squares scales of the kept units of every layer, on an *unpruned* model (pruning is simulated by masks).

    Args:
        model: The model before pruning; it is not modified.
        batches: Calibration batches of model inputs (labels are ignored).
        selection: The units to keep and the layers to remove.
        damping: Ridge damping relative to the mean diagonal of each fit's Gram matrix, pulling scales towards 1.
        show_progress: Show a tqdm progress bar over the layers.

    Returns:
        `(head_scales, ffn_scales)`: per layer, one scale per kept head / neuron (in the order of
        `selection.heads[layer]` / `selection.ffn[layer]`), or `None` where the layer needs no rescaling (nothing was
        removed up to and including it, or nothing is kept).
    """
    spec = get_spec(model)
    structure = get_structure(model)
    counts = {"heads": structure.heads, "ffn": structure.ffn}
    units = {"heads": structure.head_dim, "ffn": 1}
    kept_units = {"heads": selection.heads, "ffn": selection.ffn}
    masks = {
        kind: [_mask_values(k, n) for k, n in zip(kept_units[kind], counts[kind], strict=True)] for kind in counts
    }
    scales: dict[str, list[list[float] | None]] = {kind: [None] * structure.num_layers for kind in counts}
    batches = [{k: v for k, v in batch.items() if k != "labels"} for batch in batches]
    token_masks = [batch.get("attention_mask") for batch in batches]
    upstream_changed = False
    was_training = model.training
    model.eval()
    try:
        reference = [_layer_inputs(model, batch) for batch in batches]
        current = list(reference)
        for index, layer in enumerate(tqdm(get_layers(model), desc="Rescaling kept units", disable=not show_progress)):
            modules = {
                "heads": layer.get_submodule(spec.attention_output),
                "ffn_in": layer.get_submodule(spec.ffn_in),
                "ffn": layer.get_submodule(spec.ffn_out),
            }
            reference, targets = _reference_pass(layer, modules, reference, token_masks)
            if index in selection.layers:  # a removed layer: the pruned model's stream passes it unchanged
                upstream_changed = True
                continue
            for kind in ("heads", "ffn"):
                kept = kept_units[kind][index]
                pruned_here = len(kept) < counts[kind][index]
                if not kept or not (pruned_here or upstream_changed):
                    upstream_changed |= pruned_here
                    continue
                solution = _fit_sublayer(
                    model, index, modules, kind, units[kind], kept, current, token_masks, targets[kind], masks, damping
                )
                # Like Kwon et al., distrust extreme solutions: the data could not pin these scales down.
                if not torch.isfinite(solution).all() or solution.abs().max() > _MAX_SCALE:
                    logger.warning("Rescaling %s of layer %d gave extreme scales; keeping them at 1.", kind, index)
                    solution = torch.ones(len(kept), dtype=torch.float64)
                scales[kind][index] = solution.float().tolist()
                masks[kind][index] = masks[kind][index].index_put((torch.tensor(kept),), solution.float())
                upstream_changed = True
            with UnitMasks(model, head_masks=masks["heads"], ffn_masks=masks["ffn"]):
                current = [(_run_layer(layer, call, {})[0], call[1], call[2]) for call in current]
    finally:
        model.train(was_training)
    return scales["heads"], scales["ffn"]
