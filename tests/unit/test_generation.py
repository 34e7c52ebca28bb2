"""Greedy decoding (firstsight/inference/generation.py): the static path gives model.generate's tokens exactly,
on the tiny models the suite builds offline (the shipped pre-trained teacher and student base, and a
random student), in fp32 and bf16, at batch 1 and on left-padded batches, with the end token
suppressed or allowed; its captures are kept and reused; a failed capture or an unsupported
generation setting falls back; profile and evaluate run under hardware.generation=static and =hf
and agree."""

from __future__ import annotations

import logging

import pytest
from conftest import compose

from firstsight.config.specs import model_spec
from firstsight.inference import cuda_graphs

MOVED = 5  # validation index of a two-frame question: the longest prompt of the first few
PAD_ROWS = [0, MOVED, 1, 3, 16]  # prompt lengths 35, 73, 55, 38, 32 tokens: four rows left-padded


@pytest.fixture(scope="module")
def tiny(cache_dir):
    """The processor, the validation questions and a loader of the tiny teacher / student."""
    from firstsight.data import load_split
    from firstsight.data.batching import PromptCollator
    from firstsight.models.loading import load_model, load_processor

    cfg = compose()
    processor = load_processor(cfg.model, cfg.cache_dir)
    samples = load_split(cfg.data, "validation", cfg.seed)
    collate = PromptCollator(processor)

    def model(role, dtype="float32", random=False):
        import torch

        side = compose([f"model.{role}.weights=random"]) if random else cfg
        loaded = load_model(model_spec(side), role, processor, "cpu", frozen=True).model
        return loaded.to(getattr(torch, dtype))

    class Tiny:
        pad = processor.tokenizer.pad_token_id
        end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

        @staticmethod
        def batch(indices):
            return collate([samples[i] for i in indices])

    Tiny.model = staticmethod(model)
    Tiny.processor = processor
    return Tiny


def _generate(model, batch, max_new, min_new=0, **kwargs):
    """What the suite used to call: model.generate's new tokens."""
    import torch

    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new, min_new_tokens=min_new or None, do_sample=False, **kwargs)
    return out[:, batch["input_ids"].shape[1] :]


def _static(model, batch, max_new, min_new=0, **kwargs):
    from firstsight.inference.generation import GreedyDecoder

    return GreedyDecoder(model, "static").generate(batch, max_new, min_new, **kwargs)


