import json

import pytest
import torch
from conftest import ARCHITECTURES, random_batch, tiny_model
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, GPT2Config, GPT2Model

from hf_compress import (
    bert_to_distilbert,
    create_student,
    get_structure,
    prune_ffn_neurons,
    prune_heads,
    select_layers,
)
from hf_compress.architectures import get_layers, get_spec

TASKS = ["sequence-classification", "token-classification", "masked-lm"]


def _inputs(**kwargs):
    batch = random_batch(**kwargs)
    batch.pop("labels")
    return batch


@pytest.mark.parametrize(
    ("teacher_layers", "student_layers", "expected"),
    [(12, 6, [0, 2, 4, 7, 9, 11]), (6, 3, [0, 3, 5]), (12, 4, [0, 4, 7, 11]), (6, 1, [0]), (4, 4, [0, 1, 2, 3])],
)
def test_uniform_strategy_spreads_layers_like_distilbert(teacher_layers, student_layers, expected):
    assert select_layers(teacher_layers, student_layers) == expected


@pytest.mark.parametrize(
    ("teacher_layers", "student_layers", "expected"),
    [(6, 3, [0, 2, 4]), (12, 6, [0, 2, 4, 6, 8, 10]), (6, 4, [0, 1, 3, 4]), (6, 1, [0]), (4, 4, [0, 1, 2, 3])],
)
def test_strided_strategy_keeps_one_in_k_from_the_bottom(teacher_layers, student_layers, expected):
    assert select_layers(teacher_layers, student_layers, strategy="strided") == expected


def test_first_last_and_importance_strategies():
    assert select_layers(6, 2, strategy="first") == [0, 1]
    assert select_layers(6, 2, strategy="last") == [4, 5]
    scores = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.8, 0.3])
    assert select_layers(6, 3, strategy="importance", layer_scores=scores) == [0, 2, 4]
    # Ties go to the lower layer.
    assert select_layers(4, 2, strategy="importance", layer_scores=[1.0, 2.0, 2.0, 2.0]) == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_layers": 5}, r"num_layers=5 .* 1 to 4"),
        ({"num_layers": 0}, r"num_layers=0 .* 1 to 4"),
        ({}, "Pass either `num_layers`"),
        (
            {"num_layers": 2, "strategy": "random"},
            "Unknown layer strategy 'random'. Valid strategies: uniform, strided, first",
        ),
        ({"layers_to_keep": []}, "empty"),
        ({"layers_to_keep": [0, 4]}, r"contains 4,.* 0 to 3"),
        ({"layers_to_keep": [-1, 2]}, r"contains -1"),
        ({"layers_to_keep": [1, 1]}, r"\[1\] more than once"),
        ({"layers_to_keep": [2, 0]}, r"increasing order.*\[0, 2\]"),
        ({"layers_to_keep": [0, 1], "num_layers": 3}, "disagrees"),
        ({"num_layers": 2, "strategy": "importance"}, "needs `layer_scores`"),
        ({"num_layers": 2, "strategy": "importance", "layer_scores": [1, 2]}, "4 finite numbers"),
        ({"num_layers": 2, "layer_scores": [1, 2, 3, 4]}, "only used by strategy='importance'"),
    ],
)
def test_impossible_requests_raise_and_leave_teacher_untouched(kwargs, message):
    teacher = tiny_model("bert")
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        create_student(teacher, **kwargs)
    assert all(torch.equal(before[name], tensor) for name, tensor in teacher.state_dict().items())


def test_unsupported_architecture_and_target():
    with pytest.raises(ValueError, match="gpt2.*register_architecture"):
        create_student(GPT2Model(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=10)), num_layers=1)
    with pytest.raises(ValueError, match="Unknown student target 'tinybert'.*'distilbert'"):
        create_student(tiny_model("bert"), num_layers=2, target="tinybert")


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("task", TASKS)
def test_keeping_all_layers_reproduces_the_teacher(model_type, task):
    teacher = tiny_model(model_type, task)
    student = create_student(teacher, num_layers=4)
    assert type(student) is type(teacher)
    batch = _inputs()
    with torch.no_grad():
        assert torch.equal(student(**batch).logits, teacher(**batch).logits)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_student_copies_chosen_layers_embeddings_and_head(model_type):
    teacher = tiny_model(model_type)
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    student = create_student(teacher, layers_to_keep=[1, 3])
    spec = get_spec(student)
    assert spec.num_layers(student.config) == 2 and spec.num_layers(teacher.config) == 4
    teacher_layers, student_layers = get_layers(teacher), get_layers(student)
    for new, old in enumerate([1, 3]):
        teacher_state, student_state = teacher_layers[old].state_dict(), student_layers[new].state_dict()
        assert teacher_state.keys() == student_state.keys()
        assert all(torch.equal(teacher_state[key], student_state[key]) for key in teacher_state)
    # Everything outside the layers (embeddings, task head) is the teacher's.
    layer_free = {k: v for k, v in teacher.state_dict().items() if ".layer." not in k}
    student_state = student.state_dict()
    assert all(torch.equal(student_state[name], tensor) for name, tensor in layer_free.items())

    # Training the student does not touch the teacher: no shared storage.
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(before[name], tensor) for name, tensor in teacher.state_dict().items())


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_student_saves_as_plain_checkpoint(tmp_path, attn_implementation):
    teacher = tiny_model("bert", attn_implementation=attn_implementation)
    student = create_student(teacher, num_layers=2)
    assert student.config._attn_implementation == attn_implementation
    student.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and "auto_map" not in config
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, student(**batch).logits, rtol=0, atol=1e-6)


