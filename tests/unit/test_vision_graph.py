"""The prefill's vision encoder graph (firstsight/inference/vision_graph.py) on what a CPU can check: the
encoder run with the grid's tensors precomputed (the form a CUDA graph captures) returns what it
returns computing them itself, and the hook really takes them; off CUDA nothing is captured. The
capture itself is measured on a GPU (benchmarks/generation.py: static's logits against generate's)."""

from __future__ import annotations

import pytest
import torch

from firstsight.inference.vision_graph import VisionGraphs, precomputed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def student_and_batch(tiny_parts):
    from firstsight.data.batching import PromptCollator

    samples = tiny_parts.split("validation")
    two_frames = next(s for s in samples if len(s.images) == 2)
    batch = PromptCollator(tiny_parts.processor)([two_frames, samples[0]])
    return tiny_parts.model("student"), batch


def test_precomputed_grid_tensors_give_the_encoders_own_output(student_and_batch):
    model, batch = student_and_batch
    visual = model.model.visual
    pixels, grid = batch["pixel_values"].to(visual.dtype), batch["image_grid_thw"]
    assert grid.shape[0] == 3  # three frames, two of them in one row
    with torch.no_grad():
        own = visual(pixels, grid_thw=grid).pooler_output
        given = precomputed(visual, grid, pixels.device)
        assert given["cu_seqlens"].device.type == "cpu"  # read without a device synchronisation
        taken = visual(pixels, grid_thw=grid, **dict(given)).pooler_output
        assert torch.equal(taken, own)
        # the hook is used: other positions give another output
        wrong = dict(given, position_ids=given["position_ids"].flip(0))
        assert not torch.allclose(visual(pixels, grid_thw=grid, **wrong).pooler_output, own)


def test_off_cuda_nothing_is_captured(student_and_batch):
    model, batch = student_and_batch
    graphs = VisionGraphs()
    forward = model.model.visual.forward
    with graphs.serving(model, batch):
        assert model.model.visual.forward == forward
    assert graphs.capture_seconds == [] and graphs.off is None


def test_the_profile_captures_every_prefill_graph_before_timing(tiny_parts):
    """profile._prepare_decoder reserves the static caches first, then hands the decoder every
    single query and every batch a prefill graph may serve (its frames fit a vision graph, or its
    tokens a language-model graph), as `take` will collate them, so no timed query pays a capture."""
    from firstsight.data.batching import PromptCollator
    from firstsight.inference.prefill import LanguageGraphs
    from firstsight.tasks.profile import _prepare_decoder

    collate = PromptCollator(tiny_parts.processor)
    queries = tiny_parts.split("validation")

    class Recorder:
        tag = "static_cuda_graph"

        def __init__(self, max_patches, max_tokens):
            self.vision_graphs = VisionGraphs(max_patches=max_patches)
            self.language_graphs = LanguageGraphs(max_tokens=max_tokens)
            self.calls = []

        def reserve(self, size, length, new_tokens):
            self.calls.append(("reserve", size))

        def prefill_graphs(self):
            return True

        def reserve_prefill(self, batch, new_tokens):
            assert new_tokens == 4
            self.calls.append(("prefill", batch["input_ids"].shape[0]))

    patches_per_frame = collate([queries[0]])["pixel_values"].shape[0]
    decoder = Recorder(max_patches=2 * patches_per_frame, max_tokens=0)  # batches of 2 single frames fit, of 3 do not
    _prepare_decoder(decoder, queries, collate, single=4, batched=2, batch_size=2, new_tokens=4)
    frames = [len(queries[i].images) for i in range(4, 8)]
    fitting = sum(1 for b in range(2) if sum(frames[2 * b : 2 * b + 2]) <= 2)
    assert decoder.calls == [("reserve", 1), ("reserve", 2)] + [("prefill", 1)] * 4 + [("prefill", 2)] * fitting
    assert 1 <= fitting < 2  # the check is not vacuous
    longest = max(collate([queries[i]])["input_ids"].shape[1] for i in range(4, 8))
    decoder = Recorder(max_patches=0, max_tokens=2 * longest)  # every batch fits a language-model graph
    _prepare_decoder(decoder, queries, collate, single=4, batched=2, batch_size=2, new_tokens=4)
    assert decoder.calls == [("reserve", 1), ("reserve", 2)] + [("prefill", 1)] * 4 + [("prefill", 2)] * 2
