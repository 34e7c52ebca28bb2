"""LoRA / QLoRA students and the export task: adapters alone train, a merged student equals the
adapted one, and the distill → evaluate → export → report sequence ends in a directory that stock
transformers loads and generates with, in a process that never imports firstsight."""

from __future__ import annotations

import pytest
from conftest import compose

from firstsight.config.specs import model_spec


def _student(overrides, cache_dir):
    from firstsight.models.loading import load_model, load_processor

    cfg = compose(["lora.enabled=true", *overrides])
    processor = load_processor(cfg.model, cfg.cache_dir)
    return cfg, processor, load_model(model_spec(cfg), "student", processor, "cpu", frozen=False)


def test_only_the_adapters_train(cache_dir):
    _, _, student = _student([], cache_dir)
    named = dict(student.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # every default target of every text decoder layer got its A and B matrices, the vision tower none
    for target in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{target}.lora_A" in n for n in trainable), target
        assert any(f"{target}.lora_B" in n for n in trainable), target
    assert not any("visual" in n for n in trainable)
    from firstsight.models.lora import trainable_parameters

    assert 0 < trainable_parameters(student.model) < 0.2 * sum(p.numel() for p in named.values())


def test_qlora_quantizes_the_frozen_base(cache_dir):
    _, _, student = _student(["precision=nf4"], cache_dir)
    kinds = {type(m).__name__ for m in student.model.modules()}
    assert "Linear4bit" in kinds  # the base is 4-bit (bitsandbytes), the adapters train beside it
    trainable = [n for n, p in student.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_a_target_that_matches_nothing_names_the_valid_ones(cache_dir):
    from firstsight.core.errors import FirstSightError

    with pytest.raises(FirstSightError, match=r"lora.target_modules=\['qkv_proj'\].*valid names: .*'q_proj'"):
        _student(["lora.target_modules=[qkv_proj]"], cache_dir)


def test_the_merged_student_computes_what_the_adapted_one_does(cache_dir):
    import torch

    from firstsight.data import synthetic_split
    from firstsight.data.batching import QACollator
    from firstsight.models.lora import merged_model
    from firstsight.training.loop import model_inputs

    cfg, processor, student = _student([], cache_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # adapters start as a no-op (B = 0): give them a real update first
        for name, p in student.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    student.model.eval()
    batch = QACollator(processor)([synthetic_split(cfg.data, "validation", 0)[i] for i in range(3)])
    with torch.no_grad():
        adapted = student.model(**model_inputs(batch)).logits
        merged = merged_model(student.model)(**model_inputs(batch)).logits
    assert not any("lora_" in n for n, _ in merged_model(student.model).named_parameters())
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