def _same_greedy_run(model, batch, max_new, min_new=0, **kwargs):
    """generate's run and the static path's, both with their logits; asserts they give the same
    tokens. In float32, exactly. In bf16, attention over the static cache (longer than the prompt,
    its tail masked) rounds differently from attention over generate's cache on some CPUs (seen on
    one with AVX512-BF16: 1 bf16 step in the prefill's logits), and a near-tie can then go either
    way: each row must follow generate's tokens, with logits within bf16 tolerance, up to a step
    where the two picks are tied within that tolerance in generate's own logits."""
    import torch

    from firstsight.inference.generation import GreedyDecoder

    expected = GreedyDecoder(model, "hf").generate(batch, max_new, min_new, record_logits=True, **kwargs)
    got = _static(model, batch, max_new, min_new, record_logits=True, **kwargs)
    if got.tokens.tolist() == expected.tokens.tolist():
        return expected, got
    assert model.dtype == torch.bfloat16, "float32: the tokens must be generate's exactly"
    steps = min(expected.tokens.shape[1], got.tokens.shape[1])
    for row in range(expected.tokens.shape[0]):
        differ = (expected.tokens[row, :steps] != got.tokens[row, :steps]).nonzero()
        first = int(differ[0]) if len(differ) else steps
        for step in range(min(first + 1, steps)):  # fed the same tokens so far
            ours, theirs = got.logits[step][row], expected.logits[step][row]
            tolerance = 2**-6 * float(theirs.abs().max()) + 1e-2  # benchmarks/generation.py's RTOL, ATOL
            assert float((ours - theirs).abs().max()) <= tolerance, (row, step)
            if step == first:  # the picks differ here: a near-tie in generate's own logits
                gap = float(theirs[expected.tokens[row, step]] - theirs[got.tokens[row, step]])
                assert 0 <= gap <= 2 * tolerance, (row, step, gap)
    return expected, got


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("rows", [[3], PAD_ROWS], ids=["batch1", "left_padded"])
def test_static_decoding_gives_generates_tokens_with_the_end_token_suppressed(tiny, role, dtype, rows):
    model = tiny.model(role, dtype)
    batch = tiny.batch(rows)
    if len(rows) > 1:  # really left-padded, rows of different lengths
        lengths = batch["attention_mask"].sum(1).tolist()
        assert len(set(lengths)) == len(rows) and batch["attention_mask"][:, 0].sum() == 1
    expected, got = _same_greedy_run(model, batch, 12, 12, pad_token_id=tiny.pad)
    assert got.method == "static_eager"  # the CPU: the static loop, no CUDA graph
    assert got.tokens.shape == expected.tokens.shape == (len(rows), 12)
    assert (got.tokens != tiny.end).all()  # suppressed until min_new_tokens


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_natural_stop_ends_where_generate_ends(tiny, dtype):
    """The trained teacher answers and closes with <|im_end|>; generate stops when every row has,
    and so does the static path (same tokens: _same_greedy_run)."""
    model = tiny.model("teacher", dtype)
    batch = tiny.batch(range(8))
    expected, got = _same_greedy_run(model, batch, 10, pad_token_id=tiny.pad)
    assert expected.tokens.shape[1] < 10 and (expected.tokens[:, -1] == tiny.end).all()  # it did stop early
    _stopped_when_every_row_ended(got.tokens, tiny.end, tiny.pad, 10)
    # end tokens allowed only from the third token on: longer answers, same stop
    expected, got = _same_greedy_run(model, batch, 10, 3, pad_token_id=tiny.pad)
    assert expected.tokens.shape[1] == 4
    _stopped_when_every_row_ended(got.tokens, tiny.end, tiny.pad, 10)
    assert all(tiny.end not in row[:2] for row in got.tokens.tolist())


def _stopped_when_every_row_ended(tokens, end, pad, limit):
    """Before the limit, every row holds the end token and only pads after it, and the step that
    ended the last row was the last one."""
    rows = tokens.tolist()
    assert len(rows[0]) < limit and end != pad
    for row in rows:
        assert end in row and set(row[row.index(end) + 1 :]) <= {pad}
    assert any(row[-1] == end for row in rows)


def test_rows_that_end_early_are_padded_as_generate_pads_them(tiny):
    """Rows finishing at different steps: after its end token a row holds the pad token until the
    longest row ends (a random student, whose rows run on: the end token is picked from its own
    output; the trained base ends its short answers together)."""
    model = tiny.model("student", random=True)
    batch = tiny.batch(PAD_ROWS)
    free = _static(model, batch, 8, 8, pad_token_id=tiny.pad).tokens
    end = int(free[0, 3])  # row 0 ends at its 4th token; some other row runs on
    expected = _generate(model, batch, 8, pad_token_id=tiny.pad, eos_token_id=end)
    got = _static(model, batch, 8, eos_token_id=end, pad_token_id=tiny.pad)
    assert got.tokens.tolist() == expected.tolist()
    rows = got.tokens.tolist()
    assert rows[0][3] == end and rows[0][4:] == [tiny.pad] * (len(rows[0]) - 4)
    assert any(end not in row for row in rows)  # another row did not end: generate ran to the limit
    assert got.tokens.shape[1] == 8


