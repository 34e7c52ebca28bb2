"""torchao quantization (precision=int8_weight_only, fp8): what is stored, what it computes, what is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

from firstsight.config.specs import model_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _teacher(cache_dir, precision: str):
    from firstsight.models.loading import load_model, load_processor

    cfg = compose(["task=profile", "task.target=teacher", f"precision={precision}"])
    processor = load_processor(cfg.model, cfg.cache_dir)
    return load_model(model_spec(cfg), "teacher", processor, "cpu", frozen=True), processor


def test_int8_weight_only_holds_int8_weights_and_is_counted_as_stored(cache_dir):
    bf16, processor = _teacher(cache_dir, "bf16")
    int8, _ = _teacher(cache_dir, "int8_weight_only")
    model = int8.model
    quantized = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ != "Parameter"
    }
    plain = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - set(quantized)
    assert plain == {"lm_head"}  # every other Linear layer of every part is quantized
    assert {n.split(".")[1] for n in quantized} == {"visual", "language_model"}
    assert any(".merger." in n for n in quantized)
    saved = 0
    for module in quantized.values():
        weight = module.weight
        assert weight.qdata.dtype == torch.int8 and weight.qdata.shape == weight.shape
        inner = [
            getattr(weight, name)
            for name in ("qdata", "scale", "zero_point")
            if getattr(weight, name, None) is not None
        ]
        saved += weight.numel() * 2 - sum(t.numel() * t.element_size() for t in inner)  # int8 data, scales, zero points
    # model/weights_gb is what is stored: bf16 minus what int8 data and scales save, not the logical bf16 size
    assert int8.weights_gb * 1e9 == pytest.approx(bf16.weights_gb * 1e9 - saved, abs=1)
    assert sum(int8.part_weights_gb.values()) == pytest.approx(int8.weights_gb)
    for part in ("vision", "merger", "language"):
        assert int8.part_weights_gb[part] < bf16.part_weights_gb[part]


def test_int8_weight_only_logits_follow_bf16(cache_dir):
    from firstsight.data import load_split
    from firstsight.data.batching import QACollator
    from firstsight.training.loop import model_inputs

    bf16, processor = _teacher(cache_dir, "bf16")
    int8, _ = _teacher(cache_dir, "int8_weight_only")
    cfg = compose(["task=profile"])
    samples = load_split(cfg.data, "validation", cfg.seed)
    batch = QACollator(processor)([samples[i] for i in range(4)])
    with torch.no_grad():
        reference = bf16.model(**model_inputs(batch)).logits.float()
        quantized = int8.model(**model_inputs(batch)).logits.float()
    assert not torch.equal(reference, quantized)  # the weights really changed
    error = (quantized - reference).norm() / reference.norm()
    assert error < 0.05, f"relative logit error {error:.3f}"
    agree = (quantized.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree > 0.95


def test_fp8_logits_of_a_padded_batch_are_finite(cache_dir, monkeypatch):
    """precision=fp8 scales each activation row by its largest magnitude; a padding position's row
    is all zeros (the padding token's embedding is zero), and without a floor its scale was 0 and
    its float8 values 0/0 = NaN, which attention carried to every position of the row: every padded
    batch's logits were NaN (seen on an H100, tests/gpu/test_gpu_fp8.py). torchao's float8 path is
    torch's own kernels (torch._scaled_mm) on the CPU too; only its GPU capability check is lifted."""
    import torchao.quantization.quant_api as quant_api

    from firstsight.data import load_split
    from firstsight.data.batching import QACollator
    from firstsight.training.loop import model_inputs

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    bf16, processor = _teacher(cache_dir, "bf16")
    fp8, _ = _teacher(cache_dir, "fp8")
    weight = fp8.model.model.language_model.layers[0].self_attn.q_proj.weight
    assert weight.qdata.dtype == torch.float8_e4m3fn
    cfg = compose(["task=profile"])
    samples = load_split(cfg.data, "validation", cfg.seed)
    batch = QACollator(processor)([samples[i] for i in range(4)])
    assert not batch["attention_mask"].bool().all()  # padded
    with torch.no_grad():
        reference = bf16.model(**model_inputs(batch)).logits.float()
        quantized = fp8.model(**model_inputs(batch)).logits.float()
    assert torch.isfinite(quantized).all(), "fp8 logits hold NaN or inf"
    real = batch["attention_mask"].bool()
    error = (quantized[real] - reference[real]).norm() / reference[real].norm()
    assert 0 < error < 0.15, f"relative logit error {error:.3f}"  # the GPU test's tolerance


def test_quantizing_leaves_the_process_compiler_settings_alone(cache_dir):
    """torchao's configs switch inductor's coordinate descent tuning on for the whole process by
    default; loading a quantized model must not (every later torch.compile would tune for minutes)."""
    import torch._inductor.config as inductor

    names = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions", "force_fuse_int_mm_with_mul")
    before = {name: getattr(inductor, name) for name in names}
    assert not any(before.values())  # inductor's defaults: the check below could not fail otherwise
    int8, _ = _teacher(cache_dir, "int8_weight_only")
    assert type(int8.model.model.language_model.layers[0].mlp.up_proj.weight).__name__ != "Parameter"
    assert {name: getattr(inductor, name) for name in names} == before
