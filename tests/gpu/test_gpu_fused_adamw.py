"""train.fused_optimizer on a GPU (firstsight/training/loop.py): torch's fused AdamW kernel, which the
loop takes on CUDA by default, takes the same steps as the plain AdamW it replaces, through the
loop's schedule (warm-up, cosine decay), gradient clipping and weight decay. fp32, so that the
only difference is the kernel's order of operations: parameters agree within 1e-5 (absolute; each
parameter moved by at least 1e-3 over the steps) and the losses within 1e-5 (relative)."""

from __future__ import annotations

import pytest
import torch
from gpu_support import GPU_MARKS, release_cuda

pytestmark = GPU_MARKS

VOCAB, WIDTH, LENGTH, STEPS = 97, 64, 12, 5


@pytest.fixture(autouse=True)
def _released():
    yield
    release_cuda()


class _Student(torch.nn.Module):
    """Embedding, a norm, an MLP and a head: tensors of several shapes, with and without decay-worthy sizes."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.up = torch.nn.Linear(WIDTH, 4 * WIDTH)
        self.down = torch.nn.Linear(4 * WIDTH, WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids, **_):
        x = self.embed(input_ids)
        x = x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return self.head(x)


def _batches():
    g = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        input_ids = torch.randint(0, VOCAB, (4, LENGTH), generator=g)
        labels = torch.full_like(input_ids, -100)
        labels[:, LENGTH // 2 :] = input_ids[:, LENGTH // 2 :]
        yield {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


def _train(fused, monkeypatch):
    """STEPS optimizer steps of KD against a fixed teacher on CUDA in fp32; the trained parameters,
    the starting ones, the per-step metrics and the optimizer the loop built."""
    import firstsight.training.loop as loop
    from firstsight.losses.kd import ForwardKL
    from firstsight.training.loop import LoopSettings, optimize

    torch.manual_seed(0)
    student = _Student().cuda()
    torch.manual_seed(1)
    teacher = _Student().cuda().requires_grad_(False)
    start = {name: p.detach().clone() for name, p in student.named_parameters()}
    loss_fn = ForwardKL(temperature=2.0, alpha=0.5)

    def micro_step(batch, answer_tokens):
        out = loss_fn(student(batch["input_ids"]), teacher(batch["input_ids"]), batch["labels"], answer_tokens)
        return {"loss": out.loss, "kd_loss": out.kd_loss, "ce_loss": out.ce_loss}

    built = []
    original = loop._optimizer

    def keeping(*args):  # the loop's own optimizer, kept to check which kind it built
        built.append(original(*args))
        return built[-1]

    monkeypatch.setattr(loop, "_optimizer", keeping)
    seen = []
    optimize(
        student,
        _batches(),
        micro_step,
        LoopSettings(
            max_steps=STEPS,
            lr=3e-2,
            weight_decay=0.1,
            warmup_steps=2,
            max_grad_norm=1.0,
            progress_bar=False,
            fused_optimizer=fused,
        ),
        device="cuda",
        dtype=torch.float32,
        on_step=lambda step, metrics, *rest: seen.append(metrics),
    )
    trained = {name: p.detach().clone() for name, p in student.named_parameters()}
    return trained, start, seen, built[0]


def test_fused_adamw_takes_the_plain_adamws_steps(monkeypatch):
    fused, start, fused_metrics, fused_optimizer = _train(True, monkeypatch)
    plain, start_plain, plain_metrics, plain_optimizer = _train(False, monkeypatch)
    assert fused_optimizer.defaults.get("fused") is True, "train.fused_optimizer on CUDA did not build a fused AdamW"
    assert not plain_optimizer.defaults.get("fused"), "the plain run built a fused AdamW"
    assert all(torch.equal(start[name], start_plain[name]) for name in start)  # one starting point
    assert len(fused_metrics) == len(plain_metrics) == STEPS
    for step, (a, b) in enumerate(zip(fused_metrics, plain_metrics), 1):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), f"step {step}: {key} {a[key]} vs {b[key]}"
    assert any(m["grad_norm"] > 1.0 for m in plain_metrics), "no step's gradients were clipped (max_grad_norm 1.0)"
    for name in fused:
        moved = float((plain[name] - start[name]).abs().max())
        assert moved > 1e-3, f"{name} moved only {moved:.2g}: the comparison would be vacuous"
        diff = float((fused[name] - plain[name]).abs().max())
        assert diff <= 1e-5, f"{name}: fused AdamW differs from plain AdamW by {diff:.3g} after {STEPS} steps"
