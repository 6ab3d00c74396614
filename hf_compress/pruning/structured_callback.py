"""Gradual structured pruning during training: remove heads and FFN neurons step by step, as a `TrainerCallback`.

Every `frequency` steps between `begin_step` and `end_step` the model is physically shrunk towards the budget of a
`PruningConfig`, following the cubic schedule of Zhu & Gupta (2017) (`hf_compress.pruning.schedules`): fast while much is
redundant, slowly near the end, so the model adapts between steps. Works with `Trainer` and its subclasses
(`DistillationTrainer`: prune while distilling).

Importance comes from the running training gradients: the same per-head / per-neuron masks as `compute_importance`
(forward pre-hooks, per-example masks) collect `(dL/dm)^2` (`importance="fisher"`) or `|dL/dm|` (`"taylor"`) in every
training backward pass, as an exponential moving average over optimizer steps; `"magnitude"` uses weight norms.

Shrinking a parameter replaces it (`prune_heads` builds new `nn.Linear`s). The callback rewires the Trainer's optimizer
in place (`hf_compress.pruning.optimizer_surgery`): the new parameters take the old ones' places in their parameter
groups, and per-element state (Adam's `exp_avg` / `exp_avg_sq`, momentum buffers) is sliced to the kept rows / columns.
Any other state of a shrunk parameter (e.g. factored second moments) is reset, with a warning. The learning-rate
scheduler keeps working, as it only holds the optimizer. Single-process training only (DDP and FSDP wrap parameters the
callback cannot swap).

Checkpoints and resume: at every checkpoint the callback writes its own state (the running importance, the budget's
reference cost and the schedule's progress) into the checkpoint folder as `hf_compress_pruning_state.safetensors`
(`hf_compress.pruning.training_state`), and restores it when `trainer.train(resume_from_checkpoint=...)` resumes at
that step, so a resumed run prunes exactly as the uninterrupted one, before, during or after pruning. The model you
resume with may be the fresh, unpruned one: when the Trainer loads a checkpoint of a smaller structure, the callback
(through a load hook it puts on the model when the Trainer is built, `hf_compress.pruning.structure_fitting`) first
prunes the model to the checkpoint's heads and FFN widths, so the weights load exactly; a checkpoint the model cannot
be pruned to is refused before any weight is touched. Pass the callback to the Trainer's constructor (not
`add_callback` afterwards) so that the hook is in place before a resume: the Trainer loads the checkpoint before it
sends any training event. The hook stays on the model (a later `model.load_state_dict` of a smaller pruned structure
prunes it likewise). The state is looked up in `output_dir/checkpoint-<step>`, where the Trainer writes it; without it,
resuming mid-pruning is refused.

With `target="latency"` the budget is a fraction of the model's latency predicted by a latency table
(`hf_compress.pruning.latency_table`): the one `config.latency_table` names, else `output_dir/latency_table.json`
when it was measured for this device and setting (a resumed run reuses it), else one measured when training begins
and written there. A layer that loses all its heads and neurons stays, empty (removing layers while training is not
supported), and counts at the table's time for an empty layer.

Refused when training begins, before any step (each error says how to fix it): an absolute `begin_step` / `end_step`
beyond `max_steps`; a latency table of another device, thread count, shape or architecture, or a latency budget
below the fastest this model can get with every layer kept; `load_best_model_at_end` with a checkpoint saved before
`end_step` (its structure differs from the final model's); a second `train()` after pruning stopped part-way. A second
`train()` after the budget was reached trains without pruning further: the budget is relative to the model the first
`train()` started from.
"""

from __future__ import annotations

import math
import os
import weakref

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from ..architectures import get_spec
from ..launch import refuse_sharded_pruning
from ..structure import get_structure
from .config import PruningConfig
from .constants import LATENCY_TABLE_NAME
from .importance import compute_importance
from .latency_search import check_latency_budget
from .latency_table import LatencyTable, latency_table_for
from .optimizer_surgery import parameter_slices, rewire_optimizer
from .schedules import CubicSparsitySchedule, resolve_step_range, validate_step_range
from .search import BALANCED_METHODS, balance_kinds, select_units, structure_cost, unit_costs
from .structure_fitting import add_structure_fitting_hook, check_optimizer_is_current
from .structured import prune_ffn_neurons, prune_heads
from .training_state import (
    PRUNING_STATE_NAME,
    checkpoint_folder,
    config_as_json,
    current_settings,
    load_pruning_state,
    save_pruning_state,
)
from .unit_masks import UnitMasks

logger = logging.get_logger(__name__)


