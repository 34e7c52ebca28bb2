"""The distillation step's speed options compute what the naive step computes.

- train.logits=answer_positions: the output heads run only where a loss is taken
  (losses.answer_logit_slice + the models' logits_to_keep); the loss, its gradient and a whole
  job's loss curve equal those of the full [B, L, V] logits (train.logits=all_positions).
- precision.trainable_dtype=bfloat16: pure bf16 training (student weights, gradients and AdamW
  states in bf16); float16 is refused before anything loads.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose

from firstsight.losses.kd import IGNORE_INDEX, JSD, ForwardKL, ReverseKL, answer_logit_slice

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ragged_batch(seed: int = 0, batch: int = 3, length: int = 12, vocab: int = 17, teacher_vocab: int = 19):
    """Logits and labels whose answer spans differ per row (as right-padded batches of different
    prompt lengths have them), one row without any answer token."""
    g = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(batch, length, teacher_vocab, generator=g, dtype=torch.float64)
    labels = torch.full((batch, length), IGNORE_INDEX)
    labels[0, 5:9] = torch.randint(0, vocab, (4,), generator=g)
    labels[1, 2:4] = torch.randint(0, vocab, (2,), generator=g)
    labels[1, 10] = 3
    return student, teacher, labels  # row 2: no answer


def test_the_slice_keeps_exactly_the_predicting_positions():
    _, _, labels = ragged_batch()
    keep, kept = answer_logit_slice(labels)
    # label positions 2,3,5,6,7,8,10 are predicted from positions 1,2,4,5,6,7,9; then one spare (10)
    assert keep.tolist() == [1, 2, 4, 5, 6, 7, 9, 10]
    assert kept.shape == (3, 8)
    assert (kept[:, 0] == IGNORE_INDEX).all()
    for j, position in enumerate(keep[:-1].tolist()):
        assert torch.equal(kept[:, j + 1], labels[:, position + 1])
    # the answer tokens, in the same (row, position) order as the full labels give them
    assert torch.equal(kept[:, 1:][kept[:, 1:] != IGNORE_INDEX], labels[:, 1:][labels[:, 1:] != IGNORE_INDEX])


def test_no_answer_token_keeps_one_position():
    labels = torch.full((2, 6), IGNORE_INDEX)
    keep, kept = answer_logit_slice(labels)
    assert keep.tolist() == [5] and kept.shape == (2, 1) and (kept == IGNORE_INDEX).all()


@pytest.mark.parametrize(
    "loss_fn",
    [ForwardKL(temperature=2.0, alpha=0.3), ReverseKL(alpha=0.7), JSD(beta=0.2, alpha=1.0)],
    ids=["forward_kl", "reverse_kl", "jsd"],
)
def test_loss_and_gradient_on_kept_positions_equal_the_full_ones(loss_fn):
    student, teacher, labels = ragged_batch()
    full_logits = student.clone().requires_grad_()
    full = loss_fn(full_logits, teacher, labels)
    full.loss.backward()

    keep, kept = answer_logit_slice(labels)
    sliced_logits = student.clone().requires_grad_()
    sliced = loss_fn(sliced_logits[:, keep], teacher[:, keep], kept, num_answer_tokens=full.num_tokens)
    sliced.loss.backward()

    assert sliced.num_tokens == full.num_tokens == 7
    for name in ("loss", "kd_loss", "ce_loss"):
        assert torch.allclose(getattr(sliced, name), getattr(full, name), rtol=0, atol=1e-12), name
    assert torch.allclose(sliced_logits.grad, full_logits.grad, rtol=0, atol=1e-12)
    assert full_logits.grad.abs().sum() > 0  # the comparison is not between two zero gradients


def test_adamw_8bit_keeps_8_bit_moments_and_steps_as_adamw_does():
    """train.optimizer=adamw_8bit: bitsandbytes' AdamW8bit. Its moments are uint8 for tensors of
    4096+ elements, and its first step is Adam's (lr * g / |g| after bias correction) up to the
    8-bit quantization of the moments."""
    from firstsight.training.loop import LoopSettings, _optimizer

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 128, generator=g), torch.randn(8, generator=g)]
    grads = [torch.randn(t.shape, generator=g) for t in start]
    moved = {}
    for name in ("adamw", "adamw_8bit"):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = _optimizer(params, LoopSettings(max_steps=1, lr=1e-2, weight_decay=0.0, optimizer=name), "cpu")
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        optimizer.step()
        moved[name] = [p.detach() - t for p, t in zip(params, start)]
        if name == "adamw_8bit":
            assert type(optimizer).__name__ == "AdamW8bit"
            assert optimizer.state[params[0]]["state1"].dtype == torch.uint8  # 8-bit first moment
            assert optimizer.state[params[1]]["state1"].dtype == torch.float32  # small tensors: 32-bit
    for exact, approx in zip(moved["adamw"], moved["adamw_8bit"]):
        assert exact.abs().max() == pytest.approx(1e-2, rel=1e-3)  # Adam's first step: lr * sign(g)
        assert (approx - exact).abs().max() < 1e-3  # within 10 % of the step


def test_unknown_optimizer_and_fsdp_with_8_bit_moments_are_refused():
    from conftest import compose

    from firstsight.core.errors import ConfigError
    from firstsight.suite.validate import validate

    with pytest.raises(ConfigError, match="train.optimizer='sgd'.*adamw, adamw_8bit"):
        validate(compose(["train.optimizer=sgd"]))
    with pytest.raises(ConfigError, match="train.optimizer=adamw"):
        validate(compose(["hardware.data_parallel=fsdp", "train.optimizer=adamw_8bit"]))


class _Block(torch.nn.Module):
    """A decoder-layer-like block: norm, MLP with an elementwise activation, residual."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(self.norm(x))) * torch.sigmoid(x.sum(-1, keepdim=True)))