def test_a_text_only_batch_uses_text_positions_as_generate_does(tiny):
    """No image or video: the three M-RoPE rows are the text positions (rope deltas 0)."""
    from firstsight.data.batching import messages_for
    from firstsight.data.synthetic import QASample

    questions = ["What colour is the ball?", "How many objects are on the table in front of you?"]
    texts = [
        tiny.processor.apply_chat_template(
            messages_for(
                QASample(images=(), question=q, answer="", kind="t", num_choices=0, index=0), with_answer=False
            ),
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in questions
    ]
    batch = dict(tiny.processor(text=texts, padding=True, padding_side="left", return_tensors="pt"))
    assert "pixel_values" not in batch and not bool(batch["attention_mask"].all())
    model = tiny.model("teacher")
    expected = _generate(model, batch, 6, 6, pad_token_id=tiny.pad)
    assert _static(model, batch, 6, 6, pad_token_id=tiny.pad).tokens.tolist() == expected.tolist()


def test_every_steps_logits_match_generates(tiny):
    """Not only the argmax: the raw logits of each step agree with generate's (output_logits)."""
    import torch

    from firstsight.inference.generation import GreedyDecoder

    model = tiny.model("teacher")
    batch = tiny.batch(PAD_ROWS)
    hf = GreedyDecoder(model, "hf").generate(batch, 6, 6, pad_token_id=tiny.pad, record_logits=True)
    static = GreedyDecoder(model, "static").generate(batch, 6, 6, pad_token_id=tiny.pad, record_logits=True)
    assert hf.method == "hf_generate" and static.method == "static_eager"
    assert static.logits.shape == hf.logits.shape == (6, len(PAD_ROWS), model.config.text_config.vocab_size)
    torch.testing.assert_close(static.logits, hf.logits, rtol=1e-4, atol=1e-4)
    assert static.tokens.tolist() == hf.tokens.tolist()


def test_the_generation_configs_repetition_penalty_is_applied_as_generate_applies_it(tiny):
    model = tiny.model("teacher")
    batch = tiny.batch(range(6))
    plain = _static(model, batch, 12, 12, pad_token_id=tiny.pad).tokens
    model.generation_config.repetition_penalty = (
        30.0  # Qwen2-VL-Instruct's config sets 1.05; this confident teacher needs far more to change its answer
    )
    expected = _generate(model, batch, 12, 12, pad_token_id=tiny.pad)
    got = _static(model, batch, 12, 12, pad_token_id=tiny.pad)
    assert got.method == "static_eager" and got.tokens.tolist() == expected.tolist()
    assert got.tokens.tolist() != plain.tolist()  # the penalty changed the answer: the case is exercised


def test_a_setting_the_static_path_lacks_goes_through_generate(tiny, caplog):
    from firstsight.inference.generation import GreedyDecoder

    model = tiny.model("teacher")
    model.generation_config.no_repeat_ngram_size = 2
    batch = tiny.batch(range(3))
    decoder = GreedyDecoder(model, "static")
    with caplog.at_level(logging.INFO, logger="firstsight.inference.generation"):
        got = decoder.generate(batch, 8, 8, pad_token_id=tiny.pad)
        decoder.generate(batch, 8, 8, pad_token_id=tiny.pad)
    assert got.method == decoder.tag == "hf_generate"
    assert got.tokens.tolist() == _generate(model, batch, 8, 8, pad_token_id=tiny.pad).tolist()
    assert caplog.text.count("no_repeat_ngram_size=2") == 1  # said once


def test_a_failed_capture_falls_back_to_the_static_loop_run_eagerly(tiny, caplog, monkeypatch):
    """CUDA graphs forced on (as on a GPU) with a capture that fails, as one would with a kernel that
    synchronises: one warning, then the same static loop without graphs, same tokens."""
    from firstsight.inference.generation import GreedyDecoder, generation_tags

    def capture_refused(step):
        step()  # the warm-up runs
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "record_graph", capture_refused)
    model = tiny.model("student")
    batch = tiny.batch([0, 1])
    decoder = GreedyDecoder(model, "static", cuda_graphs=True)
    assert decoder.tag == "static_cuda_graph"  # what it will try
    with caplog.at_level(logging.WARNING, logger="firstsight.inference.generation"):
        first = decoder.generate(batch, 6, 6, pad_token_id=tiny.pad)
        second = decoder.generate(tiny.batch([MOVED, 2]), 6, 6, pad_token_id=tiny.pad)  # a new shape: no new attempt
    assert first.method == second.method == decoder.tag == "static_eager"
    assert caplog.text.count("CUDA graph capture of the decode step failed") == 1
    assert "operation not permitted when stream is capturing" in caplog.text
    assert first.tokens.tolist() == _generate(model, batch, 6, 6, pad_token_id=tiny.pad).tolist()
    tags = generation_tags(decoder)
    assert tags["firstsight.generation"] == "static_eager" and "capturing" in tags["firstsight.generation.fallback"]