class GradualStructuredPruningCallback(TrainerCallback):
    """Prune attention heads and FFN neurons while training, reaching `config`'s budget at `end_step`.

    Args:
        config: The final budget (`target`, `keep` or `head_keep` / `ffn_keep`, `scope`, `uniform`, `round_to`,
            `importance`). `layers`, `rescale`, `num_batches` and `seq_len`-independent options that only concern
            one-shot pruning are not used here; `layers` must be unset.
        begin_step: First pruning step; a value >= 1 is a step, a value in [0, 1) a fraction of the training steps
            (resolved against `max_steps` when training begins).
        end_step: Step at which the budget is reached (same convention); the default leaves the last quarter of
            training to recover at the final size. A step beyond `max_steps` is refused when training begins (the
            budget would never be reached).
        frequency: Steps between two pruning steps.
        beta: Decay of the running importance per optimizer step, in [0, 1) (0 keeps only the last step's).

    Attributes:
        history: `(step, cost)` after each pruning step, the cost in `config.target` units (FLOPs per token or
            parameters of heads and neurons; head and neuron counts for `"ratios"`; predicted milliseconds per call
            of the whole model for `"latency"`).
        reference_cost: That cost when training began (the first `train()` of this model: a later one, or a resumed
            one, keeps it, so the budget always counts from the model pruning started from).
        latency_table: With `target="latency"`: the `LatencyTable` the budget is predicted with (set when training
            begins).

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
        self.latency_table: LatencyTable | None = None
        self._reference: tuple[int, int] = (0, 0)  # total heads and neurons at the start, for ratios
        self._masks: UnitMasks | None = None
        self._scores: dict[str, list[torch.Tensor]] = {}
        self._step_scores: dict[str, list[torch.Tensor]] = {}
        self._progress = 0.0
        # The model of the last `train()`: a second `train()` of the same model must not prune it again.
        self._model_ref: weakref.ref | None = None

    #### Trainer events

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # `trainer.train(resume_from_checkpoint=...)` loads the checkpoint before any training event: the load hook
        # must be on the model by then, so it goes on when the Trainer is built.
        model = kwargs.get("model")
        if model is not None:
            get_spec(model)
            add_structure_fitting_hook(model)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        refuse_sharded_pruning(args, type(self).__name__)
        model = kwargs["model"]
        get_spec(model)
        # Every check runs before anything changes, so a refused run leaves the callback and the model as they were.
        begin, end, frequency = resolve_step_range(self.begin_step, self.end_step, self.frequency, state.max_steps)
        schedule = CubicSparsitySchedule.from_step_range(1.0, begin, end, frequency)
        resumed = state.global_step > 0
        saved = self._read_state(args, state, schedule) if resumed else None
        again = not resumed and self._model_ref is not None and self._model_ref() is model and bool(self.history)
        if again and self._progress < 1.0:
            raise ValueError(
                f"This callback already pruned this model part-way ({self.history[-1][1] / self.reference_cost:.1%} "
                f"of its starting {self.config.target}) in an earlier train() that stopped before end_step: a new "
                "train() would measure the budget from the pruned model and compound it. Resume the earlier run "
                "instead (`trainer.train(resume_from_checkpoint=...)`), or start over with a fresh model and callback."
            )
        if resumed and saved is None and schedule.begin_step < state.global_step < schedule.end_step:
            folder = checkpoint_folder(args, state)
            raise ValueError(
                f"Training resumes at step {state.global_step}, while gradual structured pruning was in progress "
                f"(steps {schedule.begin_step}..{schedule.end_step}), but there is no {PRUNING_STATE_NAME} in "
                f"{folder}: resuming mid-pruning is not supported without it (the budget's reference and the running "
                "importance would be lost). Resume from a checkpoint this callback wrote in that folder, restart "
                f"from a checkpoint saved before step {schedule.begin_step + 1}, or from one saved at or after step "
                f"{schedule.end_step} (loaded with hf_compress.load_compressed)."
            )
        if saved is not None:
            progress = saved["progress"]
        elif again or (resumed and state.global_step >= schedule.end_step):
            progress = 1.0
        else:
            progress = 0.0
        if saved is not None:
            _check_saved_structure(model, saved)
        self._check_load_best(args, state, schedule, progress, kwargs.get("train_dataloader"))
        check_optimizer_is_current(model, kwargs.get("optimizer"))
        latency_table = None
        if self.config.target == "latency" and progress < 1.0:
            latency_table = self._latency_table_for(args, state, model, saved)
        if frequency < self.frequency:
            logger.info(
                "The pruning range, steps %d..%d, is shorter than frequency=%d: pruning once, at step %d.",
                begin,
                end,
                self.frequency,
                end,
            )

        self.schedule = schedule
        self._model_ref = weakref.ref(model)
        self._progress = progress
        if latency_table is not None:
            self.latency_table = latency_table
        if saved is not None:
            self._restore(model, saved)
        elif again:
            logger.info(
                "The model already has the pruning budget (reached in an earlier train()); this run trains it "
                "without pruning further."
            )
            self._reset_scores(model)
        else:
            if resumed and state.global_step <= schedule.begin_step:
                logger.warning(
                    "Resuming at step %d without the %s the callback writes into each checkpoint (looked in %s): the "
                    "running importance restarts from zero, so pruning may choose other units than the uninterrupted "
                    "run would.",
                    state.global_step,
                    PRUNING_STATE_NAME,
                    checkpoint_folder(args, state),
                )
            self.reference_cost = self._cost(model)
            structure = get_structure(model)
            self._reference = (sum(structure.heads), sum(structure.ffn))
            self.history = []
            self._reset_scores(model)
        if self._progress < 1.0:
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

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # The Trainer has just written the checkpoint folder; the pruning state goes beside the weights so that a
        # resume continues exactly (the running importance decides which units go next).
        if self.schedule is None or not state.is_world_process_zero:
            return
        folder = checkpoint_folder(args, state)
        if not os.path.isdir(folder):
            logger.warning(
                "No checkpoint folder %s to write the gradual pruning state into; resuming from this checkpoint will "
                "restart the running importance.",
                folder,
            )
            return
        structure = get_structure(kwargs["model"])
        description = {
            "global_step": state.global_step,
            "settings": self._settings(),
            "reference_cost": self.reference_cost,
            "reference": list(self._reference),
            "progress": self._progress,
            "history": [list(entry) for entry in self.history],
            "heads": list(structure.heads),
            "ffn": list(structure.ffn),
        }
        save_pruning_state(folder, self._scores, description)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._uninstall()

    #### Checks and saved state

    def _settings(self) -> dict:
        """What must agree between the run that saved a checkpoint and the run resuming it."""
        schedule = self.schedule
        return {
            "config": config_as_json(self.config),
            "schedule": [schedule.begin_step, schedule.end_step, schedule.frequency],
            "beta": self.beta,
        }

    def _read_state(
        self, args: TrainingArguments, state: TrainerState, schedule: CubicSparsitySchedule
    ) -> dict | None:
        """The pruning state saved in the checkpoint training resumes from, checked against this run (None: absent)."""
        saved = load_pruning_state(checkpoint_folder(args, state), state.global_step)
        if saved is None:
            return None
        previous, self.schedule = self.schedule, schedule
        try:
            settings = self._settings()
        finally:
            self.schedule = previous
        if current_settings(saved["settings"]) != settings:
            raise ValueError(
                f"The checkpoint's gradual pruning was run with {saved['settings']}, this callback has {settings}: "
                "resuming would change the budget or schedule part-way. Resume with the callback's original "
                "arguments (and the same max_steps), or start a new run."
            )
        return saved

    def _restore(self, model: nn.Module, saved: dict) -> None:
        structure = get_structure(model)
        device = next(model.parameters()).device
        tensors = saved["tensors"]
        self._scores = {
            kind: [tensors[f"scores.{kind}.{layer}"].to(device) for layer in range(len(counts))]
            for kind, counts in (("heads", structure.heads), ("ffn", structure.ffn))
        }
        self._step_scores = {kind: [torch.zeros_like(t) for t in values] for kind, values in self._scores.items()}
        self.reference_cost = saved["reference_cost"]
        self._reference = tuple(saved["reference"])
        self.history = [tuple(entry) for entry in saved["history"]]

    def _check_load_best(
        self,
        args: TrainingArguments,
        state: TrainerState,
        schedule: CubicSparsitySchedule,
        progress: float,
        train_dataloader,
    ) -> None:
        """Refuse `load_best_model_at_end` when the best checkpoint could be one with another structure than the end's.

        Checkpoints saved before the last pruning step hold a bigger model: loading one at the end would either fail
        half-way or hand back a model over the budget.
        """
        if not getattr(args, "load_best_model_at_end", False):
            return
        end = schedule.end_step
        best = state.best_global_step
        if best is not None and best < end:
            where = f"the best checkpoint so far was saved at step {best}"
        elif progress >= 1.0:
            return
        else:
            step = _next_checkpoint_step(args, state, train_dataloader)
            if step is None or step >= end:
                return
            where = f"a checkpoint that can become the best is saved at step {step}"
        raise ValueError(
            f"load_best_model_at_end=True with gradual structured pruning until step {end} (end_step="
            f"{self.end_step!r}): {where}, before the model reaches its final structure, so the Trainer could load "
            f"a checkpoint of another size at the end. Save (and evaluate) only from step {end} on, e.g. "
            f"save_steps={end} with eval_steps dividing it, or set load_best_model_at_end=False and load the best "
            "checkpoint yourself with hf_compress.load_compressed(trainer.state.best_model_checkpoint)."
        )

    def _latency_table_for(
        self, args: TrainingArguments, state: TrainerState, model: nn.Module, saved: dict | None
    ) -> LatencyTable:
        """The latency table of this run (read or measured, see the module docstring), its budget checked."""
        fallback = os.path.join(args.output_dir, LATENCY_TABLE_NAME) if getattr(args, "output_dir", None) else None
        table = latency_table_for(
            model,
            self.config,
            fallback_path=fallback,
            save=state.is_world_process_zero,
            show_progress=not getattr(args, "disable_tqdm", False),
        )
        structure = get_structure(model)
        reference = saved["reference_cost"] if saved is not None else None
        check_latency_budget(
            table, structure.heads, structure.ffn, self.config.keep, reference, drop_empty_layers=False
        )
        return table

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
        if self.config.target == "latency":
            return self.latency_table.model_latency(structure.heads, structure.ffn)
        costs = unit_costs(model, self.config.target, self.config.seq_len)
        return structure_cost(list(structure.heads), list(structure.ffn), costs)

    def _step_targets(self, model: nn.Module) -> dict[str, float]:
        """What `select_units` keeps at this step, relative to the current model: `keep`, or `head_keep`/`ffn_keep`.

        Passed as overrides of the config, not as a new `PruningConfig`: a step's fractions are not a user's config (a
        step may remove no heads and no neurons, which `PruningConfig(target="ratios")` rightly refuses).
        """
        config, progress = self.config, self._progress
        if config.target == "ratios":
            structure = get_structure(model)
            fractions = {}
            for name, total, current in (
                ("head_keep", self._reference[0], sum(structure.heads)),
                ("ffn_keep", self._reference[1], sum(structure.ffn)),
            ):
                final = 1.0 if getattr(config, name) is None else getattr(config, name)
                goal = round(total * (1 - progress * (1 - final)))  # units kept at this step
                fractions[name] = min(goal, current) / current if current else 1.0
            return fractions
        keep = 1 - progress * (1 - config.keep)
        return {"keep": min(1.0, keep * self.reference_cost / max(self._cost(model), 1e-12))}

    def _prune(self, model: nn.Module, optimizer, step: int) -> None:
        config = self.config
        if self.config.importance == "magnitude":
            scores = compute_importance(model, method="magnitude")
            head_scores, ffn_scores = scores.heads, scores.ffn
        else:
            head_scores = [s.cpu() for s in self._scores["heads"]]
            ffn_scores = [s.cpu() for s in self._scores["ffn"]]
        if config.target == "latency":
            costs = self.latency_table.unit_costs()
        else:
            costs = unit_costs(model, "params" if config.target == "params" else "flops", config.seq_len)
        if config.importance in BALANCED_METHODS:
            head_scores, ffn_scores = balance_kinds(head_scores, ffn_scores, costs)
        selection = select_units(
            head_scores,
            ffn_scores,
            config,
            costs,
            latency_table=self.latency_table,
            drop_empty_layers=False,
            **self._step_targets(model),
        )
        remove_heads, remove_ffn = selection.removed(get_structure(model))
        if remove_heads or remove_ffn:
            self._uninstall()
            slices = parameter_slices(model, selection)
            prune_heads(model, remove_heads)
            prune_ffn_neurons(model, remove_ffn)
            if optimizer is not None:
                rewire_optimizer(optimizer, slices)
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


def _check_saved_structure(model: nn.Module, saved: dict) -> None:
    structure = get_structure(model)
    if [list(structure.heads), list(structure.ffn)] != [saved["heads"], saved["ffn"]]:
        raise ValueError(
            f"The checkpoint was saved with heads per layer {saved['heads']} and FFN widths {saved['ffn']}, but the "
            f"model resumed has {list(structure.heads)} and {list(structure.ffn)}: its weights cannot be this "
            "checkpoint's. Pass the callback to the Trainer's constructor (not `add_callback`) so that it fits the "
            "model to the checkpoint while loading, or build the model with hf_compress.load_compressed(checkpoint)."
        )


def _next_checkpoint_step(args: TrainingArguments, state: TrainerState, train_dataloader) -> int | None:
    """The first step after `state.global_step` at which the Trainer may save a checkpoint (None: it never does)."""
    strategy, every = getattr(args.save_strategy, "value", args.save_strategy), state.save_steps
    if strategy == "best":  # a checkpoint at every evaluation that improves the metric
        strategy, every = getattr(args.eval_strategy, "value", args.eval_strategy), state.eval_steps
    if strategy == "epoch":
        try:
            batches = len(train_dataloader)
        except TypeError:  # no dataloader, or one without a length: the shortest epoch that fits max_steps
            every = math.ceil(state.max_steps / max(state.num_train_epochs, 1))
        else:
            every = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    elif strategy != "steps":
        return None
    if not every:
        return None
    return min((state.global_step // every + 1) * every, state.max_steps)
