"""Shared fixtures: tiny models built from configs in-process, so the suite never touches the network."""

from __future__ import annotations

import os

# Before transformers/huggingface_hub are imported: they read these once, at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertTokenizerFast,
)

torch.set_num_threads(1)

ARCHITECTURES = ["bert", "roberta", "xlm-roberta", "electra", "distilbert"]
VOCAB_SIZE = 99


def tiny_config(model_type: str = "bert", num_labels: int = 2, **overrides):
    """A 4-layer, 4-head, hidden-16 config of `model_type`; `overrides` change any field."""
    if model_type == "distilbert":
        kwargs = dict(vocab_size=VOCAB_SIZE, dim=16, n_layers=4, n_heads=4, hidden_dim=24, max_position_embeddings=64)
    else:
        kwargs = dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=16,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=24,
            max_position_embeddings=64,
            type_vocab_size=2,
        )
        if model_type == "electra":
            kwargs["embedding_size"] = 16
    if model_type in ("roberta", "xlm-roberta"):
        kwargs.update(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    kwargs.update(num_labels=num_labels)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "bert", task: str = "sequence-classification", seed: int = 0, **overrides):
    """A tiny randomly initialised model for `task` ("sequence-classification", "token-classification", "masked-lm")."""
    auto = {
        "sequence-classification": AutoModelForSequenceClassification,
        "token-classification": AutoModelForTokenClassification,
        "masked-lm": AutoModelForMaskedLM,
    }[task]
    torch.manual_seed(seed)
    return auto.from_config(tiny_config(model_type, **overrides)).eval()


TOY_SENTENCES = ["a good movie", "a bad film", "great fun", "dull and awful", "not very good", "love the story"]


def teacher_and_data_folders(
    path,
    tokenizer,
    labels: tuple[str, ...] = ("negative", "positive"),
    text_column: str = "sentence",
    train_repeat: int = 3,
    string_labels: bool = False,
    **model_overrides,
):
    """Write a tiny teacher (with `labels`, and the tokenizer) to `path/teacher` and a task folder to `path/data`:
    train.tsv (`TOY_SENTENCES` `train_repeat` times) and validation.tsv, each sentence labelled with the next class
    in turn, written as its id (or, with `string_labels`, its name)."""
    teacher = tiny_model("bert", num_labels=len(labels), **model_overrides)
    teacher.config.id2label = dict(enumerate(labels))
    teacher.config.label2id = {label: i for i, label in enumerate(labels)}
    teacher.save_pretrained(path / "teacher")
    tokenizer.save_pretrained(path / "teacher")
    data = path / "data"
    data.mkdir()
    for split, repeat in (("train", train_repeat), ("validation", 1)):
        classes = labels if string_labels else range(len(labels))
        rows = [f"{sentence}\t{classes[i % len(labels)]}" for i, sentence in enumerate(TOY_SENTENCES)] * repeat
        (data / f"{split}.tsv").write_text(f"{text_column}\tlabel\n" + "\n".join(rows) + "\n")
    return path


def random_batch(batch_size: int = 4, seq_len: int = 10, num_labels: int = 2, seed: int = 0, padded: bool = True):
    """input_ids/attention_mask/labels for a tiny model; with `padded`, rows have different lengths."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB_SIZE, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if padded:
        for row in range(1, batch_size):
            attention_mask[row, seq_len - row :] = 0
    labels = torch.randint(0, num_labels, (batch_size,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


TOY_WORDS = "the a movie film good bad great awful fun dull not very plot actor story love hate".split()
# Short reviews in the toy words, for calibration files and CLI data folders.
TOY_REVIEWS = [
    "the movie was great fun",
    "a dull plot",
    "i love the actor",
    "bad , awful story",
    "not very good",
    "great film , great fun",
    "the story is dull",
    "hate the plot",
]


def word_tokenizer(folder, words=TOY_WORDS, size: int = VOCAB_SIZE) -> BertTokenizerFast:
    """A WordPiece tokenizer of `size` tokens (the special ones, then `words`, then fillers `w0`, `w1`, ...), its
    `vocab.txt` written to `folder`."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words][:size]
    vocab += [f"w{i}" for i in range(size - len(vocab))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)


@pytest.fixture
def tiny_tokenizer(tmp_path):
    """A WordPiece tokenizer over a toy vocabulary, written to disk and loaded like any checkpoint's."""
    return word_tokenizer(tmp_path)
