"""Gradual structured pruning during training: remove heads and FFN neurons step by step, as a `TrainerCallback`.

Every `frequency` steps between `begin_step` and `end_step` the model is physically shrunk towards the budget of a
`PruningConfig`, following the cubic schedule of Zhu & Gupta (2017) (`hf_compress.schedules`): fast while much is
redundant, slowly near the end, so the model adapts between steps. Works with `Trainer` and its subclasses
(`DistillationTrainer`: prune while distilling).

Importance comes from the running training gradients: the same per-head / per-neuron masks as `compute_importance`
(forward pre-hooks, per-example masks) collect `(dL/dm)^2` (`importance="fisher"`) or `|dL/dm|` (`"taylor"`) in every
training backward pass, as an exponential moving average over optimizer steps; `"magnitude"` uses weight norms.

Shrinking a parameter replaces it (`prune_heads` builds new `nn.Linear`s). The callback rewires the Trainer's
optimizer in place: the new parameters take the old ones' places in their parameter groups, and per-element state
(Adam's `exp_avg` / `exp_avg_sq`, momentum buffers) is sliced to the kept rows / columns. Any other state of a shrunk
parameter (e.g. factored second moments) is reset, with a warning. The learning-rate scheduler keeps working, as it
only holds the optimizer. Single-process training only (DDP and FSDP wrap parameters the callback cannot swap).

Checkpoints and resume: a checkpoint saved before `begin_step` or from `end_step` on holds a model of one fixed
structure and resumes normally, provided the model you resume with has that structure (load a checkpoint saved at or
after `end_step` with `hf_compress.load_compressed`). Resuming a checkpoint saved *while* pruning is in progress is
not supported (the budget's reference and the running importance are not in the checkpoint); the callback raises a
`ValueError` when training resumes at such a step instead of pruning to a wrong budget. Likewise
`load_best_model_at_end` needs the best checkpoint to have the final structure.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .architectures import get_layers, get_spec
from .importance import UnitMasks, compute_importance
from .mask_search import BALANCED_METHODS, Selection, balance_kinds, select_units, structure_cost, unit_costs
from .pruning_config import PruningConfig
from .schedules import CubicSparsitySchedule, resolve_step, validate_step_range
from .structured import get_structure, prune_ffn_neurons, prune_heads

logger = logging.getLogger(__name__)


class GradualStructuredPruningCallback(TrainerCallback):
    """Prune attention heads and FFN neurons while training, reaching `config`'s budget at `end_step`.

    Args:
        config: The final budget (`target`, `keep` or the ratios, `scope`, `uniform`, `round_to`, `importance`).
            `layers`, `rescale`, `num_batches` and `seq_len`-independent options that only concern one-shot pruning
            are not used here; `layers` must be unset.
        begin_step: First pruning step; a value >= 1 is a step, a value in [0, 1) a fraction of the training steps.
        end_step: Step at which the budget is reached (same convention); the default leaves the last quarter of
            training to recover at the final size.
        frequency: Steps between two pruning steps.
        beta: Decay of the running importance per optimizer step, in [0, 1) (0 keeps only the last step's).

    Attributes:
        history: `(step, cost)` after each pruning step, the cost in `config.target` units (FLOPs per token or
            parameters of heads and neurons; head and neuron counts for `"ratios"`).
        reference_cost: That cost when training began.

    Example:
    ```python
    from hf_compress import GradualStructuredPruningCallback, PruningConfig

    pruning = GradualStructuredPruningCallback(PruningConfig(target="flops", keep=0.4), begin_step=0.1, end_step=0.7)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train, callbacks=[pruning])
    trainer.train()
    trainer.save_model()  # a smaller dense model, loadable with hf_compress.load_compressed
    ```
    """

    def __init__(
        self,
        config: PruningConfig,
        begin_step: float = 0,
        end_step: float = 0.75,
        frequency: int = 10,
        beta: float = 0.9,
    ):
        if not isinstance(config, PruningConfig):
            raise ValueError(f"config must be a PruningConfig, got {type(config).__name__}.")
        if config.layers:
            raise ValueError(
                f"GradualStructuredPruningCallback prunes heads and neurons, not layers (config.layers="
                f"{config.layers}); drop layers before training with `drop_layers` or `prune`."
            )
        validate_step_range(begin_step, end_step, frequency)
        if not 0 <= beta < 1:
            raise ValueError(f"beta={beta} must be in [0, 1): the decay of the running importance per step.")
        self.config = config
        self.begin_step, self.end_step, self.frequency, self.beta = begin_step, end_step, frequency, beta
        self.schedule: CubicSparsitySchedule | None = None
        self.history: list[tuple[int, float]] = []
        self.reference_cost: float | None = None
        self._reference: tuple[int, int] = (0, 0)  # total heads and neurons at the start, for ratios
        self._masks: UnitMasks | None = None
        self._scores: dict[str, list[torch.Tensor]] = {}
        self._step_scores: dict[str, list[torch.Tensor]] = {}
        self._progress = 0.0

    #### Trainer events

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs["model"]
        get_spec(model)
        begin, end = resolve_step(self.begin_step, state.max_steps), resolve_step(self.end_step, state.max_steps)
        self.schedule = CubicSparsitySchedule.from_step_range(
            1.0, begin, end, min(self.frequency, max(end - begin, 1))
        )
        if self.schedule.begin_step < state.global_step < self.schedule.end_step:
            raise ValueError(
                f"Training resumes at step {state.global_step}, while gradual structured pruning was in progress "
                f"(steps {self.schedule.begin_step}..{self.schedule.end_step}). Resuming mid-pruning is not supported: "
                "the checkpoint lacks the pruning budget's reference and the running importance. Restart from a "
                f"checkpoint saved before step {self.schedule.begin_step + 1}, or from one saved at or after step "
                f"{self.schedule.end_step} (loaded with hf_compress.load_compressed)."
            )
        self.reference_cost = self._cost(model)
        structure = get_structure(model)
        self._reference = (sum(structure.heads), sum(structure.ffn))
        self._progress = self.schedule(state.global_step) if state.global_step >= self.schedule.end_step else 0.0
        self._reset_scores(model)
        self._install(model)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        for kind, running in self._scores.items():
            for layer, values in enumerate(running):
                values.mul_(self.beta).add_(self._step_scores[kind][layer])
                self._step_scores[kind][layer].zero_()
        if self.schedule is None or not self.schedule.is_pruning_step(state.global_step):
            return
        progress = self.schedule(state.global_step)
        if progress <= self._progress:
            return
        self._progress = progress
        self._prune(kwargs["model"], kwargs.get("optimizer"), state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._uninstall()

    #### Scores

    def _reset_scores(self, model: nn.Module) -> None:
        structure = get_structure(model)
        # On the model's device, so that accumulating in every backward pass needs no host synchronisation.
        device = next(model.parameters()).device
        self._scores = {
            "heads": [torch.zeros(n, device=device) for n in structure.heads],
            "ffn": [torch.zeros(n, device=device) for n in structure.ffn],
        }
        self._step_scores = {kind: [torch.zeros_like(t) for t in values] for kind, values in self._scores.items()}

    def _install(self, model: nn.Module) -> None:
        self._uninstall()
        if self.config.importance == "magnitude":
            return
        self._masks = UnitMasks(model, per_example=True, on_mask=self._watch).attach()

    def _uninstall(self) -> None:
        if self._masks is not None:
            self._masks.remove()
            self._masks = None

    def _watch(self, kind: str, layer: int, mask: torch.Tensor) -> None:
        def accumulate(grad: torch.Tensor) -> None:
            grad = grad.detach().float()  # (batch, units)
            value = grad.square() if self.config.importance == "fisher" else grad.abs()
            self._step_scores[kind][layer] += value.sum(0)

        mask.register_hook(accumulate)

    #### Pruning

    def _cost(self, model: nn.Module) -> float:
        structure = get_structure(model)
        if self.config.target == "ratios":
            return float(sum(structure.heads) + sum(structure.ffn))
        costs = unit_costs(model, self.config.target, self.config.seq_len)
        return structure_cost(list(structure.heads), list(structure.ffn), costs)

    def _target_config(self, model: nn.Module) -> tuple[PruningConfig, float | None]:
        """The config (and `keep` relative to the current model) that takes the model to this step's target."""
        config, progress = self.config, self._progress
        if config.target == "ratios":
            structure = get_structure(model)
            ratios = {}
            for name, total, current in (
                ("head_ratio", self._reference[0], sum(structure.heads)),
                ("ffn_ratio", self._reference[1], sum(structure.ffn)),
            ):
                goal = round(total * (1 - progress * (getattr(config, name) or 0.0)))  # units kept at this step
                ratios[name] = (current - min(goal, current)) / current if current else 0.0
            # PruningConfig refuses ffn_ratio=1 (an FFN-less model); goals never ask for it, rounding might.
            ratios["ffn_ratio"] = min(ratios["ffn_ratio"], 1 - 1e-9)
            return replace(config, **ratios), None
        keep = 1 - progress * (1 - config.keep)
        return config, min(1.0, keep * self.reference_cost / max(self._cost(model), 1e-12))

    def _prune(self, model: nn.Module, optimizer, step: int) -> None:
        config, keep = self._target_config(model)
        if self.config.importance == "magnitude":
            scores = compute_importance(model, method="magnitude")
            head_scores, ffn_scores = scores.heads, scores.ffn
        else:
            head_scores = [s.cpu() for s in self._scores["heads"]]
            ffn_scores = [s.cpu() for s in self._scores["ffn"]]
        costs = unit_costs(model, "params" if config.target == "params" else "flops", config.seq_len)
        if config.importance in BALANCED_METHODS:
            head_scores, ffn_scores = balance_kinds(head_scores, ffn_scores, costs)
        selection = select_units(head_scores, ffn_scores, config, costs, keep=keep)
        structure = get_structure(model)
        remove_heads = {
            i: sorted(set(range(n)) - set(selection.heads[i]))
            for i, n in enumerate(structure.heads)
            if len(selection.heads[i]) < n
        }
        remove_ffn = {
            i: sorted(set(range(n)) - set(selection.ffn[i]))
            for i, n in enumerate(structure.ffn)
            if len(selection.ffn[i]) < n
        }
        if remove_heads or remove_ffn:
            self._uninstall()
            slices = _parameter_slices(model, selection)
            prune_heads(model, remove_heads)
            prune_ffn_neurons(model, remove_ffn)
            if optimizer is not None:
                _rewire_optimizer(optimizer, slices)
            for kind, kept in (("heads", selection.heads), ("ffn", selection.ffn)):
                self._scores[kind] = [
                    s[torch.tensor(k, dtype=torch.long, device=s.device)]
                    for s, k in zip(self._scores[kind], kept, strict=True)
                ]
                self._step_scores[kind] = [torch.zeros_like(s) for s in self._scores[kind]]
            self._install(model)
        self.history.append((step, self._cost(model)))
        structure = get_structure(model)
        logger.info(
            "Step %d: pruned to %.1f%% of the starting %s (heads per layer %s, FFN widths %s).",
            step,
            100 * self.history[-1][1] / self.reference_cost,
            self.config.target,
            list(structure.heads),
            list(structure.ffn),
        )


def _parameter_slices(model: nn.Module, selection: Selection) -> dict[int, tuple]:
    """id(old parameter) -> (layer, module path, parameter name, layer index, sliced dim or None, kept index)."""
    spec = get_spec(model)
    head_dim = get_structure(model).head_dim
    slices = {}
    for index, layer in enumerate(get_layers(model)):
        heads = torch.tensor(selection.heads[index], dtype=torch.long)
        head_features = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
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
                slices[id(parameter)] = (layer, path, name, index, sliced, kept)
    return slices


def _rewire_optimizer(optimizer, slices: dict) -> None:
    """Swap shrunk parameters into the optimizer's groups and slice their state to the kept rows / columns.

    `slices` comes from `_parameter_slices`, taken before pruning.
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