class _ReplayedStep:
    """Stands in for a CUDA graph on the CPU: replay() runs the captured step eagerly (a real replay
    runs its recorded kernels on the same buffers). `broken`: replay does nothing, as a graph that
    captured stale pointers would compute something else."""

    captures = 0

    def __init__(self, step, broken=False):
        self.step, self.broken = step, broken
        type(self).captures += 1

    def replay(self):
        if not self.broken:
            self.step()


def _fake_capture(monkeypatch, broken=False):

    def record(step, pool=None):
        for _ in range(cuda_graphs.WARMUP_STEPS):
            step()
        return _ReplayedStep(step, broken)

    _ReplayedStep.captures = 0
    monkeypatch.setattr(cuda_graphs, "record_graph", record)


def test_the_captured_step_replayed_per_token_gives_generates_tokens(tiny, monkeypatch, caplog):
    """The graph path's logic on the CPU: capture after warm-up (from a rewound state), the check
    against the eager step, one replay per token reading and writing only the entry's buffers, one
    capture per shape reused across calls."""
    from firstsight.inference.generation import GreedyDecoder, generation_tags

    _fake_capture(monkeypatch)
    model = tiny.model("teacher")
    decoder = GreedyDecoder(model, "static", cuda_graphs=True)
    batch = tiny.batch(PAD_ROWS)
    with caplog.at_level(logging.INFO, logger="firstsight.inference.generation"):
        fixed = decoder.generate(batch, 10, 10, pad_token_id=tiny.pad)
        natural = decoder.generate(batch, 10, 0, pad_token_id=tiny.pad)
        again = decoder.generate(tiny.batch([16, 0, 1, 3, 2]), 10, 10, pad_token_id=tiny.pad)
    assert fixed.method == natural.method == again.method == decoder.tag == "static_cuda_graph"
    assert fixed.tokens.tolist() == _generate(model, batch, 10, 10, pad_token_id=tiny.pad).tolist()
    assert natural.tokens.tolist() == _generate(model, batch, 10, pad_token_id=tiny.pad).tolist()
    assert (
        again.tokens.tolist() == _generate(model, tiny.batch([16, 0, 1, 3, 2]), 10, 10, pad_token_id=tiny.pad).tolist()
    )
    assert len(decoder.capture_seconds) == 1  # one batch size: one decode-step capture
    # the prefill's language model: captured at the second prompt of a shape (the first two calls),
    # not for a shape seen once (the third)
    assert len(decoder.language_graphs.capture_seconds) == 1 and _ReplayedStep.captures == 2
    assert "captured the decode step as a CUDA graph (batch 5, cache 128 tokens)" in caplog.text
    tags = generation_tags(decoder)
    assert tags["firstsight.generation"] == "static_cuda_graph" and float(tags["firstsight.generation.capture_s"]) > 0


def test_a_graph_that_disagrees_with_the_eager_step_is_not_used(tiny, monkeypatch, caplog):
    from firstsight.inference.generation import GreedyDecoder

    _fake_capture(monkeypatch, broken=True)
    model = tiny.model("student")
    decoder = GreedyDecoder(model, "static", cuda_graphs=True)
    batch = tiny.batch([0, 1])
    with caplog.at_level(logging.WARNING, logger="firstsight.inference.generation"):
        got = decoder.generate(batch, 6, 6, pad_token_id=tiny.pad)
    assert got.method == "static_eager" and "disagrees with the step run eagerly" in caplog.text
    assert got.tokens.tolist() == _generate(model, batch, 6, 6, pad_token_id=tiny.pad).tolist()


