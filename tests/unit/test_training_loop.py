"""The optimisation loop (firstsight.training.loop.optimize) on tiny models whose answers are known:
gradient accumulation gives what one large batch gives, the learning-rate schedule and the `lr`
it logs, and gradient clipping (`grad_norm` is the norm before clipping; the update is the clipped
gradient's). One short in-process distillation checks the same through task=distill."""

from __future__ import annotations

import math

import pytest
import torch

from firstsight.losses.kd import IGNORE_INDEX, ForwardKL
from firstsight.training.loop import LoopSettings, _lr_lambda, optimize

# tiny tensors: extra OpenMP threads only wait for each other on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, WIDTH, LENGTH = 11, 6, 9


def _run(model, batches, micro_step, **settings):
    """optimize() on the CPU in float32 (no autocast); the per-step metrics it reported."""
    seen = []
    optimize(
        model,
        iter(batches),
        micro_step,
        LoopSettings(progress_bar=False, **settings),
        device="cpu",
        dtype=torch.float32,
        on_step=lambda step, metrics, *rest: seen.append((step, metrics)),
    )
    assert [step for step, _ in seen] == list(range(1, settings["max_steps"] + 1))
    return [metrics for _, metrics in seen]


# ----------------------------------------------------------------------------- gradient accumulation


class _Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids, **_):
        return self.head(torch.tanh(self.embed(input_ids)))


