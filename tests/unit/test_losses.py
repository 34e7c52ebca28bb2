"""Tests of firstsight.losses.kd against independent float64 references written out here."""

from __future__ import annotations

import math
import re

import pytest
import torch

from firstsight.losses.kd import JSD, ForwardKL, KDLoss, ReverseKL, count_answer_tokens

# ----------------------------------------------------------------------------- helpers


# tiny tensors: extra OpenMP threads only wait for each other on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_batch(
    batch=3, length=7, vocab=11, teacher_vocab=None, seed=0, dtype=torch.float64, answer_frac=0.6, scale=3.0
):
    """Random logits (scaled so the distributions are far from uniform) and labels in which
    roughly 1 - answer_frac of the positions are -100, with at least one answer token."""
    g = torch.Generator().manual_seed(seed)
    teacher_vocab = vocab if teacher_vocab is None else teacher_vocab
    student = (scale * torch.randn(batch, length, vocab, generator=g)).to(dtype)
    teacher = (scale * torch.randn(batch, length, teacher_vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) > answer_frac] = -100
    labels[0, -1] = 1  # at least one answer token
    return student, teacher, labels


def reference(kind, student, teacher, labels, temperature, alpha, beta=0.5):
    """(loss, kd, ce) by the plain formulas, in float64, token by token."""
    vocab = student.shape[-1]
    s, t = student.double(), teacher.double()[..., :vocab]
    kd_terms, ce_terms = [], []
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            y = int(labels[b, i + 1])  # logits at i predict the label at i + 1
            if y == -100:
                continue
            p = torch.softmax(t[b, i] / temperature, dim=-1)
            q = torch.softmax(s[b, i] / temperature, dim=-1)
            if kind == "forward_kl":
                d = (p * (p.log() - q.log())).sum()
            elif kind == "reverse_kl":
                d = (q * (q.log() - p.log())).sum()
            else:
                m = beta * p + (1 - beta) * q
                d = beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum()
            kd_terms.append(d)
            ce_terms.append(-torch.softmax(s[b, i], dim=-1)[y].log())
    kd = torch.stack(kd_terms).mean()
    ce = torch.stack(ce_terms).mean()
    return alpha * temperature**2 * kd + (1 - alpha) * ce, kd, ce


def make_loss(kind, **kwargs):
    beta = kwargs.pop("beta", 0.5)
    if kind == "forward_kl":
        return ForwardKL(**kwargs)
    if kind == "reverse_kl":
        return ReverseKL(**kwargs)
    return JSD(beta=beta, **kwargs)


KINDS = ["forward_kl", "reverse_kl", "jsd"]


