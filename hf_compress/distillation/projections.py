"""The hidden-state projections: one learned `Linear(student_hidden, teacher_hidden)` per mapped student layer.

They exist only when the hidden-state loss is on and the hidden sizes differ. They are training state like the
optimizer's: trained with the student (in its optimizer, gradients averaged over processes), saved beside the optimizer
state in each checkpoint so that resuming restores them, and never written into the student's weights.

Under FSDP2 they stay whole on every process (replicated, like under DDP) while the student is sharded. FSDP2 saves and
loads the optimizer state by the student's parameter names, so there their part of it is taken out of the optimizer
for that time (`detached_from_optimizer`) and saved apart, in `PROJECTIONS_OPTIMIZER_NAME`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Written beside the optimizer state in each checkpoint (never into the student's weights), so resuming restores it.
PROJECTIONS_NAME = "distillation_projections.safetensors"
# Their optimizer state under FSDP2 (elsewhere it is in the Trainer's optimizer file).
PROJECTIONS_OPTIMIZER_NAME = "distillation_projections_optimizer.pt"


def build_projections(
    student_config: PretrainedConfig, teacher_config: PretrainedConfig, layer_mapping: dict[int, int], args
) -> nn.ModuleDict | None:
    """One `Linear(student_hidden, teacher_hidden)` per mapped student layer (keyed by its index as a string) on
    `args.device`, or `None` when the hidden-state loss is off or the hidden sizes are equal."""
    student_size, teacher_size = student_config.hidden_size, teacher_config.hidden_size
    if args.hidden_loss_weight == 0 or student_size == teacher_size:
        return None
    projections = nn.ModuleDict({str(s): nn.Linear(student_size, teacher_size) for s in layer_mapping})
    return projections.to(args.device)


def add_to_optimizer(
    optimizer: torch.optim.Optimizer, projections: nn.ModuleDict, weight_decay: float, created_here: bool
) -> None:
    """Train `projections` with `optimizer`: weights with `weight_decay`, biases without, like the student's.

    An optimizer passed in by the user (`created_here=False`) is left as it is, with a warning, unless it already
    holds them.
    """
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if all(id(p) in in_optimizer for p in projections.parameters()):
        return
    if not created_here:
        logger.warning(
            "The optimizer passed to DistillationTrainer does not hold `trainer.hidden_projections`, so the "
            "hidden-state projections stay at their random initialisation; add their parameters to it."
        )
        return
    named = list(projections.named_parameters())
    optimizer.add_param_group({"params": [p for n, p in named if n.endswith("weight")], "weight_decay": weight_decay})
    optimizer.add_param_group({"params": [p for n, p in named if not n.endswith("weight")], "weight_decay": 0.0})


def average_gradients(projections: nn.ModuleDict, accelerator: Accelerator) -> None:
    """Average the projections' gradients over processes, as DDP does for the student's (they live outside it)."""
    grads = [p.grad for p in projections.parameters() if p.grad is not None]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    for grad, reduced in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(reduced.view_as(grad))


def save_projections(projections: nn.ModuleDict, checkpoint_dir: str) -> None:
    """Write the projections to `checkpoint_dir/PROJECTIONS_NAME`."""
    state = {k: v.detach().cpu().contiguous() for k, v in projections.state_dict().items()}
    save_file(state, os.path.join(checkpoint_dir, PROJECTIONS_NAME))


def load_projections(projections: nn.ModuleDict, checkpoint_dir: str) -> None:
    """Restore the projections saved in `checkpoint_dir` (copied onto their device); without that file they keep their
    values, with a warning."""
    path = os.path.join(checkpoint_dir, PROJECTIONS_NAME)
    if not os.path.isfile(path):
        logger.warning(f"{path} not found: the hidden-state projections restart from their initialisation.")
        return
    # Read on the CPU: safetensors refuses indexed CPU devices ("cpu:0", the device of distributed CPU runs).
    projections.load_state_dict(load_file(path, device="cpu"))


@contextmanager
def detached_from_optimizer(optimizer: torch.optim.Optimizer, projections: nn.ModuleDict) -> Iterator[dict[str, Any]]:
    """Take the projections' parameter groups and state out of `optimizer` for the duration of the block.

    FSDP2's optimizer checkpointing (`torch.distributed.checkpoint.state_dict`) names every optimizer parameter after
    the model's, and the projections are not in the student. The groups go back at their positions afterwards, into
    whatever list the optimizer holds then (loading a state dict replaces it), with their state.

    Yields:
        The projections' optimizer state, as `projections_optimizer_state` gives it (read before detaching).
    """
    ids = {id(p) for p in projections.parameters()}
    groups = optimizer.param_groups
    detached = [(i, group) for i, group in enumerate(groups) if any(id(p) in ids for p in group["params"])]
    for _, group in detached:
        if not all(id(p) in ids for p in group["params"]):
            raise ValueError(
                "A parameter group of the optimizer mixes the hidden-state projections with other parameters, so "
                "FSDP2 cannot checkpoint it; give the projections their own groups (as DistillationTrainer does)."
            )
    snapshot = projections_optimizer_state(optimizer, projections)
    state = {p: optimizer.state.pop(p) for _, group in detached for p in group["params"] if p in optimizer.state}
    optimizer.param_groups = [group for i, group in enumerate(groups) if i not in {j for j, _ in detached}]
    try:
        yield snapshot
    finally:
        restored = list(optimizer.param_groups)
        for i, group in detached:
            restored.insert(i, group)
        optimizer.param_groups = restored
        optimizer.state.update(state)


def projections_optimizer_state(optimizer: torch.optim.Optimizer, projections: nn.ModuleDict) -> dict[str, Any]:
    """The projections' part of `optimizer.state_dict()`: their state and groups, parameters numbered in the order of
    `projections.parameters()`."""
    params = list(projections.parameters())
    number = {id(p): i for i, p in enumerate(params)}
    groups = [group for group in optimizer.param_groups if any(id(p) in number for p in group["params"])]
    return {
        "state": {number[id(p)]: dict(optimizer.state[p]) for p in params if p in optimizer.state},
        "param_groups": [
            {**{k: v for k, v in group.items() if k != "params"}, "params": [number[id(p)] for p in group["params"]]}
            for group in groups
        ],
    }


def save_projections_optimizer_state(state: dict[str, Any], checkpoint_dir: str) -> None:
    """Write the projections' optimizer state to `checkpoint_dir/PROJECTIONS_OPTIMIZER_NAME`."""
    torch.save(state, os.path.join(checkpoint_dir, PROJECTIONS_OPTIMIZER_NAME))


