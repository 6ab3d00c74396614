"""Build a smaller student from a teacher: fewer transformer layers, initialised from the teacher's own weights.

Two kinds of student:

- `create_student(teacher, num_layers=6)`: the same architecture as the teacher (a BERT teacher gives a BERT student)
  with a subset of its layers. The config is the teacher's with a smaller layer count, so the student saves and loads
  with stock transformers and no custom code. (A teacher pruned to different widths per layer gives a student with the
  kept layers' widths, a pruned checkpoint like the teacher's; if the kept layers are uniform it is a stock one again.)
- `bert_to_distilbert(teacher, num_layers=6)` (or `create_student(..., target="distilbert")`): a BERT teacher becomes a
  real `DistilBertFor...` model, as DistilBERT itself was initialised from BERT-base.

Which teacher layers are kept (`strategy`):

| strategy       | layers kept                                          | 12 -> 6            | 6 -> 3    |
|----------------|------------------------------------------------------|--------------------|-----------|
| `"uniform"`    | spread evenly, always the first and the last         | 0, 2, 4, 7, 9, 11  | 0, 3, 5   |
| `"strided"`    | every k-th from the first, k = teacher / student     | 0, 2, 4, 6, 8, 10  | 0, 2, 4   |
| `"first"`      | the bottom `num_layers`                              | 0, 1, 2, 3, 4, 5   | 0, 1, 2   |
| `"last"`       | the top `num_layers`                                 | 6, 7, 8, 9, 10, 11 | 3, 4, 5   |
| `"importance"` | the `num_layers` highest `layer_scores`, in order    | depends on scores  |           |

`"uniform"` with 12 -> 6 picks exactly the layers DistilBERT was initialised from (one layer in two, keeping the top
layer). `"strided"` is the seed-style choice that drops the top layer: on the SST-2 MiniLM teacher (6 -> 3, 8,000
sentences, seeds 0-2) it distilled to 97.7 +- 0.6% of the teacher where `"uniform"` gave 95.7-96.2%
(`benchmarks/example_defaults.py`); one task, so `"uniform"` stays the default here. An explicit `layers_to_keep=[...]`
overrides the strategy. New strategies are functions
`(num_teacher_layers, num_layers, layer_scores) -> sorted list of layer indices` added to `_STRATEGIES`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from transformers import (
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForMultipleChoice,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    DistilBertModel,
    PreTrainedModel,
)
from transformers.utils import logging

from ..architectures import get_base_model, get_layers, get_spec
from ..pruning.structured import drop_layers

logger = logging.get_logger(__name__)


#### Layer selection


def _uniform(num_teacher_layers: int, num_layers: int, layer_scores: Sequence[float] | None) -> list[int]:
    if num_layers == 1:
        # One layer cannot span the teacher; the bottom layer is the one trained directly on the embeddings.
        return [0]
    step = (num_teacher_layers - 1) / (num_layers - 1)
    # Round half up (not Python's round-half-to-even) so 12 -> 6 gives DistilBERT's 0, 2, 4, 7, 9, 11.
    return [math.floor(i * step + 0.5) for i in range(num_layers)]


def _strided(num_teacher_layers: int, num_layers: int, layer_scores: Sequence[float] | None) -> list[int]:
    return [i * num_teacher_layers // num_layers for i in range(num_layers)]


def _first(num_teacher_layers: int, num_layers: int, layer_scores: Sequence[float] | None) -> list[int]:
    return list(range(num_layers))


def _last(num_teacher_layers: int, num_layers: int, layer_scores: Sequence[float] | None) -> list[int]:
    return list(range(num_teacher_layers - num_layers, num_teacher_layers))


def _importance(num_teacher_layers: int, num_layers: int, layer_scores: Sequence[float] | None) -> list[int]:
    # Stable sort: on equal scores the lower layer wins, so the choice is deterministic.
    ranked = sorted(range(num_teacher_layers), key=lambda i: -float(layer_scores[i]))
    return sorted(ranked[:num_layers])


_STRATEGIES: dict[str, Callable[[int, int, Sequence[float] | None], list[int]]] = {
    "uniform": _uniform,
    "strided": _strided,
    "first": _first,
    "last": _last,
    "importance": _importance,
}


def select_layers(
    num_teacher_layers: int,
    num_layers: int | None = None,
    layers_to_keep: Sequence[int] | None = None,
    strategy: str = "uniform",
    layer_scores: Sequence[float] | torch.Tensor | None = None,
) -> list[int]:
    """The teacher layers a student keeps, in increasing order.

    Args:
        num_teacher_layers: How many transformer layers the teacher has.
        num_layers: How many layers the student gets (1 to `num_teacher_layers`). Optional when `layers_to_keep` is
            given.
        layers_to_keep: An explicit, increasing list of distinct teacher layer indices; overrides `strategy`.
        strategy: `"uniform"`, `"strided"`, `"first"`, `"last"` or `"importance"` (see the module docstring).
        layer_scores: One score per teacher layer, higher meaning more important; required by (and only used by)
            `strategy="importance"`.

    Returns:
        The kept teacher layer indices; student layer `i` is initialised from teacher layer `result[i]`.

    Raises:
        ValueError: for a request the teacher cannot satisfy (see the messages).

    Example:
        ```python
        >>> select_layers(12, 6)
        [0, 2, 4, 7, 9, 11]
        >>> select_layers(6, 3, strategy="importance", layer_scores=[0.9, 0.1, 0.5, 0.2, 0.8, 0.3])
        [0, 2, 4]
        ```
    """
    if layers_to_keep is not None:
        return _check_layers_to_keep(num_teacher_layers, num_layers, layers_to_keep)
    if num_layers is None:
        raise ValueError(
            "Pass either `num_layers` (how many layers the student gets) or `layers_to_keep` (which teacher layers)."
        )
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= num_teacher_layers:
        raise ValueError(
            f"num_layers={num_layers!r} is not possible: the teacher has {num_teacher_layers} layers, so the student "
            f"can keep 1 to {num_teacher_layers} of them."
        )
    if strategy not in _STRATEGIES:
        raise ValueError(
            f"Unknown layer strategy {strategy!r}. Valid strategies: {', '.join(_STRATEGIES)}; or pass "
            "`layers_to_keep=[...]` to choose the layers yourself."
        )
    if strategy == "importance":
        layer_scores = _check_layer_scores(num_teacher_layers, layer_scores)
    elif layer_scores is not None:
        raise ValueError(
            f"layer_scores are only used by strategy='importance', not by strategy={strategy!r}; pass "
            "strategy='importance' to keep the highest-scoring layers."
        )
    return _STRATEGIES[strategy](num_teacher_layers, num_layers, layer_scores)


def _check_layers_to_keep(num_teacher_layers: int, num_layers: int | None, layers_to_keep: Sequence[int]) -> list[int]:
    kept = list(layers_to_keep)
    valid = f"integers from 0 to {num_teacher_layers - 1} (the teacher has {num_teacher_layers} layers)"
    if not kept:
        raise ValueError(f"layers_to_keep is empty; a student needs at least one layer: pass {valid}.")
    for index in kept:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_teacher_layers:
            raise ValueError(f"layers_to_keep contains {index!r}, which is not a teacher layer: pass {valid}.")
    duplicates = sorted({index for index in kept if kept.count(index) > 1})
    if duplicates:
        raise ValueError(
            f"layers_to_keep lists layer(s) {duplicates} more than once; each teacher layer is kept once."
        )
    if kept != sorted(kept):
        raise ValueError(
            f"layers_to_keep={kept} is not in increasing order; the student keeps the teacher's layer order, so pass "
            f"{sorted(kept)}."
        )
    if num_layers is not None and num_layers != len(kept):
        raise ValueError(
            f"num_layers={num_layers} disagrees with layers_to_keep={kept} ({len(kept)} layers); pass only one of them."
        )
    return kept


def _check_layer_scores(num_teacher_layers: int, layer_scores: Sequence[float] | torch.Tensor | None) -> list[float]:
    if layer_scores is None:
        raise ValueError(
            "strategy='importance' needs `layer_scores`: one score per teacher layer "
            f"({num_teacher_layers} values), higher meaning more important."
        )
    scores = layer_scores.tolist() if isinstance(layer_scores, torch.Tensor) else list(layer_scores)
    if len(scores) != num_teacher_layers or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores):
        raise ValueError(
            f"layer_scores must hold {num_teacher_layers} finite numbers (one per teacher layer), got {scores!r}."
        )
    return scores


#### Same-architecture students


def create_student(
    teacher: PreTrainedModel,
    num_layers: int | None = None,
    layers_to_keep: Sequence[int] | None = None,
    strategy: str = "uniform",
    layer_scores: Sequence[float] | torch.Tensor | None = None,
    target: str | None = None,
) -> PreTrainedModel:
    """A copy of `teacher` with fewer transformer layers, initialised from the teacher's weights.

    The student has the teacher's class (any task head of a registered architecture), its embeddings and task head,
    and teacher layer `layers_to_keep[i]` as its layer `i`. Its config is the teacher's with a smaller layer count, so
    it saves and loads with stock transformers (for a teacher pruned per layer, see the module docstring). The teacher
    is not modified and shares no tensors with the student; the global random state is left as it was.

    Args:
        teacher: A model of a registered architecture (`hf_compress.supported_model_types()`).
        num_layers: How many layers the student gets (1 to the teacher's layer count).
        layers_to_keep: Explicit increasing teacher layer indices; overrides `strategy`.
        strategy: How to choose `num_layers` layers: `"uniform"` (default, spread evenly like DistilBERT),
            `"strided"`, `"first"`, `"last"` or `"importance"` (the module docstring lists what each picks).
        layer_scores: Per-layer importance scores for `strategy="importance"`.
        target: `None` for a student of the teacher's own architecture, or `"distilbert"` to turn a BERT teacher into
            a `DistilBertFor...` model (see `bert_to_distilbert`).

    Returns:
        The student, on the teacher's device and dtype, in the teacher's train/eval mode, with every parameter
        trainable (even when the teacher is frozen, as `DistillationTrainer` leaves its teacher).

    Raises:
        ValueError: for an unsupported architecture, an unknown strategy or target, or layers the teacher does not
            have.

    Example:
        ```python
        from transformers import AutoModelForSequenceClassification
        from hf_compress import create_student

        teacher = AutoModelForSequenceClassification.from_pretrained("textattack/bert-base-uncased-SST-2")
        student = create_student(teacher, num_layers=6)  # teacher layers 0, 2, 4, 7, 9, 11
        student.save_pretrained("bert-6l-sst2")  # loads with AutoModelForSequenceClassification
        ```
    """
    if target == "distilbert":
        return bert_to_distilbert(teacher, num_layers, layers_to_keep, strategy, layer_scores)
    if target is not None:
        raise ValueError(
            f"Unknown student target {target!r}. Valid targets: None (same as the teacher), 'distilbert'."
        )

    num_teacher_layers = get_spec(teacher).num_layers(teacher.config)
    kept = select_layers(num_teacher_layers, num_layers, layers_to_keep, strategy, layer_scores)
    # A deep copy shares no tensors with the teacher and keeps its class, device, dtype, mode and attention
    # implementation; drop_layers keeps the config in step (a pruned teacher's per-layer structure included).
    student = copy.deepcopy(teacher)
    # A student is made to be trained, also from a teacher that a DistillationTrainer has frozen before.
    student.requires_grad_(True)
    drop_layers(student, [index for index in range(num_teacher_layers) if index not in kept])
    logger.info(f"Created a {len(kept)}-layer student from teacher layers {kept}.")
    return student


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _instantiate(cls: type[PreTrainedModel], config, teacher: PreTrainedModel) -> PreTrainedModel:
    # Random initialisation is overwritten right away; forking the RNG keeps the caller's seeded runs reproducible.
    with torch.random.fork_rng(devices=[]):
        student = cls(config)
    return student.to(device=teacher.device, dtype=teacher.dtype).train(teacher.training)


def _load_checked(student: PreTrainedModel, state_dict: dict[str, torch.Tensor]) -> None:
    expected = student.state_dict()
    for name, tensor in state_dict.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise ValueError(
                f"The teacher's {name} has shape {tuple(tensor.shape)} but {type(student).__name__} expects "
                f"{tuple(expected[name].shape)}: heads or FFN neurons of this layer were pruned, and DistilBERT needs "
                "every layer at full size. Convert the unpruned teacher (and prune the student afterwards), or keep "
                "only unpruned layers."
            )
    student.load_state_dict(state_dict, strict=True)


#### BERT -> DistilBERT

_DISTILBERT_CLASSES = {
    "BertModel": DistilBertModel,
    "BertForSequenceClassification": DistilBertForSequenceClassification,
    "BertForMultipleChoice": DistilBertForMultipleChoice,
    "BertForTokenClassification": DistilBertForTokenClassification,
    "BertForQuestionAnswering": DistilBertForQuestionAnswering,
    "BertForMaskedLM": DistilBertForMaskedLM,
}

# Task-head parameters: BERT name -> DistilBERT name (relative to the whole model).
_HEAD_WEIGHTS = {
    "BertForSequenceClassification": {"bert.pooler.dense": "pre_classifier", "classifier": "classifier"},
    "BertForMultipleChoice": {"bert.pooler.dense": "pre_classifier", "classifier": "classifier"},
    "BertForTokenClassification": {"classifier": "classifier"},
    "BertForQuestionAnswering": {"qa_outputs": "qa_outputs"},
    "BertForMaskedLM": {
        "cls.predictions.transform.dense": "vocab_transform",
        "cls.predictions.transform.LayerNorm": "vocab_layer_norm",
        "cls.predictions.decoder": "vocab_projector",
    },
}

# DistilBERT hard-codes this epsilon in every LayerNorm.
_DISTILBERT_LAYER_NORM_EPS = 1e-12


def bert_to_distilbert(
    teacher: PreTrainedModel,
    num_layers: int | None = None,
    layers_to_keep: Sequence[int] | None = None,
    strategy: str = "uniform",
    layer_scores: Sequence[float] | torch.Tensor | None = None,
) -> PreTrainedModel:
    """Turn a BERT teacher into a `DistilBertFor...` student with a subset of its layers, as DistilBERT was made.

    Mapping (teacher -> student): word and position embeddings and the embedding LayerNorm; per kept layer
    query/key/value/attention-output -> `q_lin`/`k_lin`/`v_lin`/`out_lin`, attention LayerNorm -> `sa_layer_norm`,
    FFN -> `ffn.lin1`/`ffn.lin2`, output LayerNorm -> `output_layer_norm`; the task head as below. DistilBERT has no
    token-type (segment) embeddings, so BERT's segment-0 embedding is added into every position embedding: for inputs
    whose `token_type_ids` are all 0 (single sentences, BERT's default) the embeddings, and so the hidden states of
    every layer, equal the teacher's when all layers are kept.

    What cannot match:
    - Segment-1 inputs (sentence pairs): DistilBERT cannot tell the segments apart.
    - Sequence classification and multiple choice: BERT classifies `tanh(pooler(h[CLS]))`, DistilBERT
      `relu(pre_classifier(h[CLS]))`. `pre_classifier` starts from BERT's pooler and `classifier` from BERT's
      classifier, but the activation differs, so logits differ until the student is trained (distilled).
    Token classification, question answering and masked-LM heads are copied exactly. A teacher whose
    `layer_norm_eps` is not 1e-12 (DistilBERT's fixed value) gives slightly different outputs; a warning says so.

    Args:
        teacher: A BERT model: `BertModel` or `BertFor{SequenceClassification,MultipleChoice,TokenClassification,
            QuestionAnswering,MaskedLM}`.
        num_layers, layers_to_keep, strategy, layer_scores: Which teacher layers to keep, as in `create_student`.

    Returns:
        The `DistilBertFor...` student on the teacher's device and dtype, in the teacher's train/eval mode.

    Raises:
        ValueError: if the teacher is not one of the BERT classes above, or for impossible layer requests.

    Example:
        ```python
        from hf_compress import bert_to_distilbert

        student = bert_to_distilbert(bert_teacher, num_layers=6)  # DistilBertForSequenceClassification
        ```
    """
    class_name = type(teacher).__name__
    if getattr(teacher.config, "model_type", None) != "bert" or class_name not in _DISTILBERT_CLASSES:
        raise ValueError(
            f"bert_to_distilbert needs a BERT teacher, got {class_name} (model_type "
            f"{getattr(teacher.config, 'model_type', None)!r}). Supported classes: {', '.join(_DISTILBERT_CLASSES)}. "
            "For other architectures use create_student(teacher, ...) to keep the teacher's architecture."
        )
    config = teacher.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("bert_to_distilbert needs an encoder-only BERT; this teacher is a decoder or cross-attends.")
    if not isinstance(config.hidden_act, str):
        raise ValueError(
            f"The teacher's hidden_act is {config.hidden_act!r}; DistilBERT's config stores the activation by name."
        )
    if config.layer_norm_eps != _DISTILBERT_LAYER_NORM_EPS:
        logger.warning(
            f"The teacher's layer_norm_eps is {config.layer_norm_eps:g} but DistilBERT always uses "
            f"{_DISTILBERT_LAYER_NORM_EPS:g}: the student's outputs will differ slightly from the teacher's."
        )

    bert_spec = get_spec(teacher)
    kept = select_layers(bert_spec.num_layers(config), num_layers, layers_to_keep, strategy, layer_scores)
    classifier_dropout = getattr(config, "classifier_dropout", None)
    head_dropout = config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
    student_config = DistilBertConfig(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        n_layers=len(kept),
        n_heads=config.num_attention_heads,
        dim=config.hidden_size,
        hidden_dim=config.intermediate_size,
        dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_probs_dropout_prob,
        activation=config.hidden_act,
        initializer_range=config.initializer_range,
        qa_dropout=head_dropout,
        seq_classif_dropout=head_dropout,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=getattr(config, "tie_word_embeddings", True),
        num_labels=config.num_labels,
        id2label=config.id2label,
        label2id=config.label2id,
        problem_type=config.problem_type,
    )
    student = _instantiate(_DISTILBERT_CLASSES[class_name], student_config, teacher)
    _load_checked(student, _distilbert_state_dict(teacher, student, kept))
    logger.info(f"Created a {len(kept)}-layer {type(student).__name__} from BERT layers {kept}.")
    return student


def _distilbert_state_dict(
    teacher: PreTrainedModel, student: PreTrainedModel, kept: list[int]
) -> dict[str, torch.Tensor]:
    """The student's full state dict, every tensor taken (or, for positions, computed) from the teacher's."""
    bert = get_base_model(teacher)
    distil_prefix = _module_name(student, get_base_model(student))

    def linear_or_norm(source: torch.nn.Module, path: str) -> dict[str, torch.Tensor]:
        module = source.get_submodule(path)
        return {"weight": module.weight, "bias": module.bias}

    pairs: dict[str, dict[str, torch.Tensor]] = {}  # student module path -> {"weight", "bias"}
    embeddings = bert.embeddings
    # (max_positions, dim) + (dim,): BERT adds the segment-0 embedding at every position of a single-segment input.
    positions = embeddings.position_embeddings.weight + embeddings.token_type_embeddings.weight[0]
    pairs["embeddings.word_embeddings"] = {"weight": embeddings.word_embeddings.weight}
    pairs["embeddings.position_embeddings"] = {"weight": positions}
    pairs["embeddings.LayerNorm"] = linear_or_norm(embeddings, "LayerNorm")

    distil_spec = get_spec(student)
    bert_spec = get_spec(teacher)
    bert_layers = get_layers(teacher)
    # BERT keeps its two LayerNorms beside the output projections; DistilBERT names them per block.
    norm_paths = {"attention.output.LayerNorm": "sa_layer_norm", "output.LayerNorm": "output_layer_norm"}
    for new, old in enumerate(kept):
        block = f"{distil_spec.layers}.{new}"
        for role in ("query", "key", "value", "attention_output", "ffn_in", "ffn_out"):
            source_path, target_path = getattr(bert_spec, role), getattr(distil_spec, role)
            pairs[f"{block}.{target_path}"] = linear_or_norm(bert_layers[old], source_path)
        for source_path, target_path in norm_paths.items():
            pairs[f"{block}.{target_path}"] = linear_or_norm(bert_layers[old], source_path)

    state_dict = {}
    for path, tensors in pairs.items():
        for kind, tensor in tensors.items():
            state_dict[_join(distil_prefix, path, kind)] = tensor
    for source_path, target_path in _HEAD_WEIGHTS.get(type(teacher).__name__, {}).items():
        for kind, tensor in linear_or_norm(teacher, source_path).items():
            state_dict[_join(target_path, kind)] = tensor
    return {name: tensor.detach() for name, tensor in state_dict.items()}


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)
