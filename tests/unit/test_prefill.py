"""The static decoder's prefill taken apart (firstsight/inference/prefill.py) on what a CPU can check: its
logits and cache equal the model's own forward's (fp32 and bf16, left-padded multi-frame batches);
positions computed from host copies equal those computed on the device; the language model's graph
policy (captured at a shape's second prefill or when asked, replayed after, never beyond the token
limit, least recently used dropped, a disagreeing or failing capture turned off with one warning).
A CUDA graph is stood in for by a replay that reruns the captured function (tests/test_generation.py's
_fake_capture); the real captures are checked on a GPU (benchmarks/generation.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from firstsight.inference import cuda_graphs
from firstsight.inference.prefill import GraphStore, LanguageGraphs, prefill

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [0, 5, 1, 3]  # left-padded: prompt lengths 35, 73, 55, 38; the second row has two frames


@pytest.fixture(scope="module")
def parts(tiny_parts):
    from firstsight.data.batching import PromptCollator

    samples = tiny_parts.split("validation")
    collate = PromptCollator(tiny_parts.processor)

    def batch(rows=ROWS):
        return collate([samples[i] for i in rows])

    return tiny_parts.model("student"), batch


def _cache(model, length=128):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def _own_forward(model, batch, cache):
    """What the static decoder ran before: the model's forward with the prompt's positions."""
    from firstsight.inference.prefill import _NOT_MODEL_INPUTS, cache_keyword
    from firstsight.models.positions import prompt_positions

    inputs = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
    positions = prompt_positions(model, batch)
    out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    return out.logits[:, -1, :], positions


def _recording_capture(monkeypatch, broken=False, fails=False):
    """record_graph stood in for: warm-up runs, then a 'graph' whose replay reruns the function
    (or, `broken`, does nothing; `fails`: the capture raises). Returns the list of captures."""

    captured = []

    class Replay:
        def __init__(self, step):
            self.step = step

        def replay(self):
            if not broken:
                self.step()

    def record(step, pool=None):
        for _ in range(cuda_graphs.WARMUP_STEPS):
            step()
        if fails:
            raise RuntimeError("operation not permitted when stream is capturing")
        captured.append(step)
        return Replay(step)

    monkeypatch.setattr(cuda_graphs, "record_graph", record)
    return captured


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_taken_apart_prefill_gives_the_models_own_logits_and_cache(parts, dtype):
    model, batch = parts
    model = model.to(dtype)
    try:
        prompts = batch()
        with torch.no_grad():
            own_cache, apart_cache = _cache(model), _cache(model)
            own, own_positions = _own_forward(model, prompts, own_cache)
            apart, positions = prefill(model, prompts, apart_cache, LanguageGraphs(), None)
        assert torch.equal(positions, own_positions)
        assert torch.equal(apart, own)
        for mine, theirs in zip(apart_cache.layers, own_cache.layers):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
            assert int(mine.cumulative_length) == int(theirs.cumulative_length) == prompts["input_ids"].shape[1]
    finally:
        model.to(torch.float32)


def test_positions_from_host_copies_equal_those_computed_on_the_device(parts):
    from firstsight.models.positions import host_inputs, prompt_positions

    model, batch = parts
    prompts = batch()
    host = host_inputs(prompts)
    assert all(v is None or v.device.type == "cpu" for v in host.values())
    assert torch.equal(prompt_positions(model, prompts, host), prompt_positions(model, prompts))
    text_only = {k: v for k, v in prompts.items() if k in ("input_ids", "attention_mask")}
    assert torch.equal(prompt_positions(model, text_only, host_inputs(text_only)), prompt_positions(model, text_only))


def test_image_tokens_that_do_not_match_the_features_are_refused(parts):
    model, batch = parts
    prompts = batch([0])
    image = model.config.image_token_id
    ids = prompts["input_ids"].clone()
    ids[0, (ids[0] == image).nonzero()[0, 0]] = 0  # one image token fewer than features
    with torch.no_grad(), pytest.raises(ValueError, match=r"tokens: \d+, features: \d+"):
        prefill(model, dict(prompts, input_ids=ids), _cache(model), LanguageGraphs(), None)


def test_a_shape_is_captured_at_its_second_prefill_and_replayed_after(parts, monkeypatch, caplog):
    model, batch = parts
    captured = _recording_capture(monkeypatch)
    graphs, store, cache = LanguageGraphs(), GraphStore(), _cache(model)
    first, other = batch(), batch([2, 4, 5, 6])  # the same shape: the two-frame row 5 is the longest of both
    with torch.no_grad():
        expected = {id(b): _own_forward(model, b, _cache(model))[0] for b in (first, other)}
        with caplog.at_level(logging.INFO, logger="firstsight.inference.prefill"):
            assert torch.equal(prefill(model, first, cache, graphs, store)[0], expected[id(first)])
            assert captured == []  # a shape seen once runs eagerly
            assert torch.equal(prefill(model, first, cache, graphs, store)[0], expected[id(first)])
            assert len(captured) == 1 and len(graphs.capture_seconds) == 1
            assert "captured the prefill's language model as a CUDA graph (batch 4, 73 tokens)" in caplog.text
            replayed = prefill(model, first, cache, graphs, store)[0]
            assert torch.equal(replayed, expected[id(first)]) and len(captured) == 1  # replayed, not captured again
            # another batch of the same shape replays the same graph with its own inputs
            assert other["input_ids"].shape == first["input_ids"].shape
            assert not torch.equal(expected[id(other)], expected[id(first)])
            assert torch.equal(prefill(model, other, cache, graphs, store)[0], expected[id(other)])
            assert len(captured) == 1
        # the cache holds what the model's own forward writes
        own_cache = _cache(model)
        _own_forward(model, first, own_cache)
        prefill(model, first, cache, graphs, store)
        assert torch.equal(cache.layers[-1].keys, own_cache.layers[-1].keys)


def test_capture_now_beyond_the_limit_and_the_least_recently_used(parts, monkeypatch):
    model, batch = parts
    captured = _recording_capture(monkeypatch)
    cache = _cache(model)
    prompts = [batch(rows) for rows in ([0], [1], [3])]  # lengths 35, 55, 38
    with torch.no_grad():
        graphs, store = LanguageGraphs(max_tokens=54), GraphStore(limit=1)
        prefill(model, prompts[1], cache, graphs, store, capture_now=True)  # 55 tokens: over the limit
        assert captured == [] and store.graphs == {}
        prefill(model, prompts[0], cache, graphs, store, capture_now=True)  # asked for: captured at once
        assert len(captured) == 1 and len(store.graphs) == 1
        prefill(model, prompts[2], cache, graphs, store, capture_now=True)
        assert len(captured) == 2 and [key[0][:2] for key in store.graphs] == [(1, 38)]  # the older one dropped


@pytest.mark.parametrize("broken", [True, False])
def test_a_capture_that_fails_or_disagrees_turns_the_graphs_off(parts, monkeypatch, caplog, broken):
    model, batch = parts
    captured = _recording_capture(monkeypatch, broken=broken, fails=not broken)
    graphs, store, cache = LanguageGraphs(), GraphStore(), _cache(model)
    prompts = batch([0])
    with torch.no_grad():
        expected = _own_forward(model, prompts, _cache(model))[0]
        with caplog.at_level(logging.WARNING, logger="firstsight.inference.prefill"):
            got = prefill(model, prompts, cache, graphs, store, capture_now=True)[0]
            again = prefill(model, prompts, cache, graphs, store, capture_now=True)[0]  # off: no new attempt
    assert torch.equal(got, expected) and torch.equal(again, expected)
    assert caplog.text.count("capturing the prefill's language model as a CUDA graph failed") == 1
    assert ("disagrees with it run eagerly" if broken else "operation not permitted") in graphs.off
    assert store.graphs == {} and len(captured) == (1 if broken else 0)


def test_the_decoder_records_its_prefill_graphs(tiny_parts, monkeypatch):
    """Through GreedyDecoder (graphs forced on, as on a GPU): the same tokens as generate, the
    prefill's captures in the run's tags; reserve_prefill captures before any timed call."""
    from firstsight.data.batching import PromptCollator
    from firstsight.inference.generation import GreedyDecoder, generation_tags

    captured = _recording_capture(monkeypatch)
    model = tiny_parts.model("student")
    prompts = PromptCollator(tiny_parts.processor)([tiny_parts.split("validation")[i] for i in ROWS])
    pad = tiny_parts.processor.tokenizer.pad_token_id
    with torch.no_grad():
        expected = model.generate(**prompts, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=pad)
    decoder = GreedyDecoder(model, "static", cuda_graphs=True)
    decoder.reserve(len(ROWS), prompts["input_ids"].shape[1], 6)
    decoder.reserve_prefill(prompts, 6)
    assert len(decoder.language_graphs.capture_seconds) == 1
    got = decoder.generate(prompts, 6, 6, pad_token_id=pad)
    assert got.tokens.tolist() == expected[:, prompts["input_ids"].shape[1] :].tolist()
    assert len(decoder.language_graphs.capture_seconds) == 1 and len(captured) == 2  # decode step + prefill
    tags = generation_tags(decoder)
    assert tags["firstsight.generation.prefill_graphs"] == "1" and "firstsight.generation.fallback" not in tags


def _attention_calls(monkeypatch, run):
    """(mask given, is_causal) of every SDPA call `run()` makes."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((attn_mask is not None, bool(is_causal)))
        return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        with torch.no_grad():
            run()
    return calls


