"""static_compile's compiled prefill (firstsight/inference/compiled_prefill.py): which blocks and regions it
compiles, once per model; the language model's regions run compiled only inside
language_regions_compiled, and compute what the eager ones compute; the patch embedding as a
matrix product equals the Conv3d."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def student_batch(tiny_parts):
    """A left-padded batch of four validation questions (frames included), as the decoder gets it."""
    from firstsight.data.batching import PromptCollator

    split = tiny_parts.split("validation")
    return PromptCollator(tiny_parts.processor)([split[i] for i in range(4)])


def _student(tiny_parts, dtype="float32"):
    import torch

    return tiny_parts.model("student").to(getattr(torch, dtype))


def test_compile_prefill_blocks_compiles_each_block_and_region_once(tiny_parts):
    import torch

    from firstsight.inference.compiled_prefill import (
        _COMPILED,
        compile_prefill_blocks,
        language_regions,
        language_regions_compiled,
        uncompile_prefill_blocks,
    )
    from firstsight.models.vision_attention import EAGER_UNDER_COMPILE

    model = _student(tiny_parts)
    blocks = list(model.model.visual.blocks)
    language = model.model.language_model
    regions = language_regions(model)
    assert len(regions) == 3 * len(language.layers) + 1 and regions[-1] is language.norm
    assert regions[2] is language.layers[0].mlp
    assert compile_prefill_blocks(model) == len(blocks) + len(regions) > 0  # lazy: nothing compiles until used
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert all(vars(block.attn)[EAGER_UNDER_COMPILE] for block in blocks)  # their attention call runs eagerly
    # the language model's regions keep their own forward outside the prefill (the decode step is compiled whole)
    assert all("forward" not in vars(region) and region._compiled_call_impl is None for region in regions)
    assert all(getattr(layer, "_compiled_call_impl", None) is None for layer in language.layers)
    with language_regions_compiled(model) as switched:
        assert switched == len(regions)
        assert all(vars(region)["forward"] is vars(region)[_COMPILED] for region in regions)
    assert all("forward" not in vars(region) for region in regions)
    assert compile_prefill_blocks(model) == 0  # once per model
    assert compile_prefill_blocks(torch.nn.Linear(2, 2)) == 0  # no vision encoder, no language model
    assert language_regions(torch.nn.Linear(2, 2)) == []
    assert "forward" in vars(model.model.visual.patch_embed)  # the patch embedding as a matrix product
    uncompile_prefill_blocks(model)
    assert all(block._compiled_call_impl is None for block in blocks)
    assert not any(EAGER_UNDER_COMPILE in vars(block.attn) for block in blocks)
    assert "forward" not in vars(model.model.visual.patch_embed)
    with language_regions_compiled(model) as switched:
        assert switched == 0


def test_the_compiled_language_regions_compute_the_eager_prefill(tiny_parts, student_batch):
    """Really compiled (inductor on the CPU): the language model's prefill with its norms and MLPs
    compiled gives the eager logits to fp32 rounding, at two prompt shapes (the second one compiled
    with dynamic batch and length), and the regions ran through the compiler."""
    import torch
    from torch._dynamo.utils import counters

    from firstsight.inference.compiled_prefill import compile_prefill_blocks, language_regions_compiled

    model = _student(tiny_parts)
    language = model.model.language_model
    compile_prefill_blocks(model)
    torch.manual_seed(0)
    for shape in ((4, 37), (3, 21)):
        embeds = torch.randn(*shape, language.config.hidden_size)
        with torch.no_grad():
            eager = language(inputs_embeds=embeds).last_hidden_state
            captured = counters["stats"]["calls_captured"]
            with language_regions_compiled(model):
                compiled = language(inputs_embeds=embeds).last_hidden_state
        if shape == (4, 37):  # the first shape: compiled now
            assert counters["stats"]["calls_captured"] > captured
        assert compiled.shape == eager.shape
        assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5), float((compiled - eager).abs().max())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_patch_embedding_as_a_matrix_product_equals_the_conv(tiny_parts, student_batch, dtype):
    """patch_embed_as_matmul: the same sums of products as the Conv3d (fp32: to rounding; bf16: to
    bf16 rounding of the output), switched on and off in place; a conv whose kernel is not its
    stride is left alone."""
    import torch

    from firstsight.inference.compiled_prefill import patch_embed_as_matmul

    model = _student(tiny_parts, dtype)
    embed = model.model.visual.patch_embed
    pixels = student_batch["pixel_values"]
    with torch.no_grad():
        conv = embed(pixels)
        assert patch_embed_as_matmul(model, True)
        product = embed(pixels)
        assert patch_embed_as_matmul(model, False)
        assert torch.equal(embed(pixels), conv)
    assert product.shape == conv.shape and product.dtype == conv.dtype
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    assert float((product.float() - conv.float()).norm() / conv.float().norm()) < tolerance
    overlapping = torch.nn.Conv3d(3, 4, kernel_size=(2, 2, 2), stride=(1, 2, 2), bias=False)
    embed.proj, saved = overlapping, embed.proj
    try:
        assert not patch_embed_as_matmul(model, True) and "forward" not in vars(embed)
    finally:
        embed.proj = saved
