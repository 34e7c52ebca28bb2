"""Skew KLs (DistiLLM) and the no-KD control, against float64 references."""

from __future__ import annotations

import pytest
import torch

from firstsight.losses.kd import IGNORE_INDEX, ForwardKL, NoKD, ReverseKL, SkewForwardKL, SkewReverseKL


def _batch(seed=0, vocab=11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 6, vocab, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 6, vocab, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (2, 6), generator=g)
    labels[:, :2] = IGNORE_INDEX
    labels[1, 4] = IGNORE_INDEX
    return student, teacher, labels


def _reference(student, teacher, labels, temperature, skew, reverse):
    """Token by token: KL(a || λa + (1−λ)b) with (a, b) = (p, q), or (q, p) when reverse."""
    values = []
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] == IGNORE_INDEX:
                continue
            p = torch.softmax(teacher[b, t - 1] / temperature, -1)
            q = torch.softmax(student[b, t - 1] / temperature, -1)
            a, other = (q, p) if reverse else (p, q)
            m = skew * a + (1 - skew) * other
            values.append((a * (a.log() - m.log())).sum())
    return torch.stack(values).mean()


@pytest.mark.parametrize("cls, reverse", [(SkewForwardKL, False), (SkewReverseKL, True)])
@pytest.mark.parametrize("skew, temperature", [(0.1, 1.0), (0.5, 2.0), (0.9, 0.7)])
def test_skew_kl_matches_the_formula(cls, reverse, skew, temperature):
    student, teacher, labels = _batch()
    out = cls(temperature=temperature, alpha=1.0, skew=skew, chunk_size=3)(student, teacher, labels)
    assert out.kd_loss.item() == pytest.approx(
        _reference(student, teacher, labels, temperature, skew, reverse).item(), rel=1e-9
    )
    assert out.loss.item() == pytest.approx(temperature**2 * out.kd_loss.item(), rel=1e-9)


@pytest.mark.parametrize("skewed, plain", [(SkewForwardKL, ForwardKL), (SkewReverseKL, ReverseKL)])
def test_zero_skew_is_the_plain_kl_and_full_skew_is_zero(skewed, plain):
    student, teacher, labels = _batch(1)
    assert skewed(skew=0.0)(student, teacher, labels).kd_loss.item() == pytest.approx(
        plain()(student, teacher, labels).kd_loss.item(), rel=1e-12
    )
    assert skewed(skew=1.0)(student, teacher, labels).kd_loss.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("cls", [SkewForwardKL, SkewReverseKL])
def test_skew_kl_gradients(cls):
    student, teacher, labels = _batch(2, vocab=5)
    student.requires_grad_(True)
    loss = cls(temperature=1.5, alpha=0.7, skew=0.3, chunk_size=2)
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, labels).loss, (student,))


def test_no_kd_is_plain_cross_entropy():
    student, teacher, labels = _batch(3)
    out = NoKD(alpha=0.0)(student, teacher, labels)
    shifted = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        student[:, :-1].reshape(-1, 11), shifted.reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert out.loss.item() == pytest.approx(ce.item(), rel=1e-12)
    assert out.kd_loss.item() == 0.0 and not NoKD.uses_teacher


def test_bad_skew_is_refused():
    with pytest.raises(ValueError, match="skew"):
        SkewForwardKL(skew=1.5)