def value_and_grad(loss_fn, student, teacher, labels, **kwargs):
    student = student.detach().clone().requires_grad_()
    out = loss_fn(student, teacher, labels, **kwargs)
    out.loss.backward()
    return out, student.grad


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "temperature, alpha, beta", [(1.0, 0.5, 0.5), (2.0, 0.3, 0.1), (0.5, 1.0, 0.9), (3.0, 0.0, 0.5), (1.7, 0.8, 0.3)]
)
def test_matches_float64_reference(kind, temperature, alpha, beta):
    student, teacher, labels = make_batch(seed=int(10 * temperature + 100 * alpha))
    loss_fn = make_loss(kind, temperature=temperature, alpha=alpha, beta=beta, chunk_size=4)
    out, grad = value_and_grad(loss_fn, student, teacher, labels)

    ref_student = student.clone().requires_grad_()
    ref_loss, ref_kd, ref_ce = reference(kind, ref_student, teacher, labels, temperature, alpha, beta)
    ref_loss.backward()

    torch.testing.assert_close(out.loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.kd_loss, ref_kd.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.ce_loss, ref_ce.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_student.grad, rtol=1e-9, atol=1e-12)
    assert out.num_tokens == int((labels[:, 1:] != -100).sum())
    assert out.loss.dtype == torch.float64


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_temperature_squared_and_alpha_mixing(kind, temperature):
    student, teacher, labels = make_batch(seed=3)
    kd_only = make_loss(kind, temperature=temperature, alpha=1.0)(student, teacher, labels)
    ce_only = make_loss(kind, temperature=temperature, alpha=0.0)(student, teacher, labels)
    mixed = make_loss(kind, temperature=temperature, alpha=0.25)(student, teacher, labels)

    torch.testing.assert_close(kd_only.loss, temperature**2 * kd_only.kd_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(ce_only.loss, ce_only.ce_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(mixed.loss, 0.25 * kd_only.loss + 0.75 * ce_only.loss, rtol=1e-12, atol=0)
    # The CE term is at T = 1 whatever the kd temperature.
    torch.testing.assert_close(ce_only.ce_loss, make_loss(kind, temperature=1.0)(student, teacher, labels).ce_loss)
    assert kd_only.kd_loss > 0 and ce_only.ce_loss > 0


def test_divergences_are_the_kls_themselves():
    # KL(p||q) for ForwardKL and KL(q||p) for ReverseKL: swapping the two models swaps them.
    student, teacher, labels = make_batch(seed=4)
    forward = ForwardKL(temperature=1.5, alpha=1.0)(student, teacher, labels).kd_loss
    reverse_swapped = ReverseKL(temperature=1.5, alpha=1.0)(teacher, student, labels).kd_loss
    torch.testing.assert_close(forward, reverse_swapped, rtol=1e-12, atol=0)
    assert not torch.allclose(forward, ReverseKL(temperature=1.5, alpha=1.0)(student, teacher, labels).kd_loss)


def test_base_class_has_no_divergence():
    student, teacher, labels = make_batch()
    with pytest.raises(NotImplementedError):
        KDLoss()(student, teacher, labels)


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize("kind", KINDS)
def test_non_answer_positions_do_not_matter(kind):
    student, teacher, labels = make_batch(batch=3, length=8, seed=5)
    loss_fn = make_loss(kind, temperature=2.0, alpha=0.5, chunk_size=3)
    out, grad = value_and_grad(loss_fn, student, teacher, labels)

    # Logits predict the next label; the last position predicts nothing.
    predicts_nothing = torch.ones(labels.shape, dtype=torch.bool)
    predicts_nothing[:, :-1] = labels[:, 1:] == -100
    assert predicts_nothing.any() and (~predicts_nothing).any()
    g = torch.Generator().manual_seed(99)
    student2, teacher2 = student.clone(), teacher.clone()
    student2[predicts_nothing] = 100 * torch.randn(student2[predicts_nothing].shape, generator=g, dtype=torch.float64)
    teacher2[predicts_nothing] = 100 * torch.randn(teacher2[predicts_nothing].shape, generator=g, dtype=torch.float64)
    # labels[:, 0] is never a target (nothing predicts it): any value, -100 or a token id.
    for first in (-100, 0, 7):
        labels2 = labels.clone()
        labels2[:, 0] = first
        out2, grad2 = value_and_grad(loss_fn, student2, teacher2, labels2)
        assert out2.loss.item() == pytest.approx(out.loss.item(), rel=1e-13)
        assert out2.num_tokens == out.num_tokens
        torch.testing.assert_close(grad2, grad, rtol=1e-12, atol=0)
    assert (grad[predicts_nothing] == 0).all()
    assert (grad[~predicts_nothing] != 0).any(dim=-1).all()


@pytest.mark.parametrize("kind", KINDS)
def test_kd_term_ignores_answer_token_ids(kind):
    # The token ids enter only the CE term: with alpha = 1 they do not matter (only which
    # positions are answers does).
    student, teacher, labels = make_batch(seed=6)
    loss_fn = make_loss(kind, temperature=1.3, alpha=1.0)
    relabelled = labels.clone()
    answer = relabelled != -100
    relabelled[answer] = (relabelled[answer] + 5) % student.shape[-1]
    torch.testing.assert_close(loss_fn(student, teacher, relabelled).loss, loss_fn(student, teacher, labels).loss)
    assert not torch.allclose(
        make_loss(kind, alpha=0.0)(student, teacher, relabelled).loss,
        make_loss(kind, alpha=0.0)(student, teacher, labels).loss,
    )


def test_count_answer_tokens():
    labels = torch.tensor([[5, -100, 3, 4], [-100, 2, -100, -100], [1, -100, -100, -100]])
    assert count_answer_tokens(labels) == 3  # labels[:, 0] never counts
    assert isinstance(count_answer_tokens(labels), int)
    assert count_answer_tokens(torch.full((2, 3), -100)) == 0


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "loss_fn",
    [
        ForwardKL(temperature=2.0, alpha=0.7, chunk_size=3),
        ReverseKL(temperature=0.7, alpha=0.4, chunk_size=3),
        JSD(temperature=1.5, alpha=0.6, beta=0.3, chunk_size=3),
        JSD(temperature=1.0, alpha=0.6, beta=0.0, chunk_size=3),
        JSD(temperature=1.0, alpha=0.6, beta=1.0, chunk_size=3),
    ],
    ids=repr,
)
def test_gradcheck(loss_fn):
    student, teacher, labels = make_batch(batch=2, length=5, vocab=6, seed=7)
    assert count_answer_tokens(labels) > 3  # several chunks, each checkpointed
    student.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: loss_fn(s, teacher, labels).loss, (student,))


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind):
    student, teacher, labels = make_batch(batch=2, length=8, vocab=9, seed=8)
    labels[:, 1:] = -100
    answer = torch.tensor([1, 2, 3, 5, 6])
    labels[:, answer] = torch.randint(0, 9, (2, len(answer)))
    assert count_answer_tokens(labels) == 10
    chunked, chunked_grad = value_and_grad(make_loss(kind, temperature=2.0, chunk_size=3), student, teacher, labels)
    whole, whole_grad = value_and_grad(make_loss(kind, temperature=2.0, chunk_size=1000), student, teacher, labels)
    torch.testing.assert_close(chunked.loss, whole.loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", KINDS)
def test_no_grad_gives_same_value(kind):
    student, teacher, labels = make_batch(seed=9)
    loss_fn = make_loss(kind, temperature=2.0, chunk_size=2)
    with torch.no_grad():
        value = loss_fn(student, teacher, labels).loss
    torch.testing.assert_close(value, loss_fn(student.requires_grad_(), teacher, labels).loss.detach())


def test_no_gradient_into_the_teacher():
    student, teacher, labels = make_batch(seed=10)
    student.requires_grad_()
    teacher.requires_grad_()
    ForwardKL(chunk_size=2)(student, teacher, labels).loss.backward()
    assert student.grad is not None and teacher.grad is None


# ----------------------------------------------------------------------------- JSD


def _jsd_kd(beta, student, teacher, labels, temperature=1.0):
    return JSD(temperature=temperature, alpha=1.0, beta=beta)(student, teacher, labels).kd_loss


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_is_zero_at_both_ends(beta):
    # beta = 0: m = q, so 0 * KL(p||m) + KL(q||q) = 0; beta = 1: KL(p||p) + 0 * KL(q||p) = 0.
    student, teacher, labels = make_batch(seed=11)
    out, grad = value_and_grad(JSD(temperature=2.0, alpha=1.0, beta=beta), student, teacher, labels)
    assert out.kd_loss.item() == 0.0 and out.loss.item() == 0.0
    assert torch.isfinite(grad).all() and (grad == 0).all()
    # With CE mixed in, the loss is exactly the CE part and the gradients are finite.
    out, grad = value_and_grad(JSD(temperature=2.0, alpha=0.5, beta=beta), student, teacher, labels)
    assert out.loss.item() == pytest.approx(0.5 * out.ce_loss.item(), rel=1e-14)
    assert torch.isfinite(grad).all() and (grad != 0).any()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_near_the_ends_is_forward_or_reverse_kl(temperature):
    # With m = q + b (p - q), expanding log(m / q) = log(1 + b (p - q) / q) in b gives
    #   JSD_b(p||q) = b KL(p||q) - b^2/2 chi2(p||q) + O(b^3),  chi2(p||q) = sum (p - q)^2 / q,
    # valid while b * max(p / q) << 1; and JSD_b(p||q) = JSD_{1-b}(q||p). Hence
    #   JSD_b / b       = KL(p||q) - b/2 chi2(p||q) + O(b^2)   -> forward KL as b -> 0,
    #   JSD_b / (1 - b) = KL(q||p) - (1-b)/2 chi2(q||p) + ...  -> reverse KL as b -> 1.
    # Both the limit and the first correction are checked (logits of scale 1 keep p/q
    # moderate, so b = 1e-4 is inside the range of the expansion).
    student, teacher, labels = make_batch(seed=12, scale=1.0)
    kwargs = dict(temperature=temperature, alpha=1.0)
    forward = ForwardKL(**kwargs)(student, teacher, labels).kd_loss.item()
    reverse = ReverseKL(**kwargs)(student, teacher, labels).kd_loss.item()

    rows = labels[:, 1:] != -100
    p = torch.softmax(teacher[:, :-1][rows] / temperature, dim=-1)
    q = torch.softmax(student[:, :-1][rows] / temperature, dim=-1)
    chi2_pq = ((p - q) ** 2 / q).sum(-1).mean().item()
    chi2_qp = ((q - p) ** 2 / p).sum(-1).mean().item()
    assert 1e-4 * max((p / q).max(), (q / p).max()) < 0.05

    b = 1e-4
    near_zero = _jsd_kd(b, student, teacher, labels, temperature).item()
    near_one = _jsd_kd(1 - b, student, teacher, labels, temperature).item()
    assert near_zero / b == pytest.approx(forward, rel=b * chi2_pq / forward)
    assert near_one / b == pytest.approx(reverse, rel=b * chi2_qp / reverse)
    assert (near_zero / b - forward) / b == pytest.approx(-chi2_pq / 2, rel=1e-2)
    assert (near_one / b - reverse) / b == pytest.approx(-chi2_qp / 2, rel=1e-2)
    # ...and the unnormalised divergence goes continuously to the value 0 of the ends.
    assert 0 < _jsd_kd(1e-9, student, teacher, labels, temperature).item() < 2e-9 * forward


def test_jsd_swap_symmetry():
    student, teacher, labels = make_batch(seed=13)
    torch.testing.assert_close(
        _jsd_kd(0.2, student, teacher, labels, 1.5), _jsd_kd(0.8, teacher, student, labels, 1.5), rtol=1e-12, atol=0
    )


# ----------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_padding_rows_are_cut(kind):
    student, teacher, labels = make_batch(vocab=13, teacher_vocab=13 + 5, seed=14)
    teacher[..., 13:] = 50.0  # would dominate the teacher's softmax if it were not cut
    loss_fn = make_loss(kind, temperature=2.0)
    padded, padded_grad = value_and_grad(loss_fn, student, teacher, labels)
    cut, cut_grad = value_and_grad(loss_fn, student, teacher[..., :13].contiguous(), labels)
    torch.testing.assert_close(padded.loss, cut.loss, rtol=0, atol=0)
    torch.testing.assert_close(padded_grad, cut_grad, rtol=0, atol=0)


def test_smaller_teacher_vocabulary_is_an_error():
    student, _, labels = make_batch(vocab=13, seed=15)
    teacher = torch.randn(*labels.shape, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"(?s)12.*13"):
        ForwardKL()(student, teacher, labels)


def test_bad_shapes_and_labels_are_errors():
    student, teacher, labels = make_batch(vocab=13, seed=16)
    with pytest.raises(ValueError):
        ForwardKL()(student, teacher, labels[:, :-1])
    with pytest.raises(ValueError):
        ForwardKL()(student[0], teacher[0], labels[0])
    bad = labels.clone()
    bad[0, -1] = 13  # out of the student's vocabulary
    with pytest.raises(ValueError, match="13"):
        ForwardKL()(student, teacher, bad)
    bad[0, -1] = -1  # only -100 is ignored
    with pytest.raises(ValueError, match="-1"):
        ForwardKL()(student, teacher, bad)


# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("kind", KINDS)
def test_micro_batches_normalised_by_the_total_sum_to_the_whole_batch(kind):
    student, teacher, labels = make_batch(batch=4, length=6, seed=17)
    labels[2] = -100  # micro-batches with different counts
    labels[2, 3] = 4
    loss_fn = make_loss(kind, temperature=2.0, alpha=0.3, chunk_size=2)
    whole, whole_grad = value_and_grad(loss_fn, student, teacher, labels)

    total = count_answer_tokens(labels)
    parts = [slice(0, 2), slice(2, 4)]
    outs, grads = zip(
        *(value_and_grad(loss_fn, student[m], teacher[m], labels[m], num_answer_tokens=total) for m in parts)
    )
    assert sum(o.num_tokens for o in outs) == total and outs[0].num_tokens != outs[1].num_tokens
    torch.testing.assert_close(sum(o.loss for o in outs), whole.loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(sum(o.kd_loss for o in outs), whole.kd_loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(sum(o.ce_loss for o in outs), whole.ce_loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(torch.cat(grads), whole_grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("num_answer_tokens", [None, 5])
def test_micro_batch_without_answer_tokens(num_answer_tokens):
    student, teacher, labels = make_batch(seed=18)
    labels[:, 1:] = -100
    labels[:, 0] = 3  # not a target: nothing predicts it
    out, grad = value_and_grad(ForwardKL(), student, teacher, labels, num_answer_tokens=num_answer_tokens)
    assert out.num_tokens == 0
    assert out.loss.item() == 0 and out.kd_loss.item() == 0 and out.ce_loss.item() == 0
    assert isinstance(out.kd_loss, torch.Tensor) and isinstance(out.ce_loss, torch.Tensor)
    assert (grad == 0).all()  # backward() ran: the zero is connected to the graph


def test_num_answer_tokens_below_local_count_is_an_error():
    student, teacher, labels = make_batch(seed=19)
    with pytest.raises(ValueError, match="num_answer_tokens"):
        ForwardKL()(student, teacher, labels, num_answer_tokens=count_answer_tokens(labels) - 1)


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(kind, low):
    student, teacher, labels = make_batch(batch=2, length=12, vocab=2000, seed=20, dtype=torch.float32)
    loss_fn = make_loss(kind, temperature=2.0, alpha=0.5, chunk_size=5)
    s_low, t_low = student.to(low), teacher.to(low)

    out_low, grad_low = value_and_grad(loss_fn, s_low, t_low, labels)
    assert out_low.loss.dtype == torch.float32 and grad_low.dtype == low
    # Same (rounded) values in float32: the arithmetic is float32 in both cases, so the results
    # agree to float32 precision (bf16 arithmetic would be off by ~1e-2 relative).
    out_same, grad_same = value_and_grad(loss_fn, s_low.float(), t_low.float(), labels)
    torch.testing.assert_close(out_low.loss, out_same.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_low, grad_same.to(low))
    # And close to the result on the unrounded float32 logits.
    out_full = loss_fn(student, teacher, labels)
    torch.testing.assert_close(out_low.loss, out_full.loss, rtol=2e-2, atol=1e-3)


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "cls, kwargs, bad",
    [
        (ForwardKL, dict(temperature=0.0), "temperature"),
        (ForwardKL, dict(temperature=-1.0), "temperature"),
        (ReverseKL, dict(temperature=math.nan), "temperature"),
        (ReverseKL, dict(temperature=math.inf), "temperature"),
        (ForwardKL, dict(alpha=-0.1), "alpha"),
        (ForwardKL, dict(alpha=1.5), "alpha"),
        (JSD, dict(alpha=math.nan), "alpha"),
        (JSD, dict(beta=-0.01), "beta"),
        (JSD, dict(beta=1.01), "beta"),
        (JSD, dict(beta=math.nan), "beta"),
        (ForwardKL, dict(chunk_size=0), "chunk_size"),
        (JSD, dict(chunk_size=-4), "chunk_size"),
        (ReverseKL, dict(chunk_size=2.5), "chunk_size"),
    ],
)
def test_bad_constructor_arguments(cls, kwargs, bad):
    with pytest.raises(ValueError, match=bad) as info:
        cls(**kwargs)
    message = str(info.value)
    assert repr(kwargs[bad]) in message  # names the bad value...
    assert any(r in message for r in ("> 0", "[0, 1]", ">= 1"))  # ...and the valid range


def test_good_constructor_arguments():
    loss_fn = JSD(temperature=0.1, alpha=0.0, beta=1.0, chunk_size=1)
    assert (loss_fn.temperature, loss_fn.alpha, loss_fn.beta, loss_fn.chunk_size) == (0.1, 0.0, 1.0, 1)
    assert ForwardKL(alpha=1.0).alpha == 1.0


# ----------------------------------------------------------------------------- memory


def _peak_cpu_bytes(fn) -> int:
    """Peak of the CPU bytes allocated by torch while fn runs, above the level at its start,
    from the allocation/free events recorded by torch.profiler(profile_memory=True)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
        deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except AttributeError as error:  # the raw event list is not a public API
        pytest.skip(f"cannot read torch.profiler's memory events in this torch version: {error}")
    running = peak = 0
    for _, nbytes in deltas:
        running += nbytes
        peak = max(peak, running)
    return peak


def test_chunking_bounds_peak_memory():
    vocab, tokens, chunk = 151936, 128, 16  # Qwen2-VL's vocabulary
    rows_fp32 = tokens * vocab * 4  # one fp32 [N, V] tensor: what the chunks avoid

    # The measurement must see a known allocation, or it proves nothing.
    calibration = _peak_cpu_bytes(lambda: torch.empty(tokens, vocab))
    if not 0.99 * rows_fp32 <= calibration <= 1.01 * rows_fp32:
        pytest.skip(f"torch.profiler reported {calibration} bytes for a {rows_fp32}-byte tensor")

    g = torch.Generator().manual_seed(21)
    length = tokens // 2 + 1
    student = torch.randn(2, length, vocab, generator=g).to(torch.bfloat16).requires_grad_()
    teacher = torch.randn(2, length, vocab + 128, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (2, length), generator=g)
    assert count_answer_tokens(labels) == tokens

    def forward_backward(chunk_size):
        values = []

        def run():
            student.grad = None
            loss = ForwardKL(temperature=2.0, alpha=0.5, chunk_size=chunk_size)(student, teacher, labels).loss
            loss.backward()
            values.append(loss.detach())

        peak = _peak_cpu_bytes(run)
        return peak, values[0], student.grad

    (chunked, chunked_loss, chunked_grad), (whole, whole_loss, whole_grad) = (
        forward_backward(chunk),
        forward_backward(tokens),
    )
    # The same loss and gradient either way (only the summation order of the loss differs).
    torch.testing.assert_close(chunked_loss, whole_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=0, atol=0)
    # Chunked: what does not depend on chunk_size is the gathered bf16 student rows, their
    # gradient and its scatter into the logits' shape (about 3 x N x V x 2 bytes); plus a
    # few fp32 chunk x V temporaries.
    bound = 3 * tokens * vocab * 2 + 8 * chunk * vocab * 4
    assert chunked <= bound, (chunked, bound)
    # Unchunked, several fp32 [N, V] temporaries are alive at once.
    assert whole >= 4 * rows_fp32, (whole, rows_fp32)
    assert chunked * 2.5 <= whole, (chunked, whole)


def test_chunked_peak_memory_at_thousands_of_tokens():
    # The Qwen2-VL vocabulary at 2048 answer tokens, where one fp32 [N, V] tensor is 1.24 GB and
    # the unchunked loss, which holds at least four of them at once (measured at 128 tokens in
    # test_chunking_bounds_peak_memory; all its temporaries are [N, V], so this scales with N),
    # would peak above 5 GB. Only the chunked loss is run here: one forward+backward at this size
    # takes ~30 s on two busy CPU cores. T = 1 spares the separate T = 1 cross-entropy pass;
    # the memory layout is the same.
    vocab, tokens, chunk = 151936, 2048, 64
    rows_fp32 = tokens * vocab * 4
    rows_bf16 = tokens * vocab * 2

    calibration = _peak_cpu_bytes(lambda: torch.empty(4 * chunk, vocab))
    if not 0.99 * 4 * chunk * vocab * 4 <= calibration <= 1.01 * 4 * chunk * vocab * 4:
        pytest.skip(f"torch.profiler reported {calibration} bytes for a {4 * chunk * vocab * 4}-byte tensor")

    g = torch.Generator().manual_seed(22)
    length = tokens // 2 + 1
    # Values do not matter for memory: a repeated random block fills the student's bf16 logits
    # (622 MB) quickly, and the teacher is one random row broadcast to [B, L, V + 128] (a view:
    # its rows are gathered per chunk, as from a real tensor).
    block = torch.randn(64, vocab, generator=g).to(torch.bfloat16)
    student = block.repeat(2 * length // 64 + 1, 1)[: 2 * length].reshape(2, length, vocab).requires_grad_()
    teacher = torch.randn(vocab + 128, generator=g).to(torch.bfloat16).expand(2, length, vocab + 128)
    labels = torch.randint(0, vocab, (2, length), generator=g)
    assert count_answer_tokens(labels) == tokens

    losses = []

    def run():
        out = ForwardKL(temperature=1.0, alpha=0.5, chunk_size=chunk)(student, teacher, labels)
        out.loss.backward()
        losses.append(out.loss.detach())

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # big tensors: worth a second thread (the autouse fixture sets one)
    try:
        peak = _peak_cpu_bytes(run)
    finally:
        torch.set_num_threads(threads)

    assert torch.isfinite(losses[0]) and student.grad is not None and torch.isfinite(student.grad[0, 0]).all()
    # What remains does not depend on chunk_size: the gathered bf16 student rows, their gradient
    # and its scatter into the logits' shape (at most 3 x N x V x 2 bytes), plus a few fp32
    # chunk x V temporaries (a chunk is 39 MB here).
    bound = 3 * rows_bf16 + 8 * chunk * vocab * 4
    assert peak <= bound, (peak, bound)
    # ...which is about one fp32 [N, V] tensor, not the unchunked path's four or more.
    assert peak <= 1.5 * rows_fp32, (peak, rows_fp32)
    assert peak * 2.5 <= 4 * rows_fp32, (peak, rows_fp32)


def test_a_loss_setting_that_points_elsewhere_in_the_config_is_resolved():
    """`distill_loss.temperature: ${...}` names another key of the whole config: the loss gets its value."""
    from omegaconf import OmegaConf

    from firstsight.losses.build import build_loss

    cfg = OmegaConf.create(
        {
            "sweep": {"temperature": 4.0},
            "distill_loss": {
                "_target_": "firstsight.losses.ForwardKL",
                "name": "forward_kl",
                "temperature": "${sweep.temperature}",
                "alpha": 0.5,
            },
        }
    )
    loss = build_loss(cfg.distill_loss)
    assert isinstance(loss, ForwardKL) and loss.temperature == 4.0


# ----------------------------------------------------------------------------- the loss on top-k targets


def _bucket_reference(student_row, teacher_row, ids, label, temperature, alpha):
    """The sparse loss of one answer token in float64, bucket by bucket: the top-k ids and the tail."""
    p = torch.softmax(teacher_row.double() / temperature, -1)
    q = torch.softmax(student_row.double() / temperature, -1)
    rest = [v for v in range(p.numel()) if v not in ids]
    p_buckets = torch.cat([p[ids], p[rest].sum().reshape(1)])
    q_buckets = torch.cat([q[ids], q[rest].sum().reshape(1)])
    kd = (p_buckets * (p_buckets.log() - q_buckets.log())).sum()
    ce = -torch.log_softmax(student_row.double(), -1)[label]
    return alpha * temperature**2 * kd + (1 - alpha) * ce, kd, ce


def test_sparse_loss_of_a_single_answer_token_in_a_bfloat16_student():
    """One answer token, k = 2 of 5 ids (teacher rows with padding beyond the vocabulary, in
    float16): the float64 bucket-by-bucket value; the bfloat16 student's logits are computed on in
    float32, as are the float16 teacher's."""
    from firstsight.losses.sparse import SparseTargets, sparse_kd_loss, topk_targets

    student = torch.tensor([[[0.5, -1.0, 2.0, 0.25, -0.5], [1.0, 0.0, 0.0, 0.0, 0.0]]], dtype=torch.bfloat16)
    teacher_row = torch.tensor([[1.5, 0.25, -2.0, 0.5, 1.0, 9.0, 9.0]], dtype=torch.float16)  # 2 padding ids
    labels = torch.tensor([[-100, 3]])
    ids, logprobs, tail = topk_targets(teacher_row, 5, 2, 2.0)
    assert logprobs.dtype == tail.dtype == torch.float32
    assert ids.tolist() == [[0, 4]]
    exact = torch.log_softmax(teacher_row[0, :5].double() / 2.0, -1)
    torch.testing.assert_close(logprobs[0].double(), exact[[0, 4]], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tail[0].double(), exact[[1, 2, 3]].logsumexp(-1), rtol=1e-6, atol=1e-7)

    loss_fn = ForwardKL(temperature=2.0, alpha=0.3)
    targets = SparseTargets(ids, logprobs, tail, labels=torch.tensor([3]))
    out = sparse_kd_loss(loss_fn, student.requires_grad_(), targets, labels)
    loss, kd, ce = _bucket_reference(student[0, 0], teacher_row[0, :5], [0, 4], 3, 2.0, 0.3)
    assert out.num_tokens == 1 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.kd_loss.double(), kd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.ce_loss.double(), ce, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-7)
    out.loss.backward()
    assert student.grad[0, 0].abs().sum() > 0 and student.grad[0, 1].abs().sum() == 0


def test_sparse_loss_of_a_batch_without_answer_tokens_is_a_zero_that_backpropagates():
    from firstsight.losses.sparse import SparseTargets, sparse_kd_loss

    student = torch.randn(2, 3, 5, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.full((2, 3), -100)
    empty = SparseTargets(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), torch.zeros(0))
    out = sparse_kd_loss(ForwardKL(temperature=2.0, alpha=0.5), student, empty, labels)
    assert out.num_tokens == 0
    assert out.loss.dtype == torch.float32 and out.loss.item() == 0.0
    assert out.kd_loss.item() == 0.0 and out.ce_loss.item() == 0.0
    out.loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_sparse_targets_are_checked_against_the_batch():
    """Targets of other answer tokens, ids outside the student's vocabulary, and id-less targets
    that do not cover it are refused, each with what is wrong."""
    from firstsight.losses.sparse import SparseTargets, sparse_kd_loss, topk_targets

    g = torch.Generator().manual_seed(0)
    student = torch.randn(1, 4, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, 2, -100, 4]])
    ids, logprobs, tail = topk_targets(torch.randn(2, 5, generator=g, dtype=torch.float64), 5, 2, 1.0)
    loss_fn = ForwardKL(temperature=1.0, alpha=0.5)

    same = sparse_kd_loss(loss_fn, student, SparseTargets(ids, logprobs, tail, labels=torch.tensor([2, 4])), labels)
    unchecked = sparse_kd_loss(loss_fn, student, SparseTargets(ids, logprobs, tail), labels)
    assert same.loss.item() == unchecked.loss.item() and same.num_tokens == 2
    with pytest.raises(ValueError, match="the sparse teacher targets were computed for other answer tokens than"):
        sparse_kd_loss(loss_fn, student, SparseTargets(ids, logprobs, tail, labels=torch.tensor([2, 3])), labels)

    for bad in ([[0, -1], [1, 2]], [[0, 5], [1, 2]], [[0, 1, 2, 3, 4, 0], [1, 2, 3, 4, 0, 1]]):
        bad_ids = torch.tensor(bad)
        with pytest.raises(ValueError, match=r"sparse target ids must be at most 5 ids in \[0, 5\) \(the student"):
            sparse_kd_loss(loss_fn, student, SparseTargets(bad_ids, logprobs[:, :1].expand_as(bad_ids), tail), labels)

    with pytest.raises(
        ValueError, match=r"without ids must cover the student's whole vocabulary \(5\), they have 2 col"
    ):
        sparse_kd_loss(loss_fn, student, SparseTargets(None, logprobs, tail), labels)


def test_topk_targets_refuses_rows_and_k_that_do_not_fit_the_vocabulary():
    from firstsight.losses.sparse import topk_targets

    for rows in (torch.zeros(7), torch.zeros(2, 4), torch.zeros(1, 2, 7)):
        with pytest.raises(
            ValueError, match=rf"teacher rows must be \[N, >= 5\], got {re.escape(str(tuple(rows.shape)))}"
        ):
            topk_targets(rows, 5, 2, 1.0)
    for k in (0, 6):
        with pytest.raises(ValueError, match=rf"top_k must lie in \[1, 5\] \(the student's vocabulary\), got {k}"):
            topk_targets(torch.zeros(2, 5), 5, k, 1.0)


def test_sparse_targets_move_to_a_device_with_every_field():
    from firstsight.losses.sparse import SparseTargets

    targets = SparseTargets(
        torch.tensor([[1, 0]]), torch.tensor([[-0.1, -2.5]]), torch.tensor([-3.0]), torch.tensor([1])
    )
    moved = targets.to("meta")
    assert [t.device.type for t in (moved.token_ids, moved.logprobs, moved.tail_logprob, moved.labels)] == ["meta"] * 4
    dense = SparseTargets(None, targets.logprobs, targets.tail_logprob).to("meta")
    assert dense.token_ids is None and dense.labels is None and dense.logprobs.is_meta


# ----------------------------------------------------------------------------- the KD losses' inputs and settings


def test_labels_that_are_not_batch_by_sequence_are_refused():
    from firstsight.losses.kd import answer_logit_slice

    for count in (count_answer_tokens, answer_logit_slice):
        with pytest.raises(ValueError, match=r"labels must be \[batch, seq_len\], got shape \(4,\)"):
            count(torch.zeros(4, dtype=torch.long))


def test_kd_loss_refuses_logits_and_labels_of_other_shapes():
    """Each input of the wrong rank, and each of the wrong batch or length, alone."""
    loss_fn = ForwardKL()
    s, t, y = torch.zeros(2, 3, 5), torch.zeros(2, 3, 6), torch.zeros(2, 3, dtype=torch.long)
    expected = r"expected student_logits \[B, L, Vs\], teacher_logits \[B, L, Vt\] and labels \[B, L\], got "
    for args, shapes in (
        ((s[0], t, y), "(3, 5), (2, 3, 6) and (2, 3)"),
        ((s, t[0], y), "(2, 3, 5), (3, 6) and (2, 3)"),
        ((s, t, y[0]), "(2, 3, 5), (2, 3, 6) and (3,)"),
    ):
        with pytest.raises(ValueError, match=expected + re.escape(shapes)):
            loss_fn(*args)
    differ = "batch and sequence sizes differ: student_logits "
    for args, shapes in (
        ((s[:, :2], t, y), "(2, 2, 5), teacher_logits (2, 3, 6), labels (2, 3)"),
        ((s, t[:1], y), "(2, 3, 5), teacher_logits (1, 3, 6), labels (2, 3)"),
    ):
        with pytest.raises(ValueError, match=re.escape(differ + shapes)):
            loss_fn(*args)


def test_a_batch_without_answer_tokens_gives_a_float32_zero_for_a_bfloat16_student():
    student = torch.randn(2, 3, 5, dtype=torch.bfloat16, requires_grad=True)
    out = ForwardKL(temperature=2.0)(student, torch.randn(2, 3, 5), torch.full((2, 3), -100))
    assert out.loss.dtype == torch.float32 and out.loss.item() == 0.0 and out.num_tokens == 0
    out.loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_defaults_and_settings_of_the_losses():
    """The documented defaults (T = 1, alpha = 0.5, chunks of 1024, beta = 0.5, skew = 0.1); every
    setting given is kept; an out-of-range one is refused by its name."""
    from firstsight.losses.kd import SkewForwardKL, SkewReverseKL

    plain, jsd, skew = ForwardKL(), JSD(), SkewForwardKL()
    for loss_fn in (plain, jsd, skew):
        assert (loss_fn.temperature, loss_fn.alpha, loss_fn.chunk_size) == (1.0, 0.5, 1024)
    assert jsd.beta == 0.5 and skew.skew == 0.1
    given = SkewReverseKL(temperature=2.0, alpha=0.25, skew=0.3, chunk_size=3)
    assert (given.temperature, given.alpha, given.skew, given.chunk_size) == (2.0, 0.25, 0.3, 3)
    for make, name in (
        (lambda: ForwardKL(alpha=1.5), "alpha"),
        (lambda: JSD(beta=-0.1), "beta"),
        (lambda: SkewForwardKL(skew=2.0), "skew"),
    ):
        with pytest.raises(ValueError, match=rf"^{name} must be in \[0, 1\], got "):
            make()


def test_a_loss_without_a_divergence_says_so():
    with pytest.raises(NotImplementedError, match=r"^KDLoss must implement divergence\(\)$"):
        KDLoss().divergence(torch.zeros(2, 3), torch.zeros(2, 3))


def test_divergence_is_per_answer_token():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), -1)
    per_token = ForwardKL().divergence(p, q)
    assert per_token.shape == (4,)
    torch.testing.assert_close(per_token, (p.exp() * (p - q)).sum(-1), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- the hidden-state term


def test_hidden_state_loss_settings_are_checked_and_the_projection_has_no_bias():
    from firstsight.losses.kd import HiddenStateLoss, hidden_layer_pairs

    assert HiddenStateLoss(1, 1).projection.weight.shape == (1, 1)  # width 1 is a width
    assert HiddenStateLoss(3, 4).projection.bias is None  # ||W h_s - h_t||: W alone is trained
    for widths, name, given in (((True, 2), "student_width", "True"), ((2, 0), "teacher_width", "0")):
        with pytest.raises(ValueError, match=rf"^{name} must be an integer >= 1, got {given}$"):
            HiddenStateLoss(*widths)
    with pytest.raises(ValueError, match="hidden layer True is out of range"):
        hidden_layer_pairs([True], 4, 8)
    with pytest.raises(ValueError, match=r"^name at least one hidden layer, e\.g\. \[-1\] \(the last\)$"):
        hidden_layer_pairs([], 4, 8)


def test_hidden_state_loss_refuses_states_of_other_shapes():
    from firstsight.losses.kd import HiddenStateLoss

    loss_fn = HiddenStateLoss(3, 4)
    s, t, y = torch.zeros(2, 5, 3), torch.zeros(2, 5, 4), torch.zeros(2, 5, dtype=torch.long)
    expected = r"expected student_hidden \[B, L, d_s\], teacher_hidden \[B, L, d_t\] and labels \[B, L\], got "
    for args, shapes in (
        ((s[0], t, y), "(5, 3), (2, 5, 4) and (2, 5)"),
        ((s, t[0], y), "(2, 5, 3), (5, 4) and (2, 5)"),
        ((s, t, y[0]), "(2, 5, 3), (2, 5, 4) and (5,)"),
    ):
        with pytest.raises(ValueError, match=expected + re.escape(shapes)):
            loss_fn(*args)
    for args in ((s[:, :4], t, y), (s, t[:1], y), (torch.zeros(2, 5, 2), t, y), (s, torch.zeros(2, 5, 3), y)):
        with pytest.raises(ValueError, match="shapes do not fit a projection from width 3 to 4"):
            loss_fn(*args)


def test_hidden_state_loss_is_computed_in_full_precision_under_autocast():
    """Under a bfloat16 autocast the projection still runs in float32 (float64 inputs: float64)."""
    from firstsight.losses.kd import HiddenStateLoss

    g = torch.Generator().manual_seed(0)
    loss_fn = HiddenStateLoss(8, 6)
    student, teacher = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 6, generator=g)
    labels = torch.tensor([[-100, 1, 2, -100, 3], [-100, -100, 4, 5, -100]])
    rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    w = loss_fn.projection.weight.detach().double()
    exact = ((student[rows, cols].double() @ w.T - teacher[rows, cols].double()) ** 2).sum() / 6 / 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = loss_fn(student, teacher, labels)
    assert in_autocast.dtype == torch.float32
    torch.testing.assert_close(in_autocast.double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss_fn(student.double(), teacher.double(), labels), exact, rtol=1e-12, atol=0)


