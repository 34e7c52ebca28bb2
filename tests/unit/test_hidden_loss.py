"""The optional hidden-state distillation term (firstsight.losses.kd.HiddenStateLoss and
HiddenDistillation) against a float64 reference written out token by token here, its config
checks, its training (optimize(extra_parameters=...)) and one short `python run.py` with it on."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose

from firstsight.core.errors import ConfigError
from firstsight.losses.kd import HiddenDistillation, HiddenStateLoss, count_answer_tokens, hidden_layer_pairs
from firstsight.suite.validate import validate

KINDS = ["mse", "cosine"]


# tiny tensors: extra OpenMP threads only wait for each other on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_batch(batch=3, length=7, d_s=5, d_t=6, seed=0, dtype=torch.float64, answer_frac=0.6):
    """Random hidden states of both models and labels with about 1 - answer_frac of -100."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, d_s, generator=g).to(dtype)
    teacher = torch.randn(batch, length, d_t, generator=g).to(dtype)
    labels = torch.randint(0, 50, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) > answer_frac] = -100
    labels[0, -1] = 1  # at least one answer token
    return student, teacher, labels


def make_loss(kind, d_s=5, d_t=6, seed=1):
    torch.manual_seed(seed)
    return HiddenStateLoss(d_s, d_t, kind).double()


def reference(kind, student, teacher, weight, labels):
    """The plain formula in float64, token by token: the state at t pairs with label t + 1."""
    terms = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if int(labels[b, t + 1]) == -100:
                continue
            z = weight.double() @ student[b, t].double()
            y = teacher[b, t].double()
            if kind == "mse":
                terms.append(((z - y) ** 2).sum() / y.numel())
            else:
                terms.append(1 - (z @ y) / (z.norm() * y.norm()))
    return torch.stack(terms).mean()


def value_and_grads(loss_fn, student, teacher, labels, **kwargs):
    student = student.detach().clone().requires_grad_()
    loss_fn.zero_grad(set_to_none=True)
    value = loss_fn(student, teacher, labels, **kwargs)
    value.backward()
    return value.detach(), student.grad, loss_fn.projection.weight.grad.clone()


