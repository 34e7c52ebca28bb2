"""hardware.grouped_decode_attention: a decode step's attention groups the query heads that share a
KV head instead of copying the cache per query head (firstsight/models/decode_attention.py), and computes
what transformers' SDPA path computes; prompts go through transformers' path unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import compose

from firstsight.config.specs import model_spec
from firstsight.models.decode_attention import NAME, group_decode, grouped_decode_attention, ungroup_decode

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Attention(torch.nn.Module):
    """What the attention functions read from the module (transformers' decoder attention)."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _tensors(batch=3, heads=6, kv_heads=2, query_len=1, cache_len=10, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, query_len, dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, cache_len, dim, generator=g) for _ in range(2))
    return q, k, v


def _reference(q, k, v, mask, scale):
    """The attention with every KV head repeated for its query heads (transformers' repeat_kv)."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_one_query_position_is_the_repeated_kv_attention(mask_kind):
    q, k, v = _tensors()
    pad = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    pad[0, ..., :4] = False  # a left-padded row
    pad[2, ..., 7:] = False  # cache slots not yet written
    mask = {"bool": pad, "float": torch.zeros(pad.shape).masked_fill(~pad, float("-inf")), "none": None}[mask_kind]
    out, weights = grouped_decode_attention(_Attention(3), q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (3, 1, 6, 8)
    torch.testing.assert_close(out, _reference(q, k, v, mask, 0.3), rtol=1e-6, atol=1e-6)


def test_a_prompt_goes_through_transformers_sdpa_path(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    calls = []
    original = sdpa.sdpa_attention_forward
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **kw: calls.append(a[1].shape) or original(*a, **kw))
    q, k, v = _tensors(query_len=5, cache_len=5)
    out, _ = grouped_decode_attention(_Attention(3), q, k, v, None, scaling=0.3)
    assert calls == [q.shape]  # several positions: transformers' own path, as it is
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(out, _reference(q, k, v, causal, 0.3), rtol=1e-6, atol=1e-6)
    grouped_decode_attention(_Attention(3), *_tensors(), None, scaling=0.3)
    assert len(calls) == 1  # one position: grouped here, not passed on


@pytest.fixture(scope="module")
def tiny_student(cache_dir):
    from firstsight.models.loading import load_model, load_processor

    cfg = compose(["hardware.grouped_decode_attention=false"])
    processor = load_processor(cfg.model, cfg.cache_dir)
    model = load_model(model_spec(cfg), "student", processor, "cpu", frozen=True).model.float()
    assert model.config.text_config.num_attention_heads > model.config.text_config.num_key_value_heads  # grouped
    return cfg, processor, model


def test_greedy_decoding_is_the_same_with_grouped_decode_attention(tiny_student, monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    from firstsight.data import load_split
    from firstsight.data.batching import PromptCollator
    from firstsight.inference.generation import GreedyDecoder

    cfg, processor, model = tiny_student
    batch = PromptCollator(processor)(list(load_split(cfg.data, "validation", cfg.seed))[:3])  # left-padded rows
    assert not bool(batch["attention_mask"].all())

    def decode():
        return GreedyDecoder(model, "static").generate(
            batch, 6, 6, pad_token_id=processor.tokenizer.pad_token_id, record_logits=True
        )

    ungroup_decode(model)
    plain = decode()
    passed_on = []
    original = sdpa.sdpa_attention_forward
    monkeypatch.setattr(
        sdpa, "sdpa_attention_forward", lambda *a, **kw: passed_on.append(a[1].shape[2]) or original(*a, **kw)
    )
    assert group_decode(model)
    try:
        grouped = decode()
    finally:
        ungroup_decode(model)
    assert passed_on and set(passed_on) == {batch["input_ids"].shape[1]}  # only the prompts; every step grouped
    assert torch.equal(grouped.tokens, plain.tokens)
    torch.testing.assert_close(grouped.logits, plain.logits, rtol=1e-5, atol=1e-5)


def test_on_by_default_for_the_language_model_only_and_not_saved(cache_dir, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    from firstsight.models.loading import load_model, load_processor
    from firstsight.models.vision_attention import plain_config

    cfg = compose()
    assert cfg.hardware.grouped_decode_attention is True
    model = load_model(model_spec(cfg), "student", load_processor(cfg.model, cfg.cache_dir), "cpu", frozen=True).model
    assert model.config.text_config._attn_implementation == NAME
    assert model.config.vision_config._attn_implementation != NAME
    model.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()  # a saved student loads anywhere
    with plain_config(model) as config:
        assert config.text_config._attn_implementation == "sdpa"
        assert isinstance(Qwen2VLForConditionalGeneration._from_config(config), Qwen2VLForConditionalGeneration)
    assert model.config.text_config._attn_implementation == NAME  # switched back after the block
    assert not group_decode(torch.nn.Linear(2, 2))  # not a Qwen2-VL model: nothing to switch
    eager = compose(["hardware.attn_implementation=eager"])
    assert (
        load_model(
            model_spec(eager), "student", load_processor(eager.model, eager.cache_dir), "cpu", frozen=True
        ).model.config.text_config._attn_implementation
        == "eager"
    )  # only SDPA is extended