def test_static_compile_captures_the_compiled_step_or_else_the_plain_one(tiny, monkeypatch, caplog):
    import firstsight.inference.compiled_prefill as compiled_prefill
    import firstsight.inference.generation as generation
    from firstsight.inference.generation import GreedyDecoder, generation_tags

    _fake_capture(monkeypatch)
    compiled_calls = []

    def compiled(model, options=None):  # stands in for torch.compile(model): counts the calls the captured step makes
        def forward(**kwargs):
            compiled_calls.append(1)
            return model(**kwargs)

        return forward

    monkeypatch.setattr(generation, "_compiled_forward", compiled)
    vision_compiled = []  # the prefill's blocks: compiled once per model (here: not, on the CPU)
    monkeypatch.setattr(compiled_prefill, "compile_prefill_blocks", lambda model: vision_compiled.append(model) or 0)
    model = tiny.model("teacher")
    batch = tiny.batch(PAD_ROWS)
    expected = _generate(model, batch, 8, 8, pad_token_id=tiny.pad).tolist()
    decoder = GreedyDecoder(model, "static_compile", cuda_graphs=True)
    with caplog.at_level(logging.INFO, logger="firstsight.inference.generation"):
        got = decoder.generate(batch, 8, 8, pad_token_id=tiny.pad)
    assert got.method == "static_compiled_cuda_graph" and got.tokens.tolist() == expected
    # the compile is announced before it starts (it prints nothing for minutes on a GPU)
    announced = caplog.text.index("compiling the decode step for batch 5")
    assert announced < caplog.text.index("captured the torch.compile'd decode step as a CUDA graph (batch 5")
    # warm-up, the check (one replay, one eager step), then 7 replays: every step ran the compiled forward
    assert len(compiled_calls) == cuda_graphs.WARMUP_STEPS + 2 + 7
    assert vision_compiled == [model]
    GreedyDecoder(model, "static", cuda_graphs=True).generate(batch, 2, 2, pad_token_id=tiny.pad)
    assert vision_compiled == [model]  # static: the prefill is not compiled

    def compile_fails(model, options=None):
        raise RuntimeError("inductor: no C++ compiler")

    monkeypatch.setattr(generation, "_compiled_forward", compile_fails)
    decoder = GreedyDecoder(model, "static_compile", cuda_graphs=True)
    with caplog.at_level(logging.WARNING, logger="firstsight.inference.generation"):
        got = decoder.generate(batch, 8, 8, pad_token_id=tiny.pad)
    assert got.method == "static_cuda_graph" and got.tokens.tolist() == expected
    assert "capturing the torch.compile'd decode step failed (RuntimeError: inductor" in caplog.text
    assert generation_tags(decoder)["firstsight.generation.fallback"].startswith("torch.compile: RuntimeError")


def test_prefill_blocks_that_fail_to_compile_are_uncompiled_and_the_prefill_runs_again(tiny, monkeypatch, caplog):
    """static_compile where graphs are used: a compiler error surfaces in the first prefill through
    the compiled blocks; the blocks run eagerly from then on, the answer is generate's."""
    import firstsight.inference.compiled_prefill as compiled_prefill
    import firstsight.inference.generation as generation
    from firstsight.inference.generation import GreedyDecoder, generation_tags

    _fake_capture(monkeypatch)
    monkeypatch.setattr(generation, "_compiled_forward", lambda model, options=None: model)

    def compile_fails(model):  # stands in for torch.compile: the error comes on the first call
        def broken(*args, **kwargs):
            raise RuntimeError("inductor: CppCompileError")

        for block in model.model.visual.blocks:
            block._compiled_call_impl = broken
        return len(model.model.visual.blocks)

    monkeypatch.setattr(compiled_prefill, "compile_prefill_blocks", compile_fails)
    model = tiny.model("student")
    batch = tiny.batch(PAD_ROWS)
    expected = _generate(model, batch, 6, 6, pad_token_id=tiny.pad).tolist()
    decoder = GreedyDecoder(model, "static_compile", cuda_graphs=True)
    with caplog.at_level(logging.WARNING, logger="firstsight.inference.generation"):
        first = decoder.generate(batch, 6, 6, pad_token_id=tiny.pad)
        again = decoder.generate(batch, 6, 6, pad_token_id=tiny.pad)
    assert first.tokens.tolist() == again.tokens.tolist() == expected
    assert caplog.text.count("the compiled prefill blocks failed (RuntimeError: inductor: CppCompileError)") == 1
    assert all(block._compiled_call_impl is None for block in model.model.visual.blocks)
    assert "compiled prefill blocks: RuntimeError" in generation_tags(decoder)["firstsight.generation.fallback"]