def test_hidden_distillation_passes_its_kind_and_the_batch_s_answer_count_to_each_pair():
    from firstsight.losses.kd import HiddenDistillation

    g = torch.Generator().manual_seed(0)
    states_s = [torch.randn(1, 4, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    states_t = [torch.randn(1, 4, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    labels = torch.tensor([[-100, 1, 2, -100]])
    for kind in ("mse", "cosine"):
        term = HiddenDistillation(3, 5, 2, 2, layers=[-1], kind=kind)
        assert [loss.kind for loss in term.losses] == [kind]
        own = term(states_s, states_t, labels)
        accumulated = term(states_s, states_t, labels, num_answer_tokens=8)  # 2 of the batch's 8
        torch.testing.assert_close(accumulated, own / 4, rtol=1e-12, atol=0)
        single = term.losses[0](states_s[-1], states_t[-1], labels)
        torch.testing.assert_close(own, single, rtol=0, atol=0)


def test_sparse_loss_on_targets_as_the_cache_stores_them_is_computed_in_the_student_s_float64():
    """The cache hands over int32 ids and labels and float32 log-probabilities: they are checked
    against the batch as they are, and a float64 student's loss is computed in float64 from them."""
    from firstsight.losses.sparse import SparseTargets, sparse_kd_loss, topk_targets

    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, 2, 6, -100], [-100, -100, 0, 5]])
    ids, logprobs, tail = topk_targets(torch.randn(4, 9, generator=g), 7, 3, 1.0)  # a float32 teacher
    cached = SparseTargets(ids.to(torch.int32), logprobs, tail, labels=torch.tensor([2, 6, 0, 5], dtype=torch.int32))
    out = sparse_kd_loss(ForwardKL(temperature=1.0, alpha=1.0), student, cached, labels)

    rows = student[:, :-1][labels[:, 1:] != -100]
    q = torch.log_softmax(rows, -1)
    outside = torch.ones_like(q, dtype=torch.bool).scatter(-1, ids, False)
    q_buckets = torch.cat([q.gather(-1, ids), q.masked_fill(~outside, float("-inf")).logsumexp(-1, keepdim=True)], -1)
    p_buckets = torch.cat([logprobs, tail.unsqueeze(-1)], -1).double()
    kd = (p_buckets.exp() * (p_buckets - q_buckets)).sum() / 4
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, kd, rtol=1e-12, atol=0)

    _, whole, _ = topk_targets(torch.randn(4, 9, generator=g), 7, 7, 1.0)  # k = V: the cache drops the ids
    dense = sparse_kd_loss(ForwardKL(temperature=1.0, alpha=1.0), student, SparseTargets(None, whole, tail), labels)
    assert dense.loss.dtype == torch.float64
    exact = (whole.double().exp() * (whole.double() - q)).sum() / 4
    torch.testing.assert_close(dense.loss, exact, rtol=1e-12, atol=0)

    with pytest.raises(ValueError, match="the sparse teacher targets have 3 rows but the batch has 4 answer tokens"):
        sparse_kd_loss(ForwardKL(), student, SparseTargets(ids[:3], logprobs[:3], tail[:3]), labels)
