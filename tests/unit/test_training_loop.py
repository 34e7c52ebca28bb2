"""The optimisation loop (firstsight.training.loop.optimize) on tiny models whose answers are known:
gradient accumulation gives what one large batch gives, the learning-rate schedule and the `lr`
it logs, and gradient clipping (`grad_norm` is the norm before clipping; the update is the clipped
gradient's). One short in-process distillation checks the same through task=distill."""

from __future__ import annotations

import contextlib
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


# ----------------------------------------------------------------------------- the helpers of a step


def test_model_inputs_are_the_batch_without_labels_sample_index_and_the_teachers_own_inputs():
    from firstsight.training.loop import model_inputs

    batch = {"input_ids": 1, "attention_mask": 2, "pixel_values": 3, "labels": 4, "sample_index": 5, "teacher": {}}
    assert model_inputs(batch) == {"input_ids": 1, "attention_mask": 2, "pixel_values": 3}


class _Movable:
    """A batch value with a `to` that records how it was moved."""

    def __init__(self):
        self.moves = []

    def to(self, device, **kwargs):
        self.moves.append((device, kwargs))
        return f"on {device}"


def test_to_device_moves_what_can_move_without_blocking_and_keeps_the_rest():
    from firstsight.training.loop import to_device

    movable, nested = _Movable(), _Movable()
    batch = {"a": movable, "t": torch.ones(2), "n": 3, "s": "text", "teacher": {"b": nested, "m": 4}}
    moved = to_device(batch, "meta")
    assert moved["a"] == "on meta" and movable.moves == [("meta", {"non_blocking": True})]
    assert moved["t"].device.type == "meta"
    assert moved["n"] == 3 and moved["s"] == "text"
    # a nested batch (a teacher's own inputs) is moved too
    assert moved["teacher"] == {"b": "on meta", "m": 4} and nested.moves == [("meta", {"non_blocking": True})]


def test_autocast_runs_at_the_run_dtype_and_not_at_all_for_float32():
    from firstsight.training.loop import autocast

    for dtype in (torch.bfloat16, torch.float16):
        with autocast("cpu", dtype):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
    with autocast("cpu", torch.float32):
        assert not torch.is_autocast_enabled("cpu")


def test_one_decay_step_ends_at_a_tenth():
    """max_steps - warmup_steps = 1: the decay is one step long (not two)."""
    assert _lr_lambda(warmup_steps=0, max_steps=1)(1) == pytest.approx(0.1, rel=1e-12)
    assert _lr_lambda(warmup_steps=3, max_steps=4)(4) == pytest.approx(0.1, rel=1e-12)


def test_the_optimizer_is_fused_only_where_asked_on_cuda_and_not_for_dtensors():
    """fused_optimizer: torch's fused AdamW kernel on CUDA (the flag is all this checks, so the CPU
    tensors here do: torch's fused AdamW also runs on the CPU), never over FSDP's DTensors; lr and
    weight decay are the settings'."""
    from firstsight.training.loop import _Optimization, _optimizer

    class DTensor(torch.nn.Parameter):  # the name is what the loop looks at
        pass

    def settings(**kw):
        return LoopSettings(max_steps=2, lr=0.02, weight_decay=0.3, **kw)

    model = _linear_model()
    fused = _Optimization.of(model, (), settings(fused_optimizer=True), "cuda", torch.float32).optimizer
    assert fused.defaults["fused"] is True
    assert fused.defaults["lr"] == 0.02 and fused.defaults["weight_decay"] == 0.3
    assert not _Optimization.of(model, (), settings(fused_optimizer=True), "cpu", torch.float32).optimizer.defaults[
        "fused"
    ]
    assert not _Optimization.of(model, (), settings(), "cuda", torch.float32).optimizer.defaults["fused"]
    dtensors = [DTensor(torch.zeros(3))]
    assert not _optimizer(dtensors, settings(fused_optimizer=True), "cuda").defaults["fused"]