def test_static_compile_runs_the_language_models_compiled_regions_in_the_prefill_only(tiny, monkeypatch):
    """The language model's norms and MLPs run their compiled forwards while the prefill runs (each
    once per prefill), never in the decode steps (compiled whole) nor after; a decoder told not to
    (compile_language_prefill=False, the benchmarks' comparison) runs them as they are."""
    import firstsight.inference.compiled_prefill as compiled_prefill
    import firstsight.inference.generation as generation
    from firstsight.inference.compiled_prefill import language_regions
    from firstsight.inference.generation import GreedyDecoder

    _fake_capture(monkeypatch)
    monkeypatch.setattr(generation, "_compiled_forward", lambda model, options=None: model)
    calls = []

    def counting(model):  # stands in for compile_prefill_blocks: "compiled" forwards that count their calls
        regions = language_regions(model)
        for region in regions:
            own = type(region).forward.__get__(region)
            setattr(region, compiled_prefill._COMPILED, lambda *a, own=own, **k: calls.append(1) or own(*a, **k))
        return len(regions)

    monkeypatch.setattr(compiled_prefill, "compile_prefill_blocks", counting)
    model = tiny.model("student")
    regions = language_regions(model)
    batch = tiny.batch(PAD_ROWS)
    expected = _generate(model, batch, 6, 6, pad_token_id=tiny.pad).tolist()
    decoder = GreedyDecoder(model, "static_compile", cuda_graphs=True)
    assert decoder.generate(batch, 6, 6, pad_token_id=tiny.pad).tokens.tolist() == expected
    assert len(calls) == len(regions) > 0  # one prefill (eager: a shape's first), none in the 5 decode steps
    assert all("forward" not in vars(region) for region in regions)  # switched off again
    plain = GreedyDecoder(model, "static_compile", cuda_graphs=True)
    plain.compile_language_prefill = False
    assert plain.generate(batch, 6, 6, pad_token_id=tiny.pad).tokens.tolist() == expected
    assert len(calls) == len(regions)


def _assert_follows_up_to_near_ties(got, reference, tolerance):
    """`got`'s logits within `tolerance` of `reference`'s at every step of every row until their
    tokens part, and they part only at a near-tie: the two picks' reference logits within 2 x tolerance."""
    import torch

    for row in range(reference.tokens.shape[0]):
        for step in range(reference.tokens.shape[1]):
            ref = reference.logits[step, row].float()
            torch.testing.assert_close(got.logits[step, row].float(), ref, rtol=0, atol=tolerance)
            mine, theirs = int(got.tokens[row, step]), int(reference.tokens[row, step])
            if mine != theirs:  # raw logits: a suppressed end token may top both, so compare the two picks
                assert abs(ref[theirs] - ref[mine]) < 2 * tolerance, (row, step, mine, theirs, ref[mine], ref[theirs])
                break


