"""Greedy decoding on a GPU (firstsight/inference/generation.py, prefill.py, vision_graph.py,
compiled_prefill.py): the decode step really captured as a CUDA graph (`static`) and, under
`static_compile`, torch.compile'd before capture, with the prefill's vision encoder and language
model replayed from graphs, give `model.generate`'s tokens on the tiny pair, in fp32 and bf16, at
batch 1 and on left-padded batches, with the end token suppressed or a natural stop.

Up to near-ties (gpu_support.assert_greedy_tokens_follow): where generate's own top-2 logits of a
step are within twice the dtype's logit tolerance, the picks may differ there and the row is not
compared after it; everywhere else a different token fails. The CPU tests
(tests/unit/test_generation.py, unit/test_prefill.py) check the same paths with stand-ins for the graphs."""

from __future__ import annotations

import pytest
import torch
from conftest import compose
from gpu_support import GPU_MARKS, assert_greedy_tokens_follow, release_cuda

from firstsight.config.specs import model_spec

pytestmark = GPU_MARKS

MOVED = 5  # validation index of a two-frame question: the longest prompt of the first few
PAD_ROWS = [0, MOVED, 1, 3, 16]  # prompt lengths 35, 73, 55, 38, 32 tokens: four rows left-padded


@pytest.fixture(autouse=True)
def _released():
    yield
    release_cuda()


@pytest.fixture(scope="module")
def tiny(cache_dir):
    """The processor, the validation questions and a loader of the tiny teacher / student on CUDA."""
    from firstsight.data import load_split
    from firstsight.data.batching import PromptCollator
    from firstsight.models.loading import load_model, load_processor
    from firstsight.training.loop import to_device

    cfg = compose(["hardware=gpu"])
    processor = load_processor(cfg.model, cfg.cache_dir)
    samples = load_split(cfg.data, "validation", cfg.seed)
    collate = PromptCollator(processor)

    class Tiny:
        pad = processor.tokenizer.pad_token_id
        end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

        @staticmethod
        def model(role, dtype):
            return load_model(model_spec(cfg), role, processor, "cuda", frozen=True).model.to(dtype)

        @staticmethod
        def batch(rows):
            return to_device(collate([samples[i] for i in rows]), "cuda")

    return Tiny


def _reference(model, batch, max_new, min_new, pad):
    """model.generate's tokens and raw logits per step (GreedyDecoder's hf method)."""
    from firstsight.inference.generation import GreedyDecoder

    ref = GreedyDecoder(model, "hf").generate(batch, max_new, min_new, pad_token_id=pad, record_logits=True)
    assert ref.method == "hf_generate" and ref.logits.shape[:2] == (ref.tokens.shape[1], batch["input_ids"].shape[0])
    return ref


def _no_fallback(decoder):
    from firstsight.inference.generation import generation_tags

    tags = generation_tags(decoder)
    assert "firstsight.generation.fallback" not in tags, f"a capture or compilation was given up: {tags}"
    return tags


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_cuda_graph_decoding_gives_generates_tokens(tiny, role, dtype):
    """`static` on CUDA: the decode step is a captured graph (not the eager fallback), the prefill's
    vision encoder a graph from the first call and its language model a graph from the second call
    of a shape; each call's tokens (and, where recorded, logits) are generate's."""
    from firstsight.inference.generation import GreedyDecoder

    model = tiny.model(role, dtype)
    decoder = GreedyDecoder(model, "static")
    for rows in ([3], PAD_ROWS):
        batch = tiny.batch(rows)
        ref = _reference(model, batch, 12, 12, tiny.pad)
        what = f"{role} {dtype} rows {rows}"
        for call in range(2):  # a shape's second prefill captures the language model's graph and replays it
            got = decoder.generate(batch, 12, 12, pad_token_id=tiny.pad)
            assert got.method == "static_cuda_graph", f"{what}: decoded by {got.method}, not a captured graph"
            assert got.tokens.shape == (len(rows), 12), f"{what}: {tuple(got.tokens.shape)} tokens"
            assert (got.tokens != tiny.end).all(), f"{what}: an end token before min_new_tokens"
            assert_greedy_tokens_follow(ref, got, dtype, f"{what}, call {call + 1}")
        recorded = decoder.generate(batch, 12, 12, pad_token_id=tiny.pad, record_logits=True)  # its own capture
        assert recorded.method == "static_cuda_graph"
        assert_greedy_tokens_follow(ref, recorded, dtype, f"{what}, logits recorded")
    tags = _no_fallback(decoder)
    assert tags["firstsight.generation"] == "static_cuda_graph"
    assert len(decoder.capture_seconds) == 4, "one decode-step graph per batch size, and per logit recording"
    assert decoder.vision_graphs.capture_seconds, "the prefill's vision encoder was never captured"
    assert decoder.language_graphs.capture_seconds, "the prefill's language model was never captured"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_decoding_stops_where_generate_stops(tiny, dtype):
    """The trained teacher closes its answers with <|im_end|>: the graph's end-of-row bookkeeping
    (finished rows padded, the read-back every check_every steps, the trim after the last row ended)
    gives generate's tokens and length."""
    from firstsight.inference.generation import GreedyDecoder

    model = tiny.model("teacher", dtype)
    batch = tiny.batch(range(8))
    ref = _reference(model, batch, 20, 0, tiny.pad)
    assert ref.tokens.shape[1] < 20, "the trained teacher did not stop by itself: nothing to compare"
    decoder = GreedyDecoder(model, "static")
    for call in range(2):
        got = decoder.generate(batch, 20, pad_token_id=tiny.pad)
        assert got.method == "static_cuda_graph", f"decoded by {got.method}, not a captured graph"
        assert_greedy_tokens_follow(ref, got, dtype, f"teacher {dtype} natural stop, call {call + 1}")
    _no_fallback(decoder)


def test_static_compile_gives_generates_tokens(tiny):
    """`static_compile` (bf16, as the study decodes): the decode step torch.compile'd with the
    suite's inductor options, then captured; the prefill's blocks compiled; the tokens and logits
    are generate's up to near-ties. Inductor compiles once for this batch size (tens of seconds)."""
    from firstsight.inference.generation import GreedyDecoder

    dtype = torch.bfloat16
    model = tiny.model("teacher", dtype)
    decoder = GreedyDecoder(model, "static_compile")
    batch = tiny.batch(PAD_ROWS)
    ref = _reference(model, batch, 12, 12, tiny.pad)
    # as the tasks decode (one capture of the compiled step), then with the logits recorded (another
    # capture of the same compiled step), each twice: the second prefill of a shape captures its graph
    for record in (False, True):
        for call in range(2):
            got = decoder.generate(batch, 12, 12, pad_token_id=tiny.pad, record_logits=record)
            what = f"static_compile, {'logits recorded, ' if record else ''}call {call + 1}"
            assert got.method == "static_compiled_cuda_graph", f"{what}: decoded by {got.method}"
            assert got.tokens.shape == (len(PAD_ROWS), 12), f"{what}: {tuple(got.tokens.shape)} tokens"
            assert_greedy_tokens_follow(ref, got, dtype, what)
    tags = _no_fallback(decoder)
    assert tags["firstsight.generation"] == "static_compiled_cuda_graph"
    assert decoder.prefill_compile_off is None and decoder.compile_off is None