def test_adamw_8bit_gets_the_settings_weight_decay():
    pytest.importorskip("bitsandbytes")
    from firstsight.training.loop import _optimizer

    params = [torch.nn.Parameter(torch.zeros(8))]
    for weight_decay in (0.0, 0.25):
        optimizer = _optimizer(
            params, LoopSettings(max_steps=1, lr=0.02, weight_decay=weight_decay, optimizer="adamw_8bit"), "cpu"
        )
        assert type(optimizer).__name__ == "AdamW8bit"
        assert optimizer.defaults["weight_decay"] == weight_decay and optimizer.defaults["lr"] == 0.02


# ----------------------------------------------------------------------------- optimize: around the step


class _Checkpointer:
    """Records what optimize restores from and saves; restores `done` steps, is due every step."""

    def __init__(self, done=0):
        self.done, self.restored, self.due_calls, self.saved = done, None, [], []

    def restore(self, optimizer, scheduler, scaler):
        self.restored = (optimizer, scheduler, scaler)
        return self.done

    def due(self, step, last_step):
        self.due_calls.append((step, last_step))
        return True

    def save(self, step, optimizer, scheduler, scaler, position, metrics):
        self.saved.append((step, (optimizer, scheduler, scaler), position, dict(metrics)))
        return f"checkpoint-{step}"


class _Batches:
    """Batches of a list whose position is the number handed out."""

    def __init__(self, batches):
        self.batches, self.taken = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.taken += 1
        return self.batches[self.taken - 1]

    def position(self):
        return {"taken": self.taken}


def _gradient_step(model):
    return lambda batch, tokens: {"loss": (model.weight[0] * batch["c"]).sum()}


def test_a_resumed_loop_starts_after_the_restored_step_and_checkpoints_what_it_restored():
    """The checkpointer restores 2 steps done: steps 3..5 run, each checkpointed (due is asked with
    the step and the last step) with the optimizer, schedule and scaler it restored, the data
    position after the step's batches and the step's metrics."""
    model = _linear_model()
    checkpointer = _Checkpointer(done=2)
    batches = _Batches(_constant_gradient_batches([[1.0, 2.0, 3.0, 4.0]] * 6))
    seen = []
    optimize(
        model,
        batches,
        _gradient_step(model),
        LoopSettings(max_steps=5, lr=0.1, grad_accum_steps=2, progress_bar=False),
        device="cpu",
        dtype=torch.float32,
        on_step=lambda step, metrics, *rest: seen.append((step, dict(metrics))),
        checkpointer=checkpointer,
    )
    assert [step for step, _ in seen] == [3, 4, 5]
    optimizer, scheduler, scaler = checkpointer.restored
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["params"][0] is model.weight
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and isinstance(scaler, torch.amp.GradScaler)
    assert checkpointer.due_calls == [(3, 5), (4, 5), (5, 5)]
    assert [(step, objects, position) for step, objects, position, _ in checkpointer.saved] == [
        (3, checkpointer.restored, {"taken": 2}),
        (4, checkpointer.restored, {"taken": 4}),
        (5, checkpointer.restored, {"taken": 6}),
    ]
    assert [metrics for *_, metrics in checkpointer.saved] == [metrics for _, metrics in seen]


