"""The parts of the distillation loss of one batch, from the student's and the teacher's outputs.

`LossParts` picks the pure losses of `hf_compress.distillation.losses` that fit the task (classification or regression,
per example or per token) and compares the mapped layers for the intermediate losses. `DistillationTrainer.compute_loss`
weighs the parts into the loss: `alpha * soft + (1 - alpha) * hard + hidden_loss_weight * hidden +
attention_loss_weight * attention`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput, logging

from .attention_pairs import attention_position, check_attention_count
from .losses import (
    attention_kl_loss,
    cross_entropy_loss,
    hidden_state_loss,
    regression_loss,
    soft_kl_loss,
    token_kl_loss,
)

logger = logging.get_logger(__name__)


class LossParts:
    """Computes each part of the distillation loss of a batch, unweighted: `soft_loss`, `hard_loss`, `hidden_loss`
    and `attention_loss` (each only when it applies).

    Args:
        args: The `DistillationTrainingArguments` (temperature, label smoothing, which intermediate losses are on).
        token_level: Whether the task predicts per token (token classification, masked LM).
        regression: Whether the head is a regression head (MSE to the teacher's prediction and to the labels).
        layer_mapping: Student layer -> teacher layer, as hidden-state indices, for the intermediate losses.
        hidden_projections: Per mapped student layer, the `Linear` to the teacher's hidden size, or `None` when the
            sizes are equal.
        teacher_heads: The teacher's heads per layer (`heads_per_layer`), which place its layers' attention maps.
        attention_pairs: The mapped (student, teacher) layer pairs the attention loss compares (`attention_pairs`).
    """

    def __init__(
        self,
        args,
        token_level: bool,
        regression: bool,
        layer_mapping: dict[int, int],
        hidden_projections: nn.ModuleDict | None,
        teacher_heads: tuple[int, ...] | None,
        attention_pairs: list[tuple[int, int]],
    ):
        self.args = args
        self.token_level = token_level
        self.regression = regression
        self.layer_mapping = layer_mapping
        self.hidden_projections = hidden_projections
        self.teacher_heads = teacher_heads
        self.attention_pairs = attention_pairs
        self._warned_attention_pairs: set[tuple[int, int]] = set()

    def __call__(
        self,
        outputs: ModelOutput,
        teacher_outputs: ModelOutput | None,
        inputs: dict[str, Any],
        labels: torch.Tensor | None,
        items: torch.Tensor | int | None,
        examples: torch.Tensor | None,
        student_heads: tuple[int, ...] | None = None,
        teacher_from_cache: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Each part of the loss, unweighted, normalised by `items` (soft, hard) or `examples` (intermediate).

        Args:
            outputs: The student's outputs.
            teacher_outputs: The teacher's outputs, or `None` when the teacher does not run (no soft loss).
            inputs: The batch (its `attention_mask` masks padding).
            labels: The batch's labels, or `None` (no hard loss).
            items, examples: The counts to divide by (see `ItemCounts`); `None` divides by this batch's own.
            student_heads: The student's heads per layer now (`heads_per_layer`), which place each layer's map in its
                returned `attentions`.
            teacher_from_cache: Whether `teacher_outputs` come from the teacher cache, which holds the mapped layers
                only (so the teacher's number of attention maps is not checked).
        """
        logits = outputs.logits
        parts = {}
        if self.regression:
            if teacher_outputs is not None:
                parts["soft_loss"] = regression_loss(logits, teacher_outputs.logits, num_items_in_batch=items)
            if labels is not None:
                parts["hard_loss"] = regression_loss(logits, labels, num_items_in_batch=items)
            return self._intermediate_parts(
                outputs, teacher_outputs, inputs, examples, parts, student_heads, teacher_from_cache
            )

        if labels is not None and labels.is_floating_point():
            raise ValueError(
                f"The labels are floats ({labels.dtype}) but the student has num_labels={logits.shape[-1]}: "
                "multi-label classification is not supported; pass integer class indices."
            )
        temperature = self.args.temperature
        mask = labels.ne(-100) if labels is not None else None
        if teacher_outputs is not None:
            teacher_logits = teacher_outputs.logits.to(logits.device)
            if self.token_level:
                if mask is None:
                    attention_mask = inputs.get("attention_mask")
                    mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(logits[..., 0])
                parts["soft_loss"] = token_kl_loss(logits, teacher_logits, mask, temperature, items)
            else:
                parts["soft_loss"] = soft_kl_loss(logits, teacher_logits, temperature, mask, items)
        if labels is not None:
            parts["hard_loss"] = cross_entropy_loss(logits, labels, self.args.label_smoothing_factor, items)
        return self._intermediate_parts(
            outputs, teacher_outputs, inputs, examples, parts, student_heads, teacher_from_cache
        )

    def _intermediate_parts(
        self,
        outputs: ModelOutput,
        teacher_outputs: ModelOutput | None,
        inputs: dict[str, Any],
        examples: torch.Tensor | None,
        parts: dict[str, torch.Tensor],
        student_heads: tuple[int, ...] | None,
        teacher_from_cache: bool,
    ) -> dict[str, torch.Tensor]:
        """Add the hidden-state and attention losses, each averaged over the mapped layer pairs."""
        attention_mask = inputs.get("attention_mask")
        if self.args.hidden_loss_weight > 0:
            _check_returned(outputs, teacher_outputs, "hidden_states")
            losses = []
            for s, t in self.layer_mapping.items():
                student_hidden = outputs.hidden_states[s].float()
                if self.hidden_projections is not None:
                    student_hidden = self.hidden_projections[str(s)](student_hidden)
                teacher_hidden = teacher_outputs.hidden_states[t].to(student_hidden.device)
                losses.append(
                    hidden_state_loss(
                        student_hidden, teacher_hidden, attention_mask, self.args.hidden_loss_type, examples
                    )
                )
            parts["hidden_loss"] = torch.stack(losses).mean()
        if self.args.attention_loss_weight > 0:
            _check_returned(outputs, teacher_outputs, "attentions")
            check_attention_count(outputs, "student", student_heads)
            if not teacher_from_cache:  # cached outputs hold the mapped layers only
                check_attention_count(teacher_outputs, "teacher", self.teacher_heads)
            losses = []
            for s, t in self.attention_pairs:
                # attentions[i] belongs to the i-th layer that has heads: layers pruned to no heads return no map.
                student_index = attention_position(student_heads, s)
                if student_index is None:  # pruned away during training (GradualStructuredPruningCallback)
                    if (s, t) not in self._warned_attention_pairs:
                        self._warned_attention_pairs.add((s, t))
                        logger.warning(
                            f"Student layer {s} has no attention heads left: the attention loss leaves out the mapped "
                            f"layers {s} -> {t} from now on."
                        )
                    continue
                student_attention = outputs.attentions[student_index]
                teacher_attention = teacher_outputs.attentions[attention_position(self.teacher_heads, t)]
                losses.append(
                    attention_kl_loss(
                        student_attention,
                        teacher_attention.to(student_attention.device),
                        attention_mask,
                        examples,
                        average_heads=self.args.attention_average_heads,
                    )
                )
            # Every mapped student layer pruned to no heads: there is no attention left to distill.
            parts["attention_loss"] = (
                torch.stack(losses).mean() if losses else outputs.logits.new_zeros((), dtype=torch.float32)
            )
        return parts


def _check_returned(outputs: ModelOutput, teacher_outputs: ModelOutput | None, name: str) -> None:
    """Refuse, naming the fix, outputs without the `hidden_states` or `attentions` an intermediate loss needs."""
    fix = {
        "hidden_states": "its forward must honour output_hidden_states=True",
        "attentions": "attention probabilities need eager attention: `model.set_attn_implementation('eager')`",
    }[name]
    for who, output in (("student", outputs), ("teacher", teacher_outputs)):
        if output is None or getattr(output, name, None) is None:
            raise ValueError(f"The {who} returned no {name}, which the intermediate losses need; {fix}.")
