"""Pure distillation losses: tensors in, a scalar tensor out, no model or trainer state.

Every loss *sums* over the items it averages (examples, or valid token positions) and divides by `num_items_in_batch`
when given, else by the local count. Passing the item count of the whole accumulated (and gathered) batch makes the sum
of the micro-batch losses equal the loss of the big batch, which is how `DistillationTrainer` keeps gradient
accumulation and several processes exact.

Shapes: `B` batch, `L` sequence length, `C` classes (or vocabulary), `H` hidden size, `nh` attention heads.

One regulariser sits beside them: `l1_penalty`, the sum of `|w|` of a model's selected linear weights, which
`DistillationTrainer` adds to the loss (`l1_weight`) to push weights towards zero before magnitude pruning. It reads
the weights from the model (the selection rules are those of magnitude pruning, `hf_compress.pruning.module_selection`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..pruning.module_selection import effective_weight, select_linear_modules
from .constants import HIDDEN_LOSS_TYPES

__all__ = [
    "attention_kl_loss",
    "cross_entropy_loss",
    "hidden_state_loss",
    "l1_penalty",
    "regression_loss",
    "soft_kl_loss",
    "token_kl_loss",
]


def _normalize(total: torch.Tensor, local_count: torch.Tensor | int, num_items_in_batch: torch.Tensor | int | None):
    """`total / num_items_in_batch`, or `total / local_count`; a count of 0 only happens when `total` is 0 too."""
    denominator = local_count if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(denominator):
        denominator = denominator.to(device=total.device, dtype=total.dtype).clamp_min(1)
    else:
        denominator = max(denominator, 1)
    return total / denominator


def _per_position_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) over the last dimension, computed in float32."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1)


def soft_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Hinton's soft-target loss: `T^2 * KL(softmax(teacher / T) || softmax(student / T))`, averaged over examples.

    Without `mask` and `num_items_in_batch` this is exactly
    `T**2 * F.kl_div(log_softmax(student / T), softmax(teacher / T), reduction="batchmean")`. The `T^2` keeps the
    gradient scale independent of the temperature (Hinton et al., 2015).

    Args:
        student_logits: `(B, C)` student logits.
        teacher_logits: `(B, C)` teacher logits.
        temperature: Softmax temperature `T > 0`.
        mask: Optional `(B,)` boolean mask of the examples that count (the others contribute 0).
        num_items_in_batch: Divide the sum by this instead of the number of counted examples.

    Returns:
        A scalar tensor (float32).

    Example:
        ```python
        loss = soft_kl_loss(student(**batch).logits, teacher(**batch).logits, temperature=2.0)
        ```
    """
    per_example = _per_position_kl(student_logits, teacher_logits, temperature)  # (B,)
    if mask is not None:
        per_example = per_example * mask
        local_count = mask.sum()
    else:
        local_count = per_example.shape[0]
    return _normalize(per_example.sum() * temperature**2, local_count, num_items_in_batch)


def token_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Per-token soft-target loss for token classification and masked LM, averaged over the positions in `mask`.

    Args:
        student_logits: `(B, L, C)` student logits.
        teacher_logits: `(B, L, C)` teacher logits.
        mask: `(B, L)` boolean mask of the positions that count: usually `labels != -100`, or the attention mask when
            there are no labels.
        temperature: Softmax temperature `T > 0`; the result is multiplied by `T^2`.
        num_items_in_batch: Divide the sum by this instead of `mask.sum()`.

    Returns:
        A scalar tensor (float32).
    """
    mask = mask.bool()
    # Select before the softmax: a masked-LM vocabulary makes (B, L, C) large, and padding rows are wasted work.
    per_token = _per_position_kl(student_logits[mask], teacher_logits[mask], temperature)  # (num_valid,)
    return _normalize(per_token.sum() * temperature**2, per_token.shape[0], num_items_in_batch)


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Cross-entropy with the hard labels, ignoring `-100`, as the transformers heads compute it.

    Without `num_items_in_batch` this is exactly `nn.CrossEntropyLoss()(logits.view(-1, C), labels.view(-1))`, the loss
    of `*ForSequenceClassification`, `*ForTokenClassification` and `*ForMaskedLM`.

    Args:
        logits: `(B, C)` or `(B, L, C)` logits.
        labels: `(B,)` or `(B, L)` class indices, `-100` where there is no label.
        label_smoothing: As in `torch.nn.functional.cross_entropy` (the Trainer's `label_smoothing_factor`).
        num_items_in_batch: Divide the sum by this instead of the number of labels that are not `-100`.

    Returns:
        A scalar tensor.
    """
    num_classes = logits.shape[-1]
    logits = logits.float()  # a no-op in fp32; outside autocast, bf16 logits would lose precision in the softmax
    flat_labels = labels.reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(logits.reshape(-1, num_classes), flat_labels, label_smoothing=label_smoothing)
    total = F.cross_entropy(
        logits.reshape(-1, num_classes), flat_labels, label_smoothing=label_smoothing, reduction="sum"
    )
    return _normalize(total, flat_labels.ne(-100).sum(), num_items_in_batch)