def test_on_step_gets_the_samples_tokens_and_the_step_time_and_the_harness_time_is_counted():
    """Each batch is moved to the run's device; on_step gets samples = rows and tokens =
    attention-mask ones over the step's micro-batches; the returned step_seconds is the sum of
    the step times on_step got, harness_seconds the time spent in on_step (here a 50 ms sleep
    per step)."""
    import time

    model = _linear_model()
    batches = _constant_gradient_batches([[1.0, 0.0, 0.0, 0.0]] * 6)
    for batch in batches:  # 3 rows of 5 positions, 7 of them attended
        batch["labels"] = torch.ones(3, 5, dtype=torch.long)
        batch["attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]])
        batch["probe"] = _Movable()  # records its move to the run's device
    calls = []

    def on_step(step, metrics, seconds, samples, tokens):
        calls.append((seconds, samples, tokens))
        time.sleep(0.05)

    result = optimize(
        model,
        iter(batches),
        _gradient_step(model),
        LoopSettings(max_steps=3, lr=0.1, grad_accum_steps=2, progress_bar=False),
        device="cpu",
        dtype=torch.float32,
        on_step=on_step,
    )
    assert [(samples, tokens) for _, samples, tokens in calls] == [(6, 14)] * 3
    assert [batch["probe"].moves for batch in batches] == [[("cpu", {"non_blocking": True})]] * 6
    assert all(seconds > 0 for seconds, *_ in calls)
    assert result["step_seconds"] == pytest.approx(sum(seconds for seconds, *_ in calls), rel=1e-9, abs=0)
    assert 3 * 0.05 <= result["harness_seconds"] < 3 * 0.05 + 10


def test_gradients_are_freed_after_each_step():
    model = _linear_model()
    grads = []

    def micro_step(batch, tokens):
        grads.append(model.weight.grad)  # what the step before left
        return {"loss": (model.weight[0] * batch["c"]).sum()}

    _run(model, _constant_gradient_batches([[1.0, 2.0, 3.0, 4.0]] * 3), micro_step, max_steps=3, lr=0.1)
    assert grads == [None, None, None] and model.weight.grad is None


class _Bar:
    """Stands in for tqdm: records how the bar is made and moved."""

    made = []

    def __init__(self, **kwargs):
        self.kwargs, self.n, self.postfix, self.closed = kwargs, kwargs.get("initial", 0), [], False
        _Bar.made.append(self)

    def update(self, n):
        self.n += n

    def set_postfix(self, **kwargs):
        self.postfix.append(kwargs)

    def close(self):
        self.closed = True


def test_the_progress_bar_counts_the_steps_from_the_resumed_one(monkeypatch):
    import tqdm.auto

    from firstsight.core.world import Distributed
    from firstsight.training import loop

    monkeypatch.setattr(tqdm.auto, "tqdm", _Bar)
    if hasattr(loop, "tqdm"):
        monkeypatch.setattr(loop, "tqdm", _Bar)
    monkeypatch.setattr(_Bar, "made", [])
    model = _linear_model()
    losses = []

    def run(progress_bar, world=None, done=0):
        optimize(
            model,
            _Batches(_constant_gradient_batches([[1.0, 2.0, 3.0, 4.0]] * 4)),
            _gradient_step(model),
            LoopSettings(max_steps=4, lr=0.1, progress_bar=progress_bar, description="distilling"),
            device="cpu",
            dtype=torch.float32,
            on_step=lambda step, metrics, *rest: losses.append(metrics["loss"]),
            checkpointer=_Checkpointer(done=done),
            world=world,
        )
        return _Bar.made[-1]

    bar = run(True, done=1)
    assert bar.kwargs == {
        "total": 4,
        "initial": 1,
        "desc": "distilling",
        "disable": False,
        "dynamic_ncols": True,
        "leave": True,
    }
    assert bar.n == 4 and bar.closed
    assert bar.postfix == [{"loss": f"{loss:.4f}", "refresh": False} for loss in losses]
    assert run(False).kwargs["disable"] is True
    # a data-parallel process other than rank 0 shows no bar
    assert run(True, world=_TwinWorld(rank=1)).kwargs["disable"] is True
    assert run(True, world=Distributed(rank=0, world_size=1)).kwargs["disable"] is False


# ----------------------------------------------------------------------------- data parallel, stop signals


class _TwinWorld:
    """Two data-parallel processes, the other one a twin of this one: its values in every
    all-reduce are this process's, but for the stop flag (1 once `other_stops`)."""

    def __init__(self, rank=0, other_stops=False):
        self.rank, self.world_size, self.other_stops = rank, 2, other_stops
        self.averaged = []

    is_main = property(lambda self: self.rank == 0)
    active = property(lambda self: True)

    def all_reduce(self, values):
        values = list(values)
        other = list(values)
        if len(values) > 1:  # the step's figures: metrics, samples, tokens, stop flag
            other[-1] = float(self.other_stops)
        return [a + b for a, b in zip(values, other)]

    def average_gradients(self, parameters):
        self.averaged.append(list(parameters))


def _kd_run(world, steps=2, checkpointer=None):
    """A distillation step on `_Student` with a hidden-state-like extra parameter; on_step's records."""
    from firstsight.losses.kd import count_answer_tokens

    student = _Student().double()
    torch.manual_seed(1)
    teacher = _Student().double().requires_grad_(False)
    extra = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64), requires_grad=False)
    loss_fn = ForwardKL(temperature=2.0, alpha=0.5)
    told = []

    def micro_step(batch, answer_tokens):
        told.append((answer_tokens, count_answer_tokens(batch["labels"])))
        out = loss_fn(student(batch["input_ids"]), teacher(batch["input_ids"]), batch["labels"], answer_tokens)
        return {"loss": out.loss + 0.0 * extra, "kd_loss": out.kd_loss, "ce_loss": out.ce_loss}

    seen = []
    optimize(
        student,
        _Batches([m for group in _samples(steps) for m in _split(group, 2)]),
        micro_step,
        LoopSettings(max_steps=steps, lr=0.05, grad_accum_steps=2, progress_bar=False),
        device="cpu",
        dtype=torch.float32,
        on_step=lambda step, metrics, seconds, samples, tokens: seen.append((step, dict(metrics), samples, tokens)),
        extra_parameters=[extra, frozen],
        checkpointer=checkpointer,
        world=world,
    )
    return seen, told, extra, [p.detach().clone() for p in student.parameters()]