def _samples(steps, per_step=4):
    """`steps` groups of `per_step` samples whose answer-token counts differ a lot between the
    first and the second half of a group (2 or 3 tokens against 7 or 8), so that normalising each
    micro-batch by its own count, or by a share of the step's, gives another loss."""
    g = torch.Generator().manual_seed(3)
    groups = []
    for _ in range(steps):
        input_ids = torch.randint(0, VOCAB, (per_step, LENGTH), generator=g)
        labels = torch.full((per_step, LENGTH), IGNORE_INDEX)
        for row, answers in enumerate([2, 3, 7, 8][:per_step]):
            labels[row, LENGTH - answers :] = input_ids[row, LENGTH - answers :]
        groups.append({"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)})
    return groups


def _split(batch, parts):
    size = batch["labels"].shape[0] // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def _distill_steps(batch_size, grad_accum_steps, steps=3):
    student = _Student().double()
    torch.manual_seed(1)
    teacher = _Student().double().requires_grad_(False)
    loss_fn = ForwardKL(temperature=2.0, alpha=0.5)

    def micro_step(batch, answer_tokens):
        out = loss_fn(student(batch["input_ids"]), teacher(batch["input_ids"]), batch["labels"], answer_tokens)
        return {"loss": out.loss, "kd_loss": out.kd_loss, "ce_loss": out.ce_loss}

    batches = [micro for group in _samples(steps) for micro in _split(group, 4 // batch_size)]
    metrics = _run(
        student,
        batches,
        micro_step,
        max_steps=steps,
        lr=0.05,
        max_grad_norm=0.1,
        grad_accum_steps=grad_accum_steps,
    )
    return metrics, [p.detach().clone() for p in student.parameters()]


def test_two_accumulated_micro_batches_step_as_one_batch_of_both():
    """batch 2 x 2 micro-batches against batch 4: the same loss, KD and CE terms, gradient norm and
    weights after every step (each micro-batch is normalised by the whole step's answer tokens)."""
    accumulated, accumulated_weights = _distill_steps(batch_size=2, grad_accum_steps=2)
    whole, whole_weights = _distill_steps(batch_size=4, grad_accum_steps=1)
    for step, (a, w) in enumerate(zip(accumulated, whole), start=1):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm", "lr"):
            assert a[key] == pytest.approx(w[key], rel=1e-9), (step, key, a[key], w[key])
    assert whole[0]["grad_norm"] > 0.1  # clipped: the clipping sees the accumulated gradient too
    for a, w in zip(accumulated_weights, whole_weights):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-12)


def test_the_schedule_warms_up_linearly_then_decays_by_a_cosine_to_a_tenth():
    factor = _lr_lambda(warmup_steps=4, max_steps=44)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # step s uses (s + 1) / warmup
    assert factor(4) == 1.0  # the peak, where the decay starts
    assert factor(4 + 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert factor(24) == pytest.approx(0.55, rel=1e-12)  # midway: half of the way down from 1 to 0.1
    assert factor(44) == pytest.approx(0.1, rel=1e-12)  # the end: 10 % of the peak
    assert factor(60) == pytest.approx(0.1, rel=1e-12)  # and no further
    no_warmup = _lr_lambda(warmup_steps=0, max_steps=10)
    assert no_warmup(0) == 1.0 and no_warmup(5) == pytest.approx(0.55, rel=1e-12)
    assert no_warmup(10) == pytest.approx(0.1, rel=1e-12)


def _linear_model(width=4):
    model = torch.nn.Linear(width, 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    return model


def _constant_gradient_batches(gradients):
    """One batch per step; micro_step's loss is w . c, whose gradient in w is exactly c."""
    batches = [
        {"c": torch.as_tensor(c, dtype=torch.float64), "labels": torch.ones(1, 2, dtype=torch.long)} for c in gradients
    ]
    for batch in batches:
        batch["attention_mask"] = torch.ones(1, 2, dtype=torch.long)
    return batches


def test_the_logged_lr_is_the_one_each_step_applies():
    """train/lr of step s is lr x factor(s - 1), and the update of that step uses it: with one
    gradient sign throughout, AdamW moves each weight by ~lr (m / sqrt(v) = 1) every step."""
    model = _linear_model()
    lr, warmup, steps = 0.1, 2, 6
    metrics = _run(
        model,
        _constant_gradient_batches([[1.0, -2.0, 3.0, -4.0]] * steps),
        lambda batch, tokens: {"loss": (model.weight[0] * batch["c"]).sum()},
        max_steps=steps,
        lr=lr,
        warmup_steps=warmup,
        max_grad_norm=0.0,
    )
    expected = [lr * 0.5, lr * 1.0] + [
        lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))) for s in range(warmup, steps)
    ]
    assert [m["lr"] for m in metrics] == pytest.approx(expected, rel=1e-12)
    # the weights moved against the gradient by the sum of the step sizes (AdamW's eps aside)
    moved = -model.weight.detach()[0] * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(moved, torch.full((4,), sum(expected), dtype=torch.float64), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- gradient clipping


def _clipping_run(max_grad_norm, gradients):
    model = _linear_model()
    metrics = _run(
        model,
        _constant_gradient_batches(gradients),
        lambda batch, tokens: {"loss": (model.weight[0] * batch["c"]).sum()},
        max_steps=len(gradients),
        lr=0.1,
        max_grad_norm=max_grad_norm,
    )
    return metrics, model.weight.detach()[0]


def _adamw_reference(gradients, max_grad_norm):
    """torch's AdamW fed the gradients clipped by torch's clip_grad_norm_ to `max_grad_norm` (0: not
    clipped), at the schedule's rates for two steps without warm-up (factors 1 and 0.55)."""
    weight = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.0)
    for factor, g in zip((1.0, 0.55), gradients):
        weight.grad = torch.as_tensor(g, dtype=torch.float64).clone()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([weight], max_grad_norm)
        optimizer.param_groups[0]["lr"] = 0.1 * factor
        optimizer.step()
    return weight.detach()


def test_clipping_bounds_the_applied_gradient_and_grad_norm_is_the_norm_before_it():
    """A first gradient of norm 5 and a second of norm 0.5: with max_grad_norm=1 the first is scaled
    to norm 1 before AdamW sees it (the second is left alone), which changes AdamW's second step;
    max_grad_norm=0 clips nothing. grad_norm is logged before clipping in both."""
    gradients = [[3.0, 4.0, 0.0, 0.0], [0.0, 0.3, 0.4, 0.0]]
    clipped_metrics, clipped = _clipping_run(1.0, gradients)
    free_metrics, free = _clipping_run(0.0, gradients)
    for metrics in (clipped_metrics, free_metrics):
        assert [m["grad_norm"] for m in metrics] == pytest.approx([5.0, 0.5], rel=1e-12)
    torch.testing.assert_close(clipped, _adamw_reference(gradients, 1.0), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(free, _adamw_reference(gradients, 0.0), rtol=1e-12, atol=1e-15)
    assert (clipped - free).abs().max() > 1e-3  # the two runs are told apart
    # a limit above every norm changes nothing
    torch.testing.assert_close(_clipping_run(10.0, gradients)[1], free, rtol=0, atol=0)