def test_static_compile_keeps_torchaos_products_out_of_the_compiled_prefill(tiny, monkeypatch, caplog):
    """With torchao's weights (precision=int8_weight_only) static_compile compiles the prefill's vision
    blocks and norms, but each quantized product stays torchao's eager one (compiled, inductor made
    the int8 student's batch-1 prefill 1.43 s instead of 22 ms on an H200) and the language
    model's MLPs stay uncompiled. Really compiled (inductor on the CPU): the same tokens as generate,
    and the products ran outside the compiled graphs."""
    import torch
    from torch._dynamo.utils import counters

    import firstsight.inference.generation as generation
    from firstsight.inference.compiled_prefill import _COMPILED, _EAGER, language_regions, subclass_linears
    from firstsight.inference.generation import GreedyDecoder, subclass_weights
    from firstsight.models.loading import load_model

    _fake_capture(monkeypatch)
    monkeypatch.setattr(generation, "_compiled_forward", lambda model, options=None: model)
    int8 = load_model(
        model_spec(compose(["task=profile", "precision=int8_weight_only"])),
        "student",
        tiny.processor,
        "cpu",
        frozen=True,
    ).model
    assert subclass_weights(int8) and not subclass_weights(tiny.model("student"))
    blocks = list(int8.model.visual.blocks)
    products = [linear for block in blocks for linear in subclass_linears(block)]
    assert len(products) == 4 * len(blocks)  # q/k/v, the attention's output, the MLP's two
    weight_class = type(products[0].weight)
    assert all(type(linear.weight) is weight_class for linear in products)
    original = weight_class.__torch_function__.__func__
    eager_calls = []  # per quantized product: whether the compiler was tracing it

    def recording(cls, func, types, args=(), kwargs=None):
        eager_calls.append(torch.compiler.is_compiling())
        return original(cls, func, types, args, kwargs or {})

    monkeypatch.setattr(weight_class, "__torch_function__", classmethod(recording))
    batch = tiny.batch(PAD_ROWS)
    expected = GreedyDecoder(int8, "hf").generate(batch, 4, 4, pad_token_id=tiny.pad, record_logits=True)
    decoder = GreedyDecoder(int8, "static_compile", cuda_graphs=True)
    captured = counters["stats"]["calls_captured"]
    eager_calls.clear()
    with caplog.at_level(logging.INFO, logger="firstsight.inference.generation"):
        for _ in range(2):
            got = decoder.generate(batch, 4, 4, pad_token_id=tiny.pad, record_logits=True)
    assert got.method == "static_compiled_cuda_graph" and decoder.prefill_compile_off is None
    _assert_follows_up_to_near_ties(got, expected, tolerance=0.05)  # bf16 products: compiled norms and MLPs round apart
    assert counters["stats"]["calls_captured"] > captured  # the vision blocks and norms did compile
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert all(_EAGER in vars(linear) for linear in products)
    assert eager_calls and not any(eager_calls)  # every quantized product ran outside the compiler
    regions = language_regions(int8)
    assert all((_COMPILED in vars(region)) == (not subclass_linears(region)) for region in regions)
    assert any(_COMPILED in vars(region) for region in regions) and not all(_COMPILED in vars(r) for r in regions)
    assert caplog.text.count("torchao-quantized weights: the compiled prefill runs their products") == 1


def test_static_compile_runs_the_vision_attention_outside_the_compiled_blocks(tiny, monkeypatch):
    """static_compile compiles the prefill's vision blocks, but their attention over the frames runs
    eagerly, each block's graph broken around it: compiled (an H100, torch 2.11) it attended over
    all frames of the batch at once, and the teacher's answer to the first question of PAD_ROWS
    became exactly what attention across frames gives (tests/gpu/test_gpu_decoding.py). Really
    compiled (inductor on the CPU): the blocks ran compiled, every SDPA call over the frames outside
    the compiler, and the tokens are generate's."""
    import torch
    from torch._dynamo.utils import counters

    import firstsight.inference.generation as generation
    from firstsight.inference.generation import GreedyDecoder
    from firstsight.models.vision_attention import EAGER_UNDER_COMPILE

    _fake_capture(monkeypatch)
    monkeypatch.setattr(generation, "_compiled_forward", lambda model, options=None: model)  # the decode step: plain
    model = tiny.model("teacher")
    batch = tiny.batch(PAD_ROWS)
    expected = _generate(model, batch, 4, 4, pad_token_id=tiny.pad).tolist()
    frames = int(batch["image_grid_thw"][:, 0].sum())
    patches = int(batch["image_grid_thw"][0].prod())
    sdpa = torch.nn.functional.scaled_dot_product_attention
    over_frames = []  # per SDPA call over the frames: whether the compiler was tracing it

    def recording(query, *args, **kwargs):
        if query.dim() == 4 and tuple(query.shape[::2]) == (frames, patches):
            over_frames.append(torch.compiler.is_compiling())
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    captured = counters["stats"]["calls_captured"]
    decoder = GreedyDecoder(model, "static_compile", cuda_graphs=True)
    got = decoder.generate(batch, 4, 4, pad_token_id=tiny.pad)
    assert got.method == "static_compiled_cuda_graph" and decoder.prefill_compile_off is None
    assert got.tokens.tolist() == expected
    blocks = list(model.model.visual.blocks)
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert counters["stats"]["calls_captured"] > captured  # the blocks (and norms) did compile
    assert len(over_frames) == len(blocks) and not any(over_frames), over_frames  # one call per block, none traced
    assert all(vars(block.attn)[EAGER_UNDER_COMPILE] for block in blocks)