def test_two_twin_processes_report_what_one_process_with_both_batches_reports(monkeypatch):
    """A data-parallel step: each process normalises by the global answer-token count (both
    processes' tokens) and scales its loss by world_size, so with DDP's average of gradients it
    steps as one process would; the metrics, samples and tokens on_step gets are summed over the
    processes, but for grad_norm and lr (one value for all). The extra parameters that need a
    gradient are averaged by hand. No process asked to stop: no stop is left requested."""
    from firstsight.core.signals import STOP
    from firstsight.core.world import SINGLE

    monkeypatch.setattr(STOP, "requested", None)
    world = _TwinWorld()
    alone, alone_told, _, _ = _kd_run(SINGLE)
    twins, twins_told, extra, _ = _kd_run(world)
    assert [tokens for tokens, _ in twins_told] == [2 * tokens for tokens, _ in alone_told]
    for (step, a, samples, tokens), (twin_step, t, twin_samples, twin_tokens) in zip(alone, twins):
        assert twin_step == step and (twin_samples, twin_tokens) == (2 * samples, 2 * tokens)
        assert set(t) == set(a) == {"loss", "kd_loss", "ce_loss", "grad_norm", "lr"}
        for key in ("loss", "kd_loss", "ce_loss"):  # each process's half, summed
            assert t[key] == pytest.approx(a[key], rel=1e-9), key
        # the twin's gradient is twice its half (no real average here): the norm of the whole batch's
        assert t["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-9)
        assert t["lr"] == a["lr"]
    assert len(world.averaged) == 2 and all(params == [extra] for params in world.averaged)
    assert STOP.requested is None


def test_a_stop_requested_by_another_process_ends_the_job_after_this_steps_checkpoint(monkeypatch):
    import signal

    from firstsight.core.signals import STOP, Preempted

    monkeypatch.setattr(STOP, "requested", None)
    checkpointer = _Checkpointer()
    with pytest.raises(Preempted) as stopped:
        _kd_run(_TwinWorld(other_stops=True), steps=3, checkpointer=checkpointer)
    assert (stopped.value.signum, stopped.value.step, stopped.value.checkpoint) == (signal.SIGTERM, 1, "checkpoint-1")
    assert [step for step, *_ in checkpointer.saved] == [1]
    assert STOP.requested is None


def test_a_stop_whose_previous_handler_returns_goes_on_alone_and_ends_a_data_parallel_job(monkeypatch):
    """SIGUSR2 during step 2, whose previous handler returns (submitit's SIGTERM bypass does):
    one process trains on; in a data-parallel job every process must stop together, so it ends
    after step 2's checkpoint."""
    import signal

    from firstsight.core.signals import STOP, Preempted
    from firstsight.core.world import SINGLE

    passed_on = []
    monkeypatch.setattr(STOP, "requested", None)
    monkeypatch.setitem(STOP._previous, signal.SIGUSR2, lambda signum, frame: passed_on.append(signum))

    def run(world):
        model = _linear_model()

        def micro_step(batch, tokens):
            if batch["step"] == 2:
                STOP.requested = signal.SIGUSR2
            return {"loss": (model.weight[0] * batch["c"]).sum()}

        batches = _constant_gradient_batches([[1.0, 2.0, 3.0, 4.0]] * 3)
        for step, batch in enumerate(batches, start=1):
            batch["step"] = step
        seen = []
        checkpointer = _Checkpointer()
        try:
            optimize(
                model,
                _Batches(batches),
                micro_step,
                LoopSettings(max_steps=3, lr=0.1, progress_bar=False),
                device="cpu",
                dtype=torch.float32,
                on_step=lambda step, *rest: seen.append(step),
                checkpointer=checkpointer,
                world=world,
            )
        finally:
            STOP.requested = None
        return seen

    assert run(SINGLE) == [1, 2, 3] and passed_on == [signal.SIGUSR2]
    with pytest.raises(Preempted) as stopped:
        run(_TwinWorld())
    assert (stopped.value.signum, stopped.value.step, stopped.value.checkpoint) == (signal.SIGUSR2, 2, "checkpoint-2")
    assert passed_on == [signal.SIGUSR2] * 2


# ----------------------------------------------------------------------------- mixed precision, DDP's no_sync


class _SyncedLinear(torch.nn.Module):
    """A linear map with DDP's no_sync (records whether each forward ran inside it) that also
    records whether autocast was on, and at which dtype."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, 4))
        self.in_no_sync = False
        self.calls = []

    @contextlib.contextmanager
    def no_sync(self):
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False

    def micro_step(self, batch, tokens):
        autocast_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self.calls.append((self.in_no_sync, autocast_dtype))
        return {"loss": (self.weight[0] * batch["c"]).sum() * batch.get("scale", 1.0)}


def _synced_run(dtype, gradients, grad_accum_steps=1, checkpointer=None):
    model = _SyncedLinear()
    optimize(
        model,
        _Batches(_constant_gradient_batches(gradients)),
        model.micro_step,
        LoopSettings(
            max_steps=len(gradients) // grad_accum_steps, lr=0.1, grad_accum_steps=grad_accum_steps, progress_bar=False
        ),
        device="cpu",
        dtype=dtype,
        on_step=lambda *args: None,
        checkpointer=checkpointer,
    )
    return model


def test_micro_batches_but_the_last_of_a_step_skip_ddps_gradient_sync():
    model = _synced_run(torch.float32, [[1.0, 2.0, 3.0, 4.0]] * 6, grad_accum_steps=3)
    assert [in_no_sync for in_no_sync, _ in model.calls] == [True, True, False] * 2


def test_the_forward_runs_under_autocast_at_the_run_dtype():
    for dtype, expected in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, None)):
        model = _synced_run(dtype, [[1.0, 2.0, 3.0, 4.0]] * 2)
        assert [autocast_dtype for _, autocast_dtype in model.calls] == [expected] * 2, dtype


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
def test_float16_scales_the_loss_and_skips_a_step_whose_gradients_overflow():
    """fp16 (only): a GradScaler on the run's device; a step with an inf gradient leaves the
    weights as they were and lowers the scale, the next step trains."""
    for dtype in (torch.float32, torch.bfloat16):
        checkpointer = _Checkpointer()
        _synced_run(dtype, [[1.0, 2.0, 3.0, 4.0]], checkpointer=checkpointer)
        assert not checkpointer.restored[2].is_enabled(), dtype
    checkpointer = _Checkpointer()
    model = _SyncedLinear()
    batches = _constant_gradient_batches([[1.0, float("inf"), 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    weights = []
    optimize(
        model,
        _Batches(batches),
        model.micro_step,
        LoopSettings(max_steps=2, lr=0.1, max_grad_norm=0.0, progress_bar=False),
        device="cpu",
        dtype=torch.float16,
        on_step=lambda *args: weights.append(model.weight.detach().clone()),
        checkpointer=checkpointer,
    )
    scaler = checkpointer.restored[2]
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**15  # 2**16 halved once
    assert torch.equal(weights[0], torch.zeros(1, 4))  # the overflowing step was skipped
    assert (weights[1] != 0).all()  # the next one was not


# ----------------------------------------------------------------------------- answer accuracy


class _Predictor(torch.nn.Module):
    """A model whose logits at position p pick batch["predicted"][:, p] (the token it predicts for
    p + 1), for the positions `logits_to_keep` names; records its mode and autocast."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, input_ids, attention_mask, predicted, logits_to_keep, probe):
        assert probe == "on cpu"  # moved to the device
        autocast_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self.calls.append((self.training, torch.is_grad_enabled(), autocast_dtype))
        logits = torch.nn.functional.one_hot(predicted[:, logits_to_keep], VOCAB).float() * self.weight
        return type("Output", (), {"logits": logits})()


def _answer_batch(answers, predicted):
    """Rows of LENGTH tokens whose last len(answer) positions are the answer (labelled); the model
    predicts `predicted` (a full row: position p predicts token p + 1)."""
    rows = len(answers)
    input_ids = torch.zeros(rows, LENGTH, dtype=torch.long)
    labels = torch.full((rows, LENGTH), IGNORE_INDEX)
    for row, answer in enumerate(answers):
        input_ids[row, LENGTH - len(answer) :] = torch.tensor(answer)
        labels[row, LENGTH - len(answer) :] = torch.tensor(answer)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "sample_index": torch.arange(rows),
        "predicted": torch.tensor(predicted),
        "probe": _Movable(),
    }