# ----------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_float64_reference_values_and_gradients(kind, seed):
    student, teacher, labels = make_batch(seed=seed)
    loss_fn = make_loss(kind, seed=seed)
    value, grad_student, grad_weight = value_and_grads(loss_fn, student, teacher, labels)

    ref_student = student.clone().requires_grad_()
    ref_weight = loss_fn.projection.weight.detach().clone().requires_grad_()
    ref = reference(kind, ref_student, teacher, ref_weight, labels)
    ref.backward()

    assert value.dtype == torch.float64 and value.dim() == 0
    torch.testing.assert_close(value, ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_student, ref_student.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad_weight, ref_weight.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_in_the_student_states_and_the_projection(kind):
    student, teacher, labels = make_batch(batch=2, length=5, d_s=3, d_t=4, seed=3)
    assert count_answer_tokens(labels) >= 2
    loss_fn = make_loss(kind, d_s=3, d_t=4, seed=3)
    weight = loss_fn.projection.weight.detach().clone()

    def f(s, w):
        # functional in w: the module's weight is replaced by the gradchecked input
        return torch.func.functional_call(loss_fn, {"projection.weight": w}, (s, teacher, labels))

    assert torch.autograd.gradcheck(f, (student.requires_grad_(), weight.requires_grad_()))


@pytest.mark.parametrize("kind", KINDS)
def test_zero_when_the_projection_maps_the_student_onto_the_teacher(kind):
    student, _, labels = make_batch(seed=4)
    loss_fn = make_loss(kind, seed=4)
    teacher = (student @ loss_fn.projection.weight.T).detach()  # h_t = W h_s exactly
    value, grad_student, grad_weight = value_and_grads(loss_fn, student, teacher, labels)
    assert abs(value.item()) < 1e-14
    assert grad_student.abs().max() < 1e-12 and grad_weight.abs().max() < 1e-12
    # cosine ignores the scale of the target; the MSE does not
    scaled = value_and_grads(loss_fn, student, 3 * teacher, labels)[0].item()
    assert (abs(scaled) < 1e-14) if kind == "cosine" else scaled > 0.1


def test_the_two_kinds_differ_and_are_bounded_as_expected():
    student, teacher, labels = make_batch(seed=5)
    values = {}
    for kind in KINDS:
        loss_fn = make_loss(kind, seed=5)
        values[kind] = loss_fn(student, teacher, labels).item()
        expected = reference(kind, student, teacher, loss_fn.projection.weight.detach(), labels).item()
        assert values[kind] == pytest.approx(expected, rel=1e-12), kind
    assert values["mse"] != values["cosine"]
    # pointing the projection away from the teacher everywhere gives the cosine's maximum, 2
    loss_fn = make_loss("cosine", seed=5)
    opposite = -(student @ loss_fn.projection.weight.T).detach()
    assert loss_fn(student, opposite, labels).item() == pytest.approx(2.0, rel=1e-12)


# ----------------------------------------------------------------------------- masking and normalisation


@pytest.mark.parametrize("kind", KINDS)
def test_non_answer_positions_do_not_matter(kind):
    student, teacher, labels = make_batch(batch=3, length=8, seed=6)
    loss_fn = make_loss(kind, seed=6)
    value, grad_student, _ = value_and_grads(loss_fn, student, teacher, labels)

    predicts_nothing = torch.ones(labels.shape, dtype=torch.bool)  # the state at t predicts label t + 1
    predicts_nothing[:, :-1] = labels[:, 1:] == -100
    assert predicts_nothing.any() and (~predicts_nothing).any()
    g = torch.Generator().manual_seed(60)
    student2, teacher2 = student.clone(), teacher.clone()
    student2[predicts_nothing] = 100 * torch.randn(student2[predicts_nothing].shape, generator=g, dtype=torch.float64)
    teacher2[predicts_nothing] = 100 * torch.randn(teacher2[predicts_nothing].shape, generator=g, dtype=torch.float64)
    for first in (-100, 0, 7):  # labels[:, 0] is never a target
        labels2 = labels.clone()
        labels2[:, 0] = first
        value2, grad2, _ = value_and_grads(loss_fn, student2, teacher2, labels2)
        assert value2.item() == pytest.approx(value.item(), rel=1e-13)
        torch.testing.assert_close(grad2, grad_student, rtol=1e-12, atol=0)
    assert (grad_student[predicts_nothing] == 0).all()
    assert (grad_student[~predicts_nothing] != 0).any(dim=-1).all()


@pytest.mark.parametrize("kind", KINDS)
def test_micro_batches_normalised_by_the_total_sum_to_the_whole_batch(kind):
    student, teacher, labels = make_batch(batch=4, length=6, seed=7)
    labels[2] = -100  # micro-batches with different counts
    labels[2, 3] = 4
    loss_fn = make_loss(kind, seed=7)
    whole, whole_grad, whole_weight_grad = value_and_grads(loss_fn, student, teacher, labels)

    total = count_answer_tokens(labels)
    parts = [slice(0, 2), slice(2, 4)]
    outs = [value_and_grads(loss_fn, student[m], teacher[m], labels[m], num_answer_tokens=total) for m in parts]
    assert count_answer_tokens(labels[parts[0]]) != count_answer_tokens(labels[parts[1]])
    torch.testing.assert_close(sum(o[0] for o in outs), whole, rtol=1e-13, atol=0)
    torch.testing.assert_close(torch.cat([o[1] for o in outs]), whole_grad, rtol=1e-12, atol=0)
    # the projection's gradient accumulates over the micro-batches as optimize() does
    torch.testing.assert_close(sum(o[2] for o in outs), whole_weight_grad, rtol=1e-12, atol=1e-16)
    # each part on its own count is its own mean, not the batch's
    alone = loss_fn(student[parts[0]], teacher[parts[0]], labels[parts[0]])
    assert alone.item() == pytest.approx(outs[0][0].item() * total / count_answer_tokens(labels[parts[0]]), rel=1e-12)


@pytest.mark.parametrize("num_answer_tokens", [None, 5])
def test_micro_batch_without_answer_tokens(num_answer_tokens):
    student, teacher, labels = make_batch(seed=8)
    labels[:, 1:] = -100
    labels[:, 0] = 3  # not a target
    loss_fn = make_loss("mse", seed=8)
    value, grad_student, grad_weight = value_and_grads(
        loss_fn, student, teacher, labels, num_answer_tokens=num_answer_tokens
    )
    assert value.item() == 0
    assert (grad_student == 0).all() and (grad_weight == 0).all()  # backward() ran


def test_num_answer_tokens_below_local_count_is_an_error():
    student, teacher, labels = make_batch(seed=9)
    with pytest.raises(ValueError, match="num_answer_tokens"):
        make_loss("mse")(student, teacher, labels, num_answer_tokens=count_answer_tokens(labels) - 1)


def test_no_gradient_into_the_teacher():
    student, teacher, labels = make_batch(seed=10)
    student.requires_grad_()
    teacher.requires_grad_()
    make_loss("cosine")(student, teacher, labels).backward()
    assert student.grad is not None and teacher.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_states_are_computed_in_float32_outside_autocast(kind):
    student, teacher, labels = make_batch(batch=2, length=12, d_s=64, d_t=96, seed=11, dtype=torch.float32)
    torch.manual_seed(11)
    loss_fn = HiddenStateLoss(64, 96, kind)  # float32 master weight, as in training
    s_low, t_low = student.bfloat16(), teacher.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(s_low, t_low, labels)
    assert low.dtype == torch.float32
    # the same rounded inputs in float32 give the float32 result: no bf16 arithmetic inside
    torch.testing.assert_close(low, loss_fn(s_low.float(), t_low.float(), labels), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(low, loss_fn(student, teacher, labels), rtol=2e-2, atol=1e-3)


def test_bad_arguments_and_shapes_are_errors():
    with pytest.raises(ValueError, match="'l1'"):
        HiddenStateLoss(4, 4, "l1")
    with pytest.raises(ValueError, match="student_width"):
        HiddenStateLoss(0, 4)
    student, teacher, labels = make_batch(d_s=5, d_t=6)
    with pytest.raises(ValueError, match="width 5 to 7"):
        make_loss("mse", d_s=5, d_t=7)(student, teacher, labels)
    with pytest.raises(ValueError):
        make_loss("mse")(student, teacher, labels[:, :-1])


# ----------------------------------------------------------------------------- layers


def test_layer_pairs_are_proportional_in_depth():
    # tiny: student 2 layers, teacher 3; indices into hidden_states (0 = embeddings, last = final norm)
    assert hidden_layer_pairs([-1], 2, 3) == [(2, 3)]
    assert hidden_layer_pairs([0, 1, 2], 2, 3) == [(0, 0), (1, 2), (2, 3)]
    assert hidden_layer_pairs([-3, -2], 2, 3) == [(0, 0), (1, 2)]
    assert hidden_layer_pairs([7, 14, -1], 28, 28) == [(7, 7), (14, 14), (28, 28)]  # Qwen2-VL 7B / 2B
    assert hidden_layer_pairs([1, 14], 28, 56) == [(1, 2), (14, 28)]
    for bad in (3, -4):
        with pytest.raises(ValueError, match=rf"{bad}.*\[-3, 2\]"):
            hidden_layer_pairs([bad], 2, 3)
    with pytest.raises(ValueError, match="at least one"):
        hidden_layer_pairs([], 2, 3)


def test_hidden_distillation_is_the_mean_over_its_pairs():
    g = torch.Generator().manual_seed(12)
    student_states = tuple(torch.randn(2, 6, 5, generator=g, dtype=torch.float64) for _ in range(3))  # 2 layers
    teacher_states = tuple(torch.randn(2, 6, 7, generator=g, dtype=torch.float64) for _ in range(4))  # 3 layers
    labels = torch.tensor([[-100, 3, 4, -100, 5, 6], [-100, -100, 1, 2, -100, -100]])
    term = HiddenDistillation(5, 7, student_layers=2, teacher_layers=3, layers=[1, -1], kind="mse").double()
    assert term.pairs == [(1, 2), (2, 3)] and len(term.losses) == 2
    expected = (
        sum(
            reference("mse", student_states[s], teacher_states[t], loss.projection.weight, labels)
            for loss, (s, t) in zip(term.losses, term.pairs)
        )
        / 2
    )
    torch.testing.assert_close(term(student_states, teacher_states, labels), expected, rtol=1e-12, atol=0)
    single = HiddenDistillation(5, 7, 2, 3).double()  # default: the last states, mse
    assert single.pairs == [(2, 3)]
    torch.testing.assert_close(
        single(student_states, teacher_states, labels),
        reference("mse", student_states[2], teacher_states[3], single.losses[0].projection.weight, labels),
    )


# ----------------------------------------------------------------------------- training and config


def test_optimize_trains_the_extra_parameters():
    from firstsight.training.loop import LoopSettings, optimize

    model = torch.nn.Linear(3, 3)
    extra = HiddenStateLoss(3, 4, "mse")
    before = extra.projection.weight.detach().clone()
    g = torch.Generator().manual_seed(13)

    def batches():
        while True:
            yield {
                "x": torch.randn(2, 5, 3, generator=g),
                "labels": torch.ones(2, 5, dtype=torch.long),
                "attention_mask": torch.ones(2, 5, dtype=torch.long),
            }

    def micro_step(batch, answer_tokens):
        hidden = model(batch["x"])
        loss = extra(hidden, torch.ones(2, 5, 4), batch["labels"], num_answer_tokens=answer_tokens)
        return {"loss": loss, "hidden_loss": loss.detach()}

    seen = []
    optimize(
        model,
        batches(),
        micro_step,
        LoopSettings(max_steps=3, lr=1e-2, progress_bar=False),
        device="cpu",
        dtype=torch.float32,
        on_step=lambda step, metrics, *rest: seen.append(metrics),
        extra_parameters=extra.parameters(),
    )
    assert not torch.equal(extra.projection.weight, before)
    assert len(seen) == 3 and all(math.isfinite(m["hidden_loss"]) for m in seen)


def test_build_loss_ignores_the_hidden_keys():
    from firstsight.losses.build import build_loss
    from firstsight.losses.kd import JSD, NoKD

    cfg = compose(["distill_loss=jsd", "distill_loss.hidden_weight=0.5", "distill_loss.hidden_loss=cosine"])
    assert isinstance(build_loss(cfg.distill_loss), JSD)
    assert isinstance(build_loss(compose(["distill_loss=none"]).distill_loss), NoKD)


def _fake_model(width, layers):
    from types import SimpleNamespace

    text = SimpleNamespace(hidden_size=width, num_hidden_layers=layers)
    return SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text))


