"""The pure loss functions equal their textbook formulas, and splitting a batch with `num_items_in_batch` is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_compress.distillation.losses import (
    attention_kl_loss,
    cross_entropy_loss,
    hidden_state_loss,
    regression_loss,
    soft_kl_loss,
    token_kl_loss,
)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _padding_mask(batch: int = 4, length: int = 6) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, length - row :] = 0
    return mask


def _attention_probs(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over keys with padding keys at probability 0, as eager attention returns them."""
    scores = scores.masked_fill(~mask[:, None, None, :].bool(), torch.finfo(scores.dtype).min)
    return scores.softmax(-1)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_soft_kl_loss_is_t2_scaled_batchmean_kl(temperature):
    student, teacher = torch.randn(5, 3, generator=_generator(0)), torch.randn(5, 3, generator=_generator(1))
    expected = temperature**2 * F.kl_div(
        F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1), reduction="batchmean"
    )
    torch.testing.assert_close(soft_kl_loss(student, teacher, temperature), expected)


def test_soft_kl_loss_is_zero_iff_distributions_match():
    logits = torch.randn(4, 3, generator=_generator(0))
    assert soft_kl_loss(logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    assert soft_kl_loss(logits, logits + torch.tensor([1.0, 0.0, 0.0]), 2.0) > 0
    # A constant shift of the logits does not change the distribution.
    assert soft_kl_loss(logits, logits + 5.0, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_kl_loss_mask_averages_over_kept_examples_only():
    student, teacher = torch.randn(4, 3, generator=_generator(0)), torch.randn(4, 3, generator=_generator(1))
    mask = torch.tensor([True, False, True, True])
    torch.testing.assert_close(
        soft_kl_loss(student, teacher, 2.0, mask=mask), soft_kl_loss(student[mask], teacher[mask], 2.0)
    )


def test_token_kl_loss_averages_over_masked_positions():
    student, teacher = torch.randn(3, 5, 7, generator=_generator(0)), torch.randn(3, 5, 7, generator=_generator(1))
    mask = torch.rand(3, 5, generator=_generator(2)) > 0.4
    temperature = 3.0
    per_position = []
    for b, t in mask.nonzero().tolist():
        log_s = F.log_softmax(student[b, t] / temperature, -1)
        p_t = F.softmax(teacher[b, t] / temperature, -1)
        per_position.append((p_t * (p_t.log() - log_s)).sum())
    expected = temperature**2 * torch.stack(per_position).mean()
    torch.testing.assert_close(token_kl_loss(student, teacher, mask, temperature), expected)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_loss_matches_the_transformers_heads(label_smoothing):
    logits = torch.randn(2, 6, 5, generator=_generator(0))
    labels = torch.randint(0, 5, (2, 6), generator=_generator(1))
    labels[0, :2] = -100
    expected = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)(logits.view(-1, 5), labels.view(-1))
    assert torch.equal(cross_entropy_loss(logits, labels, label_smoothing), expected)
    torch.testing.assert_close(
        cross_entropy_loss(logits, labels, label_smoothing, num_items_in_batch=labels.ne(-100).sum()), expected
    )


def test_regression_loss_is_mse():
    predictions, targets = torch.randn(6, 1, generator=_generator(0)), torch.randn(6, generator=_generator(1))
    expected = torch.nn.MSELoss()(predictions.squeeze(), targets.squeeze())
    torch.testing.assert_close(regression_loss(predictions, targets), expected)


@pytest.mark.parametrize("loss_type", ["mse", "cosine"])
def test_hidden_state_loss_formula(loss_type):
    student, teacher = torch.randn(4, 6, 8, generator=_generator(0)), torch.randn(4, 6, 8, generator=_generator(1))
    mask = _padding_mask()
    per_example = []
    for b in range(4):
        valid = mask[b].bool()
        if loss_type == "mse":
            per_token = ((student[b, valid] - teacher[b, valid]) ** 2).mean(-1)
        else:
            per_token = 1 - F.cosine_similarity(student[b, valid], teacher[b, valid], dim=-1)
        per_example.append(per_token.mean())
    expected = torch.stack(per_example).mean()
    torch.testing.assert_close(hidden_state_loss(student, teacher, mask, loss_type), expected)
    assert hidden_state_loss(teacher, teacher, mask, loss_type).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_state_loss_ignores_padding_values():
    student, teacher = torch.randn(4, 6, 8, generator=_generator(0)), torch.randn(4, 6, 8, generator=_generator(1))
    mask = _padding_mask()
    changed = student.clone()
    changed[~mask.bool()] = 1000.0
    torch.testing.assert_close(hidden_state_loss(changed, teacher, mask), hidden_state_loss(student, teacher, mask))


def test_attention_kl_loss_formula_and_finite_gradient_with_padding():
    mask = _padding_mask()
    student_scores = torch.randn(4, 2, 6, 6, generator=_generator(0), requires_grad=True)
    teacher_probs = _attention_probs(torch.randn(4, 2, 6, 6, generator=_generator(1)), mask)
    student_probs = _attention_probs(student_scores, mask)
    per_example = []
    for b in range(4):
        valid = mask[b].bool()
        t, s = teacher_probs[b][:, valid][:, :, valid], student_probs[b][:, valid][:, :, valid]  # (nh, Lv, Lv)
        per_example.append((t * (t.log() - s.log())).sum(-1).mean())
    expected = torch.stack(per_example).mean()
    loss = attention_kl_loss(student_probs, teacher_probs, mask)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(student_scores.grad).all()
    assert attention_kl_loss(teacher_probs, teacher_probs, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_num_items_in_batch_makes_split_batches_exact():
    """Summing the halves of a batch, each divided by the item count of the whole, gives the loss of the whole."""
    gen = _generator(0)
    student, teacher = torch.randn(4, 6, 5, generator=gen), torch.randn(4, 6, 5, generator=gen)
    labels = torch.randint(0, 5, (4, 6), generator=gen)
    labels[1, 3:] = -100
    labels[2, 1:] = -100  # the halves hold different numbers of labelled tokens
    mask, attention = labels.ne(-100), _padding_mask()
    items = mask.sum()
    halves = (slice(0, 1), slice(1, 4))  # unequal sizes too

    def split(fn):
        return sum(fn(h) for h in halves)

    torch.testing.assert_close(
        split(lambda h: token_kl_loss(student[h], teacher[h], mask[h], 2.0, items)),
        token_kl_loss(student, teacher, mask, 2.0),
    )
    torch.testing.assert_close(
        split(lambda h: cross_entropy_loss(student[h], labels[h], num_items_in_batch=items)),
        cross_entropy_loss(student, labels),
    )
    torch.testing.assert_close(
        split(lambda h: soft_kl_loss(student[h, 0], teacher[h, 0], 2.0, num_items_in_batch=4)),
        soft_kl_loss(student[:, 0], teacher[:, 0], 2.0),
    )
    torch.testing.assert_close(
        split(lambda h: hidden_state_loss(student[h], teacher[h], attention[h], "cosine", 4)),
        hidden_state_loss(student, teacher, attention, "cosine"),
    )
    torch.testing.assert_close(
        split(lambda h: regression_loss(student[h, 0, :1], teacher[h, 0, :1], num_items_in_batch=4)),
        regression_loss(student[:, 0, :1], teacher[:, 0, :1]),
    )


def test_shape_and_type_errors_name_the_values():
    with pytest.raises(ValueError, match=r"loss_type='l1'.*'mse', 'cosine'"):
        hidden_state_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), loss_type="l1")
    with pytest.raises(ValueError, match=r"\(1, 2, 3\).*\(1, 2, 4\).*project"):
        hidden_state_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 3\).*\(1, 4, 3, 3\).*heads"):
        attention_kl_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 3))
