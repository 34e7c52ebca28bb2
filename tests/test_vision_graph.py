"""The prefill's vision encoder graph (firstsight/vision_graph.py) on what a CPU can check: the
encoder run with the grid's tensors precomputed (the form a CUDA graph captures) returns what it
returns computing them itself, and the hook really takes them; off CUDA nothing is captured. The
capture itself is measured on a GPU (benchmarks/generation.py: static's logits against generate's)."""

from __future__ import annotations

import pytest
import torch

from conftest import compose
from firstsight.vision_graph import VisionGraphs, precomputed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def student_and_batch(cache_dir):
    from firstsight.data import load_split
    from firstsight.data.batching import PromptCollator
    from firstsight.models import load_model, load_processor

    cfg = compose()
    processor = load_processor(cfg)
    samples = load_split(cfg.data, "validation", cfg.seed)
    two_frames = next(s for s in samples if len(s.images) == 2)
    batch = PromptCollator(processor)([two_frames, samples[0]])
    return load_model(cfg, "student", processor, "cpu", frozen=True).model, batch


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