def test_an_answer_counts_only_if_every_answer_token_is_predicted():
    """Right: the argmax at each position before an answer token is that token (whatever is
    predicted elsewhere); one wrong answer token, or the closing one, makes the answer wrong.
    The model is evaluated in eval mode without gradients, under the run's autocast, and left in
    the mode it was in; the accuracy is the share of right answers."""
    from firstsight.training.loop import answer_accuracy, answer_outcomes

    junk = [5] * (LENGTH - 4)
    first = _answer_batch(
        [[3, 4, 2], [3, 4, 2], [7, 2], [7, 2]],
        [
            junk + [3, 4, 2, 9],  # right: the positions before 3, 4, 2 predict them
            junk + [3, 8, 2, 9],  # wrong: 8 for 4
            junk + [9, 7, 2, 9],  # right (a shorter answer; 9 where it has no label)
            junk + [9, 7, 1, 9],  # wrong: the closing token
        ],
    )
    second = _answer_batch([[6, 2]], [[1] * (LENGTH - 3) + [6, 2, 4]])  # right; the last prediction is no answer's
    model = _Predictor()
    model.train()
    assert answer_outcomes(model, iter([first, second]), "cpu", torch.float32) == [True, False, True, False, True]
    assert model.training and model.calls == [(False, False, None)] * 2
    model.eval()
    assert answer_accuracy(model, iter([first, second]), "cpu", torch.float16) == pytest.approx(3 / 5)
    assert not model.training and model.calls[2:] == [(False, False, torch.float16)] * 2
    assert answer_accuracy(model, iter([second]), "cpu", torch.float32) == 1.0
    assert answer_accuracy(model, iter([]), "cpu", torch.float32) == 0.0
