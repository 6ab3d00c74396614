"""`DistillationTrainer`: swap `Trainer` for it to train a student against a frozen teacher.

The loss is `alpha * soft + (1 - alpha) * hard + hidden_loss_weight * hidden + attention_loss_weight * attention`
(see `DistillationTrainingArguments`); every part is a pure function of `hf_compress.distillation.losses`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import datasets
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import EvalLoopOutput, TrainOutput
from transformers.utils import ModelOutput, logging

from ..architectures import supported_model_types
from ..deploy.comparison import COMPARISON_FILE
from ..deploy.model_card import create_model_card
from .attention_pairs import (
    attention_pairs,
    attention_position,
    check_gradual_pruning,
    heads_per_layer,
    switch_off_attention_dropout,
    use_eager_attention,
)
from .cache_format import CacheLayout
from .checks import check_compatible, forward_arg_names, is_regression, resolve_layer_mapping, task_of
from .config import DistillationTrainingArguments
from .distributed import (
    Lockstep,
    broadcast_teacher,
    check_distributed_setup,
    check_enabled_setup,
    check_pruning_callbacks,
    is_sharded,
    shard_teacher,
    warn_if_fsdp_ignored,
)
from .loss_accounting import EvaluationLossParts, ItemCounts, TrainingLossParts, accumulated_item_counts, count_items
from .loss_parts import LossParts
from .losses import (
    l1_penalty,
)
from .projections import (
    add_to_optimizer,
    average_gradients,
    build_projections,
    detached_from_optimizer,
    load_projections,
    load_projections_optimizer_state,
    save_projections,
    save_projections_optimizer_state,
)
from .teacher import load_teacher, prepare_teacher, run_teacher
from .teacher_cache import TeacherCache, check_cacheable, check_labels_inside_mask

logger = logging.get_logger(__name__)


class _DistillationCallback(TrainerCallback):
    """Resets the logged loss parts when training (re)starts and clears the projection gradients after each step."""

    def __init__(self, trainer: DistillationTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._training_loss_parts.reset(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        # The Trainer only zeroes the student's gradients (`model.zero_grad()`).
        if self.trainer.hidden_projections is not None:
            self.trainer.hidden_projections.zero_grad(set_to_none=True)


class DistillationTrainer(Trainer):
    r"""A [`~transformers.Trainer`] that trains `model` (the student) to match `teacher_model`.

    The loss of each batch is `alpha * soft + (1 - alpha) * hard + hidden_loss_weight * hidden +
    attention_loss_weight * attention` where, with `T` the temperature:

    - `soft = T^2 * KL(softmax(teacher / T) || softmax(student / T))`, averaged over examples (sequence classification)
      or over the tokens whose label is not `-100` (token classification, masked LM; all non-padding tokens when the
      batch has no labels). Regression heads (`num_labels == 1`) use the MSE to the teacher's prediction instead.
    - `hard` is the loss of the student's head with the labels (cross-entropy, or MSE for regression), exactly as the
      stock `Trainer` computes it, so `alpha=0` is plain fine-tuning.
    - `hidden` and `attention` compare mapped layers (see `layer_mapping`); both are off by default. Layers are
      matched by their index also in head-pruned models (whose layers without heads return no attention map); pairs
      with such a layer are left out of the attention loss. Mapped layers must have equal head counts (read from the
      modules, not the config) unless `attention_average_heads=True`, which compares head-averaged attention and is
      required with a [`GradualStructuredPruningCallback`].

    The teacher is frozen, in eval mode, run without gradients, placed on the training device (and in bf16/fp16 when
    those are on), never given to the optimizer and never saved: checkpoints and `save_model` hold the student only.
    Under DDP every process holds a whole teacher; under FSDP2 it is sharded like the student unless
    `teacher_sharding="replicate"` (see `DistillationTrainingArguments`). A teacher you pass as a model is modified
    *in place* (no copy, which would double its memory): it stays in eval mode with `requires_grad=False`, on that
    device and dtype (and sharded, under FSDP2) after training, so copy a student from it *before* creating the
    trainer (or call `student.requires_grad_(True)`). A student with no trainable
    parameter, or one that shares parameters with the teacher, is refused with a `ValueError`. With
    `teacher_cache_dir` set, `train()` runs the teacher once over the training set and training batches read its
    outputs from that cache (`trainer.teacher_cache`, a [`TeacherCache`]) instead of running it.

    The soft, hard, hidden and attention parts are logged as `soft_loss`, `hard_loss`, `hidden_loss` and
    `attention_loss` next to `loss`, averaged over the logging interval and over processes like it; with
    `l1_weight > 0` the training loss also holds `l1_weight * l1_penalty(student)`, logged as `l1_loss`.
    Evaluation logs and returns them as `eval_soft_loss`, `eval_hard_loss`, ... averaged over the whole evaluation
    set, next to `eval_loss`, which is the whole distillation loss (the stock mean over batches, without the L1 term).
    `load_best_model_at_end` without `metric_for_best_model` therefore keeps the checkpoint with the lowest
    distillation loss, closest to the teacher as much as to the labels; set `metric_for_best_model="hard_loss"` or a
    `compute_metrics` metric such as `"accuracy"` to select on the labels.

    Distributed training: DDP and FSDP2 (`fsdp=True`, `fsdp_config={"version": 2}`, or `accelerate launch` with an
    FSDP2 config) train exactly like one process with the same global batch. Under FSDP2 the hidden-state projections
    stay whole on every process (their gradients averaged like the student's) and their optimizer state is saved
    beside the checkpoint's. FSDP1, DeepSpeed and `l1_weight > 0` under FSDP are refused with a `ValueError` before
    any work. accelerate enables FSDP only on accelerator devices: on CPU, `fsdp` is ignored with a warning and
    training runs as DDP.

    Args:
        model ([`~transformers.PreTrainedModel`], *optional*):
            The student, a sequence-classification, token-classification or masked-LM model. Either `model` or
            `model_init`.
        teacher_model ([`~transformers.PreTrainedModel`] or `str`):
            The teacher, with the same head and number of labels (same vocabulary for token-level tasks, at least the
            student's for sequence classification), or a Hub id / local folder loaded with the student's Auto class
            and `args.teacher_model_init_kwargs`; a checkpoint pruned by hf-compress is loaded with
            [`load_compressed`] (its saved head) and the same keyword arguments. A string that looks like a path
            (`./`, `../`, `/`, `~`, several separators) but is no folder is refused with a `ValueError` naming it.
        args ([`DistillationTrainingArguments`], *optional*):
            Training and distillation arguments; defaults to `DistillationTrainingArguments(output_dir="tmp_trainer")`.
        data_collator, train_dataset, eval_dataset, processing_class, model_init, compute_metrics, callbacks,
        optimizers, optimizer_cls_and_kwargs, preprocess_logits_for_metrics:
            As in [`~transformers.Trainer`]. Columns that only the teacher's `forward` takes (`token_type_ids` for a
            BERT teacher of a DistilBERT student) are kept by `remove_unused_columns`, and each model receives only
            the inputs its `forward` names.

    Example:
        ```python
        from hf_compress import DistillationTrainer, DistillationTrainingArguments

        args = DistillationTrainingArguments(output_dir="student", temperature=4.0, alpha=0.5, num_train_epochs=3)
        trainer = DistillationTrainer(
            model=student, teacher_model="textattack/bert-base-uncased-SST-2", args=args, train_dataset=train_dataset
        )
        trainer.train()
        trainer.save_model()
        ```
    """

    # The loss is normalised by the item counts of the whole accumulated batch (see `_get_num_items_in_batch`, which
    # always provides them in training), so the Trainer must not divide it by the accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | None = None,
        teacher_model: PreTrainedModel | str | None = None,
        args: DistillationTrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable[..., PreTrainedModel] | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
    ):
        if args is None:
            args = DistillationTrainingArguments(output_dir="tmp_trainer")
        elif not isinstance(args, DistillationTrainingArguments):
            raise ValueError(
                f"args must be a DistillationTrainingArguments, got {type(args).__name__}; create it with "
                "`DistillationTrainingArguments(output_dir=..., temperature=..., alpha=..., **training_arguments)`."
            )
        if teacher_model is None:
            raise ValueError("DistillationTrainer needs a teacher_model (a PreTrainedModel, Hub id or local path).")
        check_distributed_setup(args)
        if args.teacher_cache_dir is not None:
            check_cacheable(train_dataset, data_collator)
        check_gradual_pruning(callbacks, args)
        # Check everything before the Trainer touches the student, so a bad pair leaves both models as they were.
        if model is not None:
            teacher_model = load_teacher(teacher_model, model, args)
            check_compatible(model, teacher_model, args)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        if model is None:  # built by `model_init` inside `Trainer.__init__`
            teacher_model = load_teacher(teacher_model, self.model, args)
            check_compatible(self.model, teacher_model, args)
        # The accelerator may have read DeepSpeed / FSDP plugins from the environment (accelerate launch).
        check_enabled_setup(args, self.accelerator.state, teacher_model)
        warn_if_fsdp_ignored(args, self.accelerator.state, self.is_fsdp_enabled)
        check_pruning_callbacks(self.callback_handler.callbacks, self.is_fsdp_enabled)
        if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
            # Only the main processes loaded its weights; accelerate fills in the student's, not the teacher's.
            broadcast_teacher(teacher_model, self.args.device)

        self._task = task_of(self.model)
        self._regression = is_regression(self.model.config)
        self.teacher_model = prepare_teacher(teacher_model, self.args)
        self._student_input_names = forward_arg_names(self.model) - {"labels"}
        self._teacher_input_names = forward_arg_names(self.teacher_model) - {"labels"}
        self._output_flags = {}
        if args.hidden_loss_weight > 0:
            self._output_flags["output_hidden_states"] = True
        if args.attention_loss_weight > 0:
            self._output_flags["output_attentions"] = True
        # alpha=0 without intermediate losses is plain fine-tuning: skip the teacher's forward entirely.
        self._needs_teacher = args.alpha > 0 or args.uses_intermediate_layers
        # Set by `train()` when `teacher_cache_dir` is set; serves the teacher's outputs of training batches.
        self.teacher_cache: TeacherCache | None = None

        self._prepare_student(self.model)
        self.layer_mapping: dict[int, int] = {}
        self.hidden_projections: nn.ModuleDict | None = None
        if args.uses_intermediate_layers:
            self.layer_mapping = resolve_layer_mapping(self.model, self.teacher_model, args)
            self.hidden_projections = build_projections(
                self.model.config, self.teacher_model.config, self.layer_mapping, args
            )
        # The teacher's structure never changes; the student's may (GradualStructuredPruningCallback), so its
        # attention positions are looked up at every step.
        self._teacher_heads = heads_per_layer(self.teacher_model) if args.attention_loss_weight > 0 else None
        self._attention_pairs: list[tuple[int, int]] = []
        if args.attention_loss_weight > 0:
            self._attention_pairs = attention_pairs(self.model, self.teacher_model, self.layer_mapping)[0]
        self._loss_parts = LossParts(
            args,
            token_level=self._task.token_level,
            regression=self._regression,
            layer_mapping=self.layer_mapping,
            hidden_projections=self.hidden_projections,
            teacher_heads=self._teacher_heads,
            attention_pairs=self._attention_pairs,
        )

        if args.l1_weight > 0:
            l1_penalty(self.model, include=args.l1_modules)  # unknown module patterns fail here, not mid-training

        self._training_loss_parts = TrainingLossParts()  # logged next to `loss`, see `log`
        self._evaluation_loss_parts = EvaluationLossParts()  # added to the metrics, see `evaluation_loop`
        self.add_callback(_DistillationCallback(self))
        # Under FSDP2 the projections join the optimizer only once accelerate has sharded the student (see
        # `create_scheduler`); True while they wait.
        self._projections_pending = False
        if self.is_fsdp_enabled and args.teacher_sharding == "shard":
            # Last: everything above reads the teacher's modules whole.
            shard_teacher(self.teacher_model, self.accelerator)

    # ---- Setup ----

    def _prepare_student(self, model: PreTrainedModel) -> None:
        """The attention loss needs the student's attention probabilities, undropped."""
        if self.args.attention_loss_weight > 0:
            use_eager_attention(model, "student")
            if model.config.model_type in supported_model_types():
                switch_off_attention_dropout(model)

    def call_model_init(self, trial: Any = None) -> PreTrainedModel:
        model = super().call_model_init(trial)
        self._prepare_student(model)
        return model

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the columns the teacher needs even when the student's forward does not take them.
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += sorted(self._teacher_input_names - set(self._signature_columns))

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus the hidden-state projections (trained with the student) when there are any.

        Under FSDP2 the optimizer is created before accelerate shards the student, and `accelerator.prepare` then
        swaps each of its parameters for the student's shard of it, which fails for the projections (they are not
        in the student): they are added right after `prepare`, before the LR scheduler is built (`create_scheduler`).
        """
        created_here = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if self.hidden_projections is not None:
            if self.is_fsdp_enabled and created_here and not is_sharded(self.model):
                self._projections_pending = True
            else:
                add_to_optimizer(optimizer, self.hidden_projections, self.args.weight_decay, created_here)
        return optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """`Trainer.create_scheduler`, after adding the projections to the FSDP2 optimizer (see `create_optimizer`), so
        that the schedule covers their parameter groups as it does without FSDP."""
        if self._projections_pending and is_sharded(self.model):
            add_to_optimizer(
                optimizer if optimizer is not None else self.optimizer,
                self.hidden_projections,
                self.args.weight_decay,
                created_here=True,
            )
            self._projections_pending = False
        return super().create_scheduler(num_training_steps, optimizer)

    # ---- The teacher ----

    def _teacher_outputs(self, inputs: dict[str, Any]) -> ModelOutput:
        """The teacher's outputs for one batch: the single place they come from.

        In training with `teacher_cache_dir` set they are read from `self.teacher_cache`; otherwise (evaluation,
        prediction, or no cache) the teacher runs.

        Args:
            inputs: The batch as given to `compute_loss` (already on the training device); the teacher receives the
                inputs its `forward` names, labels excluded.

        Returns:
            The teacher's output: `logits`, plus `hidden_states` / `attentions` when the intermediate losses are on
            (from the cache: the mapped layers only, at the same indices).
        """
        if self.teacher_cache is not None and self.model.training:
            check_labels_inside_mask(inputs, self._task.token_level)
            return self.teacher_cache.lookup(inputs, device=self.teacher_model.device)
        # no_grad rather than inference_mode: inference tensors cannot be saved for the student's backward, so they
        # would need a clone, and inference_mode was not faster (SST-2 MiniLM teacher, 32 x 64 tokens, 2 CPU threads:
        # 373 vs 362 ms per forward, benchmarks/results/distillation_cost.json). The cache build uses inference_mode.
        with torch.no_grad():
            return run_teacher(self.teacher_model, inputs, self._teacher_input_names, self._output_flags)

    # ---- Teacher-output cache ----

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """`Trainer.train`, after `prepare_teacher_cache()` when `teacher_cache_dir` is set.

        The cache is prepared here rather than in `__init__` so that `model_init` and hyperparameter search see it
        too; a file that matches the teacher and training set is reused (see `DistillationTrainingArguments`).
        """
        # Callbacks may have been added since construction (`add_callback`): check again before any step.
        check_gradual_pruning(self.callback_handler.callbacks, self.args)
        check_pruning_callbacks(self.callback_handler.callbacks, self.is_fsdp_enabled)
        self.prepare_teacher_cache()
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
        )

    def prepare_teacher_cache(self) -> TeacherCache | None:
        """Load the teacher cache of the training set, or build it by running the teacher once over it.

        `train()` calls this first. Call it yourself to build the cache ahead of training, for example once on one
        process before a multi-process run (whose processes then only load the file), or to time the build apart.
        With a teacher sharded by FSDP2 (`teacher_sharding="shard"`) every process must call it together: they run
        the teacher on the whole training set in lockstep and the local main processes write the file.

        Returns:
            The [`TeacherCache`] (also set as `self.teacher_cache`), or `None` when `teacher_cache_dir` is not set or
            the teacher never runs (`alpha=0` without intermediate losses).

        Raises:
            ValueError: for a training set whose teacher inputs change between passes (see `check_cacheable`).
        """
        self.teacher_cache = None
        if self.args.teacher_cache_dir is None:
            return None
        if not self._needs_teacher:
            logger.info("teacher_cache_dir is unused: alpha=0 without intermediate losses never runs the teacher.")
            return None
        # Each pass of a DataLoader draws a seed from the global generator: restore it afterwards, so that turning
        # the cache on does not change the shuffling and dropout of training.
        with torch.random.fork_rng(devices=[]):
            self.teacher_cache = self._load_or_build_teacher_cache()
        return self.teacher_cache

    def _load_or_build_teacher_cache(self) -> TeacherCache:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        check_cacheable(self.train_dataset, self.data_collator)
        args = self.args
        hidden_states = sorted(set(self.layer_mapping.values())) if args.hidden_loss_weight > 0 else []
        # Positions in the teacher's returned `attentions` (layers without heads return none, see `attention_position`)
        attentions = (
            sorted({attention_position(self._teacher_heads, t) for _, t in self._attention_pairs})
            if args.attention_loss_weight > 0
            else []
        )
        dtype = getattr(torch, args.teacher_cache_dtype) if args.teacher_cache_dtype else None
        layout = CacheLayout(self._task.token_level, tuple(hidden_states), tuple(attentions), dtype)

        sharded = is_sharded(self.teacher_model)

        def teacher_forward(batch: dict[str, Any]) -> ModelOutput:
            with self.compute_loss_context_manager():  # the precision context the live teacher runs in
                if not sharded:
                    return run_teacher(self.teacher_model, batch, self._teacher_input_names, self._output_flags)
                # FSDP2 gathers the weights into buffers it allocates once and reuses: allocated under the build's
                # inference mode they would be inference tensors, which a later live forward (evaluation) may not
                # write. Outside inference mode, no_grad gives the same outputs.
                with torch.inference_mode(False), torch.no_grad():
                    return run_teacher(self.teacher_model, batch, self._teacher_input_names, self._output_flags)

        if sharded:
            # Every forward of a sharded teacher is a collective: all processes fingerprint it, agree on building,
            # run it on every batch together and open the file the local main processes wrote.
            return TeacherCache.load_or_build(
                self.args.teacher_cache_dir,
                self._teacher_cache_batches(),
                self.teacher_model,
                teacher_forward,
                self._teacher_input_names,
                layout,
                show_progress=not self.args.disable_tqdm and self.is_local_process_zero(),
                lockstep=Lockstep(self.accelerator),
            )
        # Every process needs the whole training set's outputs (each sees other examples every epoch): the main
        # process builds the file, the others then find it.
        with self.args.main_process_first(desc="teacher cache"):
            return TeacherCache.load_or_build(
                self.args.teacher_cache_dir,
                self._teacher_cache_batches(),
                self.teacher_model,
                teacher_forward,
                self._teacher_input_names,
                layout,
                show_progress=not self.args.disable_tqdm,
            )

    def _teacher_cache_batches(self) -> DataLoader:
        """The training set in order, with the columns and the collator of `get_train_dataloader`."""
        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="Training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="Training")
        return DataLoader(
            dataset,
            batch_size=self._train_batch_size,
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
        )

    # ---- Loss ----

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> ItemCounts | None:
        """Item counts of the whole accumulated batch, summed over processes, so that every part of the loss averages
        over the big batch exactly (the stock Trainer only counts labels, and only when the model takes loss kwargs).
        """
        across_processes = self.args.average_tokens_across_devices and self.args.world_size > 1
        return accumulated_item_counts(
            batch_samples,
            self._task.token_level,
            self._regression,
            device,
            accelerator=self.accelerator if across_processes else None,
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: ItemCounts | torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ModelOutput]:
        """The distillation loss of one batch (see the class docstring).

        Args:
            model: The (possibly wrapped) student.
            inputs: The batch; `labels` are required unless `alpha == 1`.
            return_outputs: Also return the student's outputs.
            num_items_in_batch: The counts from `_get_num_items_in_batch` (what training passes); a plain number is
                taken as the count of labelled items, as in `Trainer`; `None` averages over this batch alone.

        Returns:
            The loss, or `(loss, student_outputs)` with `return_outputs`.
        """
        labels = inputs.get("labels")
        if labels is None and self.args.alpha < 1:
            raise ValueError(
                f"alpha={self.args.alpha} gives the hard-label loss a weight of {1 - self.args.alpha:g}, but the batch "
                f"has no 'labels' (keys: {sorted(inputs)}); add labels or set alpha=1.0 for pure distillation."
            )
        items, examples = (
            num_items_in_batch if isinstance(num_items_in_batch, ItemCounts) else (num_items_in_batch, None)
        )
        student_inputs = {k: v for k, v in inputs.items() if k in self._student_input_names}
        outputs = model(**student_inputs, **self._output_flags)
        teacher_outputs = self._teacher_outputs(inputs) if self._needs_teacher else None
        student_heads = (
            heads_per_layer(self.accelerator.unwrap_model(model)) if self.args.attention_loss_weight > 0 else None
        )
        teacher_from_cache = self.teacher_cache is not None and self.model.training
        parts = self._loss_parts(
            outputs, teacher_outputs, inputs, labels, items, examples, student_heads, teacher_from_cache
        )

        scale = 1
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            # Each process divides its sum by the global count; undo the mean that DDP takes over the gradients.
            scale = self.accelerator.num_processes
            parts = {name: value * scale for name, value in parts.items()}
        if not model.training:
            local_counts = count_items(inputs, self._task.token_level, self._regression)
            self._evaluation_loss_parts.add(parts, local_counts, items, examples, scale)
        weights = {
            "soft_loss": self.args.alpha,
            "hard_loss": 1.0 - self.args.alpha,
            "hidden_loss": self.args.hidden_loss_weight,
            "attention_loss": self.args.attention_loss_weight,
        }
        loss = sum(weights[name] * value for name, value in parts.items() if weights[name] > 0)
        if self.args.l1_weight > 0 and model.training:
            # A regulariser of the weights, not of the batch: counted once per optimizer step (hence the division by
            # the accumulation steps) and the same on every process, so it needs no DDP correction.
            l1 = l1_penalty(self.accelerator.unwrap_model(model), include=self.args.l1_modules)
            parts["l1_loss"] = l1 / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + self.args.l1_weight * parts["l1_loss"]
        if model.training:
            self._training_loss_parts.add(parts)
        if not return_outputs:
            return loss
        if self._output_flags:  # do not hand evaluation the hidden states / attentions asked for the loss only
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k not in ("hidden_states", "attentions")})
        return loss, outputs

    def evaluation_loop(
        self,
        dataloader: DataLoader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """`Trainer.evaluation_loop`, whose metrics also hold each part of the loss (`eval_soft_loss`, ...).

        Each part is averaged over the whole evaluation set (and over processes) like in training: the soft and hard
        losses over the labelled examples or tokens, the hidden-state and attention losses over the examples.
        """
        self._evaluation_loss_parts.reset()
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        for name, value in self._evaluation_loss_parts.means(self.accelerator).items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        self._evaluation_loss_parts.reset()
        return output

    # ---- Training loop hooks ----

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: ItemCounts | None = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # DDP averages the student's gradients; the projections live outside it, so average theirs here, once per
        # optimizer step (after the last micro-batch, before clipping and the optimizer step).
        if (
            self.hidden_projections is not None
            and self.accelerator.num_processes > 1
            and self.accelerator.sync_gradients
        ):
            average_gradients(self.hidden_projections, self.accelerator)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the loss parts (averaged over the logging interval and over processes, like `loss`) to training logs."""
        if "loss" in logs:
            logs.update(self._training_loss_parts.pop_means(self.accelerator, self.state.global_step))
        super().log(logs, start_time)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write hf-compress's model card to `args.output_dir/README.md` (what `push_to_hub()` uploads).

        Instead of the stock Trainer draft, the card names the teacher, the distillation settings and the student's
        structure, and, when `output_dir` holds a `comparison.json` (see `hf_compress.build_comparison`), the
        teacher-vs-student metrics, size and speed-up. An existing README's own text is kept. The arguments are the
        stock `Trainer.create_model_card` ones; `tasks` and `dataset_tags` are not used (the task comes from the
        student's head).
        """
        if not self.is_world_process_zero():
            return
        comparison_path = os.path.join(self.args.output_dir, COMPARISON_FILE)
        comparison = None
        if os.path.isfile(comparison_path):
            with open(comparison_path) as file:
                comparison = json.load(file)
        distillation = {"temperature": self.args.temperature, "alpha": self.args.alpha}
        if self.args.hidden_loss_weight > 0:
            distillation[f"hidden-state loss ({self.args.hidden_loss_type})"] = self.args.hidden_loss_weight
        if self.args.attention_loss_weight > 0:
            distillation["attention loss"] = self.args.attention_loss_weight
        if self.layer_mapping:
            distillation["layer mapping (student -> teacher)"] = self.layer_mapping
        if self.args.l1_weight > 0:
            distillation["L1 weight"] = self.args.l1_weight
        create_model_card(
            self.args.output_dir,
            self.accelerator.unwrap_model(self.model),
            base_model=finetuned_from or getattr(self.teacher_model, "name_or_path", None) or None,
            comparison=comparison,
            distillation=distillation,
            dataset=_first(dataset),
            dataset_config=_first(dataset_args),
            model_name=model_name,
            repo_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            language=language,
            license=license,
            tags=[tags] if isinstance(tags, str) else tags,
        )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # The projections are training state like the optimizer: saved beside it, never into the student's weights.
        if self.is_fsdp_enabled and self.hidden_projections is not None:
            # FSDP2 saves the optimizer state by the student's parameter names: the projections' part goes apart.
            with detached_from_optimizer(self.optimizer, self.hidden_projections) as projections_state:
                super()._save_optimizer_and_scheduler(output_dir)
            if self.args.should_save:
                save_projections_optimizer_state(projections_state, output_dir)
        else:
            super()._save_optimizer_and_scheduler(output_dir)
        if self.hidden_projections is not None and self.args.should_save:
            save_projections(self.hidden_projections, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self.is_fsdp_enabled and self.hidden_projections is not None:
            with detached_from_optimizer(self.optimizer, self.hidden_projections):
                super()._load_optimizer_and_scheduler(checkpoint)
            load_projections_optimizer_state(self.optimizer, self.hidden_projections, checkpoint)
        else:
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.hidden_projections is not None:
            load_projections(self.hidden_projections, checkpoint)


def _first(value: str | list[str] | None) -> str | None:
    # The stock Trainer takes one or several datasets; the card describes the first.
    return value[0] if isinstance(value, list) and value else value or None