def regression_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Mean squared error per example (averaged over its outputs), averaged over examples.

    Used for regression heads (`num_labels == 1`), both against the labels and, as the soft loss, against the
    teacher's prediction. Without `num_items_in_batch` it is exactly `nn.MSELoss()(predictions, targets)`.

    Args:
        predictions: `(B,)` or `(B, K)` predictions.
        targets: Targets with the same number of elements.
        num_items_in_batch: Divide the sum over examples by this instead of `B`.

    Returns:
        A scalar tensor (float32).
    """
    batch_size = predictions.shape[0]
    predictions, targets = predictions.float().reshape(batch_size, -1), targets.float().reshape(batch_size, -1)
    if num_items_in_batch is None:
        # The very op of the regression heads, so alpha=0 reproduces the Trainer's loss bit for bit.
        return F.mse_loss(predictions, targets)
    per_example = ((predictions - targets) ** 2).mean(-1)  # (B,)
    return _normalize(per_example.sum(), batch_size, num_items_in_batch)


def _per_example_token_mean(per_token: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a `(B, L)` per-token loss over each example's non-padding tokens -> `(B,)`."""
    if attention_mask is None:
        return per_token.mean(-1)
    mask = attention_mask.to(per_token.dtype)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    loss_type: str = "mse",
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Distance between student and teacher hidden states, per token, averaged over tokens then examples.

    `"mse"` is the squared error averaged over the hidden dimension (TinyBERT); `"cosine"` is `1 - cos` between the
    two vectors (DistilBERT's cosine embedding loss). Project the student first when the hidden sizes differ.

    Args:
        student_hidden: `(B, L, H)` student hidden states (already projected to the teacher's size `H`).
        teacher_hidden: `(B, L, H)` teacher hidden states.
        attention_mask: Optional `(B, L)` mask; padding tokens do not count.
        loss_type: `"mse"` or `"cosine"`.
        num_items_in_batch: Divide the sum over examples by this instead of `B`.

    Returns:
        A scalar tensor (float32).
    """
    if loss_type not in HIDDEN_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; use one of {HIDDEN_LOSS_TYPES}.")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"Student hidden states of shape {tuple(student_hidden.shape)} cannot be compared with teacher hidden "
            f"states of shape {tuple(teacher_hidden.shape)}; project the student to the teacher's hidden size first."
        )
    student_hidden, teacher_hidden = student_hidden.float(), teacher_hidden.float()
    if loss_type == "mse":
        per_token = ((student_hidden - teacher_hidden) ** 2).mean(-1)  # (B, L)
    else:
        per_token = 1.0 - F.cosine_similarity(student_hidden, teacher_hidden, dim=-1)  # (B, L)
    per_example = _per_example_token_mean(per_token, attention_mask)  # (B,)
    return _normalize(per_example.sum(), per_example.shape[0], num_items_in_batch)


def attention_kl_loss(
    student_attentions: torch.Tensor,
    teacher_attentions: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    average_heads: bool = False,
) -> torch.Tensor:
    """KL(teacher || student) between attention distributions (MiniLM), averaged over heads, queries, examples.

    By default head `h` of the student is compared with head `h` of the teacher, so both need the same number of
    heads. With `average_heads=True` each side's distributions are first averaged over its heads (the mean of
    distributions is a distribution: where the layer as a whole attends), so the head counts may differ, for example
    once some of the student's heads have been pruned.

    Args:
        student_attentions: `(B, nh, L, L)` attention probabilities of one student layer (rows sum to 1).
        teacher_attentions: `(B, nh', L, L)` attention probabilities of the mapped teacher layer (`nh' == nh` unless
            `average_heads`).
        attention_mask: Optional `(B, L)` mask; padding queries do not count (padding keys have probability 0).
        num_items_in_batch: Divide the sum over examples by this instead of `B`.
        average_heads: Compare the head-averaged distributions `(B, 1, L, L)` instead of head by head.

    Returns:
        A scalar tensor (float32).
    """
    if average_heads:
        # In float32, before the mean: bf16/fp16 sums of many heads lose precision.
        student_attentions = student_attentions.float().mean(1, keepdim=True)  # (B, 1, L, L)
        teacher_attentions = teacher_attentions.float().mean(1, keepdim=True)  # (B, 1, L, L)
    if student_attentions.shape != teacher_attentions.shape:
        raise ValueError(
            f"Student attentions of shape {tuple(student_attentions.shape)} cannot be compared with teacher "
            f"attentions of shape {tuple(teacher_attentions.shape)}: the attention loss needs the same number of heads "
            "(or average_heads=True) and the same sequence length."
        )
    # Renormalise in float32: bf16/fp16 rows only sum to 1 approximately, which can make the KL slightly negative.
    student, teacher = (probs.float() for probs in (student_attentions, teacher_attentions))
    student, teacher = (probs / probs.sum(-1, keepdim=True).clamp_min(1e-12) for probs in (student, teacher))
    # Padding keys have probability exactly 0 in both: xlogy gives 0 * log 0 = 0, and clamping the student's
    # probabilities keeps -teacher * log(student) at 0 there instead of 0 * inf = nan (in the loss and its gradient).
    log_student = torch.log(student.clamp_min(torch.finfo(student.dtype).tiny))
    per_query = (torch.xlogy(teacher, teacher) - teacher * log_student).sum(-1)  # (B, nh, L)
    per_token = per_query.mean(1)  # (B, L): average over heads
    per_example = _per_example_token_mean(per_token, attention_mask)  # (B,)
    return _normalize(per_example.sum(), per_example.shape[0], num_items_in_batch)


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
        include: Module-name patterns, as in `magnitude_prune` (default: the linear layers of the transformer layers;
            the rules are in `hf_compress.pruning.module_selection`).
        exclude: Module-name patterns removed from the selection.

    Returns:
        A 0-dim float32 tensor on the weights' device, with gradient to the weights.

    Example:

    ```python
    loss = outputs.loss + 1e-5 * l1_penalty(model)
    loss.backward()
    ```
    """
    weights = [effective_weight(module) for module in select_linear_modules(model, include, exclude).values()]
    return torch.stack([weight.abs().sum(dtype=torch.float32) for weight in weights]).sum()
