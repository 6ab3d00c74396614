"""Which attention maps the attention loss compares, and what keeps the comparison meaningful.

Layers are paired by their real index, also in head-pruned models, whose layers left with no heads return no attention
map at all (so a layer's map is not always at its index in the returned `attentions`). Mapped layers must have equal
head counts unless heads are averaged; the maps must be attention probabilities (eager attention) without dropout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput, logging

from ..architectures import get_layers, get_spec, supported_model_types
from ..pruning.structured_callback import GradualStructuredPruningCallback
from ..structure import get_structure

logger = logging.get_logger(__name__)

# Attention-dropout fields of the supported configs: returned attention probabilities include dropout in training.
_ATTENTION_DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attention_dropout")


def heads_per_layer(model: PreTrainedModel) -> tuple[int, ...] | None:
    """Attention heads of each transformer layer as its modules have them, or `None` when unknown.

    Head pruning leaves `config.num_attention_heads` at the unpruned count, so registered architectures are read
    from their modules (`get_structure`); others are taken to have the config's count in every layer.
    """
    if getattr(model.config, "model_type", None) in supported_model_types():
        return get_structure(model).heads
    heads, layers = (
        getattr(model.config, "num_attention_heads", None),
        getattr(model.config, "num_hidden_layers", None),
    )
    return (heads,) * layers if isinstance(heads, int) and isinstance(layers, int) else None


def attention_position(heads: Sequence[int] | None, layer: int) -> int | None:
    """Index in a model's returned `attentions` of transformer layer `layer` (1-based, as in `layer_mapping`).

    A layer left with no heads returns no attention map at all, so the maps of the layers after it move up one
    place; `None` for such a layer.
    """
    if heads is None:
        return layer - 1
    if heads[layer - 1] == 0:
        return None
    return sum(1 for count in heads[: layer - 1] if count > 0)


def attention_pairs(
    student: PreTrainedModel, teacher: PreTrainedModel, mapping: dict[int, int]
) -> tuple[list[tuple[int, int]], list[str]]:
    """The mapped (student, teacher) transformer-layer pairs the attention loss compares, and why others are not."""
    student_heads, teacher_heads = heads_per_layer(student), heads_per_layer(teacher)
    pairs, skipped = [], []
    for s, t in mapping.items():
        if s == 0 or t == 0:
            continue
        if attention_position(student_heads, s) is None:
            skipped.append(f"{s} -> {t} (student layer {s} has no attention heads left)")
        elif attention_position(teacher_heads, t) is None:
            skipped.append(f"{s} -> {t} (teacher layer {t} has no attention heads left)")
        else:
            pairs.append((s, t))
    return pairs, skipped


def check_attention_loss(student: PreTrainedModel, teacher: PreTrainedModel, mapping: dict[int, int], args) -> None:
    """Refuse, naming the fix, a mapping that leaves nothing to compare, unequal head counts compared head by head,
    and attention dropout that cannot be switched off."""
    if not any(s > 0 and t > 0 for s, t in mapping.items()):
        raise ValueError(
            f"attention_loss_weight={args.attention_loss_weight} but layer_mapping {mapping} maps no transformer layer "
            "to a transformer layer (0 is the embedding output, which has no attention); map layers >= 1."
        )
    pairs, skipped = attention_pairs(student, teacher, mapping)
    if not pairs:
        raise ValueError(
            f"attention_loss_weight={args.attention_loss_weight} but every layer pair of the mapping {mapping} has a "
            f"layer without attention heads: {'; '.join(skipped)}. Map layers that kept heads with layer_mapping, or "
            "set attention_loss_weight=0."
        )
    if skipped:
        logger.warning(f"The attention loss leaves out the mapped layers {'; '.join(skipped)}.")
    if not args.attention_average_heads:
        student_heads, teacher_heads = heads_per_layer(student), heads_per_layer(teacher)
        for s, t in pairs:
            if student_heads is None or teacher_heads is None or student_heads[s - 1] == teacher_heads[t - 1]:
                continue
            raise ValueError(
                f"The attention loss compares heads one to one, but in the mapped layers {s} -> {t} the student has "
                f"{student_heads[s - 1]} attention heads and the teacher {teacher_heads[t - 1]} (counted in the "
                "modules, after any head pruning). Set attention_average_heads=True to compare head-averaged "
                "attention, set attention_loss_weight=0 (use hidden_loss_weight instead), or map layers with as "
                "many heads."
            )
    # Registered architectures get their attention dropout switched off (`switch_off_attention_dropout`); others cannot.
    if student.config.model_type in supported_model_types():
        return
    for name in _ATTENTION_DROPOUT_FIELDS:
        dropout = getattr(student.config, name, None)
        if dropout:
            raise ValueError(
                f"attention_loss_weight={args.attention_loss_weight} needs the student's attention probabilities "
                f"without dropout, but its config has {name}={dropout} and hf-compress cannot switch it off for "
                f"model_type {student.config.model_type!r}; create or load the student with {name}=0.0 "
                f"(e.g. `from_pretrained(..., {name}=0.0)`) or register the architecture."
            )


def check_gradual_pruning(callbacks: Iterable, args) -> None:
    """Head-by-head attention distillation cannot survive heads being removed from the student during training."""
    if args.attention_loss_weight == 0 or args.attention_average_heads:
        return
    for callback in callbacks or ():
        callback_class = callback if isinstance(callback, type) else type(callback)
        if issubclass(callback_class, GradualStructuredPruningCallback):
            raise ValueError(
                f"attention_loss_weight={args.attention_loss_weight} compares the student's attention heads one to "
                "one with the teacher's, but GradualStructuredPruningCallback removes student heads during "
                "training, after which they no longer match. Set attention_average_heads=True (compare "
                "head-averaged attention, which needs no equal head counts) or attention_loss_weight=0."
            )


def check_attention_count(output: ModelOutput, who: str, heads: tuple[int, ...] | None) -> None:
    """Refuse to pair attention maps by position when the model returned fewer or more than its layers with heads
    (e.g. a kernel that returns no probabilities): layers would silently be compared with the wrong ones."""
    if heads is None:
        return
    expected = sum(1 for count in heads if count > 0)
    if len(output.attentions) != expected:
        raise ValueError(
            f"The {who} returned {len(output.attentions)} attention maps, but has {expected} layers with attention "
            f"heads (heads per layer: {list(heads)}); the attention loss needs one map per such layer, which "
            "eager attention returns: `model.set_attn_implementation('eager')`."
        )


def use_eager_attention(model: PreTrainedModel, role: str) -> None:
    """Switch `model` (the `role`: "student" or "teacher") to eager attention: SDPA and flash attention return no
    attention probabilities, which the attention loss needs."""
    if model.config._attn_implementation == "eager":
        return
    logger.info(f"Switching the {role} ({type(model).__name__}) to eager attention for the attention loss.")
    model.set_attn_implementation("eager")
    if model.config._attn_implementation != "eager":
        raise ValueError(
            f"The attention loss needs attention probabilities, but the {role} ({type(model).__name__}) could not "
            f"be switched from {model.config._attn_implementation!r} to eager attention; load it with "
            "`attn_implementation='eager'` or set attention_loss_weight=0."
        )


def switch_off_attention_dropout(model: PreTrainedModel) -> None:
    """Attention probabilities come back after dropout in training, which would make the KL meaningless."""
    spec = get_spec(model)
    switched = set()
    for layer in get_layers(model):
        dropout = getattr(layer.get_submodule(spec.attention_core), "dropout", None)
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            switched.add(dropout.p)
            dropout.p = 0.0
    if switched:
        logger.warning(
            f"attention_loss_weight > 0: the student's attention-probability dropout ({max(switched)}) is switched "
            "off for distillation (its other dropout stays); the config, and so the saved checkpoint, keep the value."
        )