class _Stack(torch.nn.Module):
    _no_split_modules = ["_Block"]

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


def _saved_bytes_and_grads(budget: float):
    """A compiled stack's forward + backward under hardware.compile_memory_budget=`budget`: the
    bytes its compiled blocks keep for the backward, and the weights' gradients."""
    from firstsight.models.loading import compile_blocks

    torch._dynamo.reset()  # a fresh compile reads the budget again
    torch.manual_seed(0)
    model = _Stack()
    assert compile_blocks(model, budget) == 2
    x = torch.randn(8, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x)
    loss.backward()
    return sum(saved), [p.grad.clone() for p in model.parameters()]


def test_a_compile_memory_budget_keeps_fewer_activations_and_gives_the_same_gradients():
    """hardware.compile_memory_budget < 1: the compiled blocks keep fewer activations for the
    backward and recompute the rest; the gradients are the same."""
    import torch._functorch.config as functorch_config

    try:
        kept_all, grads_all = _saved_bytes_and_grads(1.0)
        kept_some, grads_some = _saved_bytes_and_grads(0.1)
    finally:
        functorch_config.activation_memory_budget = 1.0
        torch._dynamo.reset()
    assert 0 < kept_some < kept_all
    for a, b in zip(grads_all, grads_some):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_cpp_wrapper_launches_the_compiled_blocks_kernels_from_cpp_with_the_same_gradients():
    """hardware.compile_cpp_wrapper: every graph inductor writes for the blocks (forwards and
    backwards) has a C++ launcher and no Python one (inductor's Python launcher is a `def call(`;
    by default on the CPU it is there, so the check can tell them apart), and the gradients are
    the eager stack's."""
    from torch._inductor.utils import run_and_get_code

    from firstsight.models.loading import compile_blocks

    torch.manual_seed(0)
    eager = _Stack()
    x = torch.randn(8, 64)
    eager(x).backward()
    for cpp_wrapper in (None, True):  # None: on CUDA only, so the Python launcher here
        torch._dynamo.reset()
        model = _Stack()
        model.load_state_dict(eager.state_dict())
        compile_blocks(model, cpp_wrapper=cpp_wrapper)
        _, codes = run_and_get_code(lambda: model(x).backward())
        assert len(codes) >= 2  # a forward and a backward at least
        python_launchers = sum("def call(" in code for code in codes)
        assert python_launchers == (0 if cpp_wrapper else len(codes)), (cpp_wrapper, python_launchers, len(codes))
        for a, b in zip(eager.parameters(), model.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_a_compile_memory_budget_out_of_range_or_without_compile_is_refused():
    from conftest import compose

    from firstsight.core.errors import ConfigError
    from firstsight.suite.validate import validate

    with pytest.raises(ConfigError, match=r"hardware.compile_memory_budget=0.0.*\(0, 1\]"):
        validate(compose(["hardware.compile=true", "hardware.compile_memory_budget=0"]))
    with pytest.raises(ConfigError, match="hardware.compile_memory_budget=0.5.*hardware.compile=true"):
        validate(compose(["hardware.compile_memory_budget=0.5"]))
    validate(compose(["hardware.compile=true", "hardware.compile_memory_budget=0.5"]))


def test_batches_padded_to_a_multiple_are_masked_and_unlabelled_beyond_the_longest_sample(cache_dir):
    from firstsight.data import load_split
    from firstsight.data.batching import IGNORE_INDEX, QACollator
    from firstsight.models.loading import load_processor

    cfg = compose()
    processor = load_processor(cfg.model, cfg.cache_dir)
    samples = [load_split(cfg.data, "train", cfg.seed)[i] for i in range(3)]
    plain = QACollator(processor)(samples)
    padded = QACollator(processor, pad_to_multiple_of=64)(samples)
    length = plain["input_ids"].shape[1]
    assert length % 64 and padded["input_ids"].shape[1] == -(-length // 64) * 64  # rounded up, not more
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        assert torch.equal(padded[key][:, :length], plain[key]), key  # the longest sample's span is unchanged
    assert not padded["attention_mask"][:, length:].any() and (padded["labels"][:, length:] == IGNORE_INDEX).all()
    assert torch.equal(padded["pixel_values"], plain["pixel_values"])