def load_projections_optimizer_state(
    optimizer: torch.optim.Optimizer, projections: nn.ModuleDict, checkpoint_dir: str
) -> None:
    """Restore what `save_projections_optimizer_state` wrote into `optimizer`, whose groups of the projections must
    be the saved ones; without that file their state starts afresh, with a warning.

    Like `Optimizer.load_state_dict`, floating-point state goes to each parameter's device and dtype, and `step`
    counters stay where they were saved.
    """
    path = os.path.join(checkpoint_dir, PROJECTIONS_OPTIMIZER_NAME)
    if not os.path.isfile(path):
        logger.warning(f"{path} not found: the optimizer state of the hidden-state projections restarts from zero.")
        return
    saved = torch.load(path, map_location="cpu", weights_only=True)
    params = list(projections.parameters())
    number = {id(p): i for i, p in enumerate(params)}
    groups = [group for group in optimizer.param_groups if any(id(p) in number for p in group["params"])]
    if [[number[id(p)] for p in group["params"]] for group in groups] != [g["params"] for g in saved["param_groups"]]:
        raise ValueError(
            f"{path} holds the optimizer state of other hidden-state projection groups than this trainer's; resume "
            "with the same layer_mapping and model sizes as the run that wrote the checkpoint."
        )
    for group, saved_group in zip(groups, saved["param_groups"], strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for index, values in saved["state"].items():
        param = params[int(index)]
        optimizer.state[param] = {key: _to_param(param, key, value) for key, value in values.items()}


def _to_param(param: torch.Tensor, key: str, value: Any) -> Any:
    if not torch.is_tensor(value) or key == "step":
        return value
    if value.is_floating_point():
        return value.to(device=param.device, dtype=param.dtype)
    return value.to(device=param.device)