def test_student_follows_teacher_dtype_mode_and_keeps_rng():
    teacher = tiny_model("bert").to(torch.bfloat16).train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    student = create_student(teacher, num_layers=2)
    assert torch.equal(torch.rand(3), expected)
    assert student.dtype == torch.bfloat16 and student.training


def test_pruned_teacher_gives_pruned_or_plain_student(tmp_path):
    teacher = tiny_model("bert")
    prune_heads(teacher, {1: [0, 2]})
    prune_ffn_neurons(teacher, {1: [3, 4, 5]})
    # Keeping the pruned layer: the student is a pruned checkpoint with that layer's widths.
    pruned = create_student(teacher, layers_to_keep=[1, 2])
    assert get_structure(pruned).heads == (2, 4) and get_structure(pruned).ffn == (21, 24)
    # Dropping it: the rest is uniform, so the student is a plain stock checkpoint again.
    plain = create_student(teacher, layers_to_keep=[0, 2, 3])
    plain.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in config and "hf_compress" not in config and config["num_hidden_layers"] == 3
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded).__module__.startswith("transformers.")
    batch = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, plain(**batch).logits, rtol=0, atol=1e-6)
    assert get_structure(teacher).heads == (4, 2, 4, 4)  # the teacher is as it was
    with pytest.raises(ValueError, match="DistilBERT needs every layer at full size"):
        bert_to_distilbert(teacher, layers_to_keep=[1, 2])


#### BERT -> DistilBERT


@pytest.mark.parametrize("task", TASKS)
def test_distilbert_student_hidden_states_match_for_segment_zero(task):
    teacher = tiny_model("bert", task)
    student = create_student(teacher, num_layers=4, target="distilbert")
    assert type(student).__name__.startswith("DistilBertFor")
    batch = _inputs()
    with torch.no_grad():
        expected = teacher(**batch, token_type_ids=torch.zeros_like(batch["input_ids"]), output_hidden_states=True)
        actual = student(**batch, output_hidden_states=True)
    assert len(actual.hidden_states) == len(expected.hidden_states) == 5
    mask = batch["attention_mask"].bool()
    for expected_hidden, actual_hidden in zip(expected.hidden_states, actual.hidden_states, strict=True):
        # (batch, seq, hidden) -> (real tokens, hidden); summation order differs, hence float tolerance.
        torch.testing.assert_close(actual_hidden[mask], expected_hidden[mask], rtol=0, atol=1e-5)
    if task == "sequence-classification":
        # tanh(pooler) vs relu(pre_classifier): documented not to match before training.
        assert not torch.allclose(actual.logits, expected.logits, atol=1e-3)
    else:
        torch.testing.assert_close(actual.logits[mask], expected.logits[mask], rtol=0, atol=1e-5)


def test_distilbert_mapping_of_weights():
    teacher = tiny_model("bert", "masked-lm")
    student = bert_to_distilbert(teacher, layers_to_keep=[0, 3])
    bert, distil = teacher.bert, student.distilbert
    positions = bert.embeddings.position_embeddings.weight + bert.embeddings.token_type_embeddings.weight[0]
    assert torch.equal(distil.embeddings.position_embeddings.weight, positions)
    assert torch.equal(distil.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    pairs = {
        "attention.self.query": "attention.q_lin",
        "attention.self.key": "attention.k_lin",
        "attention.self.value": "attention.v_lin",
        "attention.output.dense": "attention.out_lin",
        "attention.output.LayerNorm": "sa_layer_norm",
        "intermediate.dense": "ffn.lin1",
        "output.dense": "ffn.lin2",
        "output.LayerNorm": "output_layer_norm",
    }
    for new, old in enumerate([0, 3]):
        for source, target in pairs.items():
            source_module = bert.encoder.layer[old].get_submodule(source)
            target_module = distil.transformer.layer[new].get_submodule(target)
            assert torch.equal(source_module.weight, target_module.weight), (old, source)
            assert torch.equal(source_module.bias, target_module.bias), (old, source)
    assert torch.equal(student.vocab_transform.weight, teacher.cls.predictions.transform.dense.weight)
    assert torch.equal(student.vocab_projector.bias, teacher.cls.predictions.decoder.bias)


def test_distilbert_student_round_trips_with_stock_transformers(tmp_path):
    teacher = tiny_model("bert", "masked-lm")
    student = bert_to_distilbert(teacher, num_layers=2)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "DistilBertForMaskedLM" and loaded.config.n_layers == 2
    batch = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, student(**batch).logits, rtol=0, atol=1e-6)


def test_distilbert_needs_a_bert_teacher():
    with pytest.raises(ValueError, match="needs a BERT teacher, got RobertaForSequenceClassification"):
        bert_to_distilbert(tiny_model("roberta"), num_layers=2)


@pytest.mark.parametrize("target", [None, "distilbert"])
def test_student_of_a_frozen_teacher_is_trainable(target):
    teacher = tiny_model("bert")
    teacher.requires_grad_(False)  # as DistillationTrainer leaves its teacher
    student = create_student(teacher, num_layers=2, target=target)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