def test_the_compiled_step_is_kept_per_model_and_inductor_options(tiny, monkeypatch):
    """static_compile compiles with generation.COMPILE_OPTIONS unless a decoder names others; one
    compiled forward per model and options (torch.compile is lazy: nothing compiles here)."""
    import torch
    import torch._inductor.config as inductor

    from firstsight.inference.generation import COMPILE_OPTIONS, _compiled_forward

    calls, compile_ = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or compile_(model, **kwargs))
    model = tiny.model("student")
    tuned = _compiled_forward(model)
    assert calls == [{"dynamic": False, "fullgraph": False, "options": COMPILE_OPTIONS}]
    # inductor's own settings, each of its type: a misspelt one would fail only when a GPU compiles
    assert COMPILE_OPTIONS and all(type(getattr(inductor, k)) is type(v) for k, v in COMPILE_OPTIONS.items())
    assert _compiled_forward(model, dict(COMPILE_OPTIONS)) is tuned
    plain = _compiled_forward(model, {})
    assert plain is not tuned and _compiled_forward(model, {}) is plain


def test_static_caches_are_kept_per_batch_size_and_reused(tiny):
    from firstsight.inference.generation import CACHE_ROUNDING, decoder_for

    model = tiny.model("student")
    decoder = decoder_for(model)
    assert decoder_for(model) is decoder and decoder_for(model, "hf") is not decoder
    decoder.reserve(2, 40, 8)  # before any call, as profile does: later calls fit in it
    (entry,) = decoder._entries.values()
    assert entry.cache_len == CACHE_ROUNDING  # 48 rounded up
    decoder.generate(tiny.batch([0, 3]), 8, 8, pad_token_id=tiny.pad)  # 38 + 8 tokens
    decoder.generate(tiny.batch([16, 0]), 8, 8, pad_token_id=tiny.pad)
    assert list(decoder._entries.values()) == [entry]  # the same cache, reset and refilled
    decoder.generate(tiny.batch([MOVED, 0]), 8, 8, pad_token_id=tiny.pad)  # 73 + 8: a longer one replaces it
    (longer,) = decoder._entries.values()
    assert longer is not entry and longer.cache_len == 2 * CACHE_ROUNDING
    again = decoder.generate(tiny.batch([0, 3]), 8, 8, pad_token_id=tiny.pad)  # a shorter prompt fits in it
    assert list(decoder._entries.values()) == [longer]
    assert again.tokens.tolist() == _generate(model, tiny.batch([0, 3]), 8, 8, pad_token_id=tiny.pad).tolist()
    decoder.generate(tiny.batch([0]), 8, 8, pad_token_id=tiny.pad)  # another batch size: its own cache
    assert len(decoder._entries) == 2


def test_the_method_is_a_config_choice_and_an_unknown_one_is_refused(tiny):
    from hydra.errors import ConfigCompositionException

    from firstsight.inference.generation import decoder_for

    assert compose().hardware.generation.value == "static"  # the default
    method = compose(["hardware.generation=static_compile"]).hardware.generation
    model = tiny.model("student")
    assert decoder_for(model, method).tag == "static_eager"  # compiling is for captured steps: not on the CPU
    with pytest.raises(ConfigCompositionException, match="generation"):
        compose(["hardware.generation=beam"])
