"""Gradual magnitude pruning during training, as a `TrainerCallback` for `Trainer` and its subclasses.

How the callback keeps training, checkpoints and the optimizer correct:

- `torch.nn.utils.prune` reparametrises a pruned module: the trainable tensor moves to `weight_orig` and a
  `weight_mask` buffer appears. It re-registers the *same* `nn.Parameter` object, so the optimizer the `Trainer`
  built before pruning keeps training it. `magnitude_prune` makes `save_pretrained` fold the masks, but the model's
  `state_dict()`, parameter names and forward pre-hooks stay those of a reparametrised model while the masks live.
- So the callback uses `magnitude_prune` only to compute the masks at each pruning step, makes them permanent at
  once (the pruned weights become plain zeros; `prune.remove` keeps the parameter objects, so the optimizer is
  unaffected), keeps the masks itself and re-applies them after every optimizer step (optimizers with momentum or
  weight decay would otherwise move pruned weights off zero). The model is a plain model at every step: every
  checkpoint loads with stock `from_pretrained`, and `load_best_model_at_end` works.
- On resume the masks are rebuilt from the checkpoint: the pruned weights are stored as exact zeros, and pruning the
  loaded weights to the schedule's sparsity at the resumed step selects exactly those zeros (the smallest
  magnitudes). A trained weight that happens to be exactly 0.0 may be counted as pruned, which changes no output.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from ..launch import refuse_sharded_pruning
from .constants import SCOPES
from .module_selection import normalize_patterns, select_linear_modules
from .schedules import CubicSparsitySchedule, resolve_step, validate_step_range
from .unstructured import magnitude_prune, make_permanent, target_zeros

logger = logging.get_logger(__name__)


class GradualMagnitudePruningCallback(TrainerCallback):
    """Prune the smallest-magnitude weights during training, following the cubic schedule of Zhu & Gupta (2017).

    Every `frequency` steps from `begin_step` to `end_step` the selected weights are magnitude-pruned to the
    schedule's target (see `cubic_sparsity`); pruned weights stay zero until the end of training, and the model is a
    plain model throughout (see the module docstring), so every checkpoint, resume and the final `save_model()` work
    as without pruning. Works with `Trainer` and every subclass (e.g. `DistillationTrainer`).

    Args:
        final_sparsity: Fraction of the selected weights that are zero from `end_step` on, in [0, 1).
        initial_sparsity: Sparsity applied at `begin_step`, in [0, final_sparsity].
        begin_step: First pruning step. Like `TrainingArguments.warmup_steps`, a value >= 1 is a step number and a
            value in [0, 1) a fraction of the total training steps.
        end_step: Step at which `final_sparsity` is reached (same convention). The default, 0.75, leaves the last
            quarter of training to recover accuracy at the final sparsity, as Zhu & Gupta do.
        frequency: Steps between two pruning steps.
        scope: `"global"` (one magnitude threshold over all selected weights) or `"layer"` (one per module).
        include: Module-name patterns of the `nn.Linear` modules to prune (default: every linear layer inside the
            transformer layers; rules in `hf_compress.pruning.module_selection`).
        exclude: Module-name patterns removed from the selection.

    Attributes:
        schedule: The `CubicSparsitySchedule` in steps, set when training begins.
        sparsity: The sparsity the selected weights are pruned to so far.

    Example:

    ```python
    from transformers import Trainer
    from hf_compress import GradualMagnitudePruningCallback, sparsity_report

    pruning = GradualMagnitudePruningCallback(final_sparsity=0.9, begin_step=0.1, end_step=0.75, frequency=100)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[pruning])
    trainer.train()
    print(sparsity_report(trainer.model))
    trainer.save_model()  # an ordinary checkpoint: 90% of the encoder's linear weights are 0.0
    ```
    """

    def __init__(
        self,
        final_sparsity: float,
        initial_sparsity: float = 0.0,
        begin_step: float = 0,
        end_step: float = 0.75,
        frequency: int = 100,
        scope: str = "global",
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
    ):
        if isinstance(final_sparsity, bool) or not isinstance(final_sparsity, (int, float)):
            raise ValueError(f"`final_sparsity` must be a float in [0, 1), got {final_sparsity!r}.")
        if not 0.0 <= final_sparsity < 1.0:
            raise ValueError(f"`final_sparsity` must be in [0, 1) (1 would zero every weight), got {final_sparsity}.")
        if (
            isinstance(initial_sparsity, bool)
            or not isinstance(initial_sparsity, (int, float))
            or not 0.0 <= initial_sparsity <= final_sparsity
        ):
            raise ValueError(
                f"`initial_sparsity` must be in [0, final_sparsity={final_sparsity}], got {initial_sparsity}."
            )
        validate_step_range(begin_step, end_step, frequency)
        if scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}.")
        self.final_sparsity = final_sparsity
        self.initial_sparsity = initial_sparsity
        self.begin_step = begin_step
        self.end_step = end_step
        self.frequency = frequency
        self.scope = scope
        self.include = normalize_patterns(include, "include")
        self.exclude = normalize_patterns(exclude, "exclude")
        self.schedule: CubicSparsitySchedule | None = None
        self.sparsity = 0.0
        self._masks: dict[nn.Module, torch.Tensor] = {}

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Check the patterns against the model when the Trainer is built, not after the first training steps.
        if kwargs.get("model") is not None:
            select_linear_modules(kwargs["model"], self.include, self.exclude)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        refuse_sharded_pruning(args, type(self).__name__)
        model = kwargs["model"]
        begin, end = resolve_step(self.begin_step, state.max_steps), resolve_step(self.end_step, state.max_steps)
        self.schedule = CubicSparsitySchedule.from_step_range(
            self.final_sparsity, begin, end, self.frequency, self.initial_sparsity
        )
        if self.schedule.end_step > state.max_steps:
            logger.warning(
                "Gradual pruning reaches final_sparsity=%s at step %d, after the last training step (%d): training "
                "ends at sparsity %.3f. Lower `end_step`.",
                self.final_sparsity,
                self.schedule.end_step,
                state.max_steps,
                self.schedule(state.max_steps),
            )
        if make_permanent(model):
            logger.info("The model came with torch.nn.utils.prune masks; they are now plain zeros in the weights.")
        self.sparsity, self._masks = 0.0, {}
        target = self.schedule(state.global_step)
        if state.global_step > 0 and target > 0:
            self._check_resumed_zeros(model, target, state.global_step)
        if target > 0:
            self._prune_to(model, target, state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._apply_masks()
        if self.schedule.is_pruning_step(state.global_step):
            target = self.schedule(state.global_step)
            if target > self.sparsity:
                self._prune_to(kwargs["model"], target, state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Masks were applied after the last optimizer step; re-applying them here would also overwrite a best
        # checkpoint that `load_best_model_at_end` just loaded, so only check and release them.
        pruned = sum(int((~mask).sum()) for mask in self._masks.values())
        zeros = sum(int((module.weight == 0).sum()) for module in self._masks)
        if zeros < pruned:
            logger.warning(
                "The final model has %d zero weights where training had pruned %d: `load_best_model_at_end` loaded "
                "an earlier, less sparse checkpoint (%s).",
                zeros,
                pruned,
                state.best_model_checkpoint,
            )
        self._masks = {}

    def _prune_to(self, model: nn.Module, target: float, step: int) -> None:
        names = magnitude_prune(model, target, self.scope, self.include, self.exclude)
        modules = [model.get_submodule(name) for name in names]
        self._masks = {module: module.weight_mask.bool() for module in modules}
        make_permanent(model)
        self.sparsity = target
        logger.info("Step %d: magnitude-pruned %d modules to sparsity %.4f.", step, len(modules), target)

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for module, mask in self._masks.items():
            module.weight.masked_fill_(~mask, 0.0)

    def _check_resumed_zeros(self, model: nn.Module, target: float, step: int) -> None:
        modules = select_linear_modules(model, self.include, self.exclude)
        zeros = sum(int((module.weight == 0).sum()) for module in modules.values())
        total = sum(module.weight.numel() for module in modules.values())
        expected = sum(target_zeros(modules, target, self.scope).values())
        if zeros < expected:
            logger.warning(
                "Resuming at step %d, where the pruning schedule is at sparsity %.4f, but the loaded weights are only "
                "%.4f sparse: the checkpoint was not written by this callback with the same settings. Pruning to "
                "%.4f now.",
                step,
                target,
                zeros / total,
                target,
            )