def test_by_default_there_is_no_hidden_term_and_a_weight_alone_compares_the_last_states_by_mse():
    """The defaults train without the term (build_hidden_loss gives none); setting only its weight
    adds one MSE term between the two models' last hidden states, through a student-to-teacher
    projection."""
    from firstsight.tasks.distill import build_hidden_loss

    student, teacher = _fake_model(8, 2), _fake_model(12, 4)
    assert build_hidden_loss(compose([]), student, teacher, "cpu") is None
    hidden = build_hidden_loss(compose(["distill_loss.hidden_weight=0.5"]), student, teacher, "cpu")
    assert hidden.pairs == [(2, 4)]  # outputs.hidden_states[-1] of each: the final-norm states
    (term,) = hidden.losses
    assert term.kind == "mse" and tuple(term.projection.weight.shape) == (12, 8)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["distill_loss.hidden_weight=-0.1"], "distill_loss.hidden_weight=-0.1"),
        (["distill_loss.hidden_weight=nan"], "distill_loss.hidden_weight=nan"),
        (["distill_loss.hidden_loss=l1"], "distill_loss.hidden_loss='l1'"),
        (["distill_loss.hidden_layers=[]"], "distill_loss.hidden_layers=[]"),
        (["distill_loss.hidden_layers=[3]"], "the student has 2 layers"),
        (["distill_loss=none", "distill_loss.hidden_weight=0.5"], "distill_loss=none does not run the teacher"),
        (["teacher_cache.enabled=true", "distill_loss.hidden_weight=0.5"], "teacher_cache.enabled=true"),
    ],
)
def test_invalid_hidden_settings_are_refused(overrides, fragment):
    cfg = compose(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert fragment in str(err.value)


def test_valid_hidden_settings_pass():
    validate(
        compose(
            ["distill_loss.hidden_weight=0.5", "distill_loss.hidden_loss=cosine", "distill_loss.hidden_layers=[0,1,-1]"]
        )
    )
    validate(compose(["distill_loss=none", "distill_loss.hidden_loss=cosine"]))  # weight 0: off, no teacher needed


# ----------------------------------------------------------------------------- end to end


def _kd_step_batch(tiny_parts, size=3):
    from firstsight.data.batching import QACollator

    train = tiny_parts.split("train")
    batch = QACollator(tiny_parts.processor)([train[i] for i in range(size)])
    return batch, count_answer_tokens(batch["labels"])


def test_the_kd_step_adds_the_weighted_hidden_term_on_both_models_hidden_states(tiny_parts):
    """KDStep's loss is the KD loss plus hidden_weight times the hidden-state term, taken between
    the student's and the teacher's hidden states of the same inputs, over the answer tokens of the
    whole step; the term is logged on its own, detached."""
    from firstsight.losses.kd import ForwardKL
    from firstsight.tasks.distill import KDStep, build_hidden_loss, step_inputs

    student, teacher = tiny_parts.model("student", frozen=False), tiny_parts.model("teacher")
    hidden = build_hidden_loss(compose(["distill_loss.hidden_weight=0.25"]), student, teacher, "cpu")
    torch.nn.init.normal_(hidden.losses[0].projection.weight, std=0.1, generator=torch.Generator().manual_seed(0))
    loss_fn = ForwardKL(temperature=2.0, alpha=0.5)
    step = KDStep(student, student, teacher, loss_fn, None, hidden, 0.25, True, True, "cpu")
    batch, answers = _kd_step_batch(tiny_parts)
    metrics = step(batch, 2 * answers)  # as if the step had another micro-batch as large

    inputs, labels = step_inputs(batch, student, True, True)
    s_out = student(**inputs, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(**inputs, output_hidden_states=True)
    kd = loss_fn(s_out.logits, t_out.logits, labels, num_answer_tokens=2 * answers)
    term = hidden(s_out.hidden_states, t_out.hidden_states, batch["labels"], num_answer_tokens=2 * answers)
    assert float(term.detach()) > 1e-3  # a term that changes the loss
    assert float(metrics["hidden_loss"]) == pytest.approx(float(term), rel=1e-5)
    assert not metrics["hidden_loss"].requires_grad
    assert float(metrics["loss"]) == pytest.approx(float(kd.loss + 0.25 * term), rel=1e-5)
    assert float(metrics["kd_loss"]) == pytest.approx(float(kd.kd_loss), rel=1e-5)
    assert float(metrics["ce_loss"]) == pytest.approx(float(kd.ce_loss), rel=1e-5)
    metrics["loss"].backward()  # the term's projection trains with the student
    assert hidden.losses[0].projection.weight.grad is not None


def test_without_a_hidden_term_the_models_are_not_asked_for_hidden_states(tiny_parts):
    """No hidden term: neither forward is asked for its hidden states (a copy of every layer's
    activations), and the teacher runs outside the student's autocast, in its own dtype."""
    from firstsight.losses.kd import ForwardKL
    from firstsight.tasks.distill import KDStep

    student, teacher = tiny_parts.model("student", frozen=False), tiny_parts.model("teacher")
    seen = {}

    def spy(name, model):
        def forward(**kwargs):
            seen[name] = (kwargs, torch.is_autocast_enabled("cpu"))
            return model(**kwargs)

        return forward

    batch, answers = _kd_step_batch(tiny_parts)
    plain = KDStep(
        student, spy("student", student), spy("teacher", teacher), ForwardKL(), None, None, 0.0, True, True, "cpu"
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        metrics = plain(batch, answers)
    assert set(metrics) == {"loss", "kd_loss", "ce_loss"}
    for name in ("student", "teacher"):
        kwargs, _ = seen[name]
        assert "output_hidden_states" not in kwargs and kwargs["use_cache"] is False
    assert seen["student"][1] and not seen["teacher"][1]  # autocast for the trained student only


def test_step_inputs_share_the_host_positions_and_keep_only_the_answer_logits(tiny_parts):
    """step_inputs: no KV cache; with host positions, the M-RoPE positions computed from the model
    (the ones the model computes itself); with answer positions only, logits_to_keep and the labels
    sliced to match. KDStep passes its settings through to it."""
    from firstsight.losses.kd import ForwardKL, answer_logit_slice
    from firstsight.models.positions import mrope_positions
    from firstsight.tasks.distill import KDStep, step_inputs

    student = tiny_parts.model("student")
    batch, answers = _kd_step_batch(tiny_parts)
    inputs, labels = step_inputs(batch, student, True, False)
    assert inputs["use_cache"] is False and labels is batch["labels"] and "logits_to_keep" not in inputs
    assert torch.equal(inputs["position_ids"], mrope_positions(student, batch))
    own, sliced = step_inputs(batch, student, False, True)
    keep, expected = answer_logit_slice(batch["labels"])
    assert "position_ids" not in own and torch.equal(sliced, expected)
    assert torch.equal(torch.as_tensor(own["logits_to_keep"]), torch.as_tensor(keep))
    with torch.no_grad():
        assert torch.equal(student(**inputs).logits, student(**step_inputs(batch, student, False, False)[0]).logits)

    seen = []

    def spy(**kwargs):
        seen.append(kwargs)
        return student(**kwargs)

    with torch.no_grad():
        for share, answer_only in [(True, False), (False, True)]:
            KDStep(student, spy, student, ForwardKL(), None, None, 0.0, share, answer_only, "cpu")(batch, answers)
    assert "position_ids" in seen[0] and "logits_to_keep" not in seen[0]
    assert "position_ids" not in seen[1] and "logits_to_keep" in seen[1]


def test_the_control_without_a_teacher_never_runs_it(tiny_parts):
    """distill_loss=none: the step takes the student's own detached logits as the 'teacher', so the
    KD part is zero and the teacher is never called."""
    from firstsight.losses.kd import NoKD
    from firstsight.tasks.distill import KDStep

    student = tiny_parts.model("student", frozen=False)

    def teacher(**kwargs):
        raise AssertionError("the control ran the teacher")

    batch, answers = _kd_step_batch(tiny_parts)
    metrics = KDStep(student, student, teacher, NoKD(alpha=0.0), None, None, 0.0, True, True, "cpu")(batch, answers)
    assert float(metrics["kd_loss"]) == 0.0 and float(metrics["loss"]) == pytest.approx(float(metrics["ce_loss"]))
