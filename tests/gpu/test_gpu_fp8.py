"""precision=fp8 on a GPU (torchao float8, firstsight/models/loading.py quantize_after_loading): every
Linear of the vision tower, merger and language model holds float8 e4m3 weights and multiplies in
float8 (torch._scaled_mm), lm_head stays bf16, and the trained tiny teacher's logits track bf16's.

Tolerance (the fp8 counterpart of tests/unit/test_torchao_quantization.py's int8 check, which allows a
relative logit error of 0.05): relative error of the logits over the prompt and answer tokens
||fp8 - bf16|| / ||bf16|| < FP8_LOGIT_RTOL, and the greedy pick at the answer positions the same
as bf16's at >= FP8_ARGMAX_AGREEMENT of them. e4m3 keeps 3 mantissa bits (a relative rounding
step of 1/8 against bf16's 1/128) and quantizes the activations too, so fp8 is allowed three
times int8 weight-only's error; a broken float8 path (a wrong scale, a dropped quantization) is off
by O(1). The answer positions include the multiple-choice letter, which the tiny teacher picks
with small margins at times: near-ties there may flip, hence the agreement below 1.
Skipped, with the reason, on GPUs below compute capability 8.9 (no float8 matmuls)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose
from gpu_support import GPU_MARKS, release_cuda

from firstsight.config.specs import model_spec

FP8_LOGIT_RTOL = 0.15
FP8_ARGMAX_AGREEMENT = 0.85


def _float8_inside(tensor):
    """Whether a (torchao tensor-subclass) weight stores float8 e4m3 data, at any depth of nesting."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(tensor):
        return tensor.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
    names, _ = tensor.__tensor_flatten__()
    return any(_float8_inside(getattr(tensor, name)) for name in names)


def _fp8_capable():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _capability():
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    return f"{major}.{minor}"


pytestmark = [
    *GPU_MARKS,
    pytest.mark.skipif(
        torch.cuda.is_available() and not _fp8_capable(),
        reason=f"fp8 needs a GPU of compute capability >= 8.9 (Ada, Hopper); this one is {_capability()}",
    ),
]


@pytest.fixture(autouse=True)
def _released():
    yield
    release_cuda()


def _teacher(precision):
    from firstsight.models.loading import load_model, load_processor
    from firstsight.suite.validate import validate

    cfg = compose(["task=profile", "task.target=teacher", "hardware=gpu", f"precision={precision}"])
    validate(cfg)  # fp8 on this GPU passes the suite's own capability check
    processor = load_processor(cfg.model, cfg.cache_dir)
    return load_model(model_spec(cfg), "teacher", processor, "cuda", frozen=True), processor, cfg


def test_fp8_logits_track_bf16(cache_dir):
    from firstsight.data import load_split
    from firstsight.data.batching import QACollator
    from firstsight.losses.kd import IGNORE_INDEX
    from firstsight.training.loop import model_inputs, to_device

    bf16, processor, cfg = _teacher("bf16")
    fp8, _, _ = _teacher("fp8")

    linears = {name: m for name, m in fp8.model.named_modules() if isinstance(m, torch.nn.Linear)}
    float8 = {name for name, m in linears.items() if _float8_inside(m.weight)}
    assert set(linears) - float8 == {"lm_head"}, f"Linear layers left unquantized: {sorted(set(linears) - float8)}"
    assert {name.split(".")[1] for name in float8} == {"visual", "language_model"}
    assert type(fp8.model.lm_head.weight) is torch.nn.Parameter and fp8.model.lm_head.weight.dtype == torch.bfloat16
    assert fp8.weights_gb < bf16.weights_gb, "float8 weights take no less memory than bf16's"

    samples = load_split(cfg.data, "validation", cfg.seed)
    batch = to_device(QACollator(processor)([samples[i] for i in range(16)]), "cuda")
    with torch.no_grad():
        reference = bf16.model(**model_inputs(batch)).logits.float()
        quantized = fp8.model(**model_inputs(batch)).logits.float()
    assert torch.isfinite(quantized).all(), "fp8 logits hold NaN or inf"
    real = batch["attention_mask"].bool()
    ref, got = reference[real], quantized[real]
    assert not torch.equal(ref, got), "fp8 logits equal bf16's: the float8 path did not run"
    error = float((got - ref).norm() / ref.norm())
    assert error < FP8_LOGIT_RTOL, f"fp8 logits off bf16's by a relative {error:.3f} (tolerance {FP8_LOGIT_RTOL})"
    # the logit at position t predicts token t + 1: the answer tokens and the closing <|im_end|>
    answer = (batch["labels"][:, 1:] != IGNORE_INDEX) & real[:, :-1]
    assert int(answer.sum()) >= 16
    agree = float((quantized[:, :-1].argmax(-1) == reference[:, :-1].argmax(-1))[answer].float().mean())
    assert agree >= FP8_ARGMAX_AGREEMENT, (
        f"fp8 picks bf16's answer token at {agree:.3f} of {int(answer.sum())} answer positions "
        f"(at least {FP8_ARGMAX_AGREEMENT} expected; relative logit error {error:.3f})"
    )