def test_a_prompt_without_padding_takes_the_same_attention_while_a_graph_is_captured(parts, monkeypatch):
    """transformers skips its mask for a prompt without padding into an empty static cache (SDPA's
    is_causal, the flash kernel) only when it can read the cache's length back, which it does not
    do while a CUDA graph is captured (stood in for here by torch.cuda saying a capture is on): it
    then builds a mask, and on an H200 the captured prefill's logits differed from the eager ones by
    1.8 % (relative). The language model here is given the masks it would decide on, so it calls
    SDPA the same way in both cases."""
    model, batch = parts
    prompts = batch([0])
    assert bool(prompts["attention_mask"].all())

    def apart():
        prefill(model, prompts, _cache(model), LanguageGraphs(), None)

    def own():
        _own_forward(model, prompts, _cache(model))

    eager = _attention_calls(monkeypatch, apart)
    layers = model.config.text_config.num_hidden_layers
    assert eager[-layers:] == [(False, True)] * layers  # the language model: no mask, is_causal
    assert _attention_calls(monkeypatch, own) == eager
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _attention_calls(monkeypatch, apart) == eager
    # what the model's own forward does meanwhile (the failure this avoids): a mask, not is_causal
    assert _attention_calls(monkeypatch, own)[-layers:] == [(True, False)] * layers
