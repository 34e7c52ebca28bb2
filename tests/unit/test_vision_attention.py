"""hardware.batched_vision_attention: Qwen2-VL's vision encoder attends over all frames of one size
in a single SDPA call (firstsight/models/vision_attention.py) and computes what one call per frame
computes, forward and backward; frames of different sizes fall back to one call per frame."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

from firstsight.config.specs import model_spec
from firstsight.models.vision_attention import NAME, batch_frames, plain_config, unbatch_frames

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EQUAL = [[1, 4, 4], [1, 4, 4], [2, 4, 4]]  # three images, one of two temporal frames: four 16-patch frames
MIXED = [[1, 4, 4], [1, 6, 4]]  # 16 and 24 patches


@pytest.fixture(scope="module")
def student(cache_dir):
    from firstsight.models.loading import load_model, load_processor

    cfg = compose(["hardware.batched_vision_attention=false"])
    model = load_model(
        model_spec(cfg), "student", load_processor(cfg.model, cfg.cache_dir), "cpu", frozen=False
    ).model.float()
    assert model.config.vision_config._attn_implementation == "sdpa"
    return model


def _encode(model, grids, batched):
    """The vision encoder's merged output and the gradient of its sum w.r.t. the patches, and how
    many SDPA calls it made."""
    (batch_frames if batched else unbatch_frames)(model)
    config = model.config.vision_config
    assert config._attn_implementation == (NAME if batched else "sdpa")
    grid = torch.tensor(grids)
    dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
    patches = torch.randn(int(grid.prod(-1).sum()), dim, generator=torch.Generator().manual_seed(0), requires_grad=True)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = counted
    try:
        out = model.model.visual(patches, grid_thw=grid).pooler_output
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        unbatch_frames(model)
    out.sum().backward()
    return out.detach(), patches.grad, len(calls)


@pytest.mark.parametrize("grids, frames", [(EQUAL, 4), (MIXED, 2)], ids=["equal frames", "mixed sizes"])
def test_batched_vision_attention_computes_the_per_frame_attention(student, grids, frames):
    blocks = len(student.model.visual.blocks)
    ref, ref_grad, ref_calls = _encode(student, grids, batched=False)
    got, got_grad, got_calls = _encode(student, grids, batched=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert ref_calls == blocks * frames  # transformers: one call per frame in every block
    assert got_calls == (blocks if grids is EQUAL else blocks * frames)  # one per block when the frames match


def test_on_by_default_for_the_vision_encoder_only_and_not_saved(cache_dir, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    from firstsight.models.loading import load_model, load_processor

    cfg = compose()
    assert cfg.hardware.batched_vision_attention is True
    model = load_model(model_spec(cfg), "student", load_processor(cfg.model, cfg.cache_dir), "cpu", frozen=True).model
    assert model.config.vision_config._attn_implementation == NAME
    assert model.config.text_config._attn_implementation != NAME  # the language model has its own
    model.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()  # a saved student loads anywhere
    reloaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert reloaded.config.vision_config._attn_implementation == "sdpa"
    assert not batch_frames(torch.nn.Linear(2, 2))  # not a Qwen2-VL model: nothing to switch
    # another model built from the live config (FSDP's gathered copy) needs the plain one: transformers
    # takes the name for a flash-attn kernel to import
    with pytest.raises(ValueError, match="flash attention"):
        Qwen2VLForConditionalGeneration._from_config(model.config)
    with plain_config(model) as config:
        assert config.vision_config._attn_implementation == "sdpa"
        copy = Qwen2VLForConditionalGeneration._from_config(config)
    assert isinstance(copy, Qwen2VLForConditionalGeneration)
    assert model.config.vision_config._attn_implementation == NAME  # switched back after the block
